"""``fmforge`` command line: parse arguments, call the verb's function, print user errors as one line.

Nothing else lives here: every verb is a plain importable function (see each ``_cmd_*`` for which).
"""

from __future__ import annotations

import argparse
import os
import sys

from fmforge import __version__
from fmforge.errors import FmforgeError


def _cmd_data_prepare(args: argparse.Namespace) -> None:
    from fmforge.data.prepare import prepare_data

    prepare_data(args.inputs, args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                 val_fraction=args.val_fraction, text_field=args.text_field, overwrite=args.overwrite,
                 drop_near_duplicates=args.drop_near_duplicates)


def _cmd_data_prepare_images(args: argparse.Namespace) -> None:
    from fmforge.data.image_shards import prepare_images

    classes = [c.strip() for c in args.classes.split(",")] if args.classes is not None else None
    prepare_images(args.inputs, args.out, image_field=args.image_field, caption_field=args.caption_field,
                   label_field=args.label_field, classes=classes, val_fraction=args.val_fraction,
                   shard_samples=args.shard_samples, shard_bytes=args.shard_bytes, workers=args.workers,
                   overwrite=args.overwrite, tokenizer=args.tokenizer, vocab_size=args.vocab_size)


def _cmd_train(args: argparse.Namespace) -> None:
    from fmforge.config import load_config
    from fmforge.train.loop import train

    cfg = load_config(args.config, args.overrides)  # a bad config fails here, before any process starts
    if (args.nproc_per_node > 1 or args.max_restarts > 0) and "LOCAL_RANK" not in os.environ:
        _torchrun(args)
    # Paths are set as plain strings, not as overrides: YAML would read `run #2` as `run` and 2024 as an int.
    if args.data:
        cfg.data.path = args.data
    if args.out:
        cfg.train.out_dir = args.out
    train(cfg, resume=args.resume)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every file is written and the process group destroyed by now. Skipping interpreter teardown
        # avoids a race in gloo's background threads that aborts ~1 exit in 5 on CPU ("terminate called
        # without an active exception"), which torchrun would report as a failed run.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _cmd_finetune(args: argparse.Namespace) -> None:
    if args.base:
        args.overrides = [*args.overrides, f"finetune.base={args.base}"]
    from fmforge.config import load_config

    if not load_config(args.config, args.overrides).finetune.base:
        raise FmforgeError("fmforge finetune needs a base model: --base RUN_DIR (or finetune.base in the config)")
    _cmd_train(args)


def _cmd_merge(args: argparse.Namespace) -> None:
    from fmforge.finetune.base import merge

    merge(args.adapters, args.out, base=args.base)


def _cmd_export_safetensors(args: argparse.Namespace) -> None:
    from fmforge.train.checkpoint import export_consolidated

    out = export_consolidated(args.checkpoint, args.out)
    print(f"wrote {out / 'model.safetensors'} (+ model.json, tokenizer)")


def _cmd_import_hf(args: argparse.Namespace) -> None:
    from fmforge.models.hf import import_hf

    import_hf(args.hf_dir, args.out)


def _cmd_export_hf(args: argparse.Namespace) -> None:
    from fmforge.models.hf import export_hf

    export_hf(args.run_dir, args.out)


def _torchrun(args: argparse.Namespace) -> None:
    """Re-run this same `fmforge train` under torchrun on this machine. A restarted worker group must pick
    up where the failed one stopped, so --max-restarts implies --resume auto."""
    if args.nproc_per_node < 1:
        raise FmforgeError(f"--nproc-per-node must be at least 1, got {args.nproc_per_node}")
    resume = args.resume or ("auto" if args.max_restarts > 0 else None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc_per_node}",
           f"--max-restarts={args.max_restarts}", "-m", "fmforge", "train", args.config, *args.overrides]
    for flag, value in (("--data", args.data), ("--out", args.out), ("--resume", resume)):
        if value:
            cmd += [flag, value]
    # Become torchrun (same PID): signals from a scheduler or Ctrl-C reach it and, through it, the workers.
    sys.stdout.flush()
    os.execv(sys.executable, cmd)


