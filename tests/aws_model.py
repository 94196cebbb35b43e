"""botocore's service models as a test oracle for the AWS requests fmforge writes (``fmforge launch
sagemaker``, ``fmforge deploy sagemaker``): a client whose calls a ``botocore.stub.Stubber`` answers (its
parameters validated against the real model, nothing sent), and the model's constraints that botocore's
client-side validator leaves to the server."""

from __future__ import annotations

import re
from functools import cache

import pytest


@cache
def _session():
    """One botocore session: it loads each service model once (SageMaker's takes a second)."""
    return pytest.importorskip("botocore.session").get_session()


def stubbed_client(service: str):
    """A fresh client (a Stubber's responses belong to one client) with placeholder credentials."""
    return _session().create_client(service, region_name="us-east-1", aws_access_key_id="x",
                                    aws_secret_access_key="x")


def input_shape(service: str, operation: str):
    """The request shape of ``operation`` (``"CreateModel"``) in ``service``'s model."""
    return _session().get_service_model(service).operation_model(operation).input_shape


def _fullmatch(pattern: str, value: str) -> bool:
    try:
        import regex
    except ImportError:
        if "\\p{" in pattern:
            return True  # cannot check this one without `regex`
        return re.fullmatch(pattern, value) is not None
    return regex.fullmatch(pattern, value) is not None


def model_violations(shape, value, where: str = "") -> list[str]:
    """The constraints in the service model that botocore's client-side validator does not check (it checks
    required members, types and minimums): maximum lengths/values, patterns, enums."""
    meta, kind, out = shape.metadata, shape.type_name, []
    if kind == "structure":
        for key, item in value.items():
            out += model_violations(shape.members[key], item, f"{where}.{key}")
    elif kind == "list":
        if len(value) > meta.get("max", len(value)):
            out.append(f"{where}: {len(value)} items > {meta['max']}")
        for i, item in enumerate(value):
            out += model_violations(shape.member, item, f"{where}[{i}]")
    elif kind == "map":
        if len(value) > meta.get("max", len(value)):
            out.append(f"{where}: {len(value)} entries > {meta['max']}")
        for key, item in value.items():
            out += model_violations(shape.key, key, f"{where} key")
            out += model_violations(shape.value, item, f"{where}.{key}")
    elif kind == "string":
        if len(value) > meta.get("max", len(value)):
            out.append(f"{where}: {len(value)} chars > {meta['max']}")
        # fullmatch is stricter than the service for unanchored patterns, which is the safe side; `regex`
        # (a transformers dependency) understands the \p{L} classes some patterns use, `re` does not
        if "pattern" in meta and not _fullmatch(meta["pattern"], value):
            out.append(f"{where}: {value!r} does not match {meta['pattern']}")
        if shape.enum and value not in shape.enum:
            out.append(f"{where}: {value!r} not in enum")
    elif kind in ("integer", "long") and value > meta.get("max", value):
        out.append(f"{where}: {value} > {meta['max']}")
    return out
