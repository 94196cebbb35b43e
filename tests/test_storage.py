"""Object storage: checkpoints mirrored to and restored from s3://, prepared data staged from it, and
``data prepare`` reading s3:// sources — all against a real S3 server (SeaweedFS on loopback)."""

import json
import shutil
import sys

import pytest
import torch

from fmforge.data import staging
from fmforge.data.manifest import load_manifest
from fmforge.data.prepare import prepare_data
from fmforge.data.sources import DocumentReader, resolve_inputs
from fmforge.errors import FmforgeError
from fmforge.io import fs as objstore
from fmforge.train import mirror
from fmforge.train.checkpoint import load_checkpoint, save_checkpoint
from fmforge.train.distributed import DistInfo

pytest_plugins = ["s3server"]  # the s3_server / s3_url fixtures: a real S3 endpoint on loopback
SINGLE = DistInfo(0, 1, 0, 1, torch.device("cpu"))


# ---- helpers ----


def _model_and_optimizer(seed: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _train(model, optimizer, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 8)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def _checkpoints(root, steps, keep_last=10):
    """Real checkpoints (DCP shards, RNG, train state, meta.json with checksums) at the given steps."""
    model, optimizer = _model_and_optimizer()
    paths = []
    for step in steps:
        _train(model, optimizer, 1)
        paths.append(save_checkpoint(root, step, model, optimizer, {"step": step}, {"test": True}, keep_last,
                                     SINGLE))
    return model, optimizer, paths


def _files_under(url: str) -> list[str]:
    """Objects under ``url``. (SeaweedFS, unlike AWS, lists an emptied folder for a while; it holds no files.)"""
    found = objstore.filesystem(url).find(url, detail=True)
    return sorted(p for p, info in found.items() if info["type"] == "file")


def _corpus(d):
    """A few KB of real text as .txt, .jsonl and .parquet, plus a hidden file that must be skipped."""
    import pydoc_data.topics

    import pyarrow as pa
    import pyarrow.parquet as pq

    topics = pydoc_data.topics.topics
    keys = sorted(topics)[:30]
    d.mkdir(parents=True)
    for i, key in enumerate(keys[:6]):
        (d / f"doc{i}.txt").write_text(topics[key][:1500])
    with open(d / "records.jsonl", "w") as f:
        for key in keys[6:20]:
            f.write(json.dumps({"text": topics[key][:800]}) + "\n")
    (d / "sub").mkdir()
    pq.write_table(pa.table({"text": [topics[k][:800] for k in keys[20:]]}), d / "sub" / "rows.parquet")
    (d / ".hidden.txt").write_text("not a document")
    return d


@pytest.fixture(scope="module")
def small_prepared(tmp_path_factory):
    """A prepared data directory small enough to upload in a blink, with several train shards."""
    corpus = _corpus(tmp_path_factory.mktemp("corpus") / "c")
    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_data([str(corpus)], out, vocab_size=300, val_fraction=0.2, shard_tokens=3000, log=None)
    return out


# ---- URLs and backends ----


def test_is_remote_means_a_scheme_other_than_file():
    assert objstore.is_remote("s3://bucket/key") and objstore.is_remote("gs://b/k")
    assert not objstore.is_remote("/data/prepared") and not objstore.is_remote("relative/dir")
    assert not objstore.is_remote("file:///data") and not objstore.is_remote(str(__file__))


def test_missing_s3fs_is_a_one_line_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "s3fs", None)  # import s3fs now raises ImportError
    with pytest.raises(FmforgeError, match=r"s3://b/x.*pip install 'fmforge\[s3\]'"):
        objstore.filesystem("s3://b/x")


