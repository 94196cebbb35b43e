"""Objectives: one file = one whole objective (its Task: data, model, loss, validation metrics, FLOPs), on
the contract of ``base.py``. ``OBJECTIVES`` binds the names ``models/registry.py`` and ``finetune.task``
use; ``make_task`` picks one for a run."""

from __future__ import annotations

from pathlib import Path

from fmforge.config import Config
from fmforge.errors import FmforgeError
from fmforge.lazy import resolve
from fmforge.models.registry import family
from fmforge.objectives.base import Task

# Imported when a run picks one, so a text run never loads torchvision (see ``fmforge.lazy``).
OBJECTIVES: dict[str, str] = {
    "clm": "fmforge.objectives.clm:CausalLMTask",  # pretraining objectives, named by each family's entry
    "mlm": "fmforge.objectives.mlm:MaskedLMTask",
    "image_classify": "fmforge.objectives.image_classify:ImageClassificationTask",
    "mae": "fmforge.objectives.mae:MAETask",
    "contrastive": "fmforge.objectives.contrastive:ContrastiveTask",
    "diffusion": "fmforge.objectives.diffusion:DiffusionTask",
    "sft": "fmforge.objectives.sft:SFTTask",  # fine-tuning objectives, named by finetune.task
    "dpo": "fmforge.objectives.dpo:DPOTask",
    "text_classify": "fmforge.objectives.text_classify:TextClassificationTask",
    "text_pairs": "fmforge.objectives.text_pairs:TextPairsTask",
    "distill": "fmforge.objectives.distill:DistillTask",  # wraps the student's own objective (distill.teacher)
}

# finetune.task -> (objective per family, what the task is for)
FINETUNE_TASKS: dict[str, tuple[dict[str, str], str]] = {
    "sft": ({"decoder": "sft"}, "trains decoders (gpt2, llama)"),
    "dpo": ({"decoder": "dpo"}, "trains decoders (gpt2, llama)"),
    "classify": ({"bert": "text_classify", "vit": "image_classify"},
                 "fine-tunes BERT-family text encoders and ViT/MAE image encoders"),
    "pairs": ({"bert": "text_pairs"}, "fine-tunes BERT-family text encoders on (query, passage) pairs"),
}


def objective_name(cfg: Config) -> str:
    """The objective a run trains: ``finetune.task`` when it names one, else the family's own."""
    fam = family(cfg.model)
    if cfg.finetune.task in FINETUNE_TASKS:
        by_family, purpose = FINETUNE_TASKS[cfg.finetune.task]
        if fam.name not in by_family:
            raise FmforgeError(f"finetune.task={cfg.finetune.task} {purpose}, not model.arch={cfg.model.arch}")
        return by_family[fam.name]
    return fam.objective


def make_task(cfg: Config, data_dir: Path, echo) -> Task:
    """The Task for this run, resolved against the data in ``data_dir`` (the config is not changed)."""
    task_class: type[Task] = resolve(OBJECTIVES["distill" if cfg.distill.teacher else objective_name(cfg)])
    return task_class(cfg, data_dir, echo)
