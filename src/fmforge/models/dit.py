"""Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"), written from
the paper: a ViT over noisy image patches whose every block is modulated by the timestep and the condition
through adaLN-Zero.

- Input: the image (pixels here; latents work the same) cut into p x p patches by a strided convolution,
  plus MAE's fixed 2-D sin-cos position table (``vit.sincos_pos_embed``).
- Conditioning vector c = MLP(sinusoidal(t)) + embedding(condition). The condition is a class label (a
  table with one extra row, the "null" class that classifier-free guidance trains by dropping labels) or a
  pooled text embedding from a frozen CLIP text tower, projected to the width (a learned null vector
  replaces it when dropped).
- Each block is the shared attention and GELU MLP of ``blocks.py`` between LayerNorms without affine
  parameters; SiLU(c) -> Linear gives per-block shift, scale and gate for both halves (adaLN-Zero). The
  gates and the final projection start at zero, so every block starts as the identity.
- Output: a last adaLN-modulated LayerNorm and a linear map back to p x p x C values per patch,
  unpatchified like MAE (``vit.unpatchify``).

``DiT`` wraps the denoiser (``net``) and, when training with ``ema_decay > 0``, a frozen exponential
moving average of it (``ema``): both live in the same state dict, so checkpoints, exact resume, FSDP
sharding and the final ``model.safetensors`` carry the EMA weights beside the raw ones. Sampling uses the
EMA copy when there is one.

The timestep features use diffusers' DiT convention (frequencies 10000^(-i/(half-1)), cos before sin), so a
class-conditional DiT exports to ``diffusers.DiTTransformer2DModel`` exactly.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from fmforge.models.blocks import Attention, GeluMLP, copy_full_, init_normal_
from fmforge.models.config import BlockConfig, Section
from fmforge.models.sizes import DIT_SIZES, apply_size
from fmforge.models.vit import PatchGrid, sincos_pos_embed, unpatchify

FREQ_DIM = 256  # sinusoidal timestep features before the MLP (the paper's and diffusers' choice)


class DiTConfig(PatchGrid, Section):
    """The denoiser's shape and what it is conditioned on."""

    image_size: PositiveInt = 32
    patch_size: PositiveInt = 2
    channels: PositiveInt = 4  # 4: Stable Diffusion's VAE latents (the paper); 1 or 3 for pixels
    d_model: PositiveInt = 384
    n_layer: PositiveInt = 12
    n_head: PositiveInt = 6
    mlp_ratio: PositiveFloat = 4.0
    condition: Literal["class", "text"] = "class"
    num_classes: NonNegativeInt = 1000  # class condition; the data's class count in a run
    cond_dim: PositiveInt | None = None  # text condition: the text encoder's embedding width
    norm_eps: PositiveFloat = 1e-6
    init_std: PositiveFloat = 0.02

    @model_validator(mode="after")
    def _check_shape(self) -> DiTConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.d_model % 4:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by 4 (2-D sin-cos positions)")
        return self

    @property
    def d_ff(self) -> int:
        return int(self.d_model * self.mlp_ratio)

    def block_config(self) -> BlockConfig:
        return BlockConfig(d_model=self.d_model, n_head=self.n_head, n_kv_head=self.n_head, d_ff=self.d_ff,
                           norm="layernorm", mlp="gelu", bias=True, norm_eps=self.norm_eps)


class DiTModelConfig(DiTConfig):
    """The ``model:`` section of a diffusion run, named by ``size`` (a key of ``DIT_SIZES``). The objective's
    settings live here as MAE's do: what the network predicts, the noise schedule, how often the condition
    is dropped for classifier-free guidance, the EMA decay (0: no EMA). ``text_encoder``: a CLIP run
    directory (trained by fmforge or imported) whose frozen text tower conditions a ``condition: text``
    model."""

    arch: Literal["dit"] = "dit"
    size: str | None = None
    prediction: Literal["eps", "v"] = "eps"
    schedule: Literal["linear", "cosine"] = "linear"
    timesteps: Annotated[int, Field(ge=2, le=100_000)] = 1000
    cond_drop_prob: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.1
    ema_decay: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9999
    text_encoder: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _size_defaults(cls, data):
        return apply_size(data, DIT_SIZES, "DiT", skip=("num_classes",))