@pytest.mark.slow
def test_bad_url_missing_bucket_and_unreachable_endpoint_are_one_line_errors(s3_url, monkeypatch, tmp_path):
    with pytest.raises(FmforgeError, match="bad URL 's3:///key'"):
        objstore.read_text("s3:///key")
    nobucket = "s3://no-such-bucket-fmforge/run"
    with pytest.raises(FmforgeError, match=f"{nobucket}.*no such bucket"):
        mirror.list_remote_checkpoints(nobucket)
    with pytest.raises(FmforgeError, match=f"{nobucket}/data/manifest.json.*no such bucket"):
        staging.stage_prepared_data(f"{nobucket}/data", cache_dir=tmp_path)
    with pytest.raises(FmforgeError, match=f"no manifest.json at {s3_url}/empty"):
        staging.stage_prepared_data(f"{s3_url}/empty", cache_dir=tmp_path)
    with pytest.raises(FmforgeError, match=f"cannot read input {s3_url}/missing.txt: not found"):
        resolve_inputs([f"{s3_url}/missing.txt"])
    with pytest.raises(FmforgeError, match=f"no files match '{nobucket}/\\*.txt'"):
        resolve_inputs([f"{nobucket}/*.txt"])
    with pytest.raises(FmforgeError, match="cannot read s3://Bad Bucket/x"):
        objstore.read_text("s3://Bad Bucket/x")
    assert mirror.list_remote_checkpoints(f"{s3_url}/nothing-yet") == []  # a fresh run's empty prefix

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: connection refused
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(FmforgeError, match=f"cannot read {s3_url}/x.*Could not connect") as err:
        objstore.read_text(f"{s3_url}/x")
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_text_and_directory_helpers_round_trip(s3_url, tmp_path):
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "top.txt").write_text("top")
    (src / "a" / "b" / "deep.bin").write_bytes(bytes(range(256)) * 40)
    assert objstore.upload_dir(src, f"{s3_url}/dir") == ["a/b/deep.bin", "top.txt"]
    assert objstore.list_dir(f"{s3_url}/dir") == ["a", "top.txt"]
    assert objstore.list_dir(f"{s3_url}/nothing") == []
    assert objstore.exists(f"{s3_url}/dir/a") and not objstore.exists(f"{s3_url}/dir/zzz")
    objstore.download_dir(f"{s3_url}/dir", tmp_path / "back")
    assert (tmp_path / "back" / "a" / "b" / "deep.bin").read_bytes() == (src / "a" / "b" / "deep.bin").read_bytes()
    objstore.write_text(f"{s3_url}/note", "héllo\n")
    assert objstore.read_text(f"{s3_url}/note") == "héllo\n"


# ---- checkpoints ----


@pytest.mark.slow
def test_mirrored_checkpoint_restores_identical_tensors_after_local_loss(s3_url, tmp_path):
    local = tmp_path / "checkpoints"
    model, optimizer, [path] = _checkpoints(local, [3])
    remote = f"{s3_url}/checkpoints"
    assert mirror.mirror_checkpoint(path, remote, keep_last=2) == f"{remote}/step_0000003"
    assert mirror.list_remote_checkpoints(remote) == ["step_0000003"]
    assert objstore.read_text(f"{remote}/latest") == "step_0000003\n"
    shutil.rmtree(local)  # the node is gone; only object storage remains

    warnings = []
    fetched = mirror.latest_remote_checkpoint(remote, local, warn=warnings.append)
    assert fetched == local / "step_0000003" and not warnings
    assert not list(local.glob(".tmp_*"))
    fresh, fresh_opt = _model_and_optimizer(seed=1)
    train_state, meta = load_checkpoint(fetched, fresh, fresh_opt, SINGLE)
    assert train_state == {"step": 3} and meta["step"] == 3
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    for pa, pb in zip(model.parameters(), fresh.parameters()):
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(optimizer.state[pa][key], fresh_opt.state[pb][key])
    # A verified local copy is used as is: nothing is downloaded again.
    mtime = (fetched / "meta.json").stat().st_mtime_ns
    assert mirror.fetch_checkpoint(remote, "step_0000003", local) == fetched
    assert (fetched / "meta.json").stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_corrupt_remote_checkpoint_is_skipped_with_a_warning_for_the_older_one(s3_url, tmp_path):
    local = tmp_path / "checkpoints"
    _, _, paths = _checkpoints(local, [1, 2])
    remote = f"{s3_url}/checkpoints"
    for p in paths:
        mirror.mirror_checkpoint(p, remote, keep_last=5)
    objstore.write_text(f"{remote}/step_0000002/train_state.pt", "flipped bits")
    shutil.rmtree(local)

    warnings = []
    fetched = mirror.latest_remote_checkpoint(remote, local, warn=warnings.append)
    assert fetched == local / "step_0000001"
    assert len(warnings) == 1
    assert f"{remote}/step_0000002: train_state.pt fails its checksum" in warnings[0]
    assert "falling back" in warnings[0]
    assert sorted(p.name for p in local.iterdir()) == ["step_0000001"]  # no corrupt or temporary leftovers


