"""Artifacts someone else wrote (a run directory from a shared bucket, a downloaded Hugging Face directory) are
not trusted: a model description with absurd dimensions fails in one line before any memory is allocated,
names read from files stay inside their directory, tokenizer files are copied only as regular files from
inside theirs, and no verb replaces or deletes files it did not make (issue 20, findings 5, 8 and 9)."""

import json
import os

import optuna
import pytest
import torch
from conftest import tiny_overrides
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fmforge.quickstart as quickstart_module
from fmforge.data.tokenizer import train_tokenizer
from fmforge.errors import FmforgeError
from fmforge.interop.hf.convert import export_hf, import_hf
from fmforge.io.paths import UnsafePath
from fmforge.models.config import ModelConfig
from fmforge.models.gpt import GPT
from fmforge.plan.tune import STUDY_NAME, tune
from fmforge.quickstart import MARKER, quickstart
from fmforge.runs import copy_side_file, load_pretrained, save_pretrained

TOKENIZER_TEXT = __doc__
TINY = dict(arch="llama", n_layer=2, n_head=2, n_kv_head=1, d_model=32, d_ff=64, vocab_size=320, max_seq_len=32)


def quiet(_msg):
    pass


def one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def listing(root) -> dict:
    """Every path under ``root`` with its bytes (None for directories): what a test compares before/after."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            out[os.path.relpath(os.path.join(dirpath, name), root)] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            out[os.path.relpath(path, root)] = os.readlink(path) if os.path.islink(path) else open(path, "rb").read()
    return out


@pytest.fixture
def run_dir(tmp_path):
    """A finished run directory of a tiny Llama (weights, model.json, a tokenizer)."""
    cfg = ModelConfig(**TINY).resolved()
    torch.manual_seed(0)
    run = tmp_path / "run"
    save_pretrained(GPT(cfg).state_dict(), cfg, run)
    train_tokenizer([TOKENIZER_TEXT] * 4, 300).save(run / "tokenizer.json")
    return run


@pytest.fixture
def hf_dir(run_dir, tmp_path):
    """The tiny Llama as a Hugging Face directory, written by fmforge's own export."""
    return export_hf(run_dir, tmp_path / "hf", echo=quiet)


def edit_json(path, **changes):
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


# ---------------------------------------------------------------------------------------------------- finding 8


@pytest.mark.parametrize("field, value, named", [
    ("vocab_size", 10**12, "tok_emb.weight has shape [320, 32] in the weights, but the model needs [1000000000000, 32]"),
    ("d_model", 2**20, "tok_emb.weight has shape [320, 32] in the weights, but the model needs [320, 1048576]"),
    ("d_model", 2**40, "describes a model that cannot be built"),
    ("n_layer", 10**9, "n_layer is 1000000000, but the weights hold only"),
    ("max_seq_len", 10**11, "rope_cos"),  # rotary tables are computed from the config, not stored
])
def test_a_model_json_with_huge_dimensions_is_one_line_error_before_any_allocation(run_dir, field, value, named):
    edit_json(run_dir / "model.json", **{field: value, **({"n_head": 2**10} if field == "d_model" else {})})
    with pytest.raises(FmforgeError) as err:
        load_pretrained(run_dir)
    assert named in one_line(err)
    assert "does not match model.json" in str(err.value)


def test_weights_of_the_wrong_dtype_are_refused_naming_the_tensor(run_dir):
    tensors = load_file(run_dir / "model.safetensors")
    tensors["norm_f.weight"] = tensors["norm_f.weight"].to(torch.int32)
    save_file(tensors, run_dir / "model.safetensors")
    with pytest.raises(FmforgeError, match=r"norm_f.weight is stored as torch.int32"):
        load_pretrained(run_dir)


