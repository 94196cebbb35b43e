import pytest
from conftest import run_cli

from fmforge.config import build_config, load_config
from fmforge.errors import FmforgeError


def test_unknown_key_is_rejected_naming_it():
    with pytest.raises(FmforgeError, match=r"train\.max_stepz: unknown key"):
        build_config({"train": {"max_stepz": 10}})


def test_wrong_type_is_rejected_naming_key_and_value():
    with pytest.raises(FmforgeError, match=r"optim\.lr: .*'fast'"):
        build_config({}, ["optim.lr=fast"])


def test_bad_choice_is_rejected():
    with pytest.raises(FmforgeError, match=r"model\.arch"):
        build_config({"model": {"arch": "mamba"}})


@pytest.mark.parametrize("override", ["train.max_steps", "=3", "train..max_steps=3", "train.max-steps=3"])
def test_bad_override_syntax_is_rejected(override):
    with pytest.raises(FmforgeError, match="bad override"):
        build_config({}, [override])


def test_overrides_parse_yaml_scalars_and_win_over_file(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  max_steps: 5\noptim:\n  lr: 0.1\n")
    cfg = load_config(cfg_file, ["train.max_steps=7", "optim.lr=1e-3", "train.compile=true"])
    assert (cfg.train.max_steps, cfg.optim.lr, cfg.train.compile) == (7, 1e-3, True)


def test_named_size_fills_only_unset_fields_and_arch_defaults():
    m = build_config({"model": {"arch": "gpt2", "size": "gpt2-124m", "n_layer": 2}}).model.resolved(vocab_size=50257)
    assert (m.n_layer, m.d_model, m.n_head, m.vocab_size, m.norm, m.pos, m.tie_embeddings) == (
        2, 768, 12, 50304, "layernorm", "learned", True)
    llama = build_config({"model": {"size": "llama-1b"}}).model.resolved(vocab_size=32000, seq_len=2048)
    assert (llama.n_kv_head, llama.d_ff, llama.rope_theta, llama.mlp) == (8, 8192, 500000.0, "swiglu")


def test_shipped_configs_validate_and_their_models_build():
    from pathlib import Path

    import torch

    from fmforge.models import build_model

    archs = set()
    for path in sorted(Path(__file__).parents[1].joinpath("configs").glob("*.yaml")):
        cfg = load_config(path)
        archs.add(cfg.model.arch)
        if cfg.model.arch in ("gpt2", "llama"):
            cfg.model.resolved(vocab_size=50257, seq_len=cfg.data.seq_len)
        else:
            with torch.device("meta"):  # the shape is consistent (vocabulary and classes come from data later)
                build_model(cfg.model)
    assert archs == {"gpt2", "llama", "vit", "mae", "clip", "bert", "dit"}


def test_cli_config_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    from fmforge.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  max_stepz: 10\n")
    cases = {"unknown key": [cfg_file], "config file not found": [cfg_file.with_name("missing.yaml")],
             "bad override": [tmp_path / "empty.yaml", "train.max_steps"],
             "greater than 0": [tmp_path / "empty.yaml", "train.log_interval=0"]}
    (tmp_path / "empty.yaml").write_text("{}\n")
    for message, args in cases.items():
        with pytest.raises(SystemExit) as exit_info:
            main(["train", *map(str, args), "--data", str(tmp_path), "--out", str(tmp_path / "run")])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("fmforge: error:") and message in lines[0], err


@pytest.mark.slow
def test_a_config_error_from_the_real_command_is_one_line_with_exit_code_2(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("train:\n  max_stepz: 10\n")
    proc = run_cli("train", cfg_file)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "fmforge: error: config error: train.max_stepz: unknown key"], proc.stderr


@pytest.mark.slow
def test_every_verb_explains_itself():
    for verb in ([], ["data", "prepare"], ["train"], ["generate"], ["eval"], ["quickstart"]):
        proc = run_cli(*verb, "--help")
        assert proc.returncode == 0 and "usage: fmforge" in proc.stdout and len(proc.stdout) > 200, verb


def test_train_overrides_may_follow_options(tmp_path, capsys):
    from fmforge.cli import main

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    with pytest.raises(SystemExit):  # the trailing override reaches config validation, which names it
        main(["train", str(cfg_file), "--out", str(tmp_path / "r"), "train.max_stepz=3", "--data", str(tmp_path)])
    assert "train.max_stepz: unknown key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "a.b=1"])
    assert "unrecognized arguments: a.b=1" in capsys.readouterr().err


def test_model_vocab_smaller_than_the_tokenizer_is_rejected():
    with pytest.raises(FmforgeError, match="smaller than the tokenizer"):
        build_config({"model": {"size": "nano", "vocab_size": 128}}).model.resolved(vocab_size=300, seq_len=64)


def test_overrides_do_not_mutate_the_callers_dict():
    raw = {"train": {"max_steps": 5}}
    build_config(raw, ["train.max_steps=9", "data.path=x"])
    assert raw == {"train": {"max_steps": 5}}
