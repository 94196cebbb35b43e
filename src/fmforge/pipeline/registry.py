"""The model registry: model groups with numbered versions, metrics, approval status, aliases and lineage.

One SQLite file (``--registry FILE``, default ``$FMFORGE_REGISTRY`` or ``~/.fmforge/registry.sqlite``). Every
change is one ``BEGIN IMMEDIATE`` transaction, so concurrent writers (two pipelines registering at once)
queue on the file's lock and each gets its own version number; a failed check writes nothing.
Status follows SageMaker's model registry: ``PendingManualApproval`` (new), ``Approved``, ``Rejected``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import tempfile
import time
from pathlib import Path

from fmforge.errors import FmforgeError, clip
from fmforge.pipeline.state import connect, file_manifest, manifest_hash
from fmforge.runs import read_small_json

PENDING, APPROVED, REJECTED = "PendingManualApproval", "Approved", "Rejected"
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SCHEMA = """
CREATE TABLE IF NOT EXISTS versions (grp TEXT, version INTEGER, path TEXT, hash TEXT, metrics TEXT, status TEXT,
    created REAL, updated REAL, lineage TEXT, description TEXT, PRIMARY KEY (grp, version));
CREATE TABLE IF NOT EXISTS aliases (grp TEXT, alias TEXT, version INTEGER, PRIMARY KEY (grp, alias));
"""
UNCOPIED = ("checkpoints", "tb", ".fmforge.lock")  # training state, not the model
COLUMNS = ("group", "version", "path", "hash", "metrics", "status", "created", "updated", "lineage", "description")


def default_registry() -> Path:
    return Path(os.environ.get("FMFORGE_REGISTRY") or Path.home() / ".fmforge" / "registry.sqlite")


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME.match(value):
        raise FmforgeError(f"{what} {clip(value)}: letters, digits, '.', '_' and '-' (at most 64)")
    return value


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``NAME@VERSION`` / ``NAME@ALIAS`` / ``NAME`` -> (group, version-or-alias or None)."""
    group, _, which = str(ref).partition("@")
    return _name(group, "model group"), (which or None)


class Registry:
    def __init__(self, path: str | Path | None = None, create: bool = True):
        self.path = Path(path) if path else default_registry()
        if not self.path.is_file():
            if not create:
                raise FmforgeError(f"no registry at {self.path} (register a model first, or pass --registry)")
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db: sqlite3.Connection = connect(self.path)
        self.db.executescript(SCHEMA)

    def close(self) -> None:
        self.db.close()

    def _row(self, row) -> dict:
        out = dict(zip(COLUMNS, row))
        out["metrics"] = json.loads(out["metrics"] or "{}")
        out["lineage"] = json.loads(out["lineage"] or "{}")
        out["aliases"] = [a for (a,) in self.db.execute("SELECT alias FROM aliases WHERE grp=? AND version=? "
                                                        "ORDER BY alias", (out["group"], out["version"]))]
        return out

    def versions(self, group: str | None = None) -> list[dict]:
        sql = "SELECT * FROM versions" + (" WHERE grp=?" if group else "") + " ORDER BY grp, version"
        rows = self.db.execute(sql, (group,) if group else ()).fetchall()
        if group and not rows:
            raise FmforgeError(f"no model group {group!r} in {self.path}")
        return [self._row(r) for r in rows]

    def get(self, ref: str) -> dict:
        group, which = parse_ref(ref)
        if which is None:
            raise FmforgeError(f"{ref!r}: name a version as NAME@VERSION or NAME@ALIAS (e.g. {group}@champion)")
        if which.isdigit():
            version = int(which)
        else:
            row = self.db.execute("SELECT version FROM aliases WHERE grp=? AND alias=?", (group, which)).fetchone()
            if row is None:
                self.versions(group)  # an unknown group is named as such
                raise FmforgeError(f"model group {group!r} has no version or alias {which!r}")
            version = row[0]
        row = self.db.execute("SELECT * FROM versions WHERE grp=? AND version=?", (group, version)).fetchone()
        if row is None:
            self.versions(group)
            raise FmforgeError(f"model group {group!r} has no version {version}")
        return self._row(row)

    def register(self, path: str | Path, group: str, metrics: dict | None = None, lineage: dict | None = None,
                 description: str = "", status: str = PENDING, copy: bool = False) -> dict:
        """The next version of ``group``. ``copy``: store a copy of the run's model files (not its checkpoints)
        beside the registry file, so a later run that rewrites the run directory cannot change the version."""
        _name(group, "model group")
        path = Path(path).resolve()
        if not path.is_dir():
            raise FmforgeError(f"{path} is not a run directory")
        staged = self._stage(path, group) if copy else None
        digest = manifest_hash(file_manifest(staged or path))
        now = time.time()
        try:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                (last,) = self.db.execute("SELECT COALESCE(MAX(version), 0) FROM versions WHERE grp=?",
                                          (group,)).fetchone()
                stored = path
                if staged is not None:
                    stored = staged.parent / str(last + 1)
                    os.replace(staged, stored)
                self.db.execute("INSERT INTO versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                                (group, last + 1, str(stored), digest, json.dumps(metrics or {}), status, now, now,
                                 json.dumps({**(lineage or {}), "source": str(path)}), description))
        finally:
            if staged is not None and staged.exists():
                shutil.rmtree(staged)
        return self.get(f"{group}@{last + 1}")

    def _stage(self, path: Path, group: str) -> Path:
        root = self.path.parent / f"{self.path.stem}-models" / group
        root.mkdir(parents=True, exist_ok=True)
        staged = Path(tempfile.mkdtemp(prefix=".incoming-", dir=root))
        for item in path.iterdir():
            if item.is_symlink() or item.name in UNCOPIED:
                continue
            if item.is_dir():
                shutil.copytree(item, staged / item.name, symlinks=True)
            else:
                shutil.copy2(item, staged / item.name)
        return staged

    def set_status(self, ref: str, status: str, force: bool = False) -> dict:
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            version = self.get(ref)
            if version["status"] == REJECTED and status == APPROVED and not force:
                raise FmforgeError(f"{version['group']}@{version['version']} was rejected; pass --force to approve it")
            self.db.execute("UPDATE versions SET status=?, updated=? WHERE grp=? AND version=?",
                            (status, time.time(), version["group"], version["version"]))
        return self.get(f"{version['group']}@{version['version']}")

    def alias(self, ref: str, alias: str) -> dict:
        _name(alias, "alias")
        if alias.isdigit():
            raise FmforgeError(f"alias {alias!r}: a version number cannot be an alias")
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            version = self.get(ref)
            self.db.execute("INSERT OR REPLACE INTO aliases VALUES (?, ?, ?)",
                            (version["group"], alias, version["version"]))
        return self.get(f"{version['group']}@{version['version']}")

    def champion(self, group: str) -> dict | None:
        try:
            return self.get(f"{group}@champion")
        except FmforgeError:
            return None


