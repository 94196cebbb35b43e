"""Verbs that plan, prepare data and train: ``plan``, ``ladder``, ``tune``, ``data ...``, ``train``, ``finetune``,
``distill``, ``quantize``, ``merge`` (the table ``cli.py`` parses with)."""

from __future__ import annotations

import argparse

from fmforge.cli_args import (
    ENGINE_ARGS,
    JSON_OUT,
    PREPARED_OUT,
    TORCHRUN,
    Group,
    Verb,
    _name_list,
    _number_list,
    _split_commas,
    arg,
    run_config,
)

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
# Counterfactual data augmentation (data/augment.py), shared by `data prepare` and `data augment`.
AUGMENT_MODE_ARGS = (
    arg("--augment-mode", choices=("two-sided", "substitute"), default="two-sided",
        help="two-sided: keep each document and add its counterfactual copy; substitute: replace it by its "
             "counterfactual (default: two-sided)"),
    arg("--augment-p", type=float, metavar="P",
        help="share of documents augmented, drawn from a hash of the seed and the text (default: 1 for "
             "two-sided, 0.5 for substitute)"),
    arg("--augment-seed", type=int, default=0, metavar="S", help="seed of that draw (default: 0)"),
    arg("--augment-names", action="store_true",
        help="also swap capitalized first names (the shipped name pairs; default: off)"))
AUGMENT_HELP = ("counterfactual data augmentation: swap gendered words (the shipped pair list, sources in "
                "docs/bias.md) or the pairs of PAIRS_FILE (WORD<TAB>COUNTERPART lines), whole words, keeping "
                "case; her/his resolved by the next word")
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
            Group(title="counterfactual data augmentation (settings and counts in the manifest)", args=(
                arg("--augment", metavar="cda[=PAIRS_FILE]", help=AUGMENT_HELP + " (default: none)"),
                *AUGMENT_MODE_ARGS)),
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
        "data augment", "fmforge.data.augment_rows:augment_command",
        help="counterfactual data augmentation of chat / SFT / preference / classification JSONL",
        description="Rewrite the text fields of fine-tuning JSONL rows with counterfactual data augmentation: "
                    "gendered words (or your pair file's) swapped whole-word with their case kept, the row added "
                    "as a copy (two-sided) or substituted, with probability --augment-p per row. Chat "
                    "`messages` (each message's content), `prompt`/`response`/`completion`, `chosen`/"
                    "`rejected` and `text` by default; labels and other fields are copied. Lines that are not "
                    "JSON objects are counted and skipped.",
        parents=(JSON_OUT,),
        args=(arg("input", metavar="IN.jsonl"),
              arg("--out", required=True, metavar="OUT.jsonl"),
              arg("--augment", default="cda", metavar="cda[=PAIRS_FILE]", help=AUGMENT_HELP + " (default: cda)"),
              *AUGMENT_MODE_ARGS,
              arg("--fields", type=_name_list, metavar="A,B,...",
                  help="text fields to rewrite (default: text,prompt,response,completion,chosen,rejected,messages)"),
              arg("--overwrite", action="store_true", help="replace an existing OUT.jsonl")),
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
)
