"""Human evaluation end to end: blinded export from real runs, the rating server (over HTTP and in headless
Chromium), crash safety of the ratings file, and the report."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sklearn.metrics import cohen_kappa_score

from fmforge.deploy.generate import generate
from fmforge.errors import FmforgeError
from fmforge.eval.human import export_human_tasks, human_report
from fmforge.eval.human.server import make_server
from fmforge.eval.human.tasks import read_tasks, write_task_set
from fmforge.eval.results import load_results

try:  # the browser tests need selenium (the test extra) and Debian's chromium + chromium-driver
    from selenium import webdriver
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:
    webdriver = None

HOSTILE_PROMPT = '<script>window.__pwned = 1</script><img src=x onerror="window.__pwned = 2">'
HOSTILE_OUTPUT = '<img src=x onerror="window.__pwned = 3"><b>bold?</b></pre><script>window.__pwned = 4</script>'
PROMPTS = [{"id": "def", "prompt": "def "}, {"prompt": "import "}, {"id": 7, "prompt": "class Parser"},
           {"id": "xss", "prompt": HOSTILE_PROMPT}, {"id": "ret", "prompt": "    return "}]


def _variant(base: Path, dest: Path, seed: int) -> Path:
    """A copy of a trained run with its weights perturbed: another model that writes other text."""
    dest.mkdir(parents=True)
    for name in ("model.json", "tokenizer.json", "special_tokens_map.json", "tokenizer_config.json"):
        if (base / name).is_file():
            shutil.copy(base / name, dest / name)
    g = torch.Generator().manual_seed(seed)
    tensors = load_file(str(base / "model.safetensors"))
    save_file({k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
               for k, v in tensors.items()}, str(dest / "model.safetensors"))
    return dest


@pytest.fixture(scope="module")
def runs(chat_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("human_runs")
    return [chat_base, _variant(chat_base, root / "noisy", 1), _variant(chat_base, root / "noisier", 2)]


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("human_prompts") / "prompts.jsonl"
    bad = ["not json", json.dumps({"prompt": ""}), json.dumps({"id": "def", "prompt": "x"})]
    lines = [json.dumps(p) for p in PROMPTS] + bad
    path.write_text("\n".join(lines) + "\n")
    return path


def _request(url: str, body=None, raw: bytes | None = None, headers: dict | None = None):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    hdrs = headers if headers is not None else ({"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=hdrs), timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture
def served(tmp_path):
    """Start a rating server in a thread for a task set; stops it afterwards."""
    servers = []

    def start(tasks, **kw):
        server = make_server(tasks, port=0, **kw)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _answer(server, item: dict, rater: str, best: str = "A", score: int = 4) -> dict:
    labels = [o["label"] for o in item["outputs"]]
    body = {"rater": rater, "item": item["id"], "task_set": server.task_set,
            "thumbs": {lab: "up" if lab == best else "down" for lab in labels},
            "likert": {lab: score if lab == best else 2 for lab in labels}}
    if len(labels) == 2:
        body["choice"] = best
    elif len(labels) > 2:
        body["ranking"] = [best] + [lab for lab in labels if lab != best]
    return body


# ---------------------------------------------------------------------------------------------------- export


@pytest.mark.slow
def test_export_blinds_shuffles_and_generates_exactly_what_generate_would(runs, prompts_file, tmp_path):
    out = tmp_path / "tasks.jsonl"
    res = export_human_tasks(f"{runs[0]},{runs[1]}", prompts_file, out, seed=3, max_new_tokens=12, temperature=0.9,
                             device="cpu", echo=lambda _m: None)
    assert res["skipped"] == {"not JSON": 1, "no prompt text": 1, "duplicate id": 1}
    items, digest = read_tasks(out)
    assert digest == res["task_set"] == hashlib.sha256(out.read_bytes()).hexdigest()
    assert sorted(it["id"] for it in items) == sorted(["def", "p2", "7", "xss", "ret"])
    assert [it["id"] for it in items] != ["def", "p2", "7", "xss", "ret"]  # shuffled
    text = out.read_text()
    for run in runs[:2]:  # nothing in the task file says which model wrote what
        assert str(run) not in text and run.name not in text
    key = json.loads(Path(res["key"]).read_text())
    assert Path(res["key"]).name == "tasks.key.json" and key["task_set"] == digest
    names = [m["name"] for m in key["models"]]
    assert {tuple(key["items"][it["id"]].values()) for it in items} == {tuple(names), tuple(reversed(names))}
    order = [str(p.get("id", f"p{n}")) for n, p in enumerate(PROMPTS, 1)]
    for it in items:  # usable prompt i is sampled with seed + i, exactly like `fmforge generate --seed`
        i = order.index(it["id"])
        for o in it["outputs"]:
            run = runs[names.index(key["items"][it["id"]][o["label"]])]
            expected = generate(run, it["prompt"], max_new_tokens=12, temperature=0.9, seed=3 + i, device="cpu")
            assert o["text"] == expected[len(it["prompt"]):]
    again = export_human_tasks([runs[0], runs[1]], prompts_file, tmp_path / "again.jsonl", seed=3, max_new_tokens=12,
                               temperature=0.9, device="cpu", echo=lambda _m: None)
    assert again["task_set"] == digest  # reproducible


def test_export_refuses_bad_input_in_one_line(tmp_path, prompts_file):
    with pytest.raises(FmforgeError, match="run directory not found"):
        export_human_tasks([tmp_path / "nope"], prompts_file, tmp_path / "t.jsonl")
    (tmp_path / "empty.jsonl").write_text("garbage\n")
    (tmp_path / "run").mkdir()
    with pytest.raises(FmforgeError, match="no usable prompt"):
        export_human_tasks([tmp_path / "run"], tmp_path / "empty.jsonl", tmp_path / "t.jsonl")
    with pytest.raises(FmforgeError, match="listed twice"):
        export_human_tasks([tmp_path / "run", tmp_path / "run"], prompts_file, tmp_path / "t.jsonl")
    with pytest.raises(FmforgeError, match="temperature"):
        export_human_tasks([tmp_path / "run"], prompts_file, tmp_path / "t.jsonl", temperature=-1)


# ---------------------------------------------------------------------------------------------------- server


def _task_set(tmp_path: Path, n_models: int, n_items: int = 4, hostile: bool = False, seed: int = 0) -> dict:
    prompts = [{"id": f"q{i}", "prompt": HOSTILE_PROMPT if hostile and i == 0 else f"Question {i}: say something."}
               for i in range(n_items)]
    models = [{"name": f"model{m}", "run_dir": str(tmp_path / f"model{m}")} for m in range(n_models)]
    gens = [[HOSTILE_OUTPUT if hostile and i == 0 and m == 0 else f"answer {i} by model {m}" for i in range(n_items)]
            for m in range(n_models)]
    return write_task_set(prompts, gens, models, tmp_path / f"tasks{n_models}.jsonl", seed=seed)


@pytest.mark.slow
def test_server_answers_bad_requests_with_4xx_messages_never_a_traceback(tmp_path, served, capfd):
    server = served(_task_set(tmp_path, 2)["tasks"])
    url, item = server.url, server.items[0]
    good = _answer(server, item, "ann")
    assert _request(url + "api/rate", good)[0] == 200
    cases = {
        "unknown item": ({**good, "item": "nope"}, None, 404),
        "likert must give": ({**good, "likert": {"A": 6, "B": 1}}, None, 400),
        "likert must give ": ({**good, "likert": {"A": True, "B": 1}}, None, 400),
        "thumbs must give": ({**good, "thumbs": {"A": "meh", "B": "up"}}, None, 400),
        "choice must be": ({**good, "choice": "C"}, None, 400),
        "rater name is missing": ({**good, "rater": "  "}, None, 400),
        "control characters": ({**good, "rater": "a\u0000b"}, None, 400),
        "unknown field": ({**good, "admin": True}, None, 400),
        "another task set": ({**good, "task_set": "0" * 64}, None, 409),
        "not valid JSON": (None, b"{not json", 400),
        "must be a JSON object": (None, b"[1, 2]", 400),
        "request body over": (None, b"{" + b" " * 100_000 + b"}", 413),
    }
    for message, (body, raw, status) in cases.items():
        got, reply = _request(url + "api/rate", body, raw)
        assert (got, message.strip() in reply["error"]) == (status, True), (message, got, reply)
    assert _request(url + "api/rate", good, headers={"Content-Type": "text/plain"})[0] == 415
    assert _request(url + "api/nothing")[0] == 404
    assert _request(url + "api/progress")[0] == 400
    assert _request(url + "api/progress?rater=ann")[1]["done"][item["id"]]["choice"] == "A"
    assert _request(url, headers={"Host": "evil.example:80"})[0] == 403  # DNS rebinding
    assert _request(url + "api/rate", good, headers={"Content-Type": "application/json",
                                                     "Origin": "http://evil.example"})[0] == 403
    lines = (tmp_path / "tasks2.ratings.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "Traceback" not in capfd.readouterr().err


def test_server_refuses_ratings_from_another_task_set(tmp_path):
    a = _task_set(tmp_path, 2)
    ratings = tmp_path / "r.jsonl"
    ratings.write_text(json.dumps({"rater": "x", "item": "q0", "task_set": "f" * 64}) + "\n")
    with pytest.raises(FmforgeError, match="another task set"):
        make_server(a["tasks"], ratings, port=0)
    with pytest.raises(FmforgeError, match="ratings file cannot be"):
        make_server(a["tasks"], a["key"], port=0)


_SERVE = "import sys; from fmforge.eval.human import serve_human; serve_human(sys.argv[1], port=0)"


@pytest.mark.slow
def test_a_killed_server_loses_no_saved_answer_and_a_torn_line_is_isolated(tmp_path):
    ts = _task_set(tmp_path, 3)
    ratings = tmp_path / "tasks3.ratings.jsonl"

    def start():
        proc = subprocess.Popen([sys.executable, "-c", _SERVE, ts["tasks"]], stdout=subprocess.PIPE, text=True)
        url = proc.stdout.readline().split(" at ")[-1].strip()
        assert url.startswith("http://127.0.0.1:"), url
        return proc, url

    proc, url = start()
    items = json.loads(urllib.request.urlopen(url + "api/tasks").read())["items"]
    server = type("S", (), {"task_set": ts["task_set"]})
    for item in items[:2]:
        assert _request(url + "api/rate", _answer(server, item, "kim", best="C"))[0] == 200
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(ratings, "a") as f:
        f.write('{"rater": "kim", "item": "q3", "task_s')  # a crash mid-write
    proc, url = start()
    try:
        done = _request(url + "api/progress?rater=kim")[1]["done"]
        assert sorted(done) == sorted(it["id"] for it in items[:2])
        assert done[items[0]["id"]]["ranking"][0] == "C"
        assert _request(url + "api/rate", _answer(server, items[2], "kim"))[0] == 200
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=10)
    lines = ratings.read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[-1])["item"] == items[2]["id"]  # not glued to the torn line
    report = human_report(ratings, ts["key"], save=False, echo=lambda _m: None)
    assert report["answers"] == 3 and report["skipped"] == {"unreadable line": 1}


# ---------------------------------------------------------------------------------------------------- report


def _write_ratings(path: Path, ts: dict, answers: list[tuple[str, str, dict]]) -> Path:
    """answers: (rater, item, {model name: (thumb, likert)}) plus "best" -> model name for the choice."""
    key = json.loads(Path(ts["key"]).read_text())
    lines = []
    for rater, item, spec in answers:
        to_label = {name: label for label, name in key["items"][item].items()}
        rec = {"rater": rater, "item": item, "task_set": ts["task_set"], "time": "2025-01-01T00:00:00+00:00",
               "thumbs": {to_label[m]: t for m, (t, _s) in spec["scores"].items()},
               "likert": {to_label[m]: s for m, (_t, s) in spec["scores"].items()}}
        if "best" in spec:
            rec["choice"] = "tie" if spec["best"] == "tie" else to_label[spec["best"]]
        if "ranking" in spec:
            rec["ranking"] = [to_label[m] for m in spec["ranking"]]
        lines.append(json.dumps(rec))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_report_scores_models_through_the_key_with_intervals_and_agreement(tmp_path):
    ts = _task_set(tmp_path, 2)
    (tmp_path / "model0").mkdir()  # this run dir exists: the report is saved into it
    good, bad = {"model0": ("up", 5), "model1": ("down", 2)}, {"model0": ("down", 3), "model1": ("up", 4)}
    answers = [("ann", "q0", {"scores": good, "best": "model0"}), ("ann", "q1", {"scores": good, "best": "model0"}),
               ("ann", "q2", {"scores": bad, "best": "model1"}), ("ann", "q3", {"scores": good, "best": "tie"}),
               ("bob", "q0", {"scores": good, "best": "model0"}), ("bob", "q1", {"scores": bad, "best": "model1"}),
               ("bob", "q2", {"scores": bad, "best": "model1"}), ("bob", "q3", {"scores": bad, "best": "model0"}),
               ("bob", "q3", {"scores": good, "best": "model0"})]  # bob changed his mind: the last answer counts
    ratings = _write_ratings(tmp_path / "ratings.jsonl", ts, answers)
    lines = []
    report = human_report(ratings, ts["key"], json_out=True, echo=lines.append)
    assert json.loads(lines[0])["task_set"] == ts["task_set"]
    m0, m1 = report["models"]
    assert (m0["name"], m0["likert_n"], report["answers"]) == ("model0", 8, 8)
    assert m0["likert_mean"] == pytest.approx((5 * 5 + 3 * 3) / 8)
    assert m1["likert_mean"] == pytest.approx((2 * 5 + 4 * 3) / 8)
    assert m0["thumbs_up_rate"] == pytest.approx(5 / 8)
    assert m0["win_rate"] == pytest.approx(4.5 / 8) and m1["win_rate"] == pytest.approx(3.5 / 8)
    assert report["pairwise"] == [{"a": "model0", "b": "model1", "a_wins": 4.0, "b_wins": 3.0, "ties": 1}]
    bt = report["bradley_terry"]["strengths"]  # two models, ties as half wins: p0 / (p0 + p1) = 4.5 / 8
    assert bt["model0"] == pytest.approx(4.5 / 8) and not report["bradley_terry"]["regularized"]
    for m in report["models"]:
        for point, (lo, hi) in ((m["likert_mean"], m["likert_ci"]), (m["thumbs_up_rate"], m["thumbs_up_ci"]),
                                (m["win_rate"], m["win_rate_ci"])):
            assert lo <= point <= hi and lo < hi
    agree = report["agreement"]
    assert set(agree) == {"likert", "thumbs", "choice"} and agree["choice"]["units"] == 4
    latest = {(r["rater"], r["item"]): r["choice"] for r in map(json.loads, ratings.read_text().splitlines())}
    choices = [[latest[(rater, f"q{i}")] for i in range(4)] for rater in ("ann", "bob")]
    assert agree["choice"]["cohen_kappa"] == pytest.approx(cohen_kappa_score(*choices))
    assert "alpha_interval" in agree["likert"] and "cohen_kappa_quadratic" in agree["likert"]
    saved = load_results(tmp_path / "model0")
    assert saved[0]["kind"] == "human" and saved[0]["metrics"]["likert_mean"] == pytest.approx(m0["likert_mean"])
    assert not (tmp_path / "model1").exists()


def test_report_decomposes_rankings_and_refuses_another_task_sets_ratings(tmp_path, capsys):
    ts = _task_set(tmp_path, 3)
    s = {"model0": ("up", 5), "model1": ("up", 4), "model2": ("down", 1)}
    answers = [("ann", f"q{i}", {"scores": s, "ranking": ["model0", "model1", "model2"]}) for i in range(3)]
    ratings = _write_ratings(tmp_path / "ratings.jsonl", ts, answers)
    report = human_report(ratings, ts["key"], save=False)
    assert "Human evaluation" in capsys.readouterr().out
    wins = {m["name"]: m["win_rate"] for m in report["models"]}
    assert wins == {"model0": 1.0, "model1": 0.5, "model2": 0.0}
    assert report["bradley_terry"]["regularized"] and report["agreement"] == {}
    (tmp_path / "other").mkdir()
    other = _task_set(tmp_path / "other", 3, n_items=5)
    with pytest.raises(FmforgeError, match="another task set") as err:
        human_report(ratings, other["key"], save=False)
    assert "\n" not in str(err.value)
    with pytest.raises(FmforgeError, match="not a key file"):
        human_report(ratings, ts["tasks"], save=False)


def test_report_on_one_model_gives_scores_without_pairwise_numbers(tmp_path):
    ts = _task_set(tmp_path, 1)
    answers = [(r, f"q{i}", {"scores": {"model0": ("up" if i % 2 else "down", 1 + i)}})
               for r in ("ann", "bob", "cy") for i in range(4)]
    report = human_report(_write_ratings(tmp_path / "ratings.jsonl", ts, answers), ts["key"], save=False,
                          echo=lambda _m: None)
    (model,) = report["models"]
    assert model["likert_mean"] == pytest.approx(2.5) and model["thumbs_up_rate"] == pytest.approx(0.5)
    assert model["win_rate"] is None and report["bradley_terry"] is None and report["pairwise"] == []
    # Three raters in perfect agreement: kappa and alpha are 1, and Cohen's kappa (two raters) is absent.
    assert report["agreement"]["likert"]["alpha_interval"] == pytest.approx(1.0)
    assert report["agreement"]["thumbs"]["fleiss_kappa"] == pytest.approx(1.0)
    assert "cohen_kappa" not in report["agreement"]["thumbs"]


# ---------------------------------------------------------------------------------------------------- browser


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium from the system packages, driven by selenium through the system chromedriver."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver_path = shutil.which("chromedriver")
    if not (chromium and driver_path):
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver)")
    if webdriver is None:
        pytest.skip("selenium is not installed (pip install selenium)")
    opts = webdriver.ChromeOptions()
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=driver_path))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def _by(driver, css: str):
    return driver.find_element(By.CSS_SELECTOR, css)


def _wait_text(driver, css: str, text: str) -> None:
    WebDriverWait(driver, 10).until(lambda d: _by(d, css).text == text, f"{css} never read {text!r}")


def _keys(driver, *keys) -> None:
    for key in keys:
        ActionChains(driver).send_keys(key).perform()


def _current_item(driver, server) -> dict:
    index = int(_by(driver, "#item-pos").text.split()[1]) - 1
    return server.items[index]


@pytest.mark.slow
def test_raters_rate_with_clicks_and_keys_resume_after_reload_and_get_a_report(browser, runs, tmp_path, served):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    res = export_human_tasks(runs[:2], prompts, tmp_path / "tasks.jsonl", seed=1, max_new_tokens=24, device="cpu",
                             echo=lambda _m: None)
    server = served(res["tasks"])
    browser.get(server.url)
    _by(browser, "#rater").send_keys("alice", Keys.ENTER)
    _wait_text(browser, "#progress-text", "0 of 5 rated")
    # Item 1 with the mouse.
    first = _current_item(browser, server)
    for label, thumb, score in (("A", "up", "4"), ("B", "down", "2")):
        _by(browser, f'article[data-label="{label}"] [data-action="thumb-{thumb}"]').click()
        _by(browser, f'article[data-label="{label}"] [data-action="likert-{score}"]').click()
    _by(browser, '[data-action="choice-A"]').click()
    _by(browser, "#submit").click()
    _wait_text(browser, "#progress-text", "1 of 5 rated")
    # Items 2 and 3 with the keyboard only: score and verdict for A, move on to B, then the choice.
    _keys(browser, Keys.ARROW_UP, "5", Keys.ARROW_DOWN, "1", "a", Keys.ENTER)
    _wait_text(browser, "#progress-text", "2 of 5 rated")
    _keys(browser, "j", "+", "3", "k", "-", "2", "t", Keys.ENTER)
    _wait_text(browser, "#progress-text", "3 of 5 rated")
    fourth = _current_item(browser, server)
    browser.save_screenshot("/tmp/human_eval.png")
    browser.refresh()  # the rater's name is in the address: the page resumes at the first item left
    _wait_text(browser, "#progress-text", "3 of 5 rated")
    assert _current_item(browser, server)["id"] == fourth["id"]
    assert _by(browser, "#item-state").text == "not rated yet"
    _keys(browser, Keys.ARROW_LEFT)  # back to a rated item: its answer is shown
    assert _by(browser, "#item-state").text == "rated"
    lines = [json.loads(line) for line in (tmp_path / "tasks.ratings.jsonl").read_text().splitlines()]
    assert [(r["rater"], r["task_set"]) for r in lines] == [("alice", res["task_set"])] * 3
    assert lines[0]["item"] == first["id"] and lines[0]["choice"] == "A"
    assert lines[0]["likert"] == {"A": 4, "B": 2} and lines[0]["thumbs"] == {"A": "up", "B": "down"}
    assert [(r["likert"], r["thumbs"], r["choice"]) for r in lines[1:]] == [
        ({"A": 5, "B": 1}, {"A": "up", "B": "down"}, "A"), ({"A": 2, "B": 3}, {"A": "down", "B": "up"}, "tie")]
    for item in server.items:  # a second rater, over the API, for agreement
        assert _request(server.url + "api/rate", _answer(server, item, "bob"))[0] == 200
    report = human_report(tmp_path / "tasks.ratings.jsonl", res["key"], echo=lambda _m: None)
    assert report["raters"] == ["alice", "bob"] and report["answers"] == 8
    assert sum(m["comparisons"] for m in report["models"]) == 2 * 8
    assert "cohen_kappa" in report["agreement"]["choice"]
    for run in runs[:2]:
        saved = [r for r in load_results(run) if r["kind"] == "human"]
        assert saved and saved[0]["metrics"]["raters"] == 2


@pytest.mark.slow
def test_page_shows_hostile_text_as_text_and_ranks_three_outputs_by_keyboard(browser, tmp_path, served):
    ts = _task_set(tmp_path, 3, n_items=2, hostile=True)
    server = served(ts["tasks"])
    browser.get(server.url + "?rater=eve")
    _wait_text(browser, "#progress-text", "0 of 2 rated")
    if server.items[1]["id"] == "q0":  # the hostile item is the second in the shuffled order
        _keys(browser, Keys.ARROW_RIGHT)
    assert _by(browser, "#prompt").text == HOSTILE_PROMPT
    shown = [el.text for el in browser.find_elements(By.CSS_SELECTOR, "article.output pre")]
    assert HOSTILE_OUTPUT in shown
    assert browser.find_elements(By.CSS_SELECTOR, "main img, main b, #outputs script") == []
    assert browser.execute_script("return window.__pwned === undefined")
    for pos in range(3):  # verdict and score for every output, by keys; the score moves the highlight on
        _keys(browser, Keys.ARROW_UP if pos == 0 else Keys.ARROW_DOWN, str(5 - pos))
    _keys(browser, "c", "a")  # rank C first, then A: B is placed last by itself
    assert _by(browser, "#ranking-order").text == "C > A > B"
    _keys(browser, "r", "b", "c", Keys.ENTER)
    _wait_text(browser, "#progress-text", "1 of 2 rated")
    record = json.loads((tmp_path / "tasks3.ratings.jsonl").read_text().splitlines()[-1])
    assert (record["rater"], record["item"], record["ranking"]) == ("eve", "q0", ["B", "C", "A"])
    assert record["likert"] == {"A": 5, "B": 4, "C": 3} and record["thumbs"] == {"A": "up", "B": "down", "C": "down"}
    _keys(browser, Keys.ARROW_UP, "5", Keys.ARROW_UP, "4", Keys.ARROW_DOWN, "3", "a", "b", Keys.ENTER)
    _wait_text(browser, "#progress-text", "2 of 2 rated")
    assert _by(browser, "#finished").is_displayed() and not _by(browser, "#rate").is_displayed()
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors
