"""What a CLI verb does beyond calling its library function: validate before starting, become torchrun,
print a result, pick per-demo defaults. ``cli.py`` names these in its verb table and imports this module
only when such a verb runs."""

from __future__ import annotations

import os
import sys

from fmforge.config import load_config
from fmforge.deploy.generate import generate
from fmforge.errors import FmforgeError
from fmforge.eval.perplexity import evaluate
from fmforge.eval.runs import evaluate_run
from fmforge.launch.cli import launch
from fmforge.quickstart import quickstart
from fmforge.runs import family_of, read_model_config
from fmforge.train.checkpoint import export_consolidated
from fmforge.train.loop import train


def train_command(config: str, overrides: list[str], *, data: str | None = None, out: str | None = None,
                  resume: str | None = None, nproc_per_node: int = 1, max_restarts: int = 0) -> None:
    """``fmforge train``: validate the config, become torchrun when asked for several processes or
    restarts, then run the one training loop (whatever the model family and objective)."""
    cfg = load_config(config, overrides)  # a bad config fails here, before any process starts
    if (nproc_per_node > 1 or max_restarts > 0) and "LOCAL_RANK" not in os.environ:
        _torchrun(config, overrides, data=data, out=out, resume=resume, nproc_per_node=nproc_per_node,
                  max_restarts=max_restarts)
    # Paths are set as plain strings, not as overrides: YAML would read `run #2` as `run` and 2024 as an int.
    if data:
        cfg.data.path = data
    if out:
        cfg.train.out_dir = out
    train(cfg, resume=resume)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every file is written and the process group destroyed by now. Skipping interpreter teardown
        # avoids a race in gloo's background threads that aborts ~1 exit in 5 on CPU ("terminate called
        # without an active exception"), which torchrun would report as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _torchrun(config: str, overrides: list[str], *, data: str | None, out: str | None, resume: str | None,
              nproc_per_node: int, max_restarts: int) -> None:
    """Re-run this same `fmforge train` under torchrun on this machine. A restarted worker group must pick
    up where the failed one stopped, so --max-restarts implies --resume auto."""
    if nproc_per_node < 1:
        raise FmforgeError(f"--nproc-per-node must be at least 1, got {nproc_per_node}")
    resume = resume or ("auto" if max_restarts > 0 else None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc_per_node}",
           f"--max-restarts={max_restarts}", "-m", "fmforge", "train", config, *overrides]
    for flag, value in (("--data", data), ("--out", out), ("--resume", resume)):
        if value:
            cmd += [flag, value]
    # Become torchrun (same PID): signals from a scheduler or Ctrl-C reach it and, through it, the workers.
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


def finetune_command(config: str, overrides: list[str], *, base: str | None = None, data: str | None = None,
                     out: str | None = None, resume: str | None = None, nproc_per_node: int = 1,
                     max_restarts: int = 0) -> None:
    """``fmforge finetune``: ``fmforge train`` that insists on a base model (``base`` sets finetune.base)."""
    if base:
        overrides = [*overrides, f"finetune.base={base}"]
    if not load_config(config, overrides).finetune.base:
        raise FmforgeError("fmforge finetune needs a base model: --base RUN_DIR (or finetune.base in the config)")
    train_command(config, overrides, data=data, out=out, resume=resume, nproc_per_node=nproc_per_node,
                  max_restarts=max_restarts)


def eval_command(run_dir: str, *, data: str | None = None, max_batches: int | None = None,
                 batch_size: int | None = None, zero_shot: str | None = None, class_names: list[str] | None = None,
                 templates: list[str] | None = None, probe_samples: int = 10000, random_baseline: bool = False,
                 device: str = "auto", json_out: bool = False) -> None:
    """``fmforge eval``: perplexity for decoders, the family's own metrics and probes for everything else."""
    if family_of(read_model_config(run_dir)) == "decoder":
        if zero_shot or class_names or templates or random_baseline:
            raise FmforgeError("--zero-shot, --class-names, --template and --random-baseline apply to image runs")
        evaluate(run_dir, data_dir=data, max_batches=max_batches, batch_size=batch_size or 8, device=device,
                 json_out=json_out)
        return
    evaluate_run(run_dir, data_dir=data, zero_shot=zero_shot, class_names=class_names, templates=templates,
                 batch_size=batch_size or 64, max_batches=max_batches, probe_samples=probe_samples,
                 random_baseline=random_baseline, device=device, json_out=json_out)


def generate_command(run_dir: str, *, prompt: str = "", max_new_tokens: int = 200, temperature: float = 0.8,
                     top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                     device: str = "auto") -> None:
    """``fmforge generate``: print the prompt and its sampled continuation."""
    print(generate(run_dir, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, device=device))


def launch_command(target: str, config: str, overrides: list[str], *, nodes: int = 1, gpus_per_node: int = 8,
                   data: str | None = None, run_dir: str | None = None, out: str | None = None,
                   options: list[str] = (), submit: bool = False) -> None:
    """``fmforge launch``: ``options`` are the scheduler settings as ``key=value`` words."""
    settings = {}
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FmforgeError(f"bad --option {item!r}: expected key=value")
        settings[key] = value
    launch(target, config, nodes=nodes, gpus_per_node=gpus_per_node, out=out, submit=submit, data=data,
           run_dir=run_dir, overrides=overrides, options=settings)


def export_safetensors_command(checkpoint: str, out: str) -> None:
    """``fmforge export safetensors``: consolidate a sharded checkpoint and say what was written."""
    written = export_consolidated(checkpoint, out)
    print(f"wrote {written / 'model.safetensors'} (+ model.json, tokenizer)")


def quickstart_command(*, task: str = "language", out: str | None = None, minutes: float | None = None) -> None:
    """``fmforge quickstart``: the output directory and time budget default per demo."""
    language = task == "language"
    quickstart(out=out or ("runs/quickstart" if language else "runs/quickstart-vision"),
               minutes=minutes if minutes is not None else (6.0 if language else 3.0), task=task)
