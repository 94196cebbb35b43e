"""``fmforge eval human serve``: the rating page, on Python's own ``http.server``.

One process serves one task set to any number of raters (identified by the name they type). Each answer
is one JSON line appended to the ratings file with a single ``write`` and an ``fsync`` before the page is
told it was saved, so killing the server loses nothing that was acknowledged; a line torn by a crash
mid-write is skipped on reading and never glued to the next one. The page asks which items a rater has
done and resumes at the first one left. The server binds 127.0.0.1 by default and, when bound to a
loopback address, answers only requests addressed to a loopback name (a web page that rebinds its own
DNS name to 127.0.0.1 cannot read the tasks). Model output only ever travels as JSON and is put into the
page as text, under a Content-Security-Policy that allows no script but the page's own.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import re
import socket
import sys
import threading
import unicodedata
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from fmforge.errors import FmforgeError, clip
from fmforge.eval.human.tasks import key_path_for, ratings_path_for, read_tasks

MAX_BODY_BYTES = 64 << 10  # one answer is a few hundred bytes
MAX_DRAIN_BYTES = 1 << 20
MAX_RATER_CHARS = 64
MAX_RATINGS_LINE = 1 << 20
LIKERT = range(1, 6)
THUMBS = ("up", "down")
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
_ANSWER_KEYS = {"rater", "item", "task_set", "thumbs", "likert", "choice", "ranking"}


class BadRequest(Exception):
    """A request the page (or anyone else) got wrong: answered with ``status`` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def read_ratings(path: str | Path) -> tuple[list[dict], int]:
    """(every well-formed answer line of a ratings file, in order; the number of unreadable lines). A line
    torn by a crash, or any line that is not an answer object, is counted, never fatal."""
    records, bad = [], 0
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return [], 0
    except OSError as err:
        raise FmforgeError(f"cannot read ratings file {path}: {err.strerror or err}") from None
    with f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line) if len(line) <= MAX_RATINGS_LINE else None
            except (ValueError, RecursionError):
                rec = None
            if isinstance(rec, dict) and all(isinstance(rec.get(k), str) for k in ("rater", "item", "task_set")):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def check_rater(name) -> str:
    if not isinstance(name, str) or not name.strip():
        raise BadRequest(400, "rater name is missing")
    name = name.strip()
    if len(name) > MAX_RATER_CHARS:
        raise BadRequest(400, f"rater name is longer than {MAX_RATER_CHARS} characters")
    if any(unicodedata.category(c)[0] == "C" for c in name):
        raise BadRequest(400, "rater name holds control characters")
    return name


def check_answer(body, items: dict[str, dict], task_set: str) -> dict:
    """The ratings-file record for a submitted answer, or ``BadRequest`` naming what is wrong with it."""
    if not isinstance(body, dict):
        raise BadRequest(400, "the answer must be a JSON object")
    unknown = sorted(set(body) - _ANSWER_KEYS)
    if unknown:
        raise BadRequest(400, f"unknown field {clip(unknown[0], 40)}")
    rater = check_rater(body.get("rater"))
    if body.get("task_set") != task_set:
        raise BadRequest(409, "this page shows another task set than the server now serves: reload the page")
    item = items.get(body.get("item")) if isinstance(body.get("item"), str) else None
    if item is None:
        raise BadRequest(404, f"unknown item {clip(body.get('item'), 60)}")
    labels = [o["label"] for o in item["outputs"]]
    thumbs, likert = body.get("thumbs"), body.get("likert")
    if not isinstance(thumbs, dict) or sorted(thumbs) != labels or any(v not in THUMBS for v in thumbs.values()):
        raise BadRequest(400, f"thumbs must give 'up' or 'down' for each of {', '.join(labels)}")
    if not isinstance(likert, dict) or sorted(likert) != labels or any(
            isinstance(v, bool) or not isinstance(v, int) or v not in LIKERT for v in likert.values()):
        raise BadRequest(400, f"likert must give a score from 1 to 5 for each of {', '.join(labels)}")
    record = {"rater": rater, "item": item["id"], "task_set": task_set,
              "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
              "thumbs": {k: thumbs[k] for k in labels}, "likert": {k: likert[k] for k in labels}}
    choice, ranking = body.get("choice"), body.get("ranking")
    if len(labels) == 2:
        if choice not in (*labels, "tie") or ranking is not None:
            raise BadRequest(400, "choice must be 'A', 'B' or 'tie' (and no ranking) for two outputs")
        record["choice"] = choice
    elif len(labels) > 2:
        if not isinstance(ranking, list) or sorted(map(str, ranking)) != labels or choice is not None:
            raise BadRequest(400, f"ranking must order all of {', '.join(labels)}, best first (and no choice)")
        record["ranking"] = list(ranking)
    elif choice is not None or ranking is not None:
        raise BadRequest(400, "a single output takes no choice or ranking")
    return record


