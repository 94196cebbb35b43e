"""One typed config schema for every run: YAML file + ``key.sub=value`` overrides, validated before any work.

Unknown keys and wrong types fail with one line naming the key. The resolved config (every default made
explicit) is written to ``RUN_DIR/config.yaml`` and is enough to reproduce the run.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveFloat, PositiveInt, ValidationError

from fmforge.errors import FmforgeError

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """Decoder-only transformer. ``arch`` picks the family defaults, ``size`` a named shape; any field set
    explicitly wins. ``None`` means "take it from arch/size/tokenizer/data" and is filled by ``resolved``."""

    arch: Literal["gpt2", "llama"] = "llama"
    size: str | None = None
    n_layer: PositiveInt | None = None
    n_head: PositiveInt | None = None
    n_kv_head: PositiveInt | None = None
    d_model: PositiveInt | None = None
    d_ff: PositiveInt | None = None
    vocab_size: PositiveInt | None = None
    max_seq_len: PositiveInt | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    pos: Literal["learned", "rope"] | None = None
    bias: bool | None = None
    tie_embeddings: bool | None = None
    rope_theta: PositiveFloat | None = None
    norm_eps: PositiveFloat = 1e-5
    dropout: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0
    init_std: PositiveFloat = 0.02
    # Pad the embedding/head to a multiple of this many rows: matmuls on 50257 rows are slow, 50304 fast.
    vocab_multiple: PositiveInt = 64

    def resolved(self, vocab_size: int | None = None, seq_len: int | None = None) -> ModelConfig:
        """Every field filled: explicit value > named size > arch default. ``vocab_size``/``seq_len`` come
        from the tokenizer and data when the config leaves them open."""
        from fmforge.models.registry import ARCH_DEFAULTS, SIZES

        values = self.model_dump()
        if self.size is not None:
            if self.size not in SIZES:
                raise FmforgeError(f"model.size: unknown size {self.size!r}; known: {', '.join(sorted(SIZES))}")
            for key, val in SIZES[self.size].items():
                if values.get(key) is None:
                    values[key] = val
        for key, val in ARCH_DEFAULTS[self.arch].items():
            if values.get(key) is None:
                values[key] = val
        if values["vocab_size"] is not None and vocab_size is not None and values["vocab_size"] < vocab_size:
            raise FmforgeError(f"model.vocab_size ({values['vocab_size']}) is smaller than the tokenizer's "
                               f"vocabulary ({vocab_size})")
        if values["vocab_size"] is None:
            if vocab_size is None:
                raise FmforgeError("model.vocab_size: not set and no tokenizer to take it from")
            m = self.vocab_multiple
            values["vocab_size"] = (vocab_size + m - 1) // m * m
        if values["max_seq_len"] is None:
            values["max_seq_len"] = seq_len
        for key in ("n_layer", "n_head", "d_model", "max_seq_len"):
            if values[key] is None:
                raise FmforgeError(f"model.{key}: not set (give it, or a model.size that sets it)")
        if values["n_kv_head"] is None:
            values["n_kv_head"] = values["n_head"]
        if values["d_model"] % values["n_head"]:
            raise FmforgeError(f"model.d_model ({values['d_model']}) must be divisible by model.n_head ({values['n_head']})")
        if values["n_head"] % values["n_kv_head"]:
            raise FmforgeError(f"model.n_head ({values['n_head']}) must be divisible by model.n_kv_head ({values['n_kv_head']})")
        if values["pos"] == "rope" and (values["d_model"] // values["n_head"]) % 2:
            raise FmforgeError("model: rotary embeddings need an even head dimension (d_model / n_head)")
        if values["d_ff"] is None:
            values["d_ff"] = default_d_ff(values["d_model"], values["mlp"])
        if seq_len is not None and seq_len > values["max_seq_len"]:
            raise FmforgeError(f"data.seq_len ({seq_len}) exceeds model.max_seq_len ({values['max_seq_len']})")
        return ModelConfig(**values)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


def default_d_ff(d_model: int, mlp: str) -> int:
    """GPT-2: 4d. Llama's SwiGLU: 2/3 of 4d (same weights as a 4d GELU MLP), rounded up to a multiple of 64."""
    if mlp == "swiglu":
        return (int(8 * d_model / 3) + 63) // 64 * 64
    return 4 * d_model


class DataConfig(Section):
    path: str | None = None  # a prepared data directory (fmforge data prepare), local or s3://
    seq_len: PositiveInt = 256
    prefetch: NonNegativeInt = 2  # optimizer steps of batches read ahead by a background thread (0: inline)


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


class TrainConfig(Section):
    out_dir: str | None = None
    seed: NonNegativeInt = 1337
    max_steps: PositiveInt = 1000
    global_batch_tokens: PositiveInt = 65536
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


class LogConfig(Section):
    tensorboard: bool = True
    progress: Literal["auto", "rich", "plain", "none"] = "auto"  # auto: rich bar on a TTY, plain lines otherwise


class Config(Section):
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    parallel: ParallelConfig = ParallelConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log: LogConfig = LogConfig()


def _format_validation_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        else:
            parts.append(f"{loc}: {e['msg']} (got {e.get('input')!r})")
    return "config error: " + "; ".join(parts)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=c`` → (["a", "b"], c) with c parsed as a YAML scalar (so 3 is an int, 1e-3 a float, true a bool)."""
    key, sep, raw = text.partition("=")
    if not sep or not key or any(not p.isidentifier() for p in key.split(".")):
        raise FmforgeError(f"bad override {text!r}: expected key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
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
                raise FmforgeError(f"bad override {text!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def build_config(raw: dict | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    raw = apply_overrides(copy.deepcopy(raw or {}), list(overrides))
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
            raise FmforgeError(f"config file not found: {p}")
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark else ""
            raise FmforgeError(f"config file {p} is not valid YAML{where}") from None
        if not isinstance(raw, dict):
            raise FmforgeError(f"config file {p} must hold a mapping of sections (model, data, optim, train, ...)")
    return build_config(raw, overrides)


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
