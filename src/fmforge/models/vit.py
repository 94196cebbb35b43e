"""Vision Transformer (Dosovitskiy et al. 2021) and its masked-autoencoder pretraining (He et al. 2021).

Both run on the shared ``Block`` of ``blocks.py`` with ``causal=False``: an image encoder is the language
model's block without the causal mask, plus a patch embedding in front and a pooled head behind. The MAE
encoder *is* a ``ViT`` (``MAE.encoder``), so its weights fine-tune or linear-probe without conversion.

Patches are flattened as MAE does, (row p, column q, channel c) within a patch, patches in row-major order.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn as nn
from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt, model_validator

from fmforge.models.blocks import Block, init_linear, init_normal_, make_norm
from fmforge.models.config import BlockConfig, Section, encoder_block_config
from fmforge.models.sizes import MAE_SIZES, VIT_SIZES, apply_size, lookup_size

Dropout = Annotated[float, Field(ge=0.0, lt=1.0)]
GELU_KERNEL = {"exact": "none", "tanh": "tanh", "quick": "quick"}  # config name -> GeluMLP's gelu_approximate


class PatchGrid:
    """The patch geometry of a config with ``image_size``, ``patch_size`` and ``channels`` (ViT, MAE, DiT)."""

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size ** 2 * self.channels


class VisionConfig(PatchGrid, Section):
    """An image encoder's shape. ``num_classes=0`` drops the head: ``forward`` then returns pooled features."""

    image_size: PositiveInt = 224
    patch_size: PositiveInt = 16
    channels: PositiveInt = 3
    d_model: PositiveInt = 768
    n_layer: PositiveInt = 12
    n_head: PositiveInt = 12
    d_ff: PositiveInt | None = None  # None: 4 d_model (GELU) or Llama's 8/3 d_model (SwiGLU)
    pooling: Literal["cls", "mean"] = "cls"  # a learned [CLS] token, or the mean of the patch tokens
    num_classes: NonNegativeInt = 1000
    pos: Literal["learned", "sincos"] = "learned"  # sincos: MAE's fixed 2-D table (not a parameter)
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    gelu: Literal["exact", "tanh", "quick"] = "exact"  # ViT/MAE: erf; OpenAI CLIP: quick, x * sigmoid(1.702 x)
    bias: bool = True
    patch_bias: bool = True  # OpenAI CLIP's patch projection has no bias
    ln_pre: bool = False  # OpenAI CLIP normalizes the embedded tokens before the first block
    norm_eps: PositiveFloat = 1e-6
    dropout: Dropout = 0.0
    init_std: PositiveFloat = 0.02

    @model_validator(mode="after")
    def _check_shape(self) -> VisionConfig:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a multiple of patch_size ({self.patch_size})")
        if self.d_model % self.n_head:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})")
        if self.pos == "sincos" and self.d_model % 4:
            raise ValueError(f"pos=sincos needs d_model ({self.d_model}) divisible by 4 (sin and cos per axis)")
        return self

    @classmethod
    def from_size(cls, name: str, **overrides) -> VisionConfig:
        return cls(**{**lookup_size(VIT_SIZES, name, "ViT"), **overrides})

    @property
    def n_prefix(self) -> int:
        """Tokens in front of the patches: the [CLS] token when pooling by it."""
        return 1 if self.pooling == "cls" else 0

    def block_config(self) -> BlockConfig:
        return encoder_block_config(self, self.d_model, self.n_head, self.d_ff)


class ViTModelConfig(VisionConfig):
    """The ``model:`` section of an image-classification run: a ``VisionConfig`` named by ``size`` (a key of
    ``VIT_SIZES``; fields given explicitly win). The class count comes from the data unless set."""

    arch: Literal["vit"] = "vit"
    size: str | None = None
    label_smoothing: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.0

    @model_validator(mode="before")
    @classmethod
    def _size_defaults(cls, data):
        return apply_size(data, VIT_SIZES, "ViT", skip=("num_classes",))