def test_export_checks_model_json_against_the_weights_before_writing_anything(run_dir, tmp_path):
    edit_json(run_dir / "model.json", vocab_size=10**12)
    with pytest.raises(FmforgeError, match="tok_emb.weight has shape"):
        export_hf(run_dir, tmp_path / "out", echo=quiet)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("changes, named", [
    ({"max_position_embeddings": 10**11}, "rope_cos"),
    ({"num_hidden_layers": 10**8}, "n_layer is 100000000, but the weights hold only"),
    ({"vocab_size": 10**12}, "model.embed_tokens.weight has shape [320, 32], expected [1000000000000, 32]"),
])
def test_an_hf_config_with_huge_dimensions_is_one_line_error_before_any_allocation(hf_dir, tmp_path, changes,
                                                                                     named):
    edit_json(hf_dir / "config.json", **changes)
    with pytest.raises(FmforgeError) as err:
        import_hf(hf_dir, tmp_path / "out", echo=quiet)
    assert named in one_line(err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------- finding 9


def shard_index(hf_dir, weights, value):
    """An index in ``hf_dir`` whose entry for every tensor of ``weights`` points at ``value``."""
    with safe_open(weights, "pt") as f:
        names = list(f.keys())
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(names, value)}))


def test_hf_weight_map_entries_that_leave_the_directory_are_refused(hf_dir, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    os.replace(hf_dir / "model.safetensors", outside / "model.safetensors")  # valid weights, outside hf_dir
    before = listing(tmp_path)
    for value, message in (("../elsewhere/model.safetensors", "not a plain relative name"),
                           (str(outside / "model.safetensors"), "not a plain relative name"),
                           (5, "expected a file name, got int"), (["a"], "expected a file name, got list")):
        shard_index(hf_dir, outside / "model.safetensors", value)
        with pytest.raises(UnsafePath) as err:
            import_hf(hf_dir, tmp_path / "out", echo=quiet)
        assert message in one_line(err) and "weight_map" in str(err.value)
    (hf_dir / "shard.safetensors").symlink_to(outside / "model.safetensors")  # inside by name, outside in fact
    shard_index(hf_dir, outside / "model.safetensors", "shard.safetensors")
    with pytest.raises(UnsafePath, match="leads outside"):
        import_hf(hf_dir, tmp_path / "out", echo=quiet)
    assert not (tmp_path / "out").exists()
    assert listing(outside) == {k.removeprefix("elsewhere/"): v for k, v in before.items()
                                if k.startswith("elsewhere/")}
    (hf_dir / "shard.safetensors").unlink()  # the same index, its shard a plain file inside: imports
    os.replace(outside / "model.safetensors", hf_dir / "shard.safetensors")
    import_hf(hf_dir, tmp_path / "out", echo=quiet)
    assert load_pretrained(tmp_path / "out")[0].cfg.n_layer == 2


def test_tokenizer_files_are_copied_only_from_inside_their_directory(hf_dir, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("ssh-private-key")
    (hf_dir / "tokenizer_config.json").unlink()
    (hf_dir / "tokenizer_config.json").symlink_to(secret)
    with pytest.raises(UnsafePath, match="leads outside"):
        import_hf(hf_dir, tmp_path / "out", echo=quiet)
    assert not (tmp_path / "out").exists()
    # Directly through save_pretrained too (training copies the data directory's tokenizer this way).
    with pytest.raises(UnsafePath, match="leads outside"):
        cfg = ModelConfig(**TINY).resolved()
        save_pretrained(GPT(cfg).state_dict(), cfg, tmp_path / "run2", tokenizer_dir=hf_dir)
    assert all(b"ssh-private-key" not in (v or b"") for v in listing(tmp_path / "run2").values())
    # A regular file is copied, but only up to its size bound; a FIFO is never opened for reading forever.
    (hf_dir / "big.json").write_bytes(b"x" * 100)
    with pytest.raises(FmforgeError, match="larger than"):
        copy_side_file(hf_dir, "big.json", tmp_path, max_bytes=10)
    assert not (tmp_path / "big.json").exists()
    os.mkfifo(hf_dir / "fifo.json")
    with pytest.raises(FmforgeError, match="not a regular file"):
        copy_side_file(hf_dir, "fifo.json", tmp_path)


# ---------------------------------------------------------------------------------------------------- finding 5


def test_import_refuses_to_overwrite_user_files_in_a_directory_without_a_model(hf_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text("# my own config\n")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FmforgeError) as err:
        import_hf(hf_dir, out, echo=quiet)
    assert "config.yaml" in one_line(err) and "--overwrite" in str(err.value)
    assert listing(out) == {"config.yaml": b"# my own config\n", "notes.txt": b"mine"}
    import_hf(hf_dir, out, echo=quiet, overwrite=True)  # asked for: replaced, and nothing else touched
    assert (out / "config.yaml").read_text() != "# my own config\n" and (out / "notes.txt").read_text() == "mine"
    assert (out / "model.safetensors").is_file()


def test_export_refuses_to_overwrite_files_already_in_its_output(run_dir, tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    target = tmp_path / "precious.safetensors"
    target.write_bytes(b"precious")
    (out / "model.safetensors").symlink_to(target)  # not even through a link
    (out / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FmforgeError) as err:
        export_hf(run_dir, out, echo=quiet)
    assert "model.safetensors" in one_line(err) and "--overwrite" in str(err.value)
    assert target.read_bytes() == b"precious" and (out / "tokenizer_config.json").read_text() == "{}"
    with pytest.raises(FmforgeError, match="is the directory being converted"):
        export_hf(run_dir, run_dir, echo=quiet, overwrite=True)
    export_hf(run_dir, out, echo=quiet, overwrite=True)  # replaces the link, never writes through it
    assert target.read_bytes() == b"precious" and not (out / "model.safetensors").is_symlink()
    load_pretrained(run_dir)


def _tune_overrides(prepared, tmp_path):
    return [o for o in tiny_overrides(prepared, tmp_path, **{"train.max_steps": 4, "checkpoint.interval": 0})
            if not o.startswith(("data.path=", "train.out_dir="))]


def test_tune_never_deletes_trial_runs_when_study_db_was_removed(prepared, tmp_path):
    out = tmp_path / "study"
    run = out / "trials" / "trial_0000"
    run.mkdir(parents=True)
    (run / "model.safetensors").write_bytes(b"weeks of compute")
    with pytest.raises(FmforgeError) as err:
        tune(None, _tune_overrides(prepared, tmp_path), data=str(prepared), out=str(out), trials=1)
    assert "no study.db" in one_line(err)
    assert (run / "model.safetensors").read_bytes() == b"weeks of compute"
    assert not (out / "study.db").exists()
    # A study.db of another study (here: a fresh, empty one) does not own that trial either.
    optuna.create_study(storage=f"sqlite:///{out / 'study.db'}", study_name=STUDY_NAME)
    with pytest.raises(FmforgeError, match="trial_0000 is not a run of the study"):
        tune(None, _tune_overrides(prepared, tmp_path), data=str(prepared), out=str(out), trials=1)
    assert (run / "model.safetensors").read_bytes() == b"weeks of compute"


class _Stop(Exception):
    pass


def _stop(*_args, **_kwargs):
    raise _Stop


def test_quickstart_rerun_removes_only_its_own_outputs(tmp_path, monkeypatch):
    monkeypatch.setattr(quickstart_module, "prepare_data", _stop)  # the folder is what this test is about
    out = tmp_path / "qs"
    for name in ("run", "data", "corpus"):
        (out / name).mkdir(parents=True)
        (out / name / "old.bin").write_bytes(b"old")
    (out / MARKER).write_text("made by fmforge quickstart\n")
    (out / "my_notes.md").write_text("mine")
    (out / "my_experiments").mkdir()
    (out / "my_experiments" / "a.yaml").write_text("mine")
    with pytest.raises(_Stop):
        quickstart(out, minutes=0.1, echo=quiet)
    assert (out / "my_notes.md").read_text() == "mine" and (out / "my_experiments" / "a.yaml").read_text() == "mine"
    assert not (out / "run").exists() and not (out / "data" / "old.bin").exists()
    # A symlink under one of quickstart's names is the user's: refused, and its target left alone.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("keep")
    (out / "run").symlink_to(elsewhere)
    with pytest.raises(FmforgeError, match="symlink"):
        quickstart(out, minutes=0.1, echo=quiet)
    assert (elsewhere / "keep.txt").read_text() == "keep"
    assert (out / "corpus" / "pydoc_topics.jsonl").is_file()  # refused before anything was removed


def test_quickstart_refuses_a_non_empty_folder_it_did_not_make(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("mine")
    with pytest.raises(FmforgeError, match="was not made by quickstart"):
        quickstart(out, minutes=0.1, echo=quiet)
    assert listing(out) == {"thesis.tex": b"mine"}
