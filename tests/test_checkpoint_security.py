"""Checkpoints and run directories someone else may have written or may be using: loading never runs code,
names never leave their directory, every file is vouched for, and nothing fmforge did not make is replaced."""

import fcntl
import json
import os
import pickle
import shutil

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import tiny_overrides
from torch.distributed.checkpoint.state_dict import get_state_dict

from fmforge.config import build_config
from fmforge.errors import FmforgeError
from fmforge.io.fs import download_dir, sha256_file
from fmforge.io.paths import UnsafePath, confined, relative_name
from fmforge.train import checkpoint as ckpt
from fmforge.train import mirror
from fmforge.train.checkpoint import CorruptCheckpoint, export_consolidated, verify_checkpoint
from fmforge.train.distributed import DistInfo
from fmforge.train.loop import train
from fmforge.train.rundir import LOCK

ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"))


class _Payload:
    """Unpickling this creates ``path``: the stand-in for any code an attacker would run."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _train(prepared, out, resume=None, **extra):
    messages = []
    train(build_config({}, tiny_overrides(prepared, out, **extra)), resume=resume, echo=messages.append)
    return messages


def _reseal(path):
    """Rewrite meta.json's checksums for the files now present, as an attacker who writes both would."""
    meta = json.loads((path / "meta.json").read_text())
    meta["files"] = {p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.name != "meta.json"}
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt_security") / "run"
    _train(prepared, out, **{"train.max_steps": 10, "train.eval_interval": 0})
    return out


@pytest.fixture
def copy(run, tmp_path):
    dst = tmp_path / "checkpoints" / "step_0000010"
    shutil.copytree(run / "checkpoints" / "step_0000010", dst)
    return dst


def test_a_pickle_payload_in_dcp_metadata_is_refused_without_running(copy, tmp_path):
    marker = tmp_path / "pwned"
    (copy / ".metadata").write_bytes(pickle.dumps(_Payload(marker)))
    _reseal(copy)
    with pytest.raises(CorruptCheckpoint, match="not checkpoint metadata"):
        export_consolidated(copy, tmp_path / "export")
    assert not marker.exists()
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_a_pickle_payload_in_a_non_tensor_item_is_refused_on_resume(copy, tmp_path):
    marker = tmp_path / "pwned"
    model = torch.nn.Linear(2, 2)
    optim = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optim.step()
    msd, osd = get_state_dict(model, optim)
    osd["param_groups"][0]["lr"] = _Payload(marker)  # DCP stores non-tensor items with torch.save
    forged = tmp_path / "forged" / "step_0000010"
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(forged))
    for name in ("train_state.pt", "rng_0.pt", "meta.json"):
        shutil.copy(copy / name, forged / name)
    _reseal(forged)
    fresh = torch.nn.Linear(2, 2)
    with pytest.raises(CorruptCheckpoint, match="not plain data"):
        ckpt.load_checkpoint(forged, fresh, torch.optim.AdamW(fresh.parameters()), ONE_PROCESS)
    assert not marker.exists()


def test_a_file_meta_json_does_not_list_is_refused(copy):
    (copy / "extra.pt").write_bytes(b"unvouched")
    with pytest.raises(CorruptCheckpoint, match="does not list"):
        verify_checkpoint(copy)


@pytest.mark.parametrize("name", ["../evil", "/etc/passwd", "a/../../b", "", "x\nstep", 7])
def test_meta_json_names_outside_the_checkpoint_are_refused(copy, name):
    meta = json.loads((copy / "meta.json").read_text())
    meta["files"][name] = "0" * 64
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptCheckpoint):
        verify_checkpoint(copy)


def test_names_read_from_files_stay_inside_their_directory(tmp_path):
    assert relative_name("shards/a.bin", "x") == "shards/a.bin"
    for bad in ["..", "../a", "a//b", "/abs", "a\\b", "c:/x", "a\x00b", None, 3]:
        with pytest.raises(UnsafePath):
            relative_name(bad, "x")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "link").symlink_to(tmp_path)
    with pytest.raises(UnsafePath, match="symlink"):
        confined(tmp_path / "root", "link/secret", "x")


