"""Objectives: one file = one whole objective (its Task: data, model, loss, validation metrics, FLOPs), on
the contract of ``base.py``. ``OBJECTIVES`` binds the names ``models/registry.py`` and ``finetune.task``
use; ``make_task`` picks one for a run."""

from __future__ import annotations

from pathlib import Path

from fmforge.config import Config
from fmforge.errors import FmforgeError
from fmforge.models.registry import family
from fmforge.objectives.base import Task
from fmforge.objectives.clm import CausalLMTask
from fmforge.objectives.contrastive import ContrastiveTask
from fmforge.objectives.dpo import DPOTask
from fmforge.objectives.image_classify import ImageClassificationTask
from fmforge.objectives.mae import MAETask
from fmforge.objectives.mlm import MaskedLMTask
from fmforge.objectives.sft import SFTTask
from fmforge.objectives.text_classify import TextClassificationTask

OBJECTIVES: dict[str, type[Task]] = {
    "clm": CausalLMTask,  # pretraining objectives, named by each family's registry entry
    "mlm": MaskedLMTask,
    "image_classify": ImageClassificationTask,
    "mae": MAETask,
    "contrastive": ContrastiveTask,
    "sft": SFTTask,  # fine-tuning objectives, named by finetune.task
    "dpo": DPOTask,
    "text_classify": TextClassificationTask,
}

# finetune.task -> (objective per family, what the task is for)
FINETUNE_TASKS: dict[str, tuple[dict[str, str], str]] = {
    "sft": ({"decoder": "sft"}, "trains decoders (gpt2, llama)"),
    "dpo": ({"decoder": "dpo"}, "trains decoders (gpt2, llama)"),
    "classify": ({"bert": "text_classify", "vit": "image_classify"},
                 "fine-tunes BERT-family text encoders and ViT/MAE image encoders"),
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
    return OBJECTIVES[objective_name(cfg)](cfg, data_dir, echo)
