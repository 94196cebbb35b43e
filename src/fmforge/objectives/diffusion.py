"""Denoising diffusion (Ho et al. 2020) for the DiT family: noise schedules, the training loss with ε- or
v-prediction (Salimans & Ho 2022), classifier-free guidance by condition dropout (Ho & Salimans 2022), an
EMA of the weights, and the DDPM / DDIM (Song et al. 2021) samplers that ``fmforge generate`` and
``fmforge eval`` share.

Conditions: class labels from labelled shards, or captions encoded by a frozen fmforge CLIP text tower
(``model.text_encoder``: a CLIP run directory) into its pooled, unit-norm embedding.

Randomness of a step (timesteps, noise, which conditions drop) is drawn from the checkpointed CPU RNG for
the whole data-parallel micro-batch on every rank, and each rank keeps its slice: a run is the same at any
world size (for the same global micro-batch) and resumes exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from fmforge.errors import FmforgeError
from fmforge.models.dit import DiT
from fmforge.objectives.base import Sums, block_params, evaluating
from fmforge.objectives.contrastive import CaptionTokens
from fmforge.objectives.images import ImageTask
from fmforge.runs import TOKENIZER_FILES, copy_side_file, load_pretrained, read_model_config

TEXT_ENCODER_DIR = "text_encoder"  # where a text-conditioned run keeps its copy of the CLIP run
TEXT_ENCODER_FILES = ("model.safetensors", "model.json", *TOKENIZER_FILES)
MAX_TEXT_ENCODER_BYTES = 16 << 30


# ---------------------------------------------------------------------------------------------------- schedule


class NoiseSchedule:
    """ᾱ_t for t = 0..T-1. ``linear``: DDPM's β from 1e-4 to 0.02 (scaled by 1000/T for other lengths, as
    Nichol & Dhariwal do); ``cosine``: Nichol & Dhariwal's ᾱ_t = cos²((t/T + s)/(1 + s) · π/2), β ≤ 0.999."""

    def __init__(self, kind: str = "linear", timesteps: int = 1000):
        self.kind, self.timesteps = kind, timesteps
        T = timesteps
        if kind == "linear":
            scale = 1000.0 / T
            betas = torch.linspace(1e-4 * scale, 0.02 * scale, T, dtype=torch.float64)
        elif kind == "cosine":
            s = 0.008
            steps = torch.arange(T + 1, dtype=torch.float64) / T
            f = torch.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            raise FmforgeError(f"unknown noise schedule {kind!r}: linear or cosine")
        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)  # float64 on the CPU

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_t, √(1-ᾱ_t)) shaped to broadcast over ``like`` [B, C, H, W]; t = -1 means ᾱ = 1 (clean)."""
        ab = torch.where(t >= 0, self.alphas_cumprod[t.clamp(min=0).cpu()], torch.ones((), dtype=torch.float64))
        shape = (-1,) + (1,) * (like.dim() - 1)
        return (ab.sqrt().to(like.device, torch.float32).view(shape),
                (1 - ab).sqrt().to(like.device, torch.float32).view(shape))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self.coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction: str) -> torch.Tensor:
        if prediction == "eps":
            return noise
        a, s = self.coefficients(t, x0)
        return a * noise - s * x0  # v = √ᾱ ε - √(1-ᾱ) x0

    def split(self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor,
              prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, ε) implied by the network's output at x_t."""
        a, s = self.coefficients(t, xt)
        if prediction == "eps":
            return (xt - s * out) / a, out
        return a * xt - s * out, s * xt + a * out