def _cmd_launch(args: argparse.Namespace) -> None:
    from fmforge.launch.cli import launch

    options = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise FmforgeError(f"bad --option {item!r}: expected key=value")
        options[key] = value
    launch(args.target, args.config, nodes=args.nodes, gpus_per_node=args.gpus_per_node, out=args.out,
           submit=args.submit, data=args.data, run_dir=args.run_dir, overrides=args.overrides, options=options)


def _cmd_generate(args: argparse.Namespace) -> None:
    from fmforge.deploy.generate import generate

    text = generate(args.run_dir, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, device=args.device)
    print(text)


def _cmd_eval(args: argparse.Namespace) -> None:
    from fmforge.runs import family_of, read_model_config

    if family_of(read_model_config(args.run_dir)) == "decoder":
        from fmforge.eval.perplexity import evaluate

        if args.zero_shot or args.class_names or args.template or args.random_baseline:
            raise FmforgeError("--zero-shot, --class-names, --template and --random-baseline apply to image runs")
        evaluate(args.run_dir, data_dir=args.data, max_batches=args.max_batches, batch_size=args.batch_size or 8,
                 device=args.device, json_out=args.json)
        return
    from fmforge.eval.runs import evaluate_run

    evaluate_run(args.run_dir, data_dir=args.data, zero_shot=args.zero_shot, class_names=args.class_names,
                 templates=args.template, batch_size=args.batch_size or 64, max_batches=args.max_batches,
                 probe_samples=args.probe_samples, random_baseline=args.random_baseline, device=args.device,
                 json_out=args.json)


def _cmd_plan(args: argparse.Namespace) -> None:
    from fmforge.plan.planner import plan_cli

    plan_cli(args)


def _cmd_ladder(args: argparse.Namespace) -> None:
    from fmforge.plan.ladder import run_ladder

    run_ladder(args.config, args.overrides, data=args.data, out=args.out, sizes=args.sizes, params=args.params,
               tokens=args.tokens, target_params=args.target_params, target_tokens=args.target_tokens,
               run_target=args.run_target, bootstrap=args.bootstrap, seed=args.seed, fit_only=args.fit_only)


def _cmd_tune(args: argparse.Namespace) -> None:
    from fmforge.plan.tune import tune

    tune(args.config, args.overrides, data=args.data, out=args.out, trials=args.trials, space=args.space,
         pruner=args.pruner, seed=args.seed)


