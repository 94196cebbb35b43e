"""One typed config schema for every run: YAML file + ``key.sub=value`` overrides, validated before any work.

Unknown keys and wrong types fail with one line naming the key. The resolved config (every default made
explicit) is written to ``RUN_DIR/config.yaml`` and is enough to reproduce the run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from fmforge.errors import FmforgeError, clip
from fmforge.models.config import Fraction, ModelConfig, NonNegativeFloat, Section
from fmforge.models.registry import ARCHS, AnyModelConfig


class DataConfig(Section):
    path: str | None = None  # a prepared data directory (fmforge data prepare / prepare-images), local or s3://
    seq_len: PositiveInt = 256  # text: tokens per training sequence
    prefetch: NonNegativeInt = 2  # optimizer steps of batches read ahead by a background thread (0: inline)
    # Images: torchvision's RandomResizedCrop scale range and flip probability for training; evaluation
    # resizes the shorter side to image_size / crop_pct and center-crops (timm's crop_pct).
    crop_scale: tuple[Annotated[float, Field(gt=0.0, le=1.0)], Annotated[float, Field(gt=0.0, le=1.0)]] = (0.08, 1.0)
    hflip: Fraction = 0.5
    crop_pct: Annotated[float, Field(gt=0.0, le=1.0)] = 0.875
    mean: list[float] | None = None  # per channel; None: ImageNet's (3 channels) or 0.5 (1 channel)
    std: list[PositiveFloat] | None = None
    workers: PositiveInt | None = None  # threads decoding images (default: the usable cores, at most 8)

    @model_validator(mode="after")
    def _check_images(self) -> DataConfig:
        if self.crop_scale[0] > self.crop_scale[1]:
            raise ValueError(f"crop_scale {list(self.crop_scale)} must be [low, high] with low <= high")
        if (self.mean is None) != (self.std is None) or (self.mean is not None and len(self.mean) != len(self.std)):
            raise ValueError("mean and std go together, one value per channel each")
        return self


class OptimConfig(Section):
    lr: PositiveFloat = 3e-4
    min_lr_ratio: Fraction = 0.1  # final lr = lr * min_lr_ratio
    weight_decay: NonNegativeFloat = 0.1
    beta1: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.95
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0  # 0 disables clipping
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: NonNegativeInt = 100
    decay_fraction: Fraction = 0.2  # wsd: the last fraction of steps decays to min lr
    fused: bool | None = None  # None: fused AdamW wherever the device supports it


DEFAULT_GLOBAL_BATCH_TOKENS = 65536  # language-model pretraining's global batch when train.global_batch is unset


class TrainConfig(Section):
    out_dir: str | None = None
    seed: NonNegativeInt = 1337
    max_steps: PositiveInt = 1000
    # Per optimizer step, in the objective's unit: tokens for language-model pretraining (causal and masked),
    # conversations (sft), comparisons (dpo), sequences (text classify), images or image-text pairs (vision).
    # None: the objective's default (65,536 tokens; 256 of anything else).
    global_batch: PositiveInt | None = None
    micro_batch_size: PositiveInt = 8
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    compile: bool = False
    eval_interval: NonNegativeInt = 200  # 0: validate only at the end
    eval_batches: PositiveInt = 20
    log_interval: PositiveInt = 10
    peak_tflops: PositiveFloat | None = None  # for MFU where the device is not in the peak table (e.g. CPU)
    threads: PositiveInt | None = None  # torch intra-op threads on CPU; None leaves torch's default
    # Loss-spike rollback: a step whose loss exceeds the running mean by this many running standard
    # deviations is not applied; the run rolls back to its last checkpoint and skips the offending batches.
    spike_threshold: PositiveFloat | None = None
    spike_warmup: NonNegativeInt = 50  # steps of loss history before spikes are judged


class ParallelConfig(Section):
    """How the same run spreads over processes started by torchrun (``--nproc-per-node``, Slurm, k8s)."""

    dp: Literal["ddp", "fsdp", "hsdp"] = "fsdp"  # data parallel flavour when WORLD_SIZE > 1
    dp_shard: PositiveInt | None = None  # hsdp: data-parallel ranks per shard group (default: one node's)
    tp: PositiveInt = 1  # tensor-parallel degree (ranks per model replica; innermost, keep within a node)
    ac: Literal["none", "full", "selective"] = "none"  # activation checkpointing per block
    timeout_minutes: PositiveFloat = 10.0  # collective timeout before a hung rank fails the job


class CheckpointConfig(Section):
    interval: NonNegativeInt = 500  # steps between checkpoints; 0: only at the end and on preemption
    keep_last: PositiveInt = 3
    # Where checkpoints live (default RUN_DIR/checkpoints). An object-store URL (s3://bucket/prefix) is a
    # mirror: checkpoints are written atomically under RUN_DIR/checkpoints, then uploaded in the background;
    # --resume auto takes the newest checkpoint of either place, downloading it if needed.
    dir: str | None = None


class FinetuneConfig(Section):
    """Start from a trained or imported model (``base``: a run directory with model.safetensors + model.json)
    instead of random weights. ``full`` trains every parameter except those matching ``freeze``; ``lora``
    freezes the base and trains rank-``lora_rank`` adapters on the Linear layers matching ``lora_targets``;
    ``prefix`` / ``prompt`` freeze the base and train ``virtual_tokens`` learned keys/values per layer or
    input embeddings."""

    base: str | None = None
    method: Literal["full", "lora", "prefix", "prompt"] = "full"
    # What the data is and which loss: "lm" (the model's own pretraining objective on prepared data), "sft"
    # (chat JSONL at data.path, loss on assistant tokens only), "dpo" (preference JSONL at data.path, against
    # the frozen base as reference) for decoders; "classify" (labelled text at data.path, a new [CLS] head)
    # for BERT-family encoders
    task: Literal["lm", "sft", "dpo", "classify", "pairs"] = "lm"  # pairs: (query, passage) JSONL, contrastive
    val_fraction: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1  # sft/dpo/classify: held out by content hash
    dpo_beta: PositiveFloat = 0.1  # DPO's inverse temperature: how far the policy may move from the reference
    freeze: list[str] = []  # glob patterns over parameter names, e.g. ["tok_emb.*", "blocks.0.*"]
    lora_rank: PositiveInt = 8
    lora_alpha: PositiveFloat = 16.0
    lora_dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    lora_targets: list[str] = ["*attn.qkv", "*attn.proj", "*mlp.c_fc", "*mlp.c_proj", "*mlp.w1", "*mlp.w2", "*mlp.w3"]
    # prefix / prompt tuning (decoders): this many learned virtual tokens, started from the base model's own
    # activations (prefix) or embeddings (prompt) of ``init_text``'s tokens, else of random vocabulary tokens
    virtual_tokens: PositiveInt = 20
    init_text: str | None = None


class DistillConfig(Section):
    """Knowledge distillation (``fmforge distill``): the student (this run's model, trained by its own
    objective: causal LM, SFT or text classification) also matches a frozen ``teacher`` run directory's
    output distribution. ``kind``: forward KL(teacher || student) (Hinton et al. 2015), reverse
    KL(student || teacher), or the generalized Jensen-Shannon divergence JSD(beta) of Agarwal et al. 2024
    (GKD). Both distributions are softened by ``temperature`` and the divergence is scaled by its square."""

    teacher: str | None = None  # a run directory (model.safetensors + model.json + tokenizer.json)
    kind: Literal["fkl", "rkl", "jsd"] = "fkl"
    temperature: PositiveFloat = 1.0
    alpha: Fraction = 0.5  # weight of the divergence; 1 - alpha goes to the hard-label cross-entropy
    beta: Annotated[float, Field(gt=0.0, lt=1.0)] = 0.5  # jsd: -> 0 behaves as forward KL, -> 1 as reverse


class LogConfig(Section):
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain", "none"] = "auto"  # auto: rich bar on a TTY, plain lines otherwise


class Config(Section):
    """A run: ``model`` is one family's config, chosen by ``model.arch`` (``models/registry.py``)."""


    model: AnyModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    distill: DistillConfig = DistillConfig()
    log: LogConfig = LogConfig()


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        # A discriminated union puts the member's tag after "model": model.vit.patch_size -> model.patch_size
        loc_parts = list(e["loc"])
        if len(loc_parts) > 1 and loc_parts[0] == "model" and loc_parts[1] in ("decoder", *ARCHS):
            del loc_parts[1]
        loc = _shown_key(".".join(str(p) for p in loc_parts))
        if e["type"] == "union_tag_invalid":
            parts.append(f"{loc}.arch: unknown architecture {clip(e['ctx']['tag'])}; "
                         f"known: {', '.join(ARCHS)}")
        elif e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            parts.append(f"{loc}: {e['msg'].removeprefix('Value error, ')} (got {clip(e.get('input'))})")
    return "config error: " + "; ".join(parts)



