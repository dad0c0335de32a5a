"""The house rules: rooms import one way only, no module cycles, stages/ stays the thin entry
layer, and every room and module says what it is."""

import ast
from pathlib import Path

from .conftest import REPO

SRC = REPO / "src" / "rnnflow"
# A room may import the rooms below it and itself. shipping and analysis stand side by side
# (neither imports the other); tools, at the top, may import every room.
FLOORS = {
    "core": 0,
    "runtime": 1,
    "tracking": 2,
    "data": 3,
    "model": 4,
    "training": 5,
    "shipping": 6,
    "analysis": 6,
    "tools": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every rnnflow module `path` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "rnnflow"}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rnnflow"):
            # `from rnnflow.room import module` names modules; `from rnnflow.room.module
            # import name` names one module
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                known = (SRC.parent / Path(*candidate.split("."))).with_suffix(".py")
                found.add(candidate if known.exists() else node.module)
    return found


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in FLOORS) else None


def test_every_module_lives_in_a_room():
    loose = [p.name for p in SRC.glob("*.py") if p.name != "__init__.py"]
    assert loose == []
    assert {p.name for p in SRC.iterdir() if (p / "__init__.py").exists()} == set(FLOORS)


def wrong_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from one room into a room on its floor or above."""
    wrong = []
    for module, targets in graph.items():
        here = room(module)
        for target in sorted(targets):
            there = room(target)
            if here is None or there is None or there == here:
                continue
            if FLOORS[there] >= FLOORS[here]:
                wrong.append(f"{module} -> {target} ({here} may not import {there})")
    return wrong


def package_graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in SRC.rglob("*.py")}


def test_imports_run_one_way():
    assert wrong_imports(package_graph()) == []


def test_the_rule_catches_an_import_running_back_up(tmp_path):
    """The check fails on what it forbids: an import up, even inside a function, and one
    across between the side-by-side rooms."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from rnnflow.training import train\n")
    assert imports(probe) == {"rnnflow.training.train"}
    graph = {
        "rnnflow.core.probe": imports(probe),
        "rnnflow.shipping.probe": {"rnnflow.analysis.evaluate"},
        "rnnflow.tools.probe": {"rnnflow.analysis.evaluate", "rnnflow.core.errors"},
    }
    assert wrong_imports(graph) == [
        "rnnflow.core.probe -> rnnflow.training.train (core may not import training)",
        "rnnflow.shipping.probe -> rnnflow.analysis.evaluate (shipping may not import analysis)",
    ]


def test_no_module_cycles():
    graph = package_graph()
    graph = {m: {t for t in targets if t in graph and t != m} for m, targets in graph.items()}
    done, active, cycles = set(), [], []

    def visit(node):
        if node in active:
            cycles.append(active[active.index(node) :] + [node])
            return
        if node in done:
            return
        active.append(node)
        for target in sorted(graph[node]):
            visit(target)
        active.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert cycles == []


def test_nothing_in_the_package_imports_the_stages():
    offenders = [
        module_name(p)
        for p in SRC.rglob("*.py")
        for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        and any(
            n.split(".")[0] == "stages"
            for n in ([a.name for a in node.names] if isinstance(node, ast.Import) else [])
            + ([node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        )
    ]
    assert offenders == []


def test_every_room_and_stage_says_what_it_is():
    for path in [*SRC.rglob("*.py"), *(REPO / "stages").glob("*.py")]:
        if path.name == "__init__.py" and path.parent == REPO / "stages":
            continue
        doc = ast.get_docstring(ast.parse(path.read_text()))
        assert doc and len(doc) > 20, f"{path} has no docstring"
    for name in FLOORS:
        doc = ast.get_docstring(ast.parse((SRC / name / "__init__.py").read_text()))
        assert "import" in doc.lower(), f"rnnflow.{name} does not say what it may import"


def test_stages_are_thin():
    """One short command line per DVC stage, calling one function of the package."""
    for path in (REPO / "stages").glob("*.py"):
        if path.name != "__init__.py":
            assert len(path.read_text().splitlines()) <= 25, path