class RatingStore:
    """The ratings file and, in memory, each rater's latest answer per item (to resume from)."""

    def __init__(self, path: Path, task_set: str, items: dict[str, dict]):
        self.path, self.task_set = path, task_set
        self.lock = threading.Lock()
        records, self.unreadable = read_ratings(path)
        foreign = [r for r in records if r["task_set"] != task_set]
        if foreign:
            raise FmforgeError(f"ratings file {path} holds {len(foreign)} answer(s) for another task set "
                               f"({foreign[0]['task_set'][:12]}, not {task_set[:12]}): pass another --ratings file")
        self.done: dict[str, dict[str, dict]] = {}
        for r in records:
            if r["item"] in items:
                self.done.setdefault(r["rater"], {})[r["item"]] = r
        self._separate_torn_tail()

    def _separate_torn_tail(self) -> None:
        """A crash mid-append can leave a last line without its newline: end it, so the next answer starts
        a line of its own instead of being glued to (and lost with) the torn one."""
        try:
            with open(self.path, "rb") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() == 0:
                    return
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        except FileNotFoundError:
            return
        if torn:
            self._append(b"\n")

    def _append(self, data: bytes) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)

    def add(self, record: dict) -> int:
        """Append ``record`` durably; return how many items its rater has now done."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self.lock:
            self._append(line)
            mine = self.done.setdefault(record["rater"], {})
            mine[record["item"]] = record
            return len(mine)

    def progress(self, rater: str) -> dict[str, dict]:
        with self.lock:
            return {item: {k: r[k] for k in ("thumbs", "likert", "choice", "ranking", "time") if k in r}
                    for item, r in self.done.get(rater, {}).items()}


def load_page() -> tuple[bytes, str]:
    """(the rating page, its Content-Security-Policy: only the page's own inline script and style run)."""
    html = resources.files("fmforge.eval.human").joinpath("page.html").read_text(encoding="utf-8")

    def digests(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'" for b in blocks)

    csp = (f"default-src 'none'; script-src {digests('script')}; style-src {digests('style')}; "
           "connect-src 'self'; img-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return html.encode("utf-8"), csp


class RatingHandler(BaseHTTPRequestHandler):
    server: RatingServer
    timeout = 30  # a client that stops sending mid-request does not hold a thread forever
    server_version = "fmforge-human"
    sys_version = ""

    def log_message(self, format, *args):  # noqa: A002 - http.server's signature
        pass  # quiet: ratings go to the ratings file, not the terminal

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        try:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError:  # the browser went away: nothing to tell it
            pass

    def _json(self, status: int, obj) -> None:
        self._send(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _check_host(self) -> None:
        if not self.server.loopback_only:
            return
        host = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        if host not in LOOPBACK_NAMES:
            raise BadRequest(403, "this server answers only requests to 127.0.0.1 or localhost")

    def _dispatch(self, method) -> None:
        try:
            self._check_host()
            method()
        except BadRequest as err:
            self._json(err.status, {"error": str(err)})
        except Exception as err:  # never a traceback to the rater or the terminal
            print(f"fmforge human serve: internal error on {self.command} {self.path[:80]}: "
                  f"{type(err).__name__}: {str(err)[:200]}", file=sys.stderr)
            self._json(500, {"error": "internal server error"})

    def do_GET(self):
        self._dispatch(self._get)

    def do_POST(self):
        self._dispatch(self._post)

    def _get(self) -> None:
        url = urlsplit(self.path)
        if url.path in ("/", "/index.html"):
            self._send(200, self.server.page, "text/html; charset=utf-8",
                       {"Content-Security-Policy": self.server.csp, "X-Frame-Options": "DENY"})
        elif url.path == "/favicon.ico":  # browsers ask; a 404 would be a console error on every load
            self._send(204, b"", "image/x-icon")
        elif url.path == "/api/tasks":
            self._json(200, {"task_set": self.server.task_set, "items": self.server.items})
        elif url.path == "/api/progress":
            raters = parse_qs(url.query).get("rater", [])
            rater = check_rater(raters[0] if len(raters) == 1 else None)
            self._json(200, {"rater": rater, "task_set": self.server.task_set,
                             "done": self.server.store.progress(rater)})
        else:
            raise BadRequest(404, f"no such page: {clip(url.path, 60)}")

    def _read_json_body(self):
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise BadRequest(415, "send the answer as application/json")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise BadRequest(411, "a Content-Length is required")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # an unread body must never be parsed as the next request
            if int(length) <= MAX_DRAIN_BYTES:  # read it, so the client sees the answer and not a reset
                self.rfile.read(int(length))
            raise BadRequest(413, f"request body over {MAX_BODY_BYTES:,} bytes")
        raw = self.rfile.read(int(length))
        try:
            return json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            raise BadRequest(400, "the request body is not valid JSON") from None

    def _post(self) -> None:
        if urlsplit(self.path).path != "/api/rate":
            raise BadRequest(404, f"no such endpoint: {clip(urlsplit(self.path).path, 60)}")
        origin = self.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != self.headers.get("Host"):
            raise BadRequest(403, "answers are accepted only from the rating page itself")
        record = check_answer(self._read_json_body(), self.server.items_by_id, self.server.task_set)
        done = self.server.store.add(record)
        self._json(200, {"ok": True, "item": record["item"], "done": done, "total": len(self.server.items)})


class RatingServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a dropped connection: one line, no traceback
        err = sys.exc_info()[1]
        print(f"fmforge human serve: connection from {client_address[0]} failed: {type(err).__name__}",
              file=sys.stderr)


class RatingServer6(RatingServer):
    address_family = socket.AF_INET6


def make_server(tasks: str | Path, ratings: str | Path | None = None, host: str = "127.0.0.1",
                port: int = 8000) -> RatingServer:
    """A rating server for the task set ``tasks``, bound but not yet serving (``.serve_forever()``);
    ``port`` 0 picks a free one (``.url`` says which). Ratings go to ``ratings`` (default
    ``TASKS.ratings.jsonl``)."""
    tasks = Path(tasks)
    items, task_set = read_tasks(tasks)
    ratings = Path(ratings) if ratings else ratings_path_for(tasks)
    for other in (tasks, key_path_for(tasks)):
        if ratings.resolve() == other.resolve():
            raise FmforgeError(f"the ratings file cannot be {other}")
    if not ratings.parent.is_dir():
        raise FmforgeError(f"folder of the ratings file does not exist: {ratings.parent}")
    if not 0 <= port <= 65535:
        raise FmforgeError(f"--port must be between 0 and 65535 (got {port})")
    store = RatingStore(ratings, task_set, {it["id"]: it for it in items})
    server_class = RatingServer6 if ":" in host else RatingServer
    try:
        server = server_class((host, port), RatingHandler)
    except OSError as err:
        raise FmforgeError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    server.items, server.items_by_id = items, {it["id"]: it for it in items}
    server.task_set, server.store = task_set, store
    server.page, server.csp = load_page()
    try:
        server.loopback_only = ipaddress.ip_address(host).is_loopback
    except ValueError:
        server.loopback_only = host == "localhost"
    bound = server.server_address[1]
    shown = f"[{host}]" if ":" in host else host
    server.url = f"http://{shown}:{bound}/"
    return server


def serve_human(tasks: str | Path, ratings: str | Path | None = None, host: str = "127.0.0.1", port: int = 8000,
                echo=None) -> None:
    """``fmforge eval human serve``: serve the rating page for ``tasks`` until interrupted (Ctrl-C)."""
    echo = echo or (lambda msg: print(msg, flush=True))
    server = make_server(tasks, ratings, host, port)
    store = server.store
    raters = ", ".join(f"{r} ({len(d)})" for r, d in sorted(store.done.items())) or "none yet"
    echo(f"serving {len(server.items)} items (task set {server.task_set[:12]}) at {server.url}")
    echo(f"answers are appended to {store.path}; raters so far: {raters}")
    if store.unreadable:
        echo(f"skipped {store.unreadable} unreadable line(s) in {store.path}")
    if not server.loopback_only:
        echo(f"warning: listening on {host}: anyone who can reach this machine can read the tasks and rate")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        echo("stopped; every submitted answer is in the ratings file")
    finally:
        server.server_close()
