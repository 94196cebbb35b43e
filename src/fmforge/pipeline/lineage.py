"""``fmforge pipeline lineage PATH|NAME@VERSION [--up|--down]``: walk the artifact graph a pipeline recorded.

Every artifact a step read or wrote is a node (path + content hash, the step and run that produced it); an
edge goes from each input of a step to each of its outputs. ``--up`` (default) lists what an artifact was
derived from, back to the external inputs; ``--down`` what was derived from it. A registered model version
(``NAME@VERSION``) starts from the run directory its ``register`` step recorded.
"""

from __future__ import annotations

import json
from pathlib import Path

from fmforge.errors import FmforgeError
from fmforge.pipeline.registry import Registry
from fmforge.pipeline.state import STATE_FILE, State, file_manifest, manifest_hash, open_state


def find_state(path: Path, run: str | None) -> Path:
    if run:
        return Path(run)
    for parent in [path, *path.parents]:
        if (parent / STATE_FILE).is_file():
            return parent
    raise FmforgeError(f"{path} is not inside a pipeline's --out; pass --run OUT (the pipeline's --out)")


def walk(state: State, start: dict, up: bool, max_nodes: int = 10_000) -> list[dict]:
    """Breadth-first from ``start``: each node with its ``depth`` and the id of the node it was reached from."""
    seen, out, frontier = {start["id"]}, [{**start, "depth": 0, "via": None}], [(start, 0)]
    while frontier and len(out) < max_nodes:
        node, depth = frontier.pop(0)
        for near in state.neighbours(node["id"], up):
            if near["id"] not in seen:
                seen.add(near["id"])
                out.append({**near, "depth": depth + 1, "via": node["id"]})
                frontier.append((near, depth + 1))
    return out


def lineage(target: str, *, up: bool = True, run: str | None = None, registry: str | None = None) -> list[dict]:
    """The lineage of a path or of a registered version (see the module docstring)."""
    digest = None
    if "@" in target and not Path(target).exists():
        version = Registry(registry, create=False).get(target)
        recorded = version["lineage"]
        if "state" not in recorded:
            return [{"path": version["path"], "hash": version["hash"], "kind": "model", "step": None, "run": None,
                     "depth": 0, "via": None, "note": "registered by hand: no pipeline lineage"}]
        out_dir, path, digest = Path(recorded["state"]).parent, recorded["artifact"], recorded["hash"]
    else:
        path = str(Path(target).resolve())
        out_dir = find_state(Path(path), run)
    state = open_state(out_dir)
    try:
        start = state.artifact(path, digest)
        if start is None:
            if Path(path).exists():
                start = state.artifact(path, manifest_hash(file_manifest(Path(path))))
            if start is None:
                raise FmforgeError(f"{path} is not an artifact the pipeline in {out_dir} recorded")
        return walk(state, start, up)
    finally:
        state.close()


def lineage_command(target: str, down: bool = False, up: bool = False, run: str | None = None,
                    registry: str | None = None, json_out: bool = False) -> list[dict]:
    nodes = lineage(target, up=not down, run=run, registry=registry)
    if json_out:
        print(json.dumps(nodes, indent=2))
        return nodes
    print(f"{'derived from' if not down else 'used by'} (depth, kind, hash, producer):")
    for node in nodes:
        producer = f"step {node['step']} (run {node['run']})" if node.get("step") else "external input"
        print(f"{'  ' * node['depth']}{node['path']}  [{node['kind']}] {node['hash'][:12]}  {producer}")
    return nodes
