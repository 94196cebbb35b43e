"""LMScorer: lm-evaluation-harness's requests (log-likelihood of a continuation, rolling log-likelihood of a
text, generation until a stop string) on an fmforge decoder, checked against plain full forwards, against
lm-eval's own tokenization and window code, and against fmforge's perplexity and sampling."""

import json
import math
import sysconfig
from pathlib import Path

import pytest
import torch

from fmforge.data.prepare import prepare_data
from fmforge.data.shards import read_shard
from fmforge.deploy.generate import sample
from fmforge.errors import FmforgeError
from fmforge.eval.perplexity import evaluate
from fmforge.eval.scorer import LMScorer, rolling_windows
from fmforge.models.registry import family_of, parse_model_config

CONTEXTS = ["def parse(text):", "import os\n", "Question: what is a list?\nAnswer: ", "class Foo: ", "",
            "for key, value in sorted(items):\n    "]
CONTINUATIONS = [" return", " 2", "\n    pass", " a sequence", "import sys", "print(key)"]


@pytest.fixture(scope="module")
def scorer(chat_base) -> LMScorer:
    return LMScorer.from_run(chat_base, device="cpu")


def requests() -> list[tuple[str, str]]:
    return [(c, k) for c in CONTEXTS for k in CONTINUATIONS]


def full_forward(scorer: LMScorer, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """The reference: one plain forward of (ctx + cont) without its last token, truncated as lm-eval does."""
    ids = torch.tensor([(ctx + cont)[-(scorer.max_length + 1):]])
    with torch.no_grad():
        logprobs = scorer.model(ids[:, :-1]).float().log_softmax(-1)[0, -len(cont):]
    target = ids[0, -len(cont):]
    return float(logprobs.gather(1, target[:, None]).sum()), bool((logprobs.argmax(-1) == target).all())


def test_loglikelihood_equals_one_full_forward_per_request(scorer):
    reqs = requests() + [("word " * 100, " end")]  # the last is longer than the context: left-truncated
    got = scorer.loglikelihood(reqs)
    for (ctx, cont), (lp, greedy) in zip(scorer.encode_pairs(reqs), got):
        ref_lp, ref_greedy = full_forward(scorer, ctx, cont)
        assert lp == pytest.approx(ref_lp, abs=1e-4)
        assert greedy == ref_greedy


def test_results_do_not_depend_on_batch_size_or_on_sharing_the_context(scorer):
    reqs = requests()
    reference = scorer.loglikelihood(reqs)
    share, size = scorer.share, scorer.batch_size
    assert share  # a plain GPT packs each context once with all its continuations
    try:
        for batch_size, packed in ((1, True), (16, True), (16, False), (3, False)):
            scorer.batch_size, scorer.share = batch_size, packed  # False: one request per row, lm-eval's way
            for (lp, greedy), (ref_lp, ref_greedy) in zip(scorer.loglikelihood(reqs), reference):
                assert lp == pytest.approx(ref_lp, abs=1e-5)
                assert greedy == ref_greedy
    finally:
        scorer.batch_size, scorer.share = size, share


def test_packing_puts_several_questions_in_one_row_and_each_context_once(scorer):
    pairs = scorer.encode_pairs(requests())
    groups: dict = {}
    for i, (ctx, cont) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append((i, cont))
    rows = [row for batch in scorer._plan(groups) for row in batch]
    contexts = [ctx for row in rows for ctx, _ in row]
    assert sorted(contexts) == sorted(groups)  # every context once: the tiny requests all fit one row each
    assert len(rows) < len(groups)
    assert sorted(i for row in rows for _, conts in row for i, _ in conts) == list(range(len(pairs)))


def test_context_and_continuation_are_split_as_lm_eval_splits_them(scorer):
    lm_eval_model = pytest.importorskip("lm_eval.api.model")

    class Split(lm_eval_model.TemplateLM):  # lm-eval's own _encode_pair over fmforge's tokenizer
        eot_token_id = scorer.eos_id
        backend = "causal"

        def tok_encode(self, string, **kwargs):
            return [scorer.bos_id] + scorer.tokenizer.encode(string)

        def _loglikelihood_tokens(self, requests, **kwargs):
            raise NotImplementedError

        loglikelihood_rolling = generate_until = _loglikelihood_tokens

    split = Split()
    for ctx, cont in requests():
        if ctx:
            assert scorer.encode_pair(ctx, cont) == split._encode_pair(ctx, cont)
    # an empty context conditions on bos alone, as lm-eval's prefix token
    assert scorer.encode_pair("", "import sys") == ([scorer.bos_id], scorer.encode("import sys"))


def test_rolling_windows_are_lm_eval_disjoint_rolling_windows():
    utils = pytest.importorskip("lm_eval.utils")
    for n in (0, 1, 5, 8, 9, 17, 40):
        ids = list(range(10, 10 + n))
        for max_length in (1, 4, 8):
            expected = [utils.make_disjoint_window(w)
                        for w in utils.get_rolling_token_windows(ids, prefix_token=0, max_seq_len=max_length,
                                                                 context_len=1)]
            assert rolling_windows(ids, 0, max_length) == [(list(a), list(b)) for a, b in expected]


def test_rolling_loglikelihood_sums_every_token_once_after_bos(scorer):
    text = "for key, value in sorted(items):\n    print(key, value)\n" * 8
    ids = scorer.encode(text)
    assert len(ids) > scorer.max_length  # several windows
    (total,) = scorer.loglikelihood_rolling([text])
    with torch.no_grad():  # the first window by hand: [bos] + ids predicts ids[:max_length]
        window = torch.tensor([[scorer.bos_id] + ids[:scorer.max_length - 1]])
        first = scorer.model(window).float().log_softmax(-1)[0].gather(1, torch.tensor(ids[:scorer.max_length])[:, None])
    assert total < float(first.sum()) < 0
    assert scorer.loglikelihood_rolling(["", text]) == [0.0, pytest.approx(total, abs=1e-4)]


def test_rolling_loglikelihood_equals_fmforge_perplexity_on_the_same_text(chat_base, tmp_path):
    scorer = LMScorer.from_run(chat_base, device="cpu")
    L = scorer.max_length
    docs = tmp_path / "docs"
    docs.mkdir()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "heapq.py"):  # each cut to a whole number of windows at a token boundary
        ids = scorer.encode((stdlib / name).read_text())
        k = next(k for k in range(4, 1, -1) if scorer.encode(scorer.tokenizer.decode(ids[:k * L])) == ids[:k * L])
        (docs / f"{name}.txt").write_text(scorer.tokenizer.decode(ids[:k * L]))
    prepare_data([str(docs)], tmp_path / "data", tokenizer=str(chat_base / "tokenizer.json"), val_fraction=0.5,
                 allow_uneven_split=True, document_bytes=0, log=None)
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    (val,) = [read_shard(tmp_path / "data" / s["file"]) for s in manifest["shards"] if s["split"] == "val"]
    assert val[0] == scorer.bos_id and val[-1] == scorer.eos_id  # one document: [bos] + text + [eos]
    text = scorer.tokenizer.decode(val[1:-1].tolist())
    assert scorer.encode(text) == val[1:-1].tolist()
    result = evaluate(chat_base, tmp_path / "data", device="cpu", echo=lambda _msg: None)
    assert result["tokens"] == len(val) - 2  # fmforge's windows predict exactly the text's tokens
    (rolling,) = scorer.loglikelihood_rolling([text])
    assert -rolling == pytest.approx(result["val_loss"] * result["tokens"], rel=1e-5)


