"""The model registry: numbered versions, approval, aliases, refusals that write nothing, concurrent writers."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from fmforge.cli import main
from fmforge.errors import FmforgeError
from fmforge.pipeline.registry import APPROVED, PENDING, REJECTED, Registry, beats


@pytest.fixture
def run_dir(tmp_path) -> Path:
    d = tmp_path / "run"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"weights")
    (d / "config.yaml").write_text("model: {}\n")
    return d


def test_versions_are_numbered_per_group_and_start_pending(tmp_path, run_dir):
    reg = Registry(tmp_path / "r.sqlite")
    a1 = reg.register(run_dir, "lm", {"val_loss": 3.0})
    a2 = reg.register(run_dir, "lm", {"val_loss": 2.5})
    b1 = reg.register(run_dir, "other")
    assert (a1["version"], a2["version"], b1["version"]) == (1, 2, 1)
    assert a1["status"] == PENDING and a2["metrics"] == {"val_loss": 2.5}
    assert a1["hash"] == a2["hash"] and a1["path"] == str(run_dir.resolve())


def test_a_copied_version_keeps_its_files_when_the_run_directory_changes(tmp_path, run_dir):
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "big.pt").write_bytes(b"optimizer state")
    version = Registry(tmp_path / "r.sqlite").register(run_dir, "lm", copy=True)
    (run_dir / "model.safetensors").write_bytes(b"retrained")
    stored = Path(version["path"])
    assert stored == tmp_path / "r-models" / "lm" / "1"
    assert (stored / "model.safetensors").read_bytes() == b"weights" and not (stored / "checkpoints").exists()
    assert version["lineage"]["source"] == str(run_dir.resolve())
    assert [p.name for p in stored.parent.iterdir()] == ["1"]  # no staging directory left behind


def test_approve_reject_alias_and_path(tmp_path, run_dir, capsys):
    db = str(tmp_path / "r.sqlite")
    main(["registry", "register", str(run_dir), "--group", "lm", "--registry", db])
    main(["registry", "register", str(run_dir), "--group", "lm", "--registry", db])
    main(["registry", "approve", "lm@2", "--registry", db])
    main(["registry", "alias", "lm@2", "champion", "--registry", db])
    capsys.readouterr()
    main(["registry", "path", "lm@champion", "--registry", db])
    assert capsys.readouterr().out.strip() == str(run_dir.resolve())
    reg = Registry(db)
    assert reg.get("lm@champion")["version"] == 2 and reg.get("lm@2")["status"] == APPROVED
    assert reg.get("lm@2")["aliases"] == ["champion"]
    reg.alias("lm@1", "champion")  # an alias moves
    assert reg.get("lm@champion")["version"] == 1 and reg.get("lm@2")["aliases"] == []


def test_approving_a_rejected_version_needs_force_and_the_refusal_writes_nothing(tmp_path, run_dir, capsys):
    db = str(tmp_path / "r.sqlite")
    reg = Registry(db)
    reg.register(run_dir, "lm")
    reg.set_status("lm@1", REJECTED)
    before = reg.get("lm@1")
    with pytest.raises(SystemExit) as exit_:
        main(["registry", "approve", "lm@1", "--registry", db])
    assert exit_.value.code == 2
    assert "lm@1 was rejected; pass --force" in capsys.readouterr().err
    assert reg.get("lm@1") == before
    main(["registry", "approve", "lm@1", "--force", "--registry", db])
    assert reg.get("lm@1")["status"] == APPROVED


@pytest.mark.parametrize("ref, message", [("nope@1", "no model group 'nope'"), ("lm@7", "has no version 7"),
                                          ("lm@best", "has no version or alias 'best'"), ("lm", "NAME@VERSION")])
def test_unknown_names_are_one_line_errors(tmp_path, run_dir, ref, message):
    reg = Registry(tmp_path / "r.sqlite")
    reg.register(run_dir, "lm")
    with pytest.raises(FmforgeError, match=message):
        reg.get(ref)


def test_a_missing_registry_is_not_created_by_a_read(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["registry", "list", "--registry", str(tmp_path / "none.sqlite")])
    assert not (tmp_path / "none.sqlite").exists()
    assert "no registry at" in capsys.readouterr().err


def test_beating_the_champion_compares_the_named_metric():
    champion = {"metrics": {"val_loss": 3.0, "acc": 0.5}}
    assert beats({"val_loss": 2.9}, champion, "val_loss", True)
    assert not beats({"val_loss": 3.1}, champion, "val_loss", True)
    assert beats({"acc": 0.6}, champion, "acc", False)
    assert beats({"val_loss": 9.0}, None, "val_loss", True)  # no champion yet
    with pytest.raises(FmforgeError, match="no numeric metric 'val_loss'"):
        beats({}, champion, "val_loss", True)


def _register_many(db: str, run_dir: str, n: int) -> None:
    reg = Registry(db)
    for _ in range(n):
        reg.register(run_dir, "lm")
    reg.close()


def test_two_concurrent_writers_get_distinct_versions(tmp_path, run_dir):
    db = str(tmp_path / "r.sqlite")
    Registry(db).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_register_many, args=(db, str(run_dir), 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    versions = [v["version"] for v in Registry(db).versions("lm")]
    assert versions == list(range(1, 31))