def diffusion_loss(model, schedule: NoiseSchedule, prediction: str, x0: torch.Tensor, y: torch.Tensor,
                   t: torch.Tensor, noise: torch.Tensor, drop: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error between the network's output at x_t and its target (ε or v), in fp32."""
    xt = schedule.add_noise(x0, noise, t)
    out = model(xt, t, y, drop)
    return F.mse_loss(out.float(), schedule.target(x0, noise, t, prediction))


# ---------------------------------------------------------------------------------------------------- sampling


def sampling_timesteps(timesteps: int, steps: int) -> list[int]:
    """``steps`` timesteps evenly spaced from T-1 down to 0 (DDIM's and respaced DDPM's schedule)."""
    if not 1 <= steps <= timesteps:
        raise FmforgeError(f"--steps must be between 1 and the model's {timesteps} timesteps, got {steps}")
    return sorted({round(i * (timesteps - 1) / max(steps - 1, 1)) for i in range(steps)}, reverse=True)


@torch.no_grad()
def sample(net: nn.Module, schedule: NoiseSchedule, prediction: str, y: torch.Tensor, *, steps: int = 50,
           sampler: str = "ddim", guidance: float = 0.0, seed: int = 0, clip_x0: bool = True) -> torch.Tensor:
    """Images [B, C, H, W] in [-1, 1] for conditions ``y`` (labels [B] or text embeddings [B, D]).

    ``guidance`` is classifier-free guidance's weight w (Ho & Salimans): out = out_c + w (out_c - out_u); 0
    samples the conditional model alone (diffusers' ``guidance_scale`` is 1 + w). ``ddim`` is deterministic
    given the starting noise (η = 0); ``ddpm`` draws fresh noise at every step from the posterior of the
    respaced chain. All noise comes from a CPU generator seeded with ``seed``, so results repeat on any
    device."""
    if sampler not in ("ddim", "ddpm"):
        raise FmforgeError(f"--sampler must be ddim or ddpm, got {sampler!r}")
    if guidance < 0:
        raise FmforgeError(f"--guidance must be at least 0, got {guidance}")
    cfg = net.cfg
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(seed)
    b = y.size(0)
    x = torch.randn(b, cfg.channels, cfg.image_size, cfg.image_size, generator=g).to(device)
    y = y.to(device)
    ts = sampling_timesteps(schedule.timesteps, steps)
    for i, t_now in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t = torch.full((b,), t_now, dtype=torch.long, device=device)
        out = _guided(net, x, t, y, guidance)
        x0, eps = schedule.split(out, x, t, prediction)
        if clip_x0:  # pixel space: the data lives in [-1, 1]; recompute ε to match the clipped x0
            x0 = x0.clamp(-1, 1)
            a, s = schedule.coefficients(t, x)
            eps = (x - a * x0) / s
        tp = torch.full((b,), t_prev, dtype=torch.long, device=device)
        a_prev, s_prev = schedule.coefficients(tp, x)
        if sampler == "ddim" or t_prev < 0:
            x = a_prev * x0 + s_prev * eps
            continue
        # DDPM posterior q(x_prev | x_t, x0) over the respaced chain: β' = 1 - ᾱ_t / ᾱ_prev.
        a, s = schedule.coefficients(t, x)
        alpha = (a / a_prev) ** 2
        beta = 1 - alpha
        mean = (a_prev * beta / s ** 2) * x0 + (alpha.sqrt() * s_prev ** 2 / s ** 2) * x
        var = beta * s_prev ** 2 / s ** 2
        x = mean + var.sqrt() * torch.randn(x.shape, generator=g).to(device)
    return x.clamp(-1, 1)


def _guided(net, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, guidance: float) -> torch.Tensor:
    if guidance == 0:
        return net(x, t, y).float()
    b = x.size(0)
    drop = torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x.device)
    out = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, y]), drop).float()
    cond, uncond = out[:b], out[b:]
    return cond + guidance * (cond - uncond)


# ---------------------------------------------------------------------------------------------------- text


class TextConditioner:
    """Captions → the frozen CLIP text tower's pooled, unit-norm embeddings [B, embed_dim] (fp32, CPU),
    cached per distinct caption (a caption set repeats every epoch)."""

    def __init__(self, clip_dir: str | Path, device: str | torch.device = "cpu"):
        self.clip_dir = Path(clip_dir)
        self.model, tok = load_pretrained(self.clip_dir, device, family="clip")
        self.model.requires_grad_(False)
        self.device = device
        self.tokens = CaptionTokens(tok, self.model.cfg.text.context_length)
        self.dim = self.model.cfg.embed_dim
        self.cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            feats = self.model.encode_text(self.tokens(missing).to(self.device)).float().cpu()
            self.cache.update(zip(missing, feats))
        return torch.stack([self.cache[t] for t in texts])


def text_encoder_dir(run_dir: Path, model_cfg) -> Path:
    """The CLIP run a text-conditioned DiT reads prompts with: its own copy, else the one it trained with."""
    own = Path(run_dir) / TEXT_ENCODER_DIR
    if (own / "model.json").is_file():
        return own
    if model_cfg.text_encoder and (Path(model_cfg.text_encoder) / "model.json").is_file():
        return Path(model_cfg.text_encoder)
    raise FmforgeError(f"{run_dir} is text-conditioned but its text encoder is missing ({own} and "
                       f"{model_cfg.text_encoder} hold no model.json)")


# ---------------------------------------------------------------------------------------------------- task


