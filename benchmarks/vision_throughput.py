"""Training throughput of fmforge's ViT classifier and CLIP against Hugging Face transformers, in one process.

Each pair gets the same shape, batch, data, dtype/autocast, SDPA attention, fused AdamW and (with --compile)
torch.compile. Ours computes its loss with the trainer's objectives (``classification_loss``,
``contrastive_loss``); HF gets ``labels=`` / ``return_loss=True`` as a user would pass them. HF's models are
built from in-process configs (no hub, random init) with exact GELU, matching ours. Timed steps alternate
between the two models and images/s comes from the median step time, as in train_throughput.py.

    python benchmarks/vision_throughput.py --model both                       # CPU: vit-tiny, clip-nano
    python benchmarks/vision_throughput.py --model vit --size vit-b16 --batch 8 --steps 6 --warmup 2
    python benchmarks/vision_throughput.py --device cuda --model both --dtype bf16 --compile   # ViT-B/16, CLIP B/32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import time

import torch

from fmforge.models.clip import CLIP, CLIPConfig
from fmforge.models.vit import VisionConfig, ViT
from fmforge.objectives.contrastive import contrastive_loss
from fmforge.objectives.image_classify import classification_loss

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Dense bf16 peak TFLOPS by device-name substring, for MFU.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L4": 121.0}
DEFAULT_SIZE = {("vit", "cpu"): "vit-tiny", ("clip", "cpu"): "clip-nano",
                ("vit", "cuda"): "vit-b16", ("clip", "cuda"): "clip-b32"}
DEFAULT_BATCH = {("vit", "cpu"): 32, ("clip", "cpu"): 32, ("vit", "cuda"): 128, ("clip", "cuda"): 256}


def ours_config(model: str, size: str):
    if model == "vit":
        return VisionConfig.from_size(size)
    # HF's CLIP vision tower always has OpenAI's pre-norm and a bias-free patch projection; the named B/32+
    # sizes already do, the CPU size is given them so the two architectures (and parameter counts) match.
    return CLIPConfig.from_size(size, vision=dict(ln_pre=True, patch_bias=False))


def build_hf(cfg) -> torch.nn.Module:
    """The same architecture in transformers, from an in-process config (no hub)."""
    from transformers import CLIPConfig as HFCLIPConfig
    from transformers import CLIPModel, ViTConfig, ViTForImageClassification

    def vision(v: VisionConfig) -> dict:
        return dict(hidden_size=v.d_model, num_hidden_layers=v.n_layer, num_attention_heads=v.n_head,
                    intermediate_size=v.block_config().d_ff, image_size=v.image_size, patch_size=v.patch_size,
                    num_channels=v.channels, layer_norm_eps=v.norm_eps, hidden_act="gelu")

    if isinstance(cfg, VisionConfig):
        hf_cfg = ViTConfig(**vision(cfg), num_labels=cfg.num_classes, qkv_bias=cfg.bias,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        return ViTForImageClassification._from_config(hf_cfg, attn_implementation="sdpa")
    t = cfg.text
    # eos_token_id=2 selects HF's legacy pooling at the argmax token id, which is ours (pool="argmax").
    text = dict(vocab_size=t.vocab_size, hidden_size=t.d_model, num_hidden_layers=t.n_layer,
                num_attention_heads=t.n_head, intermediate_size=t.block_config().d_ff,
                max_position_embeddings=t.context_length, layer_norm_eps=t.norm_eps, hidden_act="gelu",
                bos_token_id=0, pad_token_id=1, eos_token_id=2)
    hf_cfg = HFCLIPConfig(text_config=text, vision_config=vision(cfg.vision), projection_dim=cfg.embed_dim,
                          logit_scale_init_value=cfg.init_logit_scale)
    return CLIPModel._from_config(hf_cfg, attn_implementation="sdpa")


def encoder_flops(blocks: torch.nn.Module, cfg, tokens: int) -> float:
    """Training FLOPs of a stack of blocks over one sequence, PaLM appendix B: 6 N T + 12 L d T^2."""
    n = sum(p.numel() for p in blocks.parameters() if p.dim() >= 2)
    return 6.0 * n * tokens + 12.0 * cfg.n_layer * cfg.d_model * tokens ** 2


def flops_per_image(model: torch.nn.Module) -> float:
    """Training FLOPs per image (ViT) or image-caption pair (CLIP), matmuls only, for MFU."""
    vit = model if isinstance(model, ViT) else model.visual
    v = vit.cfg
    flops = encoder_flops(vit.blocks, v, v.n_prefix + v.num_patches)
    flops += 6.0 * v.num_patches * vit.patch_embed.weight.numel()
    if isinstance(model, ViT):
        return flops + (6.0 * model.head.weight.numel() if model.head is not None else 0.0)
    text = model.cfg.text
    flops += encoder_flops(model.text.blocks, text, text.context_length)
    return flops + 6.0 * (model.image_proj.weight.numel() + model.text_proj.weight.numel())


def make_step(kind: str, side: str, compiled, loss_fn, opt, batch: dict, autocast):
    """One training step: forward, loss, backward, AdamW step."""
    def step() -> torch.Tensor:
        with autocast():
            if kind == "vit" and side == "ours":
                loss = loss_fn(compiled(batch["images"]), batch["labels"])
            elif kind == "vit":
                loss = compiled(pixel_values=batch["images"], labels=batch["labels"]).loss
            elif side == "ours":
                loss = loss_fn(compiled(batch["images"], batch["tokens"]))
            else:
                loss = compiled(input_ids=batch["tokens"], pixel_values=batch["images"], return_loss=True).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(kind: str, args, device: torch.device) -> dict:
    size = args.size or DEFAULT_SIZE[kind, device.type]
    batch_size = args.batch or DEFAULT_BATCH[kind, device.type]
    cfg = ours_config(kind, size)
    v = cfg if kind == "vit" else cfg.vision
    gen = torch.Generator().manual_seed(args.seed)
    batch = {"images": torch.randn(batch_size, v.channels, v.image_size, v.image_size, generator=gen)}
    if kind == "vit":
        batch["labels"] = torch.randint(0, cfg.num_classes, (batch_size,), generator=gen)
    else:
        batch["tokens"] = torch.randint(0, cfg.text.vocab_size, (batch_size, cfg.text.context_length), generator=gen)
    batch = {k: t.to(device) for k, t in batch.items()}
    if args.dtype == "bf16":
        def autocast():
            return torch.autocast(device.type, dtype=torch.bfloat16)
    else:
        autocast = contextlib.nullcontext

    sides = ["ours", "hf"]
    steps, params = {}, {}
    for side in sides:
        torch.manual_seed(args.seed)
        model = ((ViT(cfg) if kind == "vit" else CLIP(cfg)) if side == "ours" else build_hf(cfg)).to(device).train()
        params[side] = sum(p.numel() for p in model.parameters())
        compiled = torch.compile(model) if args.compile else model
        # HF's loss runs inside its forward, so compiling HF compiles its loss; compile ours alike.
        loss_fn = classification_loss if kind == "vit" else contrastive_loss
        loss_fn = torch.compile(loss_fn) if args.compile else loss_fn
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1,
                                fused=device.type in ("cuda", "cpu"))
        steps[side] = make_step(kind, side, compiled, loss_fn, opt, batch, autocast)
        for _ in range(args.warmup):
            steps[side]()
        sync(device)

    # One step of each model in turn, each timed alone; the median step ignores bursts of machine noise.
    times: dict[str, list[float]] = {side: [] for side in sides}
    losses = {}
    for _ in range(args.steps):
        for side in sides:
            sync(device)
            t0 = time.perf_counter()
            loss = steps[side]()
            sync(device)
            times[side].append(time.perf_counter() - t0)
            losses[side] = loss.item()

    with torch.device("meta"):
        flops = flops_per_image(ViT(cfg) if kind == "vit" else CLIP(cfg))
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        peak = next((p for k, p in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name(device)), None)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    same = params["ours"] == params["hf"]
    result = {"model": kind, "size": size, "batch": batch_size, "dtype": args.dtype, "compile": args.compile,
              "device": str(device), "device_name": device_name, "threads": torch.get_num_threads(),
              "steps": args.steps, "warmup": args.warmup, "ours_params": params["ours"],
              "hf_params": params["hf"], "same_params": same, "gflops_per_image": round(flops / 1e9, 3)}
    hf_name = "ViTForImageClassification" if kind == "vit" else "CLIPModel"
    print(f"\n{size} vs transformers {hf_name}, B={batch_size} {args.dtype} compile={args.compile} on {device_name} "
          f"({result['threads']} threads, torch {torch.__version__})")
    print(f"params: ours {params['ours']:,}, hf {params['hf']:,} "
          + ("(identical)" if same else f"(DIFFER by {params['ours'] - params['hf']:+,})"))
    print(f"{'model':<8}{'images/s':>12}{'ms/step':>10}{'MFU':>8}{'final loss':>12}")
    for side in sides:
        median = statistics.median(times[side])
        ips = batch_size / median
        mfu = flops * ips / (peak * 1e12) if peak else None
        result[f"{side}_images_per_s"] = round(ips, 1)
        result[f"{side}_ms_per_step_median"] = round(1e3 * median, 2)
        result[f"{side}_ms_per_step_mean"] = round(1e3 * statistics.fmean(times[side]), 2)
        result[f"{side}_mfu"] = None if mfu is None else round(mfu, 4)
        result[f"{side}_loss"] = round(losses[side], 4)
        mfu_text = "-" if mfu is None else f"{100 * mfu:.1f}%"
        print(f"{side:<8}{ips:>12,.1f}{1e3 * median:>10.1f}{mfu_text:>8}{losses[side]:>12.4f}")
    result["ratio_ours_over_hf"] = round(result["ours_images_per_s"] / result["hf_images_per_s"], 3)
    print(f"ours / hf = {result['ratio_ours_over_hf']:.2f}x")
    print(json.dumps(result))
    return result


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["vit", "clip", "both"], default="both")
    p.add_argument("--size", help="a named size (VIT_SIZES / CLIP_SIZES); default vit-tiny / clip-nano on CPU, "
                                  "vit-b16 / clip-b32 on CUDA. With --model both it must suit both, so leave it out")
    p.add_argument("--batch", type=int, help="images per step (default 32 on CPU; 128 ViT / 256 CLIP on CUDA)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per model (images/s from the median step)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per model (compilation happens here)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    p.add_argument("--compile", action="store_true", help="torch.compile both models and our loss")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: table for known GPUs)")
    p.add_argument("--threads", type=int, help="torch intra-op threads on CPU (default: torch's choice)")
    p.add_argument("--json", metavar="PATH", help="also write the list of results to PATH")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.model == "both" and args.size:
        p.error("--size names one family's size; pick --model vit or --model clip with it")

    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    results = [bench(kind, args, device) for kind in (["vit", "clip"] if args.model == "both" else [args.model])]
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
