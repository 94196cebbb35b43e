"""The command line is a table of verbs: each parses its arguments and calls one plain function."""

import inspect
import subprocess
import sys

import pytest

from fmforge import cli
from fmforge.errors import FmforgeError
from fmforge.launch.cli import TARGETS
from fmforge.train import command as train_command


def _run(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def _leaf_parsers():
    """{verb name: its argparse sub-parser}, for every entry of the verb table."""
    parser = cli.build_parser()
    found = {}

    def walk(p, words):
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            found[" ".join(words)] = p
        for action in subs:
            for name, sub in action.choices.items():
                walk(sub, [*words, name])

    walk(parser, [])
    return found


@pytest.mark.parametrize("words", ["", *cli.GROUPS, *(verb.name for verb in cli.VERBS)], ids=lambda w: w or "fmforge")
def test_every_verb_and_verb_group_prints_its_help(words, capsys):
    code, out, err = _run([*words.split(), "--help"], capsys)
    assert code == 0, err
    assert out.startswith(f"usage: fmforge {words}".rstrip()), out


def test_every_verb_in_the_table_is_reachable_and_nothing_else():
    assert set(_leaf_parsers()) == {verb.name for verb in cli.VERBS}


def test_every_parsed_argument_is_a_keyword_of_the_function_its_verb_calls():
    parsers = _leaf_parsers()
    for verb in cli.VERBS:
        dests = {a.dest for a in parsers[verb.name]._actions if a.dest != "help" and not a.dest.startswith("_")}
        # bind() fails on a dest the function does not take, and on a parameter without default left unset
        inspect.signature(cli.resolve(verb.run)).bind(**dict.fromkeys(dests))


def test_launch_choices_are_the_launch_targets():
    assert cli.LAUNCH_TARGETS == tuple(TARGETS)


def test_help_answers_without_importing_torch_or_the_stages():
    code = ("import sys, fmforge.cli as c\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'fmforge.config', 'fmforge.train.loop') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_unknown_config_key_is_one_line_and_exit_code_2(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  max_stepz: 10\n")
    for argv in (["train", str(cfg)], ["finetune", str(cfg), "--base", str(tmp_path)],
                 ["ladder", str(cfg), "--out", str(tmp_path / "l")], ["tune", str(cfg), "--out", str(tmp_path / "t")],
                 ["launch", "slurm", str(cfg), "--out", str(tmp_path / "j")]):
        code, out, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1, (argv, err)
        assert lines[0].startswith("fmforge: error:") and "max_stepz: unknown key" in lines[0], (argv, err)


def test_missing_paths_are_one_line_and_a_nonzero_exit(tmp_path, capsys):
    missing = str(tmp_path / "nowhere")
    for argv in (["train", missing + ".yaml"], ["eval", missing], ["generate", missing], ["import", "hf", missing, "--out", str(tmp_path / "r")],
                 ["export", "hf", missing, "--out", str(tmp_path / "h")], ["merge", missing, "--out", str(tmp_path / "m")],
                 ["data", "prepare", missing, "--out", str(tmp_path / "d")]):
        code, out, err = _run(argv, capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("fmforge: error:"), (argv, err)
        assert "nowhere" in lines[0], (argv, err)


def test_a_user_error_exits_with_its_own_code_and_ctrl_c_with_130(tmp_path, monkeypatch, capsys):
    class QuotaError(FmforgeError):
        exit_code = 3

    def refuse(*_args, **_kwargs):
        raise QuotaError("over quota")

    monkeypatch.setattr(train_command, "load_config", refuse)
    assert _run(["train", str(tmp_path / "c.yaml")], capsys)[::2] == (3, "fmforge: error: over quota\n")

    def interrupt(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_command, "load_config", interrupt)
    assert _run(["train", str(tmp_path / "c.yaml")], capsys)[::2] == (130, "fmforge: interrupted\n")


def test_overrides_after_options_reach_only_verbs_that_take_overrides(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    code, _, err = _run(["tune", str(cfg), "--out", str(tmp_path / "s"), "train.max_stepz=3"], capsys)
    assert code == 2 and "train.max_stepz: unknown key" in err
    code, _, err = _run(["generate", str(tmp_path), "a.b=1"], capsys)
    assert code == 2 and "unrecognized arguments: a.b=1" in err
