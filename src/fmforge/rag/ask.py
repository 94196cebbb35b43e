"""``fmforge rag ask``: retrieve, insert the passages through the spotlighted template (``grounding.py``),
and generate with a decoder run, returning the answer with the chunks it was given and which it cited.
Passages that would not leave room for the answer in the decoder's context are dropped from the end (the
least relevant first) and a single long one is cut, so the instructions are never the part truncated."""

from __future__ import annotations

import json
from dataclasses import replace

from fmforge.errors import FmforgeError
from fmforge.eval.benchmarks import check_decoder_run
from fmforge.eval.scorer import LMScorer
from fmforge.rag.grounding import citations, grounded_prompt
from fmforge.rag.search import Hit, open_retriever


def fit_hits(scorer: LMScorer, question: str, hits: list[Hit], room: int, seed: int | str = 0) -> list[Hit]:
    """The leading hits whose grounded prompt fits ``room`` tokens; the first one cut to fit if need be."""
    hits = list(hits)
    while hits and len(scorer.encode(grounded_prompt(question, hits, seed))) > room:
        if len(hits) > 1:
            hits.pop()
            continue
        chunk = hits[0].chunk
        words = chunk.text.split()
        if len(words) < 2:
            return []
        short = " ".join(words[: len(words) // 2])
        hits[0] = replace(hits[0], chunk=replace(chunk, text=short, end=chunk.start + len(short)))
    return hits


def rag_ask(index: str, run_dir: str, question: str, k: int = 4, hybrid: bool = False,
            encoder: str | None = None, max_new_tokens: int = 128, temperature: float = 0.0, seed: int = 0,
            device: str = "auto", json_out: bool = False, echo=print) -> dict:
    """Answer ``question`` from the passages of ``index`` with the decoder of ``run_dir``."""
    if not question.strip():
        raise FmforgeError("the question is empty")
    if max_new_tokens < 1:
        raise FmforgeError(f"--max-new-tokens must be at least 1 (got {max_new_tokens})")
    check_decoder_run(run_dir, "rag ask")
    mode = "hybrid" if hybrid else "dense"
    hits = open_retriever(index, encoder, mode, device=device).search(question, k, mode)
    scorer = LMScorer.from_run(run_dir, device=device, batch_size=1)
    if scorer.max_length <= max_new_tokens + 16:
        raise FmforgeError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                           f"{scorer.max_length}-token context")
    found = len(hits)
    hits = fit_hits(scorer, question, hits, scorer.max_length - max_new_tokens - 1, seed)
    if found and not hits:
        raise FmforgeError(f"the model's {scorer.max_length}-token context cannot hold the grounded prompt with "
                           f"even part of one passage and {max_new_tokens} new tokens: lower --max-new-tokens")
    prompt = grounded_prompt(question, hits, seed)
    options = {"until": ["\n\n"], "max_gen_toks": max_new_tokens, "temperature": temperature, "seed": seed}
    answer = scorer.generate_until([(prompt, options)])[0].strip()
    result = {"question": question, "answer": answer, "citations": citations(hits, answer), "prompt": prompt}
    if json_out:
        echo(json.dumps(result, ensure_ascii=False))
    else:
        echo(answer or "(empty answer)")
        for c in result["citations"]:
            echo(f"  [{c['n']}]{' cited' if c['cited'] else ''} {c['source']}#{c['doc']}:{c['start']}-{c['end']} "
                 f"(score {c['score']:.3f})")
    return result
