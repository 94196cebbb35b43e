"""Shared fixtures: a small real corpus (stdlib sources + pydoc topics) prepared once per session."""

import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# A fixed, varied slice of real code and prose: ~0.6 MB.
CORPUS_MODULES = ["argparse.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "heapq.py",
                  "bisect.py", "shlex.py", "fractions.py", "statistics.py", "csv.py", "difflib.py",
                  "functools.py", "glob.py", "fnmatch.py", "colorsys.py", "calendar.py", "dataclasses.py"]


def run_cli(*args, timeout=300, **kw):
    """Run ``python -m fmforge ARGS`` the way a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "fmforge", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, **kw)


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    import pydoc_data.topics

    d = tmp_path_factory.mktemp("corpus")
    for name in CORPUS_MODULES:
        src = STDLIB / name
        (d / name.replace("/", "_")).write_text(src.read_text(encoding="utf-8"), encoding="utf-8")
    with open(d / "topics.jsonl", "w") as f:
        for key in sorted(pydoc_data.topics.topics)[:40]:
            f.write(json.dumps({"text": pydoc_data.topics.topics[key]}) + "\n")
    return d


@pytest.fixture(scope="session")
def prepared(corpus_dir, tmp_path_factory) -> Path:
    """A prepared data dir: 512-token byte-level BPE, 10% of documents held out."""
    from fmforge.data.prepare import prepare_data

    out = tmp_path_factory.mktemp("data") / "prepared"
    prepare_data([str(corpus_dir)], out, vocab_size=512, val_fraction=0.1, document_bytes=16384, log=None)
    return out


def tiny_overrides(data: Path, out: Path, **extra) -> list[str]:
    """A nano Llama that takes a few ms per step on CPU: for loop, resume and checkpoint behaviour."""
    base = {
        "model.arch": "llama", "model.size": "nano", "model.n_kv_head": 2, "data.seq_len": 64,
        "train.global_batch": 512, "train.micro_batch_size": 4, "train.max_steps": 40,
        "train.log_interval": 1, "train.eval_interval": 20, "train.eval_batches": 2, "train.threads": 1,
        "optim.warmup_steps": 5, "optim.lr": 3e-3, "checkpoint.interval": 10, "checkpoint.keep_last": 3,
        "log.tensorboard": False, "data.path": str(data), "train.out_dir": str(out),
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def chat_base(prepared, tmp_path_factory) -> Path:
    """A nano Llama briefly pretrained on the prepared corpus: the base of the SFT and DPO tests."""
    from fmforge.config import build_config
    from fmforge.train.loop import train

    out = tmp_path_factory.mktemp("chat_base") / "run"
    train(build_config({}, tiny_overrides(prepared, out, **{"train.max_steps": 20, "checkpoint.interval": 0,
                                                            "data.seq_len": 64})), echo=lambda _msg: None)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_cmd(*args: str, env: dict, check: bool = True) -> str:
    return subprocess.run(list(args), env=env, capture_output=True, text=True, check=check, timeout=30).stdout


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node Slurm (slurmctld + slurmd from Debian's slurm-wlm) on loopback, with one fake GPU GRES so
    the script's --gpus-per-node is honoured. Yields the environment that points Slurm commands at it."""
    missing = [t for t in ("slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "srun", "sinfo")
               if shutil.which(t) is None]
    if missing:
        pytest.skip(f"Slurm not installed ({', '.join(missing)} missing): apt-get install slurm-wlm")
    if os.geteuid() != 0:
        pytest.skip("a throwaway slurmd must run as root (it launches jobs as their user)")
    host = socket.gethostname()
    try:
        socket.gethostbyname(host)
    except OSError:
        pytest.skip(f"hostname {host!r} does not resolve: the job's rendezvous uses the node name")

    d = tmp_path_factory.mktemp("slurm")
    for sub in ("state", "spool", "log"):
        (d / sub).mkdir()
    conf = d / "slurm.conf"
    conf.write_text(f"""ClusterName=fmforgetest
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
# A requeued job waits cred_expire seconds (default 120) before it may start again, then for the next
# scheduling pass (every 60 s by default)
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
GresTypes=gpu
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    (d / "gres.conf").write_text(f"NodeName={host} Name=gpu File=/dev/null\n")  # a GPU slot, no device
    env = {**os.environ, "SLURM_CONF": str(conf)}
    try:
        try:
            slurm_cmd("slurmctld", "-f", str(conf), env=env)
            slurm_cmd("slurmd", "-f", str(conf), "-N", host, env=env)
        except subprocess.CalledProcessError as err:
            pytest.skip(f"{err.cmd[0]} did not start: {(err.stderr or '').strip()[-300:]}")
        deadline = time.monotonic() + 30
        while slurm_cmd("sinfo", "-h", "-o", "%t", env=env, check=False).strip() != "idle":
            if time.monotonic() > deadline:
                logs = " | ".join((d / "log" / f).read_text()[-400:] for f in ("slurmctld.log", "slurmd.log"))
                pytest.skip(f"single-node Slurm did not come up within 30 s: {logs}")
            time.sleep(0.3)
        yield env
    finally:
        slurm_cmd("scontrol", "shutdown", env=env, check=False)
        for pid_file in ("slurmd.pid", "slurmctld.pid"):  # only the daemons this fixture started
            pid_path = d / pid_file
            if pid_path.exists():
                try:
                    os.kill(int(pid_path.read_text()), 15)
                except (ProcessLookupError, ValueError):
                    pass