def _cmd_quickstart(args: argparse.Namespace) -> None:
    from fmforge.quickstart import quickstart

    default_out = "runs/quickstart" if args.task == "language" else "runs/quickstart-vision"
    default_minutes = 6.0 if args.task == "language" else 3.0
    minutes = args.minutes if args.minutes is not None else default_minutes
    quickstart(out=args.out or default_out, minutes=minutes, task=args.task)


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
    return [part.strip() for part in text.split(",") if part.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fmforge",
        description="Pretrain, evaluate and sample foundation models, from raw data to weights, on one CPU or a GPU cluster.",
        epilog="Start with `fmforge quickstart`: it trains a tiny language model on text every Python install "
               "carries, in a few minutes on a laptop CPU. Each verb has its own --help.",
    )
    p.add_argument("--version", action="version", version=f"fmforge {__version__}")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    data = verbs.add_parser("data", help="prepare datasets (clean, dedup, tokenize, shard)",
                            description="Prepare datasets for training.")
    data_verbs = data.add_subparsers(dest="data_verb", metavar="ACTION", required=True)
    dp = data_verbs.add_parser(
        "prepare", help="raw text → tokenizer + token shards + manifest",
        description="Read text files, directories or globs (.txt .md .py .rst .jsonl .parquet), normalize "
                    "Unicode, drop exact duplicates, report near-duplicates, train a byte-level BPE tokenizer "
                    "(or load one) and write token shards plus manifest.json. Bad records are counted by "
                    "reason, skipped and summarized.")
    dp.add_argument("inputs", nargs="+", metavar="INPUT", help="files, directories or quoted globs")
    dp.add_argument("--out", required=True, metavar="DATA_DIR", help="output directory")
    tok = dp.add_mutually_exclusive_group()
    tok.add_argument("--tokenizer", metavar="PATH", help="use this tokenizer.json or HF tokenizer directory")
    tok.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                     help="train a byte-level BPE tokenizer of this size (default: 8192)")
    dp.add_argument("--val-fraction", type=float, default=0.01, metavar="F",
                    help="fraction of documents held out for validation (default: 0.01)")
    dp.add_argument("--text-field", default="text", metavar="NAME",
                    help="field holding the text in .jsonl/.parquet records (default: text)")
    dp.add_argument("--drop-near-duplicates", action="store_true",
                    help="drop near-duplicate documents too (default: only report them)")
    dp.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    dp.set_defaults(func=_cmd_data_prepare)
    di = data_verbs.add_parser(
        "prepare-images", help="images (class folders or captions/labels list) → WebDataset tar shards + index",
        description="Read class-folder trees (ROOT/CLASS/.../image: classification) or .csv/.jsonl lists of "
                    "image paths with captions (or labels, with --label-field; relative paths resolve against "
                    "the list's folder), decode every image with Pillow, and write train_*.tar / val_*.tar "
                    "shards in WebDataset layout (KEY.jpg|png|webp + KEY.cls or KEY.txt + KEY.json) plus "
                    "index.json. Missing files, corrupt or truncated images, missing captions and unknown "
                    "labels are counted by reason, skipped and summarized.")
    di.add_argument("inputs", nargs="+", metavar="INPUT", help="class-folder trees, or .csv/.jsonl image lists")
    di.add_argument("--out", required=True, metavar="DATA_DIR", help="output directory")
    di.add_argument("--image-field", default="image", metavar="NAME",
                    help="column/field holding the image path in lists (default: image)")
    di.add_argument("--caption-field", default="caption", metavar="NAME",
                    help="column/field holding the caption in lists (default: caption)")
    di.add_argument("--label-field", metavar="NAME",
                    help="column/field holding a class label: makes a list a classification dataset")
    di.add_argument("--classes", metavar="A,B,...",
                    help="class names in label order; others are dropped (default: every class seen, sorted)")
    di.add_argument("--val-fraction", type=float, default=0.05, metavar="F",
                    help="fraction of images held out for validation, chosen by image hash (default: 0.05)")
    di.add_argument("--shard-samples", type=int, default=1000, metavar="N",
                    help="samples per shard (default: 1000)")
    di.add_argument("--shard-bytes", type=int, metavar="B", help="also close a shard once it reaches B bytes")
    di.add_argument("--workers", type=int, metavar="N",
                    help="threads decoding images for verification (default: the usable cores, at most 8)")
    ditok = di.add_mutually_exclusive_group()
    ditok.add_argument("--tokenizer", metavar="PATH",
                       help="captions: copy this tokenizer.json or HF tokenizer directory as the caption tokenizer")
    ditok.add_argument("--vocab-size", type=int, default=4096, metavar="N",
                       help="captions: train a byte-level BPE of up to N tokens on the train captions (default: 4096)")
    di.add_argument("--overwrite", action="store_true", help="replace an existing prepared directory")
    di.set_defaults(func=_cmd_data_prepare_images)

    tr = verbs.add_parser(
        "train", help="pretrain a model from a config",
        description="Pretrain a causal language model. CONFIG is a YAML file (see configs/); any key can be "
                    "overridden as key.sub=value, e.g. train.max_steps=200 optim.lr=1e-3. Unknown keys and "
                    "wrong types are rejected before any work. The resolved config, metrics.jsonl, "
                    "TensorBoard events, checkpoints and final weights go to the run directory.")
    tr.add_argument("config", metavar="CONFIG.yaml")
    tr.add_argument("overrides", nargs="*", metavar="key.sub=value")
    tr.add_argument("--data", metavar="DATA_DIR", help="prepared data directory (sets data.path)")
    tr.add_argument("--out", metavar="RUN_DIR", help="run directory (sets train.out_dir)")
    tr.add_argument("--resume", metavar="auto|PATH",
                    help="auto: continue from the newest valid checkpoint in RUN_DIR (fresh start if none); "
                         "PATH: from that checkpoint directory")
    tr.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                    help="data-parallel processes on this machine, started through torchrun (GPUs: one per GPU; "
                         "CPU: gloo). Multi-node jobs: see `fmforge launch`")
    tr.add_argument("--max-restarts", type=int, default=0, metavar="R",
                    help="restart all processes up to R times after a failure, resuming from the newest "
                         "checkpoint (implies --resume auto)")
    tr.set_defaults(func=_cmd_train)

    ft = verbs.add_parser(
        "finetune", help="fine-tune a trained or imported model: full, or LoRA adapters",
        description="Train starting from a base model (--base RUN_DIR: from `fmforge train` or `fmforge import "
                    "hf`) on prepared data with the base's tokenizer: finetune.method=full (finetune.freeze "
                    "lists parameter-name globs to keep frozen) or finetune.method=lora (finetune.lora_rank, "
                    "lora_alpha, lora_dropout, lora_targets). Everything else is `fmforge train`: the same "
                    "config, checkpoints, resume and multi-process options. LoRA runs write "
                    "adapter_model.safetensors + adapter_config.json and a merged model.safetensors.")
    ft.add_argument("config", metavar="CONFIG.yaml")
    ft.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ft.add_argument("--base", metavar="RUN_DIR", help="the model to start from (sets finetune.base)")
    ft.add_argument("--data", metavar="DATA_DIR", help="prepared data directory (sets data.path)")
    ft.add_argument("--out", metavar="RUN_DIR", help="run directory (sets train.out_dir)")
    ft.add_argument("--resume", metavar="auto|PATH", help="as for train")
    ft.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="as for train")
    ft.add_argument("--max-restarts", type=int, default=0, metavar="R", help="as for train")
    ft.set_defaults(func=_cmd_finetune)

    mg = verbs.add_parser(
        "merge", help="fold LoRA adapters into their base model",
        description="Load the base model named in ADAPTER_DIR/adapter_config.json (or --base), add the adapters, "
                    "fold them into the weights (W + alpha/r B A) and write a plain run directory.")
    mg.add_argument("adapters", metavar="ADAPTER_DIR")
    mg.add_argument("--base", metavar="RUN_DIR", help="base run directory (default: the one the adapters name)")
    mg.add_argument("--out", required=True, metavar="RUN_DIR")
    mg.set_defaults(func=_cmd_merge)

    la = verbs.add_parser(
        "launch", help="write (and submit) a multi-node training job: slurm, k8s, sagemaker, skypilot",
        description="Write the job that runs `fmforge train CONFIG --resume auto` under torchrun (c10d "
                    "rendezvous) on NODES machines: an sbatch script (slurm), a Kubeflow PyTorchJob (k8s), a "
                    "CreateTrainingJob request (sagemaker) or a task YAML (skypilot). The config is validated "
                    "first. --submit also submits it. Scheduler settings: --option key=value (e.g. "
                    "partition=gpu, image=..., role_arn=...); unknown keys are rejected and listed.")
    la.add_argument("target", choices=["slurm", "k8s", "sagemaker", "skypilot"])
    la.add_argument("config", metavar="CONFIG.yaml")
    la.add_argument("overrides", nargs="*", metavar="key.sub=value")
    la.add_argument("--nodes", type=int, default=1, metavar="N")
    la.add_argument("--gpus-per-node", type=int, default=8, metavar="G")
    la.add_argument("--data", metavar="DATA_DIR", help="prepared data, as the nodes see it")
    la.add_argument("--run-dir", metavar="RUN_DIR", help="the job's run directory, as the nodes see it")
    la.add_argument("--out", metavar="DIR", help="where to write the artifact (default: launch/TARGET/)")
    la.add_argument("--option", action="append", default=[], metavar="key=value", help="scheduler setting (repeatable)")
    la.add_argument("--submit", action="store_true", help="submit the job after writing it")
    la.set_defaults(func=_cmd_launch)

    ge = verbs.add_parser("generate", help="sample text from a trained model",
                          description="Sample a continuation of PROMPT with a KV cache. temperature 0 is greedy.")
    ge.add_argument("run_dir", metavar="RUN_DIR")
    ge.add_argument("--prompt", default="", metavar="TEXT")
    ge.add_argument("--max-new-tokens", type=int, default=200, metavar="N")
    ge.add_argument("--temperature", type=float, default=0.8, metavar="T")
    ge.add_argument("--top-k", type=int, default=None, metavar="K")
    ge.add_argument("--top-p", type=float, default=None, metavar="P")
    ge.add_argument("--seed", type=int, default=None, metavar="S", help="fix the sampling RNG (reproducible output)")
    ge.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ge.set_defaults(func=_cmd_generate)

    ev = verbs.add_parser(
        "eval", help="evaluate a trained model: loss/perplexity/bits per byte, accuracy, probes, zero-shot, retrieval",
        description="Evaluate a trained model on the validation split of its data, or of another prepared "
                    "directory (--data). Language models: loss, perplexity, bits per byte, unigram baseline. "
                    "ViT: top-1/top-5, plus linear probe and k-NN on frozen features (also MAE encoders, on "
                    "labelled data). CLIP: image<->text retrieval recall@1/5/10, and zero-shot classification "
                    "of a labelled image directory (--zero-shot). BERT: masked-LM loss and perplexity.")
    ev.add_argument("run_dir", metavar="RUN_DIR")
    ev.add_argument("--data", metavar="DATA_DIR", help="prepared data directory (default: the run's own data)")
    ev.add_argument("--max-batches", type=int, default=None, metavar="N", help="cap the evaluated batches")
    ev.add_argument("--batch-size", type=int, default=None, metavar="B", help="default: 8 sequences or 64 images")
    ev.add_argument("--zero-shot", metavar="DATA_DIR", help="clip: classify this labelled image directory's val split")
    ev.add_argument("--class-names", type=_name_list, metavar="A,B,...",
                    help="clip zero-shot: class names for the prompts (default: the directory's class names)")
    ev.add_argument("--template", action="append", metavar="TEXT",
                    help="clip zero-shot: a prompt template with {} for the class name (repeatable; default: "
                         "12 of CLIP's ImageNet templates)")
    ev.add_argument("--probe-samples", type=int, default=10000, metavar="N",
                    help="train images whose features fit the linear probe and k-NN (default: 10000)")
    ev.add_argument("--random-baseline", action="store_true",
                    help="also probe a randomly initialized model of the same shape (what pretraining added)")
    ev.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ev.add_argument("--json", action="store_true", help="print the result as JSON")
    ev.set_defaults(func=_cmd_eval)

    ex = verbs.add_parser("export", help="write a trained model or checkpoint in another format")
    ex_verbs = ex.add_subparsers(dest="format", required=True, metavar="FORMAT")
    es = ex_verbs.add_parser(
        "safetensors", help="consolidate a sharded training checkpoint into one model.safetensors",
        description="Gather a Distributed Checkpoint directory (written by any number of processes, FSDP or "
                    "tensor parallel) into model.safetensors + model.json + tokenizer: a directory that "
                    "`fmforge generate` and `fmforge eval` read. Runs in one process on the CPU.")
    es.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="e.g. RUN_DIR/checkpoints/step_0001000")
    es.add_argument("--out", required=True, metavar="DIR")
    es.set_defaults(func=_cmd_export_safetensors)
    eh = ex_verbs.add_parser(
        "hf", help="write a trained model as a Hugging Face directory (AutoModel / AutoTokenizer load it)",
        description="Write RUN_DIR's model as config.json + model.safetensors + tokenizer files (+ "
                    "preprocessor_config.json for image models): decoders as LlamaForCausalLM, "
                    "Qwen2ForCausalLM or GPT2LMHeadModel, BERT as BertForMaskedLM, ViT as "
                    "ViTForImageClassification (ViTModel without a head), CLIP as CLIPModel.")
    eh.add_argument("run_dir", metavar="RUN_DIR")
    eh.add_argument("--out", required=True, metavar="HF_DIR")
    eh.set_defaults(func=_cmd_export_hf)

    im = verbs.add_parser("import", help="convert a model from another format into an fmforge run directory")
    im_verbs = im.add_subparsers(dest="format", required=True, metavar="FORMAT")
    ih = im_verbs.add_parser(
        "hf", help="a local Hugging Face model directory → fmforge run directory",
        description="Convert a local Hugging Face directory (config.json + safetensors or pytorch_model.bin + "
                    "tokenizer files) of a Llama 2/3, Mistral, Qwen2, GPT-2, BERT, ViT or CLIP model into an "
                    "fmforge run directory that generate, eval, export and fine-tuning read. Nothing is "
                    "downloaded: fetch the directory first (e.g. huggingface-cli download).")
    ih.add_argument("hf_dir", metavar="HF_DIR")
    ih.add_argument("--out", required=True, metavar="RUN_DIR")
    ih.set_defaults(func=_cmd_import_hf)

    pl = verbs.add_parser(
        "plan", help="size model, data, time and cost from a budget with published scaling laws",
        description="For a compute budget (FLOPs, devices x hours, or money), a model size, a target loss or "
                    "a dataset: the compute-optimal parameters and tokens under Kaplan et al. 2020, Chinchilla "
                    "approach 3, the Besiroglu et al. 2024 refit and the 20-tokens-per-parameter rule (they "
                    "disagree; all are shown), predicted loss, FLOPs (6ND + attention), time and cost on named "
                    "hardware, the penalty for repeating data (Muennighoff et al. 2023), an inference-aware "
                    "optimum (Sardana & Frankle 2023), batch/lr guidance, and a config `fmforge train` accepts. "
                    "--rescale CFG instead carries a config to a new global batch or world size.")
    budget = pl.add_argument_group("budget (any combination)")
    budget.add_argument("--flops", type=float, metavar="C", help="training compute in FLOPs")
    budget.add_argument("--gpu", metavar="NAME", help="hardware: a100-40gb, a100-80gb, h100, h200, b200, l4, trn1, "
                                                      "trn2, cpu (measured)")
    budget.add_argument("--gpus", type=int, default=1, metavar="K", help="devices (default: 1)")
    budget.add_argument("--hours", type=float, metavar="H", help="wall-clock hours on --gpus x --gpu")
    budget.add_argument("--usd", type=float, metavar="USD", help="money to spend on --gpu devices")
    budget.add_argument("--price", action="append", default=[], metavar="NAME=USD",
                        help="override a device's hourly price (repeatable), e.g. h100=2.2")
    budget.add_argument("--mfu", type=float, metavar="F", help="model FLOPs utilization to assume (default: 0.40)")
    budget.add_argument("--mfu-from", metavar="RUN_DIR", help="use the median MFU measured by a training run")
    budget.add_argument("--tokens", type=float, metavar="U", help="unique tokens available")
    budget.add_argument("--data", metavar="DATA_DIR", help="prepared data: its train tokens and tokenizer")
    budget.add_argument("--params", type=float, metavar="N", help="target model size")
    budget.add_argument("--target-loss", type=float, metavar="L", help="loss to reach")
    budget.add_argument("--inference-tokens", type=float, metavar="T",
                        help="tokens the model will serve over its life (inference-aware optimum)")
    pl.add_argument("--law", metavar="NAME|law.json",
                    help="law the proposed config follows: kaplan, kaplan-frontier, chinchilla, besiroglu "
                         "(default), 20-tokens, or a law.json fitted by `fmforge ladder`")
    pl.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    pl.add_argument("--seq-len", type=int, default=2048, metavar="T", help="context length (default: 2048)")
    pl.add_argument("--vocab-size", type=int, metavar="V", help="vocabulary (default: the data's, else 50257)")
    pl.add_argument("--json", action="store_true", help="print the plan as JSON")
    pl.add_argument("--plot", metavar="PNG", help="write iso-FLOP curves and the laws' N_opt(C)")
    pl.add_argument("--write-config", metavar="YAML", help="write the proposed (or rescaled) train config")
    rs = pl.add_argument_group("rescale an existing config")
    rs.add_argument("--rescale", metavar="CONFIG.yaml", help="carry this config to a new batch / world size")
    rs.add_argument("--global-batch-tokens", type=int, metavar="B", help="new global batch in tokens")
    rs.add_argument("--world-size", type=int, metavar="W", help="new number of data-parallel ranks")
    rs.add_argument("--lr-rule", choices=["sqrt", "linear", "none"], default="sqrt",
                    help="lr scaling with the global batch (default: sqrt, Malladi et al. 2022 for Adam)")
    pl.set_defaults(func=_cmd_plan)

    ld = verbs.add_parser(
        "ladder", help="fit your own scaling law from a grid of small training runs",
        description="Train every (model size x token budget) rung of a grid with the real trainer on your "
                    "prepared data (finished rungs are not rerun; an interrupted rung resumes), fit "
                    "L(N, D) = E + A/N^alpha + B/D^beta (Huber loss on log residuals, L-BFGS from a grid of "
                    "starts, as Chinchilla's approach 3) with bootstrap confidence intervals, and predict a "
                    "larger run. Writes OUT/law.json (for `fmforge plan --law`), OUT/ladder.png and OUT/rungs/.")
    ld.add_argument("config", metavar="CONFIG.yaml", help="base training config shared by every rung")
    ld.add_argument("overrides", nargs="*", metavar="key.sub=value")
    ld.add_argument("--data", metavar="DATA_DIR", help="prepared data directory (sets data.path)")
    ld.add_argument("--out", required=True, metavar="LADDER_DIR")
    ld.add_argument("--sizes", type=_name_list, metavar="NAME,...", help="named model sizes (e.g. nano,micro,tiny)")
    ld.add_argument("--params", type=_number_list, metavar="N,...",
                    help="non-embedding parameter counts; a shape near each is proposed")
    ld.add_argument("--tokens", type=_number_list, metavar="D,...", help="training tokens per rung")
    ld.add_argument("--target-params", type=float, metavar="N", help="predict the loss of a model this size ...")
    ld.add_argument("--target-tokens", type=float, metavar="D", help="... trained on this many tokens")
    ld.add_argument("--run-target", action="store_true",
                    help="also train the target run and compare its final loss with the prediction")
    ld.add_argument("--bootstrap", type=int, default=200, metavar="B", help="bootstrap resamples for the CIs")
    ld.add_argument("--seed", type=int, default=0, metavar="S", help="seed of the bootstrap resampling")
    ld.add_argument("--fit-only", action="store_true", help="refit the finished rungs; train nothing")
    ld.set_defaults(func=_cmd_ladder)

    tu = verbs.add_parser(
        "tune", help="hyperparameter search with Optuna (TPE, pruning, resumable)",
        description="Search lr, warmup, global batch and weight decay (or the space in --space) with "
                    "Optuna's TPE sampler, pruning trials on their intermediate validation loss. Each trial is "
                    "a short real training run (the config's train.max_steps: a sample of the data). The study "
                    "lives in OUT/study.db (SQLite): rerun the same command to resume it. Writes a results "
                    "table, OUT/best.yaml (a config `fmforge train` accepts) and OUT/tune.png.")
    tu.add_argument("config", metavar="CONFIG.yaml")
    tu.add_argument("overrides", nargs="*", metavar="key.sub=value")
    tu.add_argument("--data", metavar="DATA_DIR", help="prepared data directory (sets data.path)")
    tu.add_argument("--out", required=True, metavar="STUDY_DIR")
    tu.add_argument("--trials", type=int, default=20, metavar="N", help="finished trials wanted in the study")
    tu.add_argument("--space", metavar="SPACE.yaml", help="search space: key.sub: {low, high, log, int} or {choices}")
    tu.add_argument("--pruner", choices=["median", "sha", "none"], default="median",
                    help="median: Optuna's MedianPruner; sha: successive halving (default: median)")
    tu.add_argument("--seed", type=int, default=0, metavar="S", help="sampler seed")
    tu.set_defaults(func=_cmd_tune)

    qs = verbs.add_parser(
        "quickstart", help="the whole pipeline on built-in data, on CPU, in minutes",
        description="language (default): build a corpus from the Python standard library's sources and pydoc "
                    "topics (no downloads), train a tokenizer, pretrain a tiny Llama-style model, evaluate it "
                    "against the unigram baseline and print samples. vision: on scikit-learn's handwritten "
                    "digits, train a small ViT classifier, pretrain a small MAE and probe it against a random-init "
                    "encoder, train a small CLIP on digit captions and classify held-out digits zero-shot.")
    qs.add_argument("--task", choices=["language", "vision"], default="language", help="which demo (default: language)")
    qs.add_argument("--out", metavar="DIR", help="output directory (default: runs/quickstart or runs/quickstart-vision)")
    qs.add_argument("--minutes", type=float, metavar="M", help="training time budget (default: 6 language, 3 vision)")
    qs.set_defaults(func=_cmd_quickstart)
    return p


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    # `train CFG --out DIR a.b=c`: argparse stops filling the overrides positional at the first option, so
    # key=value words after options arrive as extras; only train takes them.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.verb in ("train", "finetune", "launch", "ladder", "tune") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.func(args)
    except FmforgeError as err:
        print(f"fmforge: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("fmforge: interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # `fmforge generate ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
