"""`fmforge report`: one self-contained HTML page on real tiny runs (config, curves, eval results), opened in
headless Chromium; the pages of runs without metrics or results, of hostile files, of other run families;
the user mistakes around it."""

import base64
import io
import json
import os
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import tiny_overrides
from PIL import Image

from fmforge.config import build_config
from fmforge.errors import FmforgeError
from fmforge.eval.perplexity import evaluate
from fmforge.eval.report import load_run, write_report
from fmforge.eval.results import save_result
from fmforge.io.plots import wants_log
from fmforge.train.loop import train

PNG = re.compile(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"')
ALLOWED_TAGS = {"html", "head", "meta", "link", "title", "style", "body", "header", "h1", "h2", "h3", "h4", "p",
                "nav", "a", "section", "article", "div", "table", "thead", "tbody", "tr", "th", "td", "span",
                "code", "br", "details", "summary", "pre", "figure", "img"}


def quiet(_msg):
    pass


def save_perplexity(run: Path) -> None:
    result = evaluate(run, max_batches=1, batch_size=4, echo=quiet)
    save_result(run, "perplexity", "perplexity",
                {k: v for k, v in result.items() if isinstance(v, (int, float))}, data_dir=result["data_dir"])


def save_benchmark(run: Path, accs: tuple[float, float]) -> None:
    save_result(run, "benchmark", "benchmark", {
        "boolq/acc": accs[0], "boolq/acc_stderr": 0.009, "boolq/chance": 0.5, "boolq/n": 3270,
        "mmlu/acc": accs[1], "mmlu/acc_stderr": 0.008, "mmlu/acc_norm": accs[1] + 0.01,
        "mmlu/acc_norm_stderr": 0.008, "mmlu/chance": 0.25, "mmlu/n": 2850})


@pytest.fixture(scope="module")
def first_run(chat_base, tmp_path_factory) -> Path:
    """The shared nano Llama (lr 3e-3, one validation, no MFU) copied, with a perplexity and a benchmark result."""
    run = tmp_path_factory.mktemp("report_runs") / "lr_3e-3"
    shutil.copytree(chat_base, run)  # chat_base is shared: its copy gets the eval results
    save_perplexity(run)
    save_benchmark(run, (0.55, 0.27))
    return run


@pytest.fixture(scope="module")
def two_runs(first_run, prepared) -> list[Path]:
    """The first run and a real second one at a lower learning rate that validates every 5 steps and logs MFU
    (a stated peak): the page must overlay both."""
    second = first_run.parent / "lr_1e-3"
    train(build_config({}, tiny_overrides(prepared, second, **{
        "train.max_steps": 20, "checkpoint.interval": 0, "optim.lr": 1e-3, "train.eval_interval": 5,
        "train.peak_tflops": 0.05})), echo=quiet)
    save_perplexity(second)
    save_benchmark(second, (0.51, 0.24))
    return [first_run, second]


def embedded_pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(data))) for data in PNG.findall(page)]


def assert_not_blank(image: Image.Image) -> None:
    pixels = np.asarray(image.convert("L"), dtype=float)
    assert image.width >= 300 and image.height >= 200, image.size
    assert pixels.std() > 10, "a blank plot"
    assert (pixels < 128).mean() > 0.002, "no dark pixels: no axes, text or curves"