# ---------------------------------------------------------------------------------------------------- helpers


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[B, C, H, W] -> [B, N, p*p*C], patches row-major, each flattened as (p, q, c) like MAE."""
    B, C, H, W = images.shape
    p = patch_size
    x = images.reshape(B, C, H // p, p, W // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(B, (H // p) * (W // p), p * p * C)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of ``patchify`` for square images."""
    B, N, _ = patches.shape
    p, g = patch_size, math.isqrt(N)
    x = patches.reshape(B, g, g, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(B, channels, g * p, g * p)


def sincos_pos_embed(d_model: int, grid: int, n_prefix: int = 0, device=None) -> torch.Tensor:
    """MAE's fixed 2-D position table [n_prefix + grid*grid, d_model]: the first half of the channels
    encodes a patch's column, the second half its row, each as [sin, cos] of position / 10000^(i / (d/4)).
    Prefix tokens ([CLS]) get zeros. Built in float64 like MAE's numpy version, then cast."""
    omega = 1.0 / 10000 ** (torch.arange(d_model // 4, dtype=torch.float64, device=device) / (d_model / 4))
    coords = torch.arange(grid, dtype=torch.float64, device=device)
    row, col = torch.meshgrid(coords, coords, indexing="ij")  # patch i = row * grid + col

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([axis(col), axis(row)], dim=1)
    prefix = torch.zeros(n_prefix, d_model, dtype=torch.float64, device=device)
    return torch.cat([prefix, table]).float()


def random_masking(x: torch.Tensor, mask_ratio: float,
                   generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keep a random subset of each sample's tokens (MAE): sort uniform noise, keep the first
    ``N * (1 - mask_ratio)`` (at least one). Returns the visible tokens [B, keep, D] in shuffled order, the
    mask [B, N] (1 = masked, 0 = visible, in patch order) and ``ids_restore`` [B, N] that unshuffles.
    ``generator`` (on x's device) makes the masks reproducible independently of the global RNG."""
    B, N, D = x.shape
    # floor, as MAE does, but immune to 100 * (1 - 0.9) = 9.999999999999998
    keep = max(1, math.floor(N * (1 - mask_ratio) + 1e-9))
    noise = torch.rand(B, N, generator=generator, device=x.device)
    ids_shuffle = noise.argsort(dim=1)
    ids_restore = ids_shuffle.argsort(dim=1)
    visible = x.gather(1, ids_shuffle[:, :keep, None].expand(-1, -1, D))
    mask = torch.ones(B, N, device=x.device, dtype=x.dtype)
    mask[:, :keep] = 0
    return visible, mask.gather(1, ids_restore), ids_restore


def _patch_std(conv: nn.Conv2d) -> float:
    # MAE initializes the patch projection like a Linear layer with Xavier init. A flat 0.02 would make
    # the 4-pixel patches of the CPU sizes almost vanish next to the position embeddings.
    fan_in, fan_out = conv.weight[0].numel(), conv.weight.size(0)
    return math.sqrt(2.0 / (fan_in + fan_out))


# ---------------------------------------------------------------------------------------------------- ViT


class ViT(nn.Module):
    """Patch embedding -> (+ [CLS]) + position embeddings -> pre-norm non-causal blocks -> norm -> pool -> head."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        bcfg = cfg.block_config()
        d, n_pos = cfg.d_model, cfg.n_prefix + cfg.num_patches
        self.patch_embed = nn.Conv2d(cfg.channels, d, cfg.patch_size, stride=cfg.patch_size, bias=cfg.patch_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d)) if cfg.pooling == "cls" else None
        if cfg.pos == "learned":
            self.pos_emb = nn.Parameter(torch.zeros(1, n_pos, d))
        else:  # derived from the config, so never saved; filled by reset_buffers()
            self.register_buffer("pos_emb", torch.empty(1, n_pos, d), persistent=False)
        self.norm_pre = make_norm(bcfg) if cfg.ln_pre else None
        self.drop = nn.Dropout(cfg.dropout)
        gelu = GELU_KERNEL[cfg.gelu]
        self.blocks = nn.ModuleList(Block(bcfg, causal=False, gelu_approximate=gelu) for _ in range(cfg.n_layer))
        self.norm = make_norm(bcfg)
        self.head = nn.Linear(d, cfg.num_classes) if cfg.num_classes else None
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Truncated N(0, init_std) everywhere (timm / MAE), the patch projection Xavier-scaled, biases zero,
        norms one. Every draw goes through ``init_normal_``, so a model built on the meta device and
        materialized with ``to_empty`` initializes to the same values as one built on the CPU."""
        std = self.cfg.init_std
        init_normal_(self.patch_embed.weight, _patch_std(self.patch_embed), truncated=True)
        if self.patch_embed.bias is not None:
            nn.init.zeros_(self.patch_embed.bias)
        if self.cls_token is not None:
            init_normal_(self.cls_token, std, truncated=True)
        if isinstance(self.pos_emb, nn.Parameter):
            init_normal_(self.pos_emb, std, truncated=True)
        if self.norm_pre is not None:
            self.norm_pre.reset_parameters()
        for block in self.blocks:
            block.init_weights(std, std, truncated=True)  # ViTs do not scale residual projections by depth
        self.norm.reset_parameters()
        if self.head is not None:
            init_linear(self.head, std, truncated=True)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """Recompute the fixed sin-cos table on the model's current device (``to_empty`` leaves it empty)."""
        if not isinstance(self.pos_emb, nn.Parameter):
            cfg = self.cfg
            table = sincos_pos_embed(cfg.d_model, cfg.grid, cfg.n_prefix, device=self.pos_emb.device)
            self.pos_emb.copy_(table[None])

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, d] with their position embeddings, without the [CLS] token."""
        size = self.cfg.image_size
        if images.dim() != 4 or images.shape[1:] != (self.cfg.channels, size, size):
            raise ValueError(f"expected images [B, {self.cfg.channels}, {size}, {size}], got {list(images.shape)}")
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return x + self.pos_emb[:, self.cfg.n_prefix:]

    def add_prefix(self, x: torch.Tensor) -> torch.Tensor:
        """Prepend the [CLS] token (with its position embedding) when pooling by it."""
        if self.cls_token is None:
            return x
        cls = (self.cls_token + self.pos_emb[:, :1]).expand(x.size(0), -1, -1)
        return torch.cat([cls, x], dim=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Run embedded tokens (any subset of patches, plus prefix) through the blocks and the final norm."""
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Every output token [B, n_prefix + N, d]."""
        return self.encode(self.add_prefix(self.embed(images)))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled image features [B, d]: the [CLS] token's output, or the mean of the patch tokens.
        What a linear probe or k-NN classifier reads."""
        x = self.tokens(images)
        return x[:, 0] if self.cfg.pooling == "cls" else x.mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits [B, num_classes]; the pooled features when the config has no head."""
        x = self.features(images)
        return x if self.head is None else self.head(x)

    def block_stacks(self) -> list[nn.ModuleList]:
        """The repeated blocks that parallelism wraps one by one (``registry.block_stacks``)."""
        return [self.blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------------------------------------- MAE


class MAEConfig(Section):
    """A ViT encoder (its head unused) and the light decoder that reconstructs the masked patches."""

    encoder: VisionConfig = VisionConfig(num_classes=0, pos="sincos")
    decoder_d_model: PositiveInt = 512
    decoder_n_layer: PositiveInt = 8
    decoder_n_head: PositiveInt = 16
    decoder_d_ff: PositiveInt | None = None
    mask_ratio: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.75

    @model_validator(mode="after")
    def _check_decoder(self) -> MAEConfig:
        if self.decoder_d_model % self.decoder_n_head:
            raise ValueError(f"decoder_d_model ({self.decoder_d_model}) must be divisible by decoder_n_head "
                             f"({self.decoder_n_head})")
        if self.encoder.pos == "sincos" and self.decoder_d_model % 4:
            raise ValueError(f"pos=sincos needs decoder_d_model ({self.decoder_d_model}) divisible by 4")
        return self

    @classmethod
    def from_size(cls, name: str, **overrides) -> MAEConfig:
        """``overrides`` may hold ``encoder={...}`` with encoder fields to change."""
        spec = lookup_size(MAE_SIZES, name, "MAE")
        encoder = VisionConfig(**{**spec.pop("encoder"), **overrides.pop("encoder", {})})
        return cls(encoder=encoder, **{**spec, **overrides})

    def decoder_block_config(self) -> BlockConfig:
        return encoder_block_config(self.encoder, self.decoder_d_model, self.decoder_n_head, self.decoder_d_ff)


class MAEModelConfig(MAEConfig):
    """The ``model:`` section of a masked-autoencoder pretraining run, named by ``size`` (a key of
    ``MAE_SIZES``). ``norm_pix``: predict each patch normalized by its own mean and variance (the paper's
    better target)."""

    arch: Literal["mae"] = "mae"
    size: str | None = None
    norm_pix: bool = True

    @model_validator(mode="before")
    @classmethod
    def _size_defaults(cls, data):
        return apply_size(data, MAE_SIZES, "MAE")


class MAE(nn.Module):
    """Masked autoencoder: the encoder sees only the visible patches; the decoder gets them back in place
    among shared mask tokens and predicts every patch's pixels. The loss (objectives/mae.py) scores only
    the masked ones."""

    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        enc, dcfg = cfg.encoder, cfg.decoder_block_config()
        d = cfg.decoder_d_model
        self.encoder = ViT(enc)
        self.decoder_embed = nn.Linear(enc.d_model, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        n_pos = enc.n_prefix + enc.num_patches
        if enc.pos == "learned":
            self.decoder_pos_emb = nn.Parameter(torch.zeros(1, n_pos, d))
        else:
            self.register_buffer("decoder_pos_emb", torch.empty(1, n_pos, d), persistent=False)
        gelu = GELU_KERNEL[enc.gelu]
        self.decoder_blocks = nn.ModuleList(Block(dcfg, causal=False, gelu_approximate=gelu)
                                            for _ in range(cfg.decoder_n_layer))
        self.decoder_norm = make_norm(dcfg)
        self.decoder_pred = nn.Linear(d, enc.patch_dim)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        std = self.cfg.encoder.init_std
        self.encoder.init_weights()
        init_linear(self.decoder_embed, std, truncated=True)
        init_normal_(self.mask_token, std, truncated=True)
        if isinstance(self.decoder_pos_emb, nn.Parameter):
            init_normal_(self.decoder_pos_emb, std, truncated=True)
        for block in self.decoder_blocks:
            block.init_weights(std, std, truncated=True)
        self.decoder_norm.reset_parameters()
        init_linear(self.decoder_pred, std, truncated=True)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        self.encoder.reset_buffers()
        if not isinstance(self.decoder_pos_emb, nn.Parameter):
            enc = self.cfg.encoder
            table = sincos_pos_embed(self.cfg.decoder_d_model, enc.grid, enc.n_prefix,
                                     device=self.decoder_pos_emb.device)
            self.decoder_pos_emb.copy_(table[None])

    def forward(self, images: torch.Tensor, mask_ratio: float | None = None,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Predicted pixels of every patch [B, N, patch_dim] (``patchify`` layout) and the mask [B, N]
        (1 = masked). ``mask_ratio`` defaults to the config's; ``generator`` fixes the mask."""
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        enc = self.encoder
        visible, mask, ids_restore = random_masking(enc.embed(images), ratio, generator)
        x = self.decoder_embed(enc.encode(enc.add_prefix(visible)))

        P = enc.cfg.n_prefix
        prefix, x = x[:, :P], x[:, P:]
        B, N, D = x.size(0), ids_restore.size(1), x.size(2)
        x = torch.cat([x, self.mask_token.expand(B, N - x.size(1), -1)], dim=1)
        x = x.gather(1, ids_restore[..., None].expand(-1, -1, D))  # back to patch order
        x = torch.cat([prefix, x], dim=1) + self.decoder_pos_emb
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, P:], mask

    def block_stacks(self) -> list[nn.ModuleList]:
        """The repeated blocks that parallelism wraps one by one (``registry.block_stacks``)."""
        return [self.encoder.blocks, self.decoder_blocks]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
