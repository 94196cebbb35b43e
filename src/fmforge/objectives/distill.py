"""Knowledge distillation (``distill.teacher`` set; ``fmforge distill``): the student trains with its own
objective — causal LM on prepared data, SFT on chats (decoders, per token), or text classification
(BERT-family encoders, per sequence) — while also matching a frozen teacher's output distribution:

    loss = alpha · T² · D(teacher_T, student_T) + (1 - alpha) · cross-entropy(student, hard labels)

``p_T = softmax(logits / T)``; ``D`` is ``distill.kind``:

- ``fkl``: forward KL(teacher || student), Hinton et al. 2015 (T² keeps the soft-target gradients on the
  scale of the hard-label ones as T grows);
- ``rkl``: reverse KL(student || teacher), mode-seeking;
- ``jsd``: the generalized Jensen-Shannon divergence of Agarwal et al. 2024 (GKD), with
  ``M = beta · teacher + (1 - beta) · student``:  ``beta · KL(teacher || M) + (1 - beta) · KL(student || M)``;
  divided by beta it tends to the forward KL as beta → 0, divided by 1 - beta to the reverse KL as beta → 1.

Token-level divergences average over the positions the hard loss counts (targets other than -100).

The teacher is a finished run directory whose tokenizer must be the student's (same sha256 of the
serialized tokenizer): the distributions are compared id by id. It is loaded on the student's device at the
first step, in eval mode with ``requires_grad`` off, runs under ``torch.inference_mode``, and belongs to this
Task, not to the model the loop trains: it is never wrapped by DDP/FSDP, never in a checkpoint or the final
weights. A resumed run reloads it from ``distill.teacher``. Validation is the student's own (``val_loss`` is
its hard-label loss, comparable with a run trained without a teacher).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from fmforge.config import Config, DistillConfig
from fmforge.data.records import IGNORE_INDEX
from fmforge.data.tokenizer import load_tokenizer
from fmforge.device import autocast_for
from fmforge.errors import FmforgeError
from fmforge.lazy import resolve
from fmforge.models.registry import family_of
from fmforge.objectives import OBJECTIVES, objective_name
from fmforge.objectives.base import Task
from fmforge.runs import load_pretrained, read_model_config

# The student objectives distillation can wrap -> how their batches are read ("tokens" or "sequences").
STUDENT_KINDS = {"clm": "tokens", "sft": "tokens", "text_classify": "sequences"}
TEACHER_FAMILY = {"tokens": "decoder", "sequences": "bert"}


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities [N, V] -> [N]."""
    return (logp.exp() * (logp - logq)).sum(-1)


def divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, temperature: float = 1.0,
               beta: float = 0.5) -> torch.Tensor:
    """Mean over rows of D(teacher, student) [N, V] -> scalar, both softened by ``temperature`` and the
    result scaled by its square; computed in fp32."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "fkl":
        per_row = _kl(t, s)
    elif kind == "rkl":
        per_row = _kl(s, t)
    elif kind == "jsd":
        mixture = torch.logsumexp(torch.stack([t + math.log(beta), s + math.log1p(-beta)]), dim=0)
        per_row = beta * _kl(t, mixture) + (1 - beta) * _kl(s, mixture)
    else:
        raise FmforgeError(f"distill.kind: unknown divergence {kind!r} (fkl, rkl or jsd)")
    return per_row.mean() * temperature**2


def distill_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                 d: DistillConfig) -> torch.Tensor:
    """alpha · T² · D(teacher, student) + (1 - alpha) · cross-entropy against ``targets``, over rows [N, V].
    The divergence covers the teacher's V' <= V outputs (a vocabulary padded wider than the tokenizer's has
    rows no token ever takes); the cross-entropy every output, as the student's own loss does."""
    shared = student_logits[:, :teacher_logits.size(-1)]
    loss = d.alpha * divergence(shared, teacher_logits, d.kind, d.temperature, d.beta)
    if d.alpha < 1:
        loss = loss + (1 - d.alpha) * F.cross_entropy(student_logits.float(), targets)
    return loss


def tokenizer_sha256(directory: Path, what: str) -> str:
    if not (directory / "tokenizer.json").is_file():
        raise FmforgeError(f"{what} {directory} has no tokenizer.json: distillation compares token ids")
    return load_tokenizer(directory / "tokenizer.json").sha256


