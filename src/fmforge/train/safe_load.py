"""Reading a torch Distributed Checkpoint that someone else may have written, without running their code.

DCP's own reader unpickles ``.metadata`` with ``pickle.load`` and its default planner ``torch.load``s
non-tensor items with ``weights_only=False``: a planted ``__reduce__`` in either runs arbitrary code, and the
sha256 in ``meta.json`` does not help (whoever writes the checkpoint writes ``meta.json`` too). Here:

- ``.metadata`` goes through an unpickler that only knows the checkpoint-metadata dataclasses and enums of
  ``torch.distributed.checkpoint``, ``torch.Size``, torch dtypes and layouts, and paths;
- every storage entry must name a plain file inside the checkpoint directory, with no load transforms;
- non-tensor items (optimizer hyperparameters) load with ``weights_only=True`` (tensors already do).

Anything else is a ``CorruptCheckpoint``.
"""

from __future__ import annotations

import dataclasses
import enum
import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from fmforge.errors import FmforgeError
from fmforge.io.paths import UnsafePath, relative_name


class CorruptCheckpoint(FmforgeError):
    pass


_DCP_MODULES = (dcp_metadata, dcp_filesystem)
_PLAIN = {("pathlib", "PosixPath"): pathlib.PurePosixPath, ("pathlib", "WindowsPath"): pathlib.PureWindowsPath,
          ("pathlib", "PurePosixPath"): pathlib.PurePosixPath, ("collections", "OrderedDict"): dict,
          ("torch", "Size"): torch.Size}
_METADATA_LIMIT = 1 << 30  # bytes; a real one is ~1 KB per tensor


class _MetadataUnpickler(pickle.Unpickler):
    """``find_class`` is the only door through which a pickle reaches code: it opens for data types only."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN:
            return _PLAIN[(module, name)]
        for mod in _DCP_MODULES:
            if module == mod.__name__:
                obj = getattr(mod, name, None)
                if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                    return obj
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.serialization", "_get_layout"):
            return _layout
        raise pickle.UnpicklingError(f"{module}.{name} is not checkpoint metadata")


def _layout(name: object) -> torch.layout:
    layout = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(layout, torch.layout):
        raise pickle.UnpicklingError(f"{name!r} is not a torch layout")
    return layout


def read_metadata(path: pathlib.Path) -> Metadata:
    """The checkpoint's ``.metadata``, unpickled without running code and checked for confinement."""
    meta_file = path / ".metadata"
    if meta_file.stat().st_size > _METADATA_LIMIT:
        raise CorruptCheckpoint(f"checkpoint {path}: .metadata is larger than {_METADATA_LIMIT >> 20} MiB")
    try:
        with open(meta_file, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError, IndexError) as err:
        raise CorruptCheckpoint(f"checkpoint {path}: unreadable .metadata ({err})") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise CorruptCheckpoint(f"checkpoint {path}: .metadata is not a DCP Metadata object")
    for info in metadata.storage_data.values():
        if not isinstance(info, dcp_filesystem._StorageInfo):
            raise CorruptCheckpoint(f"checkpoint {path}: .metadata has a storage entry of type {type(info).__name__}")
        try:
            name = relative_name(info.relative_path, f"checkpoint {path}")
        except UnsafePath as err:
            raise CorruptCheckpoint(str(err)) from None
        if "/" in name or info.transform_descriptors:
            raise CorruptCheckpoint(f"checkpoint {path}: .metadata names {name!r} with transforms or a folder")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file reader with ``read_metadata`` replaced by the restricted one above."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if kwargs.get("rank") is not None:
            raise CorruptCheckpoint("per-rank DCP metadata is not supported")
        metadata = read_metadata(pathlib.Path(self.path))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner, reading non-tensor items with ``weights_only=True``."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            loaded = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as err:
            raise CorruptCheckpoint(f"checkpoint item {read_item.dest_index.fqn} is not plain data "
                                    f"({str(err).splitlines()[0][:200]})") from None
        if self.flatten_state_dict:  # as the parent does, with the safely loaded value
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded
