"""Object storage (``s3://``, or any other fsspec URL): the thin layer every stage that reads or writes
remote artifacts goes through (checkpoint mirroring: ``train/mirror.py``; prepared-data staging:
``data/staging.py``; raw sources: ``data/sources.py``).

Everything fmforge makes is written to local disk first, atomically; finished artifacts are copied to and
from object storage. S3 has no atomic rename, so an artifact says it is complete with one file that is
uploaded last — ``meta.json`` for a checkpoint, ``manifest.json`` for prepared data — and deleted first
when the artifact is replaced or pruned: a half-uploaded or half-deleted artifact never looks complete.

Endpoint and credentials are the standard AWS settings, which botocore reads itself: ``AWS_ENDPOINT_URL``
or ``AWS_ENDPOINT_URL_S3`` (MinIO, SeaweedFS, R2 ...), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``, instance roles; ``AWS_MAX_ATTEMPTS`` bounds retries. s3fs is imported only when an s3://
URL is used (``pip install 'fmforge[s3]'``). Backend failures become one-line ``FmforgeError``s naming the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.io.paths import relative_name

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_filesystems: dict[tuple, object] = {}  # see filesystem()


def is_remote(path: str | Path) -> bool:
    """True for a URL with a scheme (``s3://bucket/key``), except ``file://``; False for local paths."""
    m = _SCHEME.match(str(path))
    return m is not None and m.group(1).lower() != "file"


def filesystem(url: str):
    """The fsspec filesystem for ``url``'s scheme.

    One instance per scheme, process and ``AWS_*`` environment (setting up an S3 client costs ~0.15 s), so
    a changed endpoint or credential takes effect at once. fsspec's listing cache is off: a listing never
    misses what another process just wrote.
    """
    m = _SCHEME.match(str(url))
    protocol = m.group(1).lower() if m else "file"
    if m and protocol != "file" and not url[m.end():].split("/", 1)[0]:
        raise FmforgeError(f"bad URL {url!r}: expected {protocol}://BUCKET/PATH")
    if protocol in ("s3", "s3a"):
        try:
            import s3fs  # noqa: F401
        except ImportError:
            raise FmforgeError(f"{url}: s3:// storage needs s3fs: pip install 'fmforge[s3]'") from None
    key = (protocol, os.getpid(), tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))))
    if key not in _filesystems:
        try:
            import fsspec

            _filesystems[key] = fsspec.filesystem(protocol, skip_instance_cache=True, use_listings_cache=False)
        except (ImportError, ValueError) as err:
            raise FmforgeError(f"{url}: no storage backend for {protocol}:// ({_first_line(err)})") from None
    return _filesystems[key]


def backend_errors() -> tuple[type[BaseException], ...]:
    """The exception types a storage backend raises for I/O failures (s3fs turns most into OSError;
    botocore's connection, credential and parameter errors pass through)."""
    errors: tuple[type[BaseException], ...] = (OSError,)
    with contextlib.suppress(ImportError):
        import botocore.exceptions as bx

        errors += (bx.BotoCoreError, bx.ClientError)
    return errors


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


def no_such_bucket(err: BaseException | None) -> bool:
    """Whether the backend said the bucket itself is missing (s3fs keeps botocore's error as the cause)."""
    while err is not None:
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") == "NoSuchBucket":
            return True
        err = err.__cause__ or err.__context__
    return False


def _reason(err: BaseException) -> str:
    text = _first_line(err)
    if isinstance(err, FileNotFoundError):
        return "no such bucket" if no_such_bucket(err) else "not found"
    if isinstance(err, PermissionError):
        return (f"access denied ({text}); check the credentials (AWS_ACCESS_KEY_ID, AWS_PROFILE), the bucket "
                "policy, and that the bucket exists")
    if type(err).__name__ == "NoCredentialsError":
        return "no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
    return text


@contextlib.contextmanager
def errors(url: str, action: str) -> Iterator[None]:
    """Turn a backend failure inside the block into ``FmforgeError("cannot ACTION URL: reason")``."""
    try:
        yield
    except FmforgeError:
        raise
    except backend_errors() as err:
        raise FmforgeError(f"cannot {action} {url}: {_reason(err)}") from None


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *parts])


def key(fs, url: str) -> str:
    """``url`` as the backend names it in listings (``bucket/key``)."""
    return fs._strip_protocol(url).rstrip("/")


def find(fs, url: str) -> dict[str, int]:
    """Every file under ``url``: path relative to it → size. One listing; a missing bucket raises. Folder
    entries (which some S3 servers keep after their last file is deleted) are not files."""
    root = key(fs, url)
    with errors(url, "list"):
        found = fs.find(url, detail=True)
    return {p[len(root) + 1:]: int(info.get("size") or 0) for p, info in found.items()
            if p.startswith(root + "/") and info.get("type") == "file"}


def put(fs, local_dir: Path, names: list[str], url: str) -> None:
    """Upload ``local_dir/name`` → ``url/name`` for each name (concurrently, in one batch)."""
    if names:
        with errors(url, "upload to"):
            fs.put([str(local_dir / n) for n in names], [key(fs, join(url, n)) for n in names])


def get(fs, url: str, names: list[str], local_dir: Path, suffix: str = "") -> None:
    """Download ``url/name`` → ``local_dir/name + suffix`` for each name (concurrently, in one batch)."""
    if not names:
        return
    for n in names:
        (local_dir / n).parent.mkdir(parents=True, exist_ok=True)
    with errors(url, "download from"):
        fs.get([key(fs, join(url, n)) for n in names], [str(local_dir / n) + suffix for n in names])


def exists(url: str) -> bool:
    """Whether a file, or anything under a prefix, exists at ``url``."""
    fs = filesystem(url)
    with errors(url, "check"):
        return bool(fs.exists(url))


def read_text(url: str) -> str:
    fs = filesystem(url)
    with errors(url, "read"):
        data = fs.cat_file(url)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FmforgeError(f"{url} is not UTF-8 text") from None


def write_text(url: str, text: str) -> None:
    fs = filesystem(url)
    with errors(url, "write"):
        fs.pipe_file(url, text.encode("utf-8"))


def list_dir(url: str) -> list[str]:
    """Names of the immediate children (files and prefixes) of ``url``, sorted; an empty or absent prefix
    lists as nothing, a missing bucket is an error."""
    fs = filesystem(url)
    root = key(fs, url)
    with errors(url, "list"):
        try:
            paths = fs.ls(url, detail=False)
        except FileNotFoundError:
            fs.find(url)  # raises when the bucket itself is missing; an empty prefix just has no children
            return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in paths if p.rstrip("/") != root)


def upload_dir(local_dir: str | Path, url: str) -> list[str]:
    """Upload every file under ``local_dir`` (recursive) to ``url/<relative path>``; returns those paths."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise FmforgeError(f"not a directory: {local_dir}")
    names = sorted(p.relative_to(local_dir).as_posix() for p in local_dir.rglob("*") if p.is_file())
    put(filesystem(url), local_dir, names, url)
    return names


def download_dir(url: str, local_dir: str | Path) -> list[str]:
    """Download every file under ``url`` (recursive) into ``local_dir``; returns their relative paths.
    Nothing under ``url`` is an error."""
    fs = filesystem(url)
    names = [relative_name(n, f"a key under {url}") for n in sorted(find(fs, url))]  # no `..`, no `//`
    if not names:
        raise FmforgeError(f"nothing found under {url}")
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    get(fs, url, names, local_dir)
    return names


# ---- checkpoints: RUN_DIR/checkpoints/step_NNNNNNN/ mirrored to REMOTE_ROOT/step_NNNNNNN/ ----


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