# ---------------------------------------------------------------------------------------------------- pieces


@torch.no_grad()
def init_xavier_(weight: torch.Tensor) -> None:
    """Xavier-uniform over the weight viewed as [out, fan_in] (a convolution is a Linear over its patch),
    drawn whole on the CPU generator like ``blocks.init_normal_`` so meta-built and sharded models start
    equal to one built on the CPU."""
    if weight.is_meta:
        return
    fan_out, fan_in = weight.shape[0], weight[0].numel()
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    full = torch.empty(weight.shape, dtype=torch.float32).uniform_(-bound, bound)
    copy_full_(weight, full)


def timestep_features(t: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features [B, dim] of (possibly fractional) timesteps [B]: cos then sin of t times
    frequencies max_period^(-i / (dim/2 - 1))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - 1))
    args = t.float()[:, None] * freqs[None]
    return torch.cat([args.cos(), args.sin()], dim=-1)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class TimestepEmbedder(nn.Module):
    def __init__(self, d_model: int):
        super().__init__()
        self.linear_1 = nn.Linear(FREQ_DIM, d_model)
        self.linear_2 = nn.Linear(d_model, d_model)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(timestep_features(t).to(self.linear_1.weight.dtype))))


class DiTBlock(nn.Module):
    """adaLN-Zero block: x + gate_a * attn(modulate(norm1(x))), then x + gate_m * mlp(modulate(norm2(x)))."""

    def __init__(self, cfg: BlockConfig):
        super().__init__()
        d = cfg.d_model
        self.norm1 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.attn = Attention(cfg, causal=False)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.mlp = GeluMLP(cfg, gelu_approximate="tanh")
        self.ada = nn.Linear(d, 6 * d)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.ada(F.silu(c)).chunk(6, dim=-1)
        x = x + gate_a[:, None] * self.attn(modulate(self.norm1(x), shift_a, scale_a))
        return x + gate_m[:, None] * self.mlp(modulate(self.norm2(x), shift_m, scale_m))

    @torch.no_grad()
    def init_weights(self) -> None:
        for layer in (self.attn.qkv, self.attn.proj, self.mlp.c_fc, self.mlp.c_proj):
            init_xavier_(layer.weight)
            nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.ada.weight)  # adaLN-Zero: every block starts as the identity
        nn.init.zeros_(self.ada.bias)


# ---------------------------------------------------------------------------------------------------- denoiser