def snapshot(directory: Path) -> dict:
    return {str(p.relative_to(directory)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*"))}


def synthetic_run(root: Path, name: str, config: dict, lines: list[str]) -> Path:
    run = root / name
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    if lines:
        (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def vision_metrics(steps: int = 30) -> list[str]:
    lines = []
    for step in range(1, steps + 1):
        lines.append(json.dumps({"step": step, "loss": 2.3 * 0.95 ** step, "lr": 1e-3 * min(1, step / 5),
                                 "grad_norm": 1 / step, "samples_per_s": 700 + step, "samples": 64 * step}))
        if step % 10 == 0:
            lines.append(json.dumps({"step": step, "val_loss": 2.2 * 0.96 ** step, "val_top1": step / 40,
                                     "val_top5": min(1, step / 25)}))
    return lines


# ------------------------------------------------------------------------------------------------ browser


@pytest.fixture
def browser():
    missing = [tool for tool in ("chromium", "chromedriver") if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"headless Chromium not installed ({', '.join(missing)} missing): "
                    "apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed: pip install selenium")
    service = pytest.importorskip("selenium.webdriver.chrome.service")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1400,1000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=service.Service(shutil.which("chromedriver")), options=options)
    try:
        yield driver
    finally:
        driver.quit()


# Each <img>: loaded, its natural size, and the spread of its pixels' grey levels drawn through a canvas.
IMAGE_STATS = """
return Array.from(document.images).map(img => {
  const c = document.createElement('canvas'); c.width = img.naturalWidth; c.height = img.naturalHeight;
  const g = c.getContext('2d'); g.drawImage(img, 0, 0);
  const d = g.getImageData(0, 0, c.width, c.height).data;
  let s = 0, s2 = 0, n = 0;
  for (let i = 0; i < d.length; i += 4) { const y = (d[i] + d[i+1] + d[i+2]) / 3; s += y; s2 += y * y; n++; }
  const mean = s / n;
  return {alt: img.alt, complete: img.complete, w: img.naturalWidth, h: img.naturalHeight,
          std: Math.sqrt(Math.max(0, s2 / n - mean * mean))};
});
"""


@pytest.mark.slow
def test_report_on_two_real_runs_renders_in_chromium_without_console_errors_and_with_plots_that_are_not_blank(
        two_runs, browser, tmp_path):
    before = [snapshot(run) for run in two_runs]
    out = write_report([str(r) for r in two_runs], str(tmp_path / "report.html"), title="lr sweep", echo=quiet)
    assert [snapshot(run) for run in two_runs] == before  # the run directories are only read

    broken = tmp_path / "broken.html"  # the log does report errors: a page that loads a missing image
    broken.write_text('<!DOCTYPE html><title>x</title><img src="missing.png">')
    browser.get(broken.as_uri())
    assert any(e["level"] == "SEVERE" for e in browser.get_log("browser"))

    browser.get(out.resolve().as_uri())
    assert browser.title == "lr sweep"
    errors = [e for e in browser.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]
    assert errors == [], errors
    images = browser.execute_script(IMAGE_STATS)
    alts = [img["alt"] for img in images]
    for wanted in ("loss", "learning rate", "throughput (tokens/s)", "model FLOPs utilization",
                   "benchmark: acc per group"):
        assert wanted in alts, alts
    for img in images:
        assert img["complete"] and img["w"] >= 300 and img["h"] >= 200, img
        assert img["std"] > 10, f"blank plot: {img}"
    assert browser.execute_script("return document.scripts.length") == 0

    text = browser.find_element("tag name", "body").text
    for wanted in ("lr_3e-3", "lr_1e-3", "Where the configs differ", "optim.lr", "perplexity", "bits_per_byte",
                   "0.55 ± 0.009", "0.51 ± 0.009"):
        assert wanted in text, wanted
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(1400, height + 100)
    browser.save_screenshot(str(tmp_path / "report.png"))
    if os.environ.get("FMFORGE_REPORT_SCREENSHOT"):  # to look at the page: FMFORGE_REPORT_SCREENSHOT=/tmp/x.png
        shutil.copy(tmp_path / "report.png", os.environ["FMFORGE_REPORT_SCREENSHOT"])


# ------------------------------------------------------------------------------------------- page content


def test_a_real_run_gets_its_config_curves_and_results_in_one_self_contained_page(first_run, tmp_path):
    messages = []
    out = write_report([str(first_run)], str(tmp_path / "one.html"), echo=messages.append)
    page = out.read_text()
    assert "fmforge report: lr_3e-3" in page and "bits_per_byte" in page and "0.27 ± 0.008" in page
    assert "<details><summary>" in page and "optim:" in page  # the config, folded
    pngs = embedded_pngs(page)
    assert len(pngs) >= 6  # loss, lr, throughput, grad norm, peak memory, ... and the benchmark bars
    for png in pngs:
        assert_not_blank(png)
    assert not re.search(r"""(src|href)="(?!data:|#)""", page), "everything is embedded"
    assert "<script" not in page.lower()
    assert messages[-1].startswith("report on 1 run written to")


def test_report_of_other_families_plots_whatever_scalars_their_metrics_hold(tmp_path):
    vit = synthetic_run(tmp_path, "vit", {"model": {"arch": "vit", "size": "vit-nano"}}, vision_metrics())
    bert = synthetic_run(tmp_path, "bert", {"model": {"arch": "bert", "size": "nano"}}, [
        json.dumps({"step": step, "loss": 9 / step, "lr": 1e-3, "tokens_per_s": 5000.0 + step}) for step in range(1, 9)])
    save_result(vit, "vision", "vision", {"val_top1": 0.81, "val_top5": 0.99, "linear_probe_top1": 0.77})
    save_result(vit, "human", "human", {"fleiss_kappa": 0.42}, models={
        "vit": {"mean": 3.4, "mean_ci": [3.1, 3.7], "win_rate": 0.62, "win_rate_lo": 0.55, "win_rate_hi": 0.69},
        "baseline": {"mean": 2.9, "mean_ci": [2.6, 3.2], "win_rate": 0.38, "win_rate_lo": 0.31,
                     "win_rate_hi": 0.45}})
    page = write_report([str(vit), str(bert)], str(tmp_path / "mixed.html"), echo=quiet).read_text()
    alts = re.findall(r'<img [^>]*alt="([^"]*)"', page)
    assert "throughput (samples/s)" in alts and "throughput (tokens/s)" in alts
    assert "val_top1" in alts and "human: win_rate per group" in alts
    assert "0.62 [0.55, 0.69]" in page and "3.4 [3.1, 3.7]" in page  # intervals beside their measures
    assert "linear_probe_top1" in page and "vit vit-nano" in page and "bert nano" in page


def test_runs_without_metrics_or_eval_results_still_render_with_a_note(two_runs, tmp_path):
    bare = synthetic_run(tmp_path, "bare", {"model": {"arch": "llama"}}, [])
    messages = []
    page = write_report([str(bare)], str(tmp_path / "bare.html"), echo=messages.append).read_text()
    assert "no metrics.jsonl: no training curves" in page
    assert "no evaluation results in eval/" in page
    assert "No run has logged training steps." in page and "No evaluation results found" in page
    assert any("no metrics.jsonl" in m for m in messages)


def test_malformed_metrics_lines_are_counted_skipped_and_shown(tmp_path):
    lines = [json.dumps({"step": step, "loss": 3 - step / 10}) for step in range(1, 11)]
    lines[3:3] = ['{"step": 4, "loss": 1.', "not json", '{"loss": 2.0}', "[1, 2]", '{"step": "5", "loss": 1}']
    run = synthetic_run(tmp_path, "torn", {"model": {"arch": "vit"}}, lines)
    assert load_run(run).malformed == 5
    messages = []
    page = write_report([str(run)], str(tmp_path / "torn.html"), echo=messages.append).read_text()
    assert f"5 malformed line(s) of {len(lines)} in metrics.jsonl skipped" in page
    assert any("5 malformed line(s)" in m for m in messages)
    assert len(embedded_pngs(page)) == 1  # the loss, from the ten good lines


class TagCollector(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs = set(), set()

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def test_text_from_files_is_escaped_never_markup(tmp_path):
    evil = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    run = synthetic_run(tmp_path, "run<b>x</b>$", {"model": {"arch": evil}, "note": evil},
                        [json.dumps({"step": 1, "loss": 1.0, evil: 2.0}), json.dumps({"step": 2, "loss": 0.9})])
    (run / "eval").mkdir()
    (run / "eval" / "evil.json").write_text(json.dumps({
        "kind": evil, "name": evil, "metrics": {evil: 1.0, f"{evil}/acc": 0.5, "t/acc": 0.4, "t/acc_stderr": 0.1},
        "tasks": {evil: {"acc": 0.3, "chance": 0.25, evil: evil}}, evil: evil}))
    page = write_report([str(run)], str(tmp_path / "evil.html"), echo=quiet).read_text()
    collected = TagCollector()
    collected.feed(page)
    assert collected.tags <= ALLOWED_TAGS, collected.tags - ALLOWED_TAGS
    assert not any(a.startswith("on") for a in collected.attrs), collected.attrs
    assert "<script" not in page.lower() and "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "run&lt;b&gt;x&lt;/b&gt;$" in page
    assert "default-src 'none'" in page  # and the browser would refuse to run or fetch anything anyway


# ---------------------------------------------------------------------------------------------- mistakes


def test_a_directory_that_is_not_a_run_is_a_one_line_error(tmp_path):
    (tmp_path / "empty").mkdir()
    for path, says in ((tmp_path / "empty", "no config.yaml"), (tmp_path / "missing", "no such directory")):
        with pytest.raises(FmforgeError, match=f"not a run directory \\({says}\\)") as err:
            write_report([str(path)], str(tmp_path / "r.html"), echo=quiet)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "r.html").exists()
    secret = tmp_path / "secret.txt"
    secret.write_text("password: hunter2\n")
    linked = synthetic_run(tmp_path, "linked", {}, [])
    (linked / "config.yaml").unlink()
    (linked / "config.yaml").symlink_to(secret)  # a run directory from elsewhere must not read outside itself
    with pytest.raises(FmforgeError, match="leads outside"):
        write_report([str(linked)], str(tmp_path / "r.html"), echo=quiet)
    with pytest.raises(FmforgeError, match="at least one run directory"):
        write_report([], str(tmp_path / "r.html"))


def test_out_must_be_an_html_file_and_is_replaced_atomically(tmp_path):
    run = synthetic_run(tmp_path, "run", {"model": {"arch": "vit"}}, [])
    save_result(run, "vision", "vision", {"val_top1": 0.5})
    with pytest.raises(FmforgeError, match=r"--out must name an \.html file"):
        write_report([str(run)], str(run / "metrics.jsonl"))
    (tmp_path / "dir.html").mkdir()
    with pytest.raises(FmforgeError, match="--out is a directory"):
        write_report([str(run)], str(tmp_path / "dir.html"))
    out = tmp_path / "new" / "nested" / "report.html"
    before = snapshot(run)
    write_report([str(run)], str(out), echo=quiet)
    out.write_text("an older report")
    target = tmp_path / "elsewhere.html"
    target.write_text("not to be touched")
    out.unlink()
    out.symlink_to(target)  # a link at --out is replaced, never written through
    write_report([str(run)], str(out), title="again", echo=quiet)
    assert not out.is_symlink() and "<title>again</title>" in out.read_text()
    assert target.read_text() == "not to be touched"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporary left behind
    assert snapshot(run) == before


def test_loss_goes_on_a_log_axis_only_when_it_spans_a_decade():
    assert wants_log([10.8, 5.0, 0.9])
    assert not wants_log([6.3, 4.1, 3.2])
    assert not wants_log([1.0, 0.0, 12.0])  # not all positive