def _dp_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class DiffusionTask(ImageTask):
    """DDPM training of a DiT on labelled images (class condition) or captioned images (text condition)."""

    default_global_batch = 128

    @property
    def needs_mode(self) -> str:
        return "captions" if self.cfg.model.condition == "text" else "classification"

    def __init__(self, cfg, data_dir: Path, echo):
        self.conditioner: TextConditioner | None = None
        super().__init__(cfg, data_dir, echo)
        channels = self.vision.channels
        if cfg.data.mean is None:  # diffusion works on pixels in [-1, 1], not ImageNet-standardized ones
            self.mean = self.std = (0.5,) * channels
        self.schedule = NoiseSchedule(self.model_cfg.schedule, self.model_cfg.timesteps)

    @property
    def vision(self):
        return self.model_cfg

    def resolve(self, m):
        if m.condition == "class":
            classes = len(self.train_shards.classes)
            if "num_classes" in m.model_fields_set and m.num_classes != classes:
                raise FmforgeError(f"model.num_classes ({m.num_classes}) differs from the {classes} classes of "
                                   f"{self.data_dir}; leave it unset to take the data's")
            return type(m)(**{**m.model_dump(), "num_classes": classes})
        if not m.text_encoder:
            raise FmforgeError("model.condition=text needs model.text_encoder: a CLIP run directory (fmforge train "
                               "with model.arch=clip, or fmforge import hf of a CLIP model)")
        clip_dir = Path(m.text_encoder).resolve()
        self.conditioner = TextConditioner(clip_dir)
        if "cond_dim" in m.model_fields_set and m.cond_dim != self.conditioner.dim:
            raise FmforgeError(f"model.cond_dim ({m.cond_dim}) differs from the text encoder's embedding width "
                               f"({self.conditioner.dim}); leave it unset")
        return type(m)(**{**m.model_dump(), "cond_dim": self.conditioner.dim, "text_encoder": str(clip_dir)})

    def build_model(self) -> nn.Module:
        return DiT(self.model_cfg)

    def flops_per_unit(self, model: nn.Module) -> float:
        m = self.model_cfg
        n, d = m.num_patches, m.d_model
        ada = sum(b.ada.weight.numel() for b in model.net.blocks)
        flops = 6.0 * (block_params([model.net.blocks]) - ada) * n + 6.0 * ada  # adaLN runs once per image
        flops += 12.0 * m.n_layer * d * n * n
        return flops + 6.0 * (2 * m.patch_dim * d * n + 2 * d * d)

    def conditions(self, target) -> torch.Tensor:
        """Labels as a LongTensor, or captions as their text embeddings."""
        if self.conditioner is not None:
            return self.conditioner(list(target))
        return torch.as_tensor(target, dtype=torch.long)

    def _draw(self, images: torch.Tensor, generator: torch.Generator | None = None, rank_slice: bool = True):
        """(t, noise, drop) for this rank's images, drawn for the whole data-parallel micro-batch."""
        rank, world = _dp_world() if rank_slice else (0, 1)
        b = images.size(0)
        shape = (b * world, *images.shape[1:])
        t = torch.randint(0, self.schedule.timesteps, (shape[0],), generator=generator)
        noise = torch.randn(shape, generator=generator)
        drop = torch.rand(shape[0], generator=generator) < self.model_cfg.cond_drop_prob
        mine = slice(rank * b, (rank + 1) * b)
        return t[mine].to(images.device), noise[mine].to(images.device), drop[mine].to(images.device)

    def loss(self, model, batch, device, amp):
        images = batch[0].to(device, non_blocking=True)
        y = self.conditions(batch[1]).to(device)
        t, noise, drop = self._draw(images)
        with amp():
            return diffusion_loss(model, self.schedule, self.model_cfg.prediction, images, y, t, noise, drop)

    def validate(self, model, micro_batch, device, amp):
        """The loss on the val images at the same timesteps and noise every time (no condition dropped)."""
        if self.val_shards is None:
            return None
        sums = Sums()
        g = torch.Generator().manual_seed(0)
        with evaluating(model):
            for images, target in self.val_batches(micro_batch):
                images, y = images.to(device), self.conditions(target).to(device)
                t, noise, _ = self._draw(images, g, rank_slice=False)
                with amp():
                    loss = diffusion_loss(model, self.schedule, self.model_cfg.prediction, images, y, t, noise, None)
                sums.add("val_loss", loss.item() * len(images), len(images))
        return sums.means()

    def after_step(self, model: nn.Module, step: int) -> None:
        """EMA update, its decay warmed up as (1 + step) / (10 + step) so short runs average recent weights
        rather than stay at the initialization."""
        decay = self.model_cfg.ema_decay
        if decay > 0:
            model.update_ema(min(decay, (1 + step) / (10 + step)))

    def save_pretrained(self, state_dict: dict, run_dir: Path) -> None:
        """The weights (raw ``net.*`` and EMA ``ema.*``) and model.json; a text-conditioned run also keeps a
        copy of its CLIP run in ``text_encoder/`` so the run directory samples on its own."""
        super().save_pretrained(state_dict, run_dir)
        if self.conditioner is None:
            return
        read_model_config(self.conditioner.clip_dir)  # still a CLIP run: fail before copying anything
        out = Path(run_dir) / TEXT_ENCODER_DIR
        out.mkdir(exist_ok=True)
        for name in TEXT_ENCODER_FILES:
            copy_side_file(self.conditioner.clip_dir, name, out, max_bytes=MAX_TEXT_ENCODER_BYTES)