def _shown_key(key: str, limit: int = 80) -> str:
    """A (possibly hostile) config key for a one-line message: printable and at most ``limit`` long."""
    text = key if key.isprintable() else repr(key)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _shown(path: Path) -> str:
    """A path for a one-line message: as is when printable, else its repr."""
    return str(path) if str(path).isprintable() else repr(str(path))


def _load_yaml(text: str) -> Any:
    """``yaml.safe_load``; every way it can fail on bad input (a bad date, a huge integer, deep nesting)
    becomes ``yaml.YAMLError``."""
    try:
        return yaml.safe_load(text)
    except (ValueError, RecursionError) as err:
        raise yaml.YAMLError(str(err)) from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` → (["a", "b"], c) with c parsed as a YAML scalar (so 3 is an int, 1e-3 a float, true a bool)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p.isidentifier() for p in key.split(".")):
        raise FmforgeError(f"bad override {clip(text)}: expected key.sub=value")
    try:
        value = _load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise FmforgeError(f"bad override {clip(text)}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


RENAMED = {  # old key -> its replacement, named in a one-line error
    ("train", "global_batch_tokens"): "train.global_batch (tokens for language-model pretraining)",
    ("train", "global_batch_size"): "train.global_batch (images for vision runs)",
}


def _check_renamed(raw: dict) -> None:
    for (section, key), new in RENAMED.items():
        if isinstance(raw.get(section), dict) and key in raw[section]:
            raise FmforgeError(f"config error: {section}.{key} is gone: use {new}")


def _check_arch(raw: dict) -> None:
    # model.arch picks the model family before pydantic sees the section: it must be a plain string
    model = raw.get("model")
    if isinstance(model, dict) and "arch" in model and not isinstance(model["arch"], str):
        raise FmforgeError(f"config error: model.arch: must be one of {', '.join(ARCHS)} "
                           f"(got {clip(model['arch'])})")


def build_config(raw: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = apply_overrides(copy.deepcopy(raw or {}), list(overrides))
    _check_renamed(raw)
    _check_arch(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as err:
        raise FmforgeError(_format_validation_error(err)) from None


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or start from defaults when ``path`` is None) and apply overrides."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FmforgeError(f"config file not found: {_shown(p)}")
        try:
            raw = _load_yaml(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise FmforgeError(f"config file {_shown(p)} is not UTF-8 text") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise FmforgeError(f"config file {_shown(p)} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise FmforgeError(f"config file {_shown(p)} must hold a mapping of sections (model, data, "
                               f"optim, train, ...)")
    return build_config(raw, overrides)


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
