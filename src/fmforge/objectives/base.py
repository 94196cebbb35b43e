"""The Task contract: what one objective supplies to the one training loop (``train/loop.py``).

A Task is built from the run config and the data directory. It resolves what depends on the data (the
vocabulary, the class count, the global batch's default) into ``model_cfg`` and ``global_batch`` without
touching the run config; ``resolved_config()`` returns the config the run records. The loop then calls, in
this order: ``make_loader`` → ``build_model`` (on the meta device) → ``flops_per_unit`` →
``batch_description`` → per micro-batch ``loss`` → periodically ``validate`` → ``save_pretrained``.

The loader a Task makes follows ``data.sampler.SampledLoader``: ``next_step()`` (this rank's micro-batches
of one global batch), ``micro_batch``, ``accum_steps``, ``global_batch``, ``world_size``,
``set_micro_batch``, ``state_dict`` / ``load_state_dict`` (exact resume).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn

from fmforge.config import Config
from fmforge.data.sampler import SampledLoader
from fmforge.data.tokenizer import load_tokenizer
from fmforge.errors import FmforgeError
from fmforge.runs import save_pretrained


def round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def block_params(stacks: list[nn.ModuleList]) -> int:
    """Parameters of these stacks of shared transformer blocks (the matmuls that run per token)."""
    return sum(p.numel() for blocks in stacks for p in blocks.parameters())


def encoder_flops(blocks: nn.ModuleList, tokens: int, n_layer: int, d_model: int) -> float:
    """Training FLOPs (forward + backward) of one sequence through a tower of shared blocks:
    6 · block weights · tokens + 12 · layers · width · tokens² (attention scores and their weighted sum,
    PaLM appendix B)."""
    return 6.0 * block_params([blocks]) * tokens + 12.0 * n_layer * d_model * tokens * tokens


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (no dropout) and no autograd inside, the model's previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


class Sums:
    """The one validation accumulator: metric totals over examples (``add(name, total, count)``), each
    divided by its own count in ``means()``. Counting per metric keeps averages right when the last
    batch is short or when a metric counts tokens and another sequences."""

    def __init__(self):
        self.totals: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, total: float, count: float) -> None:
        self.totals[name] = self.totals.get(name, 0.0) + float(total)
        self.counts[name] = self.counts.get(name, 0.0) + float(count)

    def means(self) -> dict[str, float]:
        return {name: total / max(self.counts[name], 1) for name, total in self.totals.items()}


def split_rows(make, what: str, data_dir: Path, echo):
    """(train rows, val rows or None): ``make(split)`` builds one split's rows; a split too small for a
    validation set is a warning, not an error."""
    train = make("train")
    try:
        return train, make("val")
    except FmforgeError:
        echo(f"warning: no validation: {data_dir} has too few {what} for finetune.val_fraction")
        return train, None


def finetune_rows(task: Task, rows_type, what: str):
    """(tokenizer, train rows, val rows or None) of a fine-tuning objective: the raw file at ``data.path``
    read as ``rows_type`` (``data/chat.py``, ``preferences.py``, ``labelled.py``) with the base model's
    tokenizer, split by content hash at ``finetune.val_fraction``. Sets ``task.tokenizer_dir``."""
    cfg, data_dir, echo = task.cfg, task.data_dir, task.echo
    task.tokenizer_dir, tok = base_tokenizer(cfg)
    seq_len, frac = cfg.data.seq_len, cfg.finetune.val_fraction
    train, val = split_rows(lambda split: rows_type(data_dir, tok, seq_len, split, frac, echo=echo), what,
                            data_dir, echo)
    return tok, train, val


def base_tokenizer(cfg: Config):
    """(directory, tokenizer) of ``finetune.base``, which the fine-tuning objectives need: their data is raw
    text (chats, preferences, labelled lines), tokenized at start-up with the base model's vocabulary."""
    if not cfg.finetune.base:
        raise FmforgeError(f"finetune.task={cfg.finetune.task} fine-tunes a model: set finetune.base (or pass --base)")
    return Path(cfg.finetune.base), load_tokenizer(Path(cfg.finetune.base) / "tokenizer.json")


class Task(ABC):
    """One objective. ``unit`` is what throughput counts ("tokens" or "samples"); ``global_batch`` how many
    of those one optimizer step consumes; ``model_cfg`` the model config resolved against the data."""

    unit = "tokens"  # or "samples": metrics.jsonl logs tokens_per_s or samples_per_s
    tokenizer_dir: Path | None = None  # the tokenizer files the final weights ship with

    def __init__(self, cfg: Config, data_dir: Path, echo):
        self.cfg, self.data_dir, self.echo = cfg, data_dir, echo
        self.model_cfg = cfg.model
        self.global_batch = 0

    def resolved_config(self) -> Config:
        """The run config with what this task derived from the data filled in (a new object)."""
        train = self.cfg.train.model_copy(update={"global_batch": self.global_batch})
        return self.cfg.model_copy(update={"model": self.model_cfg, "train": train})

    # The loop calls these, in this order.
    @abstractmethod
    def make_loader(self, micro_batch: int, rank: int, world_size: int) -> SampledLoader:
        ...

    @abstractmethod
    def build_model(self) -> nn.Module:
        ...

    @abstractmethod
    def flops_per_unit(self, model: nn.Module) -> float:
        ...

    @abstractmethod
    def batch_description(self, loader, dp_size: int) -> str:
        ...

    @abstractmethod
    def loss(self, model: nn.Module, batch, device: torch.device, amp) -> torch.Tensor:
        ...

    @abstractmethod
    def validate(self, model: nn.Module, micro_batch: int, device: torch.device, amp) -> dict | None:
        """Validation metrics (``val_loss`` first) over the configured number of batches, or None when the
        data has no validation split. Every rank evaluates the same batches (FSDP needs every rank in
        every forward)."""

    def after_step(self, model: nn.Module, step: int) -> None:
        """Called after each optimizer update that was taken (``step`` counts them from 1), on the unwrapped
        model: weights kept beside the trained ones, such as an EMA, update here. Most objectives have none."""
        return None

    def save_pretrained(self, state_dict: dict, run_dir: Path) -> None:
        save_pretrained(state_dict, self.model_cfg, run_dir, self.tokenizer_dir)