def test_remote_fetch_downloads_only_what_meta_json_lists_and_never_writes_outside(copy, tmp_path):
    fs = fsspec.filesystem("memory")
    root = "memory://bucket/escape-test"
    for p in copy.iterdir():
        fs.pipe_file(f"{root}/step_0000010/{p.name}", p.read_bytes())
    fs.pipe_file(f"{root}/step_0000010/extra/../../../../outside.txt", b"x")
    local = tmp_path / "local"
    path = mirror.fetch_checkpoint(root, "step_0000010", local)
    assert sorted(p.name for p in path.iterdir()) == sorted(p.name for p in copy.iterdir())
    assert not list(tmp_path.rglob("outside.txt"))
    meta = json.loads((copy / "meta.json").read_text())
    meta["files"]["../../outside2.txt"] = "0" * 64
    fs.pipe_file(f"{root}/step_0000020/meta.json", json.dumps({**meta, "step": 20}).encode())
    with pytest.raises(CorruptCheckpoint, match="outside2"):
        mirror.fetch_checkpoint(root, "step_0000020", local)
    assert not list(tmp_path.rglob("outside2.txt")) and not list(local.glob(".tmp_fetch_*"))


def test_downloading_a_prefix_refuses_keys_that_climb_out(tmp_path):
    fs = fsspec.filesystem("memory")
    fs.pipe_file("memory://bucket/dl/ok.txt", b"ok")
    fs.pipe_file("memory://bucket/dl/a/../../../escaped.txt", b"x")
    assert "a/../../../escaped.txt" in mirror.remote.find(fs, "memory://bucket/dl")  # kept verbatim
    with pytest.raises(UnsafePath):
        download_dir("memory://bucket/dl", tmp_path / "d")
    assert not list(tmp_path.rglob("escaped.txt"))


def test_a_mismatched_checkpoint_is_a_one_line_error(prepared, run, tmp_path):
    with pytest.raises(FmforgeError) as err:
        _train(prepared, tmp_path / "other", resume=str(run / "checkpoints" / "step_0000010"),
               **{"train.max_steps": 12, "model.size": "micro", "model.n_kv_head": 2})
    assert "does not fit" in str(err.value) and "\n" not in str(err.value) and "Traceback" not in str(err.value)


def test_a_run_directory_in_use_by_another_process_is_refused(prepared, run, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 4242 on node7\n")
    try:
        with pytest.raises(FmforgeError, match="in use by pid 4242 on node7"):
            _train(prepared, out, resume="auto", **{"train.max_steps": 2})
    finally:
        os.close(fd)
    assert not (out / "checkpoints").exists()
    _train(prepared, out, resume="auto", **{"train.max_steps": 2, "checkpoint.interval": 0})  # free again


def test_a_config_yaml_fmforge_did_not_write_is_never_overwritten(prepared, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.yaml").write_text("# my own notes\n")
    for resume in (None, "auto"):
        with pytest.raises(FmforgeError, match="not written by an fmforge run"):
            _train(prepared, out, resume=resume, **{"train.max_steps": 2})
    assert (out / "config.yaml").read_text() == "# my own notes\n"


def test_checkpoint_saves_remove_only_fmforge_temporaries(prepared, tmp_path):
    ckpts = tmp_path / "ckpts"
    (ckpts / ".tmp_user_notes").mkdir(parents=True)
    (ckpts / ".tmp_step_0000005").mkdir()
    _train(prepared, tmp_path / "run", **{"train.max_steps": 10, "checkpoint.dir": str(ckpts)})
    assert (ckpts / ".tmp_user_notes").is_dir() and not (ckpts / ".tmp_step_0000005").exists()


def test_export_does_not_replace_an_existing_model_without_overwrite(run, tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"someone else's")
    with pytest.raises(FmforgeError, match="--overwrite"):
        export_consolidated(run / "checkpoints" / "step_0000010", out)
    assert (out / "model.safetensors").read_bytes() == b"someone else's"
    export_consolidated(run / "checkpoints" / "step_0000010", out, overwrite=True)
    assert (out / "model.safetensors").stat().st_size > 1000
