"""μP coordinate check (Yang et al. 2022, "Tensor Programs V", section 7 and appendix D.1).

Trains the decoder a few AdamW steps at several widths with one learning rate, with and without
``model.mup``, and prints the mean |activation| of the token embedding, each block's residual-stream output
and the logits after those steps, per width, with the slope of log(mean |x|) against log(width). Under μP
every slope stays near 0; under the standard parametrization the residual stream and logits grow with the
width (Adam's updates have entries of size lr whatever the fan-in, so their effect grows with it).

Data: the bytes of a few standard-library modules (vocabulary 256), so nothing needs preparing. Everything
else is fmforge's own: ``GPT``, ``build_optimizer`` and ``clm_loss``. Depth, heads (head_dim grows with the
width), batch, sequence length and seed are the same at every width; the base width is the smallest.

    python benchmarks/mup_coord_check.py                       # widths 64..512, 5 steps, lr 1e-2, llama
    python benchmarks/mup_coord_check.py --arch gpt2 --steps 10 --seeds 3
"""

from __future__ import annotations

import argparse
import json
import math
import sysconfig
from pathlib import Path

import torch

from fmforge.config import OptimConfig
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.objectives.clm import clm_loss
from fmforge.train.optim import build_optimizer

MODULES = ("textwrap.py", "argparse.py", "difflib.py", "statistics.py")


def corpus() -> torch.Tensor:
    """The bytes of a few standard-library modules as token ids."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / name).read_bytes() for name in MODULES)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def batch(tokens: torch.Tensor, gen: torch.Generator, size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (size,), generator=gen)
    rows = torch.stack([tokens[s:s + seq_len + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


def model_config(width: int, base_width: int | None, arch: str, n_layer: int, n_head: int,
                 seq_len: int) -> ModelConfig:
    mup = None if base_width is None else {"base_width": base_width}
    return ModelConfig(arch=arch, n_layer=n_layer, n_head=n_head, d_model=width, vocab_size=256,
                       max_seq_len=seq_len, mup=mup).resolved()


def activation_scales(model: GPT, x: torch.Tensor) -> dict[str, float]:
    """Mean |x| of the embedding output, each block's output and the logits on the batch ``x``."""
    scales: dict[str, float] = {}
    named = [("embedding", model.tok_emb)] + [(f"block{i}", b) for i, b in enumerate(model.blocks)]
    named.append(("logits", model.lm_head))
    hooks = [module.register_forward_hook(lambda _m, _i, out, key=key: scales.__setitem__(key, out.abs().mean().item()))
             for key, module in named]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return scales


def train_and_measure(cfg: ModelConfig, tokens: torch.Tensor, steps: int, lr: float, batch_size: int,
                      seed: int) -> dict[str, float]:
    """``steps`` AdamW steps at constant ``lr`` from a seeded init, then the activation scales on a fixed batch."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    optimizer = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0, warmup_steps=0), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    probe, _ = batch(tokens, torch.Generator().manual_seed(seed + 10_000), batch_size, cfg.max_seq_len)
    for _ in range(steps):
        x, y = batch(tokens, gen, batch_size, cfg.max_seq_len)
        loss = clm_loss(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return activation_scales(model, probe)


def slope(widths: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) against log(width)."""
    xs, ys = [math.log(w) for w in widths], [math.log(v) for v in values]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def coord_check(widths: list[int], mup: bool, steps: int = 5, lr: float = 1e-2, arch: str = "llama",
                n_layer: int = 2, n_head: int = 4, seq_len: int = 64, batch_size: int = 8,
                seeds: int = 1) -> dict[str, dict]:
    """Per activation: its mean |x| at each width (averaged over ``seeds``) and the log-log slope."""
    tokens = corpus()
    base = min(widths) if mup else None
    per_width = []
    for width in widths:
        cfg = model_config(width, base, arch, n_layer, n_head, seq_len)
        runs = [train_and_measure(cfg, tokens, steps, lr, batch_size, seed) for seed in range(seeds)]
        per_width.append({key: sum(r[key] for r in runs) / seeds for key in runs[0]})
    return {key: {"scales": [s[key] for s in per_width], "slope": slope(widths, [s[key] for s in per_width])}
            for key in per_width[0]}


def show(title: str, widths: list[int], result: dict[str, dict]) -> None:
    print(title)
    print(f"  {'activation':<10}" + "".join(f"{'d=' + str(w):>10}" for w in widths) + f"{'slope':>9}")
    for key, row in result.items():
        print(f"  {key:<10}" + "".join(f"{v:>10.4f}" for v in row["scales"]) + f"{row['slope']:>+9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    ap.add_argument("--n-layer", type=int, default=2)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(steps=args.steps, lr=args.lr, arch=args.arch, n_layer=args.n_layer, n_head=args.n_head,
                  seq_len=args.seq_len, batch_size=args.batch, seeds=args.seeds)
    print(f"{args.arch}, {args.n_layer} layers, {args.n_head} heads, {args.steps} AdamW steps at lr {args.lr}, "
          f"batch {args.batch} x {args.seq_len} bytes, {args.seeds} seed(s); mean |x| after training")
    results = {}
    for name, mup in (("standard", False), ("mup", True)):
        results[name] = coord_check(args.widths, mup, **common)
        show(f"{name} parametrization" + (f" (base_width {min(args.widths)})" if mup else ""), args.widths,
             results[name])
    print(json.dumps({"widths": args.widths, **common,
                      "slopes": {name: {k: round(v["slope"], 4) for k, v in r.items()} for name, r in results.items()}}))


if __name__ == "__main__":
    main()