def beats(candidate: dict, champion: dict | None, metric: str, lower_is_better: bool) -> bool:
    """Whether ``candidate`` metrics beat the champion's on ``metric`` (no champion: it does)."""
    if champion is None:
        return True
    new, old = candidate.get(metric), champion["metrics"].get(metric)
    if not isinstance(new, (int, float)):
        raise FmforgeError(f"the candidate has no numeric metric {metric!r} to compare with the champion")
    if not isinstance(old, (int, float)):
        return True
    return new < old if lower_is_better else new > old


# ---------------------------------------------------------------------------------------------------- CLI


def _show(version: dict, echo=print) -> None:
    aliases = f"  [{', '.join(version['aliases'])}]" if version["aliases"] else ""
    metrics = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in version["metrics"].items() if isinstance(v, (int, float, str)))
    echo(f"{version['group']}@{version['version']}  {version['status']}{aliases}  {version['path']}"
         + (f"\n    {metrics}" if metrics else ""))


def _out(result, json_out: bool, echo=print) -> None:
    if json_out:
        echo(json.dumps(result, indent=2, sort_keys=True))
    else:
        for version in result if isinstance(result, list) else [result]:
            _show(version, echo)


def register_command(run_dir: str, group: str, metrics: str | None = None, description: str = "",
                     copy: bool = False, registry: str | None = None, json_out: bool = False) -> dict:
    values = read_small_json(Path(metrics)) if metrics else {}
    lineage = {"run_dir": str(Path(run_dir).resolve())}
    config = Path(run_dir) / "config.yaml"
    if config.is_file():
        lineage["config"] = str(config.resolve())
    reg = Registry(registry)
    version = reg.register(run_dir, group, values, lineage, description, copy=copy)
    _out(version, json_out)
    return version


def list_command(group: str | None = None, registry: str | None = None, json_out: bool = False) -> list[dict]:
    versions = Registry(registry, create=False).versions(group)
    _out(versions, json_out)
    return versions


def show_command(ref: str, registry: str | None = None, json_out: bool = False) -> dict:
    version = Registry(registry, create=False).get(ref)
    _out(version, json_out)
    if not json_out:
        print(json.dumps({"metrics": version["metrics"], "lineage": version["lineage"]}, indent=2))
    return version


def approve_command(ref: str, force: bool = False, registry: str | None = None) -> dict:
    version = Registry(registry, create=False).set_status(ref, APPROVED, force)
    _show(version)
    return version


def reject_command(ref: str, registry: str | None = None) -> dict:
    version = Registry(registry, create=False).set_status(ref, REJECTED)
    _show(version)
    return version


def alias_command(ref: str, alias: str, registry: str | None = None) -> dict:
    version = Registry(registry, create=False).alias(ref, alias)
    _show(version)
    return version


def path_command(ref: str, registry: str | None = None) -> str:
    version = Registry(registry, create=False).get(ref)
    print(version["path"])
    return version["path"]