def test_greedy_generation_matches_fmforge_sampling_and_stops_before_the_stop_string(scorer):
    prompts = ["def parse(text):\n", "import", "The"]
    ids = [[scorer.bos_id] + scorer.encode(p) for p in prompts]
    expected = [scorer.tokenizer.decode(sample(scorer.model, i, 12, temperature=0, eos_id=scorer.eos_id,
                                               vocab_limit=scorer.tokenizer.vocab_size)) for i in ids]
    got = scorer.generate_until([(p, {"until": [], "max_gen_toks": 12}) for p in prompts])
    assert got == expected
    for text in expected:
        if len(text) > 3:
            stop = text[2:4]
            (cut,) = scorer.generate_until([(prompts[expected.index(text)], {"until": [stop], "max_gen_toks": 12})])
            assert cut == text.split(stop)[0]


def test_prompts_of_different_lengths_and_budgets_generate_together_as_each_alone(scorer):
    """One batch of right-padded prompts, each row decoding at its own position up to its own budget; the
    long one is left-truncated to leave room for its answer."""
    reqs = [("def parse(text):\n", {"max_gen_toks": 12}), ("The", {"max_gen_toks": 3}),
            ("word " * 400, {"max_gen_toks": 6}), ("import", {"max_gen_toks": 9, "until": ["\n"]})]
    together = scorer.generate_until(reqs)
    assert together == [scorer.generate_until([r])[0] for r in reqs]
    assert any(together)


def test_sampled_generation_is_seeded_per_request(scorer):
    kwargs = {"until": ["\n\n"], "max_gen_toks": 10, "temperature": 1.0, "seed": 3}
    alone = scorer.generate_until([("def", kwargs)])
    mixed = scorer.generate_until([("import os", {"max_gen_toks": 4}), ("def", kwargs), ("xyz", kwargs)])
    assert mixed[1] == alone[0]
    assert scorer.generate_until([("def", {**kwargs, "seed": 4})]) != alone or alone == [""]


def test_the_model_is_left_as_it_was(scorer):
    head = scorer.model.lm_head
    scorer.model.train()
    try:
        scorer.loglikelihood([("a", " b")])
        scorer.generate_until([("a", {"max_gen_toks": 2})])
        assert scorer.model.training and scorer.model.lm_head is head
    finally:
        scorer.model.eval()
    assert scorer.model.lm_head.weight is scorer.model.tok_emb.weight or not scorer.model.cfg.tie_embeddings


def test_user_mistakes_are_one_line_errors(scorer, tmp_path):
    with pytest.raises(FmforgeError, match="does not fit the model's context"):
        scorer.loglikelihood_tokens([([scorer.bos_id], list(range(5, 5 + scorer.max_length + 1)))])
    with pytest.raises(FmforgeError, match="max_gen_toks"):
        scorer.generate_until([("a", {"max_gen_toks": 0})])
    with pytest.raises(FmforgeError, match="batch size"):
        LMScorer(scorer.model, scorer.tokenizer, "cpu", batch_size=0)
    run = tmp_path / "vit"
    run.mkdir()
    cfg = parse_model_config({"arch": "vit", "size": "vit-nano"})
    (run / "model.json").write_text(json.dumps({"format_version": 1, "family": family_of(cfg),
                                                **cfg.model_dump(mode="json")}))
    with pytest.raises(FmforgeError, match="holds a vit model"):
        LMScorer.from_run(run, device="cpu")
    assert math.isfinite(scorer.loglikelihood([("", "x")])[0][0])