class DiTNet(nn.Module):
    """The denoiser: (noisy images [B, C, H, W], timesteps [B], condition) -> [B, C, H, W] (noise or v)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, stride=cfg.patch_size)
        self.register_buffer("pos_emb", torch.empty(1, cfg.num_patches, d), persistent=False)
        self.t_embed = TimestepEmbedder(d)
        if cfg.condition == "class":
            self.y_embed = nn.Embedding(cfg.num_classes + 1, d)  # row num_classes: the null (dropped) label
        else:
            if cfg.cond_dim is None:
                raise ValueError("a text-conditioned DiT needs cond_dim (the text encoder's embedding width)")
            self.y_embed = nn.Linear(cfg.cond_dim, d)
            self.null_cond = nn.Parameter(torch.zeros(1, d))  # [1, d], not [d]: FSDP2 shards along dim 0
        self.blocks = nn.ModuleList(DiTBlock(cfg.block_config()) for _ in range(cfg.n_layer))
        self.norm_out = nn.LayerNorm(d, eps=cfg.norm_eps, elementwise_affine=False)
        self.ada_out = nn.Linear(d, 2 * d)
        self.proj_out = nn.Linear(d, cfg.patch_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """The paper's: Xavier-uniform Linears and patch projection, N(0, 0.02) for the timestep MLP and the
        label table, zeros for every adaLN modulation and the output projection."""
        std = self.cfg.init_std
        init_xavier_(self.patch_embed.weight)
        nn.init.zeros_(self.patch_embed.bias)
        for layer in (self.t_embed.linear_1, self.t_embed.linear_2):
            init_normal_(layer.weight, std, truncated=False)
            nn.init.zeros_(layer.bias)
        if isinstance(self.y_embed, nn.Embedding):
            init_normal_(self.y_embed.weight, std, truncated=False)
        else:
            init_xavier_(self.y_embed.weight)
            nn.init.zeros_(self.y_embed.bias)
            init_normal_(self.null_cond, std, truncated=False)
        for block in self.blocks:
            block.init_weights()
        for layer in (self.ada_out, self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        if not self.pos_emb.is_meta:
            self.pos_emb.copy_(sincos_pos_embed(self.cfg.d_model, self.cfg.grid, device=self.pos_emb.device)[None])

    def condition(self, t: torch.Tensor, y: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """c [B, d] = timestep embedding + condition embedding; ``drop`` [B] (bool) swaps in the null
        condition (classifier-free guidance). The null vector always takes part in the graph, so DDP sees
        it used even in a batch where nothing was dropped."""
        if self.cfg.condition == "class":
            if drop is not None:
                y = torch.where(drop, torch.full_like(y, self.cfg.num_classes), y)
            e = self.y_embed(y)
        else:
            e = self.y_embed(y.to(self.y_embed.weight.dtype))
            if drop is not None:
                e = torch.where(drop[:, None], self.null_cond.expand_as(e), e)
        return self.t_embed(t) + e

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.cfg
        if x.dim() != 4 or x.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images [B, {cfg.channels}, {cfg.image_size}, {cfg.image_size}], "
                             f"got {list(x.shape)}")
        c = self.condition(t, y, drop)
        h = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_emb
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.ada_out(F.silu(c)).chunk(2, dim=-1)
        h = self.proj_out(modulate(self.norm_out(h), shift, scale))
        return unpatchify(h, cfg.patch_size, cfg.channels)


class DiT(nn.Module):
    """The trained denoiser ``net`` and its frozen EMA twin ``ema`` (None when ``ema_decay`` is 0).
    ``forward`` runs ``net`` (training); ``denoiser()`` is what sampling should call."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.net = DiTNet(cfg)
        self.ema = DiTNet(cfg).requires_grad_(False) if getattr(cfg, "ema_decay", 0.0) > 0 else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        self.net.init_weights()
        if self.ema is not None:
            self.ema.reset_buffers()
            for e, p in zip(self.ema.parameters(), self.net.parameters()):
                if not p.is_meta:
                    e.copy_(p)

    def reset_buffers(self) -> None:
        self.net.reset_buffers()
        if self.ema is not None:
            self.ema.reset_buffers()

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                drop: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x, t, y, drop)

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * net, on local shards (FSDP shards both alike)."""
        if self.ema is None:
            return
        ema = [_local(p) for p in self.ema.parameters()]
        net = [_local(p) for p in self.net.parameters()]
        torch._foreach_lerp_(ema, net, 1.0 - decay)

    def denoiser(self, use_ema: bool = True) -> DiTNet:
        return self.ema if use_ema and self.ema is not None else self.net

    def block_stacks(self) -> list[nn.ModuleList]:
        """The repeated blocks that parallelism wraps one by one (``registry.block_stacks``). The EMA's are
        declared too: FSDP then shards them per block, and since they never run in training they are
        never gathered."""
        return [self.net.blocks] + ([self.ema.blocks] if self.ema is not None else [])

    def num_params(self) -> int:
        """The denoiser's parameters (the EMA copy is not counted, as in the paper)."""
        return sum(p.numel() for p in self.net.parameters())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t
