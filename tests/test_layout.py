"""The package's rooms and who may import whom (docs/ARCHITECTURE.md, "Rooms").

Read from the source with ``ast`` (every import, at module level or inside a function):
the import graph has no cycle, and each room imports only what the table allows.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "hpa_kernel"

#: room -> the rooms it may import (besides itself); a room is a top-level module or folder
ALLOWED = {
    "classes": set(),
    "config": {"formats.atomic"},  # write_manifest: through the one atomic writer
    "integrity": {"config"},
    "stages": {"classes", "config"},
    "formats": {"classes", "stages.labels", "stages.inputs"},
    "tools": {"classes", "config", "stages", "formats"},
    "run": {"classes", "config", "integrity", "stages", "formats"},
    "submit": {"classes", "config", "integrity", "stages", "formats", "run", "tools"},
    "team_merge": {"classes", "config", "stages", "formats", "run"},
    "merge": {"team_merge"},  # the old name of team_merge
    "__main__": {"submit"},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PKG.rglob("*.py"):
        parts = path.relative_to(PKG).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports ('' = the package itself), from its source."""
    found = set()
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                targets = [f"hpa_kernel.{mod}".rstrip(".")]
            else:
                targets = [node.module or ""]
            targets = [f"{t}.{a.name}" if f"{t}.{a.name}"[len("hpa_kernel."):] in known else t for t in targets[:1] for a in node.names]
        else:
            continue
        for t in targets:
            if t == "hpa_kernel" or t.startswith("hpa_kernel."):
                found.add(t[len("hpa_kernel."):] if t != "hpa_kernel" else "")
    return found - {name}


def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {t for t in _imports(name, path, set(mods)) if t in mods} for name, path in mods.items()}


#: stage modules that other rooms may import on their own (array helpers without torch)
_SHARED_STAGES = ("labels", "inputs")


def _room(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "stages" and parts[1:2] and parts[1] in _SHARED_STAGES:
        return ".".join(parts[:2])
    return "formats.atomic" if parts[:2] == ["formats", "atomic"] else parts[0]


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(g[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(g):
        if node not in state:
            visit(node, [node])


def test_rooms_import_only_what_they_may():
    bad = []
    for module, targets in graph().items():
        room = _room(module)
        if room in ("", "train"):  # the package marker; the trainer is checked below
            continue
        top = room.split(".")[0]
        allowed = ALLOWED[top] | {top, ""}
        for t in targets:
            t_room = _room(t)
            if t_room not in allowed and t_room.split(".")[0] not in allowed:
                bad.append(f"{module} imports {t}")
    assert not bad, "imports against docs/ARCHITECTURE.md: " + "; ".join(sorted(bad))


def test_nothing_at_run_time_imports_the_trainer():
    users = [m for m, targets in graph().items() if not m.startswith("train") and any(t.startswith("train") for t in targets)]
    assert users == []


def test_the_checker_sees_imports():
    g = graph()
    assert "stages.labels" in g["formats.rle"] and "run.options" in g["run.parallel"]
    assert "stages.segmentation.hpa" in g["stages.segmentation"]