@pytest.mark.slow
def test_half_uploaded_checkpoint_without_meta_is_not_listed_and_is_cleaned_up(s3_url, tmp_path):
    local = tmp_path / "checkpoints"
    _, _, paths = _checkpoints(local, [1, 2, 3])
    remote = f"{s3_url}/checkpoints"
    mirror.mirror_checkpoint(paths[0], remote, keep_last=5)
    objstore.upload_dir(paths[1], f"{remote}/step_0000002")  # an upload killed before meta.json ...
    objstore.filesystem(remote).rm_file(f"{remote}/step_0000002/meta.json")  # ... never wrote it
    objstore.write_text(f"{remote}/latest", "step_0000002\n")

    assert mirror.list_remote_checkpoints(remote) == ["step_0000001"]
    warnings = []
    assert mirror.latest_remote_checkpoint(remote, tmp_path / "elsewhere", warnings.append).name == "step_0000001"
    assert not warnings
    mirror.mirror_checkpoint(paths[2], remote, keep_last=5)  # removes the older unfinished upload
    assert mirror.list_remote_checkpoints(remote) == ["step_0000001", "step_0000003"]
    assert _files_under(f"{remote}/step_0000002") == []

    unfinished = tmp_path / "step_0000009"
    shutil.copytree(paths[2], unfinished)
    (unfinished / "meta.json").unlink()
    with pytest.raises(FmforgeError, match="is not finished"):
        mirror.mirror_checkpoint(unfinished, remote, keep_last=5)


@pytest.mark.slow
def test_pruning_keeps_the_last_keep_last_checkpoints(s3_url, tmp_path):
    _, _, paths = _checkpoints(tmp_path / "checkpoints", [10, 20, 30, 40])
    remote = f"{s3_url}/checkpoints"
    for p in paths:
        mirror.mirror_checkpoint(p, remote, keep_last=2)
    assert mirror.list_remote_checkpoints(remote) == ["step_0000030", "step_0000040"]
    assert _files_under(f"{remote}/step_0000010") == _files_under(f"{remote}/step_0000020") == []
    assert objstore.read_text(f"{remote}/latest").strip() == "step_0000040"
    # Re-mirroring a step replaces it in place and keeps the others.
    mirror.mirror_checkpoint(paths[-1], remote, keep_last=2)
    assert mirror.list_remote_checkpoints(remote) == ["step_0000030", "step_0000040"]


# ---- prepared data ----


@pytest.mark.slow
def test_staged_prepared_data_round_trips_and_is_reused(s3_url, small_prepared, tmp_path, monkeypatch):
    url = f"{s3_url}/data"
    staging.publish_prepared_data(small_prepared, url)
    monkeypatch.setenv("FMFORGE_CACHE", str(tmp_path / "cache"))
    staged = staging.stage_prepared_data(url)
    assert staged.parent == tmp_path / "cache" / "data" and len(staged.name) == 16
    manifest = load_manifest(staged)
    assert manifest == load_manifest(small_prepared)
    assert len([s for s in manifest["shards"] if s["split"] == "train"]) >= 2
    names = [manifest["tokenizer"]["file"], "special_tokens_map.json", *(s["file"] for s in manifest["shards"])]
    for name in names + ["manifest.json"]:
        assert (staged / name).read_bytes() == (small_prepared / name).read_bytes(), name

    mtimes = {n: (staged / n).stat().st_mtime_ns for n in names}
    assert staging.stage_prepared_data(url) == staged
    assert {n: (staged / n).stat().st_mtime_ns for n in names} == mtimes  # nothing downloaded again

    shard = staged / manifest["shards"][0]["file"]
    shard.write_bytes(shard.read_bytes()[:-6])  # a damaged local copy is replaced
    staging.stage_prepared_data(url)
    assert shard.read_bytes() == (small_prepared / shard.name).read_bytes()


@pytest.mark.slow
def test_truncated_remote_shard_is_caught_with_a_clear_error(s3_url, small_prepared, tmp_path):
    url = f"{s3_url}/data"
    staging.publish_prepared_data(small_prepared, url)
    shard = load_manifest(small_prepared)["shards"][0]["file"]
    fs = objstore.filesystem(url)
    fs.pipe_file(f"{url}/{shard}", (small_prepared / shard).read_bytes()[:-10])
    with pytest.raises(FmforgeError, match=f"prepared data at {url} is corrupt: corrupt token shard "
                                           f"{url}/{shard}: .*truncated.*still bad") as err:
        staging.stage_prepared_data(url, cache_dir=tmp_path / "cache")
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "cache").glob("*/manifest.json"))  # the staged copy never claims completeness