class DistillTask(Task):
    """The student's own Task (``objective_name``), plus a frozen teacher in its micro-batch loss."""

    def __init__(self, cfg: Config, data_dir: Path, echo):
        super().__init__(cfg, data_dir, echo)
        name = objective_name(cfg)
        if name not in STUDENT_KINDS:
            raise FmforgeError(f"distillation trains decoders (causal LM, finetune.task=sft) and text classifiers "
                               f"(finetune.task=classify), not the {name} objective of model.arch={cfg.model.arch}")
        self.kind = STUDENT_KINDS[name]
        self.student: Task = resolve(OBJECTIVES[name])(cfg, data_dir, echo)
        self.unit, self.tokenizer_dir = self.student.unit, self.student.tokenizer_dir
        self.model_cfg, self.global_batch = self.student.model_cfg, self.student.global_batch
        self.teacher_dir = Path(cfg.distill.teacher)
        self.outputs = self._check_teacher()
        self.teacher: nn.Module | None = None  # loaded on the student's device at the first step

    def __getattr__(self, name: str):
        # What callers outside the loop read off a task (eval's probes) is the student's.
        if name == "student":
            raise AttributeError(name)
        return getattr(self.student, name)

    def _check_teacher(self) -> int:
        """Fail before any work when the teacher cannot teach this student; returns how many of the
        logits the two share (the tokenizer's vocabulary, or the classes)."""
        teacher = self.teacher_dir
        if not (teacher / "model.json").is_file():
            raise FmforgeError(f"distill.teacher {teacher} holds no model (model.json is missing); give a run "
                               "directory from `fmforge train`, `finetune` or `import hf`")
        teacher_cfg = read_model_config(teacher)
        wanted = TEACHER_FAMILY[self.kind]
        if family_of(teacher_cfg) != wanted:
            raise FmforgeError(f"distill.teacher {teacher} holds a {family_of(teacher_cfg)} model; this student "
                               f"needs a {wanted} teacher")
        student_dir = self.student.tokenizer_dir or self.data_dir
        if tokenizer_sha256(teacher, "distill.teacher") != tokenizer_sha256(Path(student_dir), "the student's data"):
            raise FmforgeError(f"distill.teacher {teacher} uses another tokenizer than the student's data "
                               f"({student_dir}): prepare the data with `fmforge data prepare ... --tokenizer {teacher}`")
        if self.kind == "sequences":
            classes = self.model_cfg.num_labels
            if teacher_cfg.num_labels != classes:
                raise FmforgeError(f"distill.teacher {teacher} classifies into {teacher_cfg.num_labels} classes, the "
                                   f"student's data has {classes}: give a classifier fine-tuned on the same labels")
            return classes
        # Vocabularies may be padded differently (model.vocab_size rounds up): compare the real tokens.
        return load_tokenizer(teacher / "tokenizer.json").vocab_size

    def resolved_config(self) -> Config:
        return self.student.resolved_config()

    def make_loader(self, micro_batch: int, rank: int, world_size: int):
        return self.student.make_loader(micro_batch, rank, world_size)

    def build_model(self) -> nn.Module:
        return self.student.build_model()

    def flops_per_unit(self, model: nn.Module) -> float:
        return self.student.flops_per_unit(model)  # the student's training FLOPs; the teacher's forward is extra

    def batch_description(self, loader, dp_size: int) -> str:
        d = self.cfg.distill
        how = f"{d.kind}, T={d.temperature:g}, alpha={d.alpha:g}" + (f", beta={d.beta:g}" if d.kind == "jsd" else "")
        return f"{self.student.batch_description(loader, dp_size)} | distilling from {self.teacher_dir} ({how})"

    def _teacher_on(self, device: torch.device) -> nn.Module:
        if self.teacher is None:
            self.teacher, _ = load_pretrained(self.teacher_dir, device, family=TEACHER_FAMILY[self.kind])
            self.teacher.requires_grad_(False)
            self.teacher_amp = autocast_for(device, self.cfg.train.precision)  # FSDP's amp is the student's alone
            self.echo(f"teacher: {self.teacher_dir}, {self.teacher.num_params() / 1e6:.2f}M parameters, frozen")
        self.teacher.eval()
        return self.teacher

    def _logits(self, model: nn.Module, batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [N, V], targets [N]) of the rows the hard loss counts."""
        if self.kind == "tokens":
            inputs, targets = (t.to(device, non_blocking=True) for t in batch)
            logits = model(inputs)
        else:
            (ids, mask), targets = batch
            logits = model(ids.to(device), mask.to(device), classify=True)
            targets = targets.to(device)
        logits, targets = logits.reshape(-1, logits.size(-1)), targets.reshape(-1)
        keep = targets != IGNORE_INDEX
        return logits[keep], targets[keep]

    def loss(self, model, batch, device, amp):
        teacher = self._teacher_on(device)
        with torch.inference_mode(), self.teacher_amp():
            teacher_logits, _ = self._logits(teacher, batch, device)
        with amp():
            logits, targets = self._logits(model, batch, device)
        # An inference-mode tensor cannot be saved for the student's backward: a plain copy can.
        return distill_loss(logits, teacher_logits[:, :self.outputs].clone(), targets, self.cfg.distill)

    def validate(self, model, micro_batch, device, amp):
        return self.student.validate(model, micro_batch, device, amp)

    def save_pretrained(self, state_dict: dict, run_dir: Path) -> None:
        self.student.save_pretrained(state_dict, run_dir)
