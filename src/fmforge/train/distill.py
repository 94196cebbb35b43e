"""What ``fmforge distill`` adds to ``fmforge train``: a teacher (``distill.teacher``), required."""

from __future__ import annotations

from pathlib import Path

from fmforge.config import load_config
from fmforge.errors import FmforgeError
from fmforge.train.command import train_command


def _yaml_string(text: str) -> str:
    """``text`` as a single-quoted YAML scalar: an override value read back exactly (``run #2``, ``2024``)."""
    return "'" + text.replace("'", "''") + "'"


def distill_command(config: str, overrides: list[str], *, teacher: str | None = None, data: str | None = None,
                    out: str | None = None, resume: str | None = None, nproc_per_node: int = 1,
                    max_restarts: int = 0) -> None:
    """``fmforge distill``: ``fmforge train`` whose objective also matches a frozen teacher's outputs
    (``teacher`` sets distill.teacher, made absolute so config.yaml works from any directory). The student
    is the config's model (or ``finetune.base``); checkpoints, resume and torchrun work as for training."""
    if teacher:
        overrides = [*overrides, f"distill.teacher={_yaml_string(str(Path(teacher).resolve()))}"]
    if not load_config(config, overrides).distill.teacher:
        raise FmforgeError("fmforge distill needs a teacher: --teacher RUN_DIR (or distill.teacher in the config)")
    train_command(config, overrides, data=data, out=out, resume=resume, nproc_per_node=nproc_per_node,
                  max_restarts=max_restarts)