@pytest.mark.slow
def test_prepare_from_s3_sources_matches_the_same_files_read_locally(s3_url, tmp_path):
    corpus = _corpus(tmp_path / "corpus")
    objstore.upload_dir(corpus, f"{s3_url}/corpus")

    # A bare prefix is searched like a directory: same files, same order, hidden ones skipped.
    remote_files = resolve_inputs([f"{s3_url}/corpus"])
    local_files = resolve_inputs([str(corpus)])
    assert [f.removeprefix(f"{s3_url}/corpus/") for f in remote_files] == \
        [p.relative_to(corpus).as_posix() for p in local_files]
    remote_reader, local_reader = DocumentReader(remote_files), DocumentReader(local_files)
    assert [d.text for d in remote_reader] == [d.text for d in local_reader]
    assert [(s.bytes, s.sha256) for s in remote_reader.sources] == [(s.bytes, s.sha256) for s in local_reader.sources]

    for remote_inputs, local_inputs in [
        ([f"{s3_url}/corpus/*.txt", f"{s3_url}/corpus/*.jsonl"], [f"{corpus}/*.txt", f"{corpus}/*.jsonl"]),
        ([f"{s3_url}/corpus"], [str(corpus)]),
    ]:
        kw = dict(vocab_size=300, val_fraction=0.2, log=None, overwrite=True)
        m_remote = prepare_data(remote_inputs, tmp_path / "from_s3", **kw)
        m_local = prepare_data(local_inputs, tmp_path / "from_local", **kw)
        assert m_remote["documents"] == m_local["documents"]
        assert m_remote["tokens"] == m_local["tokens"] and m_remote["tokens"]["train"] > 0
        assert m_remote["tokenizer"]["sha256"] == m_local["tokenizer"]["sha256"]
        assert [(s["bytes"], s["sha256"]) for s in m_remote["sources"]] == \
            [(s["bytes"], s["sha256"]) for s in m_local["sources"]]
        assert all(s["path"].startswith(f"{s3_url}/corpus/") for s in m_remote["sources"])


# ---- the trainer on object storage ----


@pytest.mark.slow
def test_training_reads_s3_data_mirrors_checkpoints_and_resumes_on_a_machine_that_lost_its_disk(
        s3_url, prepared, tmp_path, monkeypatch):
    from conftest import read_metrics, tiny_overrides

    from fmforge.config import build_config
    from fmforge.train.loop import train

    monkeypatch.setenv("FMFORGE_CACHE", str(tmp_path / "cache"))
    steps = {"train.max_steps": 20, "checkpoint.interval": 10, "train.eval_interval": 0}
    train(build_config({}, tiny_overrides(prepared, tmp_path / "local", **steps)), echo=lambda *_: None)
    reference = [m["loss"] for m in read_metrics(tmp_path / "local") if "loss" in m]

    staging.publish_prepared_data(prepared, f"{s3_url}/data")
    remote = {"data.path": f"{s3_url}/data", "checkpoint.dir": f"{s3_url}/ckpt"}
    cfg = build_config({}, tiny_overrides(prepared, tmp_path / "run", **{**steps, **remote}))
    run, messages = tmp_path / "run", []
    train(cfg.model_copy(deep=True), echo=messages.append)
    assert any("staged in" in m for m in messages)
    assert [m["loss"] for m in read_metrics(run) if "loss" in m] == reference  # same data, read from S3
    assert mirror.list_remote_checkpoints(f"{s3_url}/ckpt") == ["step_0000010", "step_0000020"]

    # The machine is gone; a new one continues from step 10 of the mirror (the newer step 20 is set aside).
    shutil.rmtree(run)
    messages.clear()
    result = train(cfg.model_copy(deep=True), resume=f"{s3_url}/ckpt/step_0000010", echo=messages.append)
    assert result.step == 20 and any("moved 1 newer remote checkpoint" in m for m in messages), messages
    assert [m["loss"] for m in read_metrics(run) if "loss" in m] == reference[10:]
    # And --resume auto on yet another machine finds the newest mirrored checkpoint by itself.
    shutil.rmtree(run)
    messages.clear()
    result = train(cfg.model_copy(deep=True), resume="auto", echo=messages.append)
    assert any(f"fetched step_0000020 from {s3_url}/ckpt" in m for m in messages), messages
    assert result.step == 20
    # A fresh run pointed at a mirror that already holds a run is refused rather than mixed into it.
    with pytest.raises(FmforgeError, match="already holds checkpoints"):
        train(build_config({}, tiny_overrides(prepared, tmp_path / "other", **{**steps, **remote})))
