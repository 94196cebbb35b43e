"""``fmforge export hf`` for diffusion runs: a class-conditional DiT as a diffusers directory,
``transformer/`` (``DiTTransformer2DModel``: config.json + diffusion_pytorch_model.safetensors) and
``scheduler/`` (a ``DDIMScheduler`` config with the run's noise schedule and prediction type).

diffusers' DiT gives every block its own copy of the timestep and label embedders (``norm1.emb``) and reads
the final layer's conditioning from block 0's; fmforge's DiT has one shared pair, copied into each block.
The EMA weights are exported when the run kept them. What diffusers' DiT cannot express (text
conditioning, an MLP ratio other than 4) is refused in one line naming the difference. Writing needs no
diffusers install; loading the result does (``pip install 'fmforge[diffusion]'``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fmforge.errors import FmforgeError
from fmforge.models.blocks import split_qkv
from fmforge.runs import checked_run_model, claim_outputs, read_model_config, temporary_beside

TRANSFORMER_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
DIFFUSERS_MLP_RATIO = 4.0  # FeedForward(mult=4) in diffusers' BasicTransformerBlock


def diffusers_config(cfg) -> dict:
    """``DiTTransformer2DModel``'s config for this DiT, or a one-line refusal naming what does not map."""
    if cfg.condition != "class":
        raise FmforgeError("a text-conditioned DiT has no diffusers DiTTransformer2DModel equivalent: that model "
                           "takes class labels only")
    if cfg.mlp_ratio != DIFFUSERS_MLP_RATIO:
        raise FmforgeError(f"model.mlp_ratio is {cfg.mlp_ratio:g}; diffusers' DiTTransformer2DModel fixes it at 4")
    return {"_class_name": "DiTTransformer2DModel", "num_attention_heads": cfg.n_head,
            "attention_head_dim": cfg.d_model // cfg.n_head, "in_channels": cfg.channels,
            "out_channels": cfg.channels, "num_layers": cfg.n_layer, "dropout": 0.0, "norm_num_groups": 32,
            "attention_bias": True, "sample_size": cfg.image_size, "patch_size": cfg.patch_size,
            "activation_fn": "gelu-approximate", "num_embeds_ada_norm": cfg.num_classes, "upcast_attention": False,
            "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": cfg.norm_eps}


def scheduler_config(cfg) -> dict:
    """A ``DDIMScheduler`` config with the same ᾱ_t (diffusers' linear betas are DDPM's; its squaredcos_cap_v2
    is the cosine schedule with β ≤ 0.999)."""
    scale = 1000.0 / cfg.timesteps
    return {"_class_name": "DDIMScheduler", "num_train_timesteps": cfg.timesteps,
            "beta_schedule": "linear" if cfg.schedule == "linear" else "squaredcos_cap_v2",
            "beta_start": 1e-4 * scale, "beta_end": 0.02 * scale,
            "prediction_type": "epsilon" if cfg.prediction == "eps" else "v_prediction",
            "clip_sample": True, "set_alpha_to_one": True, "steps_offset": 0}


def state_to_diffusers(state: dict[str, torch.Tensor], cfg, prefix: str = "ema.") -> dict[str, torch.Tensor]:
    """fmforge DiT weights (under ``prefix``: ``ema.`` or ``net.``) -> DiTTransformer2DModel's names."""
    sd = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    out = {"pos_embed.proj.weight": sd["patch_embed.weight"], "pos_embed.proj.bias": sd["patch_embed.bias"],
           "proj_out_1.weight": sd["ada_out.weight"], "proj_out_1.bias": sd["ada_out.bias"],
           "proj_out_2.weight": sd["proj_out.weight"], "proj_out_2.bias": sd["proj_out.bias"]}
    for i in range(cfg.n_layer):
        hf, fm = f"transformer_blocks.{i}.", f"blocks.{i}."
        emb = hf + "norm1.emb."
        for j in (1, 2):
            for kind in ("weight", "bias"):
                out[f"{emb}timestep_embedder.linear_{j}.{kind}"] = sd[f"t_embed.linear_{j}.{kind}"]
        out[emb + "class_embedder.embedding_table.weight"] = sd["y_embed.weight"]
        for kind in ("weight", "bias"):
            q, k, v = split_qkv(sd[f"{fm}attn.qkv.{kind}"], cfg.n_head, cfg.n_head)
            out[f"{hf}attn1.to_q.{kind}"], out[f"{hf}attn1.to_k.{kind}"], out[f"{hf}attn1.to_v.{kind}"] = q, k, v
            out[f"{hf}attn1.to_out.0.{kind}"] = sd[f"{fm}attn.proj.{kind}"]
            out[f"{hf}norm1.linear.{kind}"] = sd[f"{fm}ada.{kind}"]
            out[f"{hf}ff.net.0.proj.{kind}"] = sd[f"{fm}mlp.c_fc.{kind}"]
            out[f"{hf}ff.net.2.{kind}"] = sd[f"{fm}mlp.c_proj.{kind}"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def export_diffusers(run_dir: str | Path, out: str | Path, echo=print, overwrite: bool = False) -> Path:
    """Write RUN_DIR's DiT as ``OUT/transformer/`` + ``OUT/scheduler/``; files already there are refused
    unless ``overwrite``."""
    run_dir, out = Path(run_dir), Path(out)
    cfg = read_model_config(run_dir)
    hf_cfg = diffusers_config(cfg)
    claim_outputs(out / "transformer", run_dir, TRANSFORMER_FILES, "exported", overwrite)
    claim_outputs(out / "scheduler", run_dir, ("scheduler_config.json",), "exported", overwrite)
    _, weights = checked_run_model(run_dir, cfg)
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError) as err:
        raise FmforgeError(f"cannot read {weights}: {err}") from None
    prefix = "ema." if any(k.startswith("ema.") for k in state) else "net."
    tensors = state_to_diffusers(state, cfg, prefix)
    (out / "transformer").mkdir(parents=True, exist_ok=True)
    (out / "scheduler").mkdir(parents=True, exist_ok=True)
    tmp = temporary_beside(out / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "transformer" / "diffusion_pytorch_model.safetensors")
    for path, data in ((out / "transformer" / "config.json", hf_cfg),
                       (out / "scheduler" / "scheduler_config.json", scheduler_config(cfg))):
        tmp = temporary_beside(path)
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(path)
    echo(f"exported {run_dir} ({'EMA' if prefix == 'ema.' else 'raw'} weights) as diffusers DiTTransformer2DModel "
         f"in {out / 'transformer'} with a DDIMScheduler config in {out / 'scheduler'}")
    return out

