"""The layers: ``stages`` knows nothing of ``pipeline``, the service knows nothing of its load harness,
and the wheel ships every package (the harness is a subpackage, easy to leave out by listing)."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import setuptools

REPO = Path(__file__).resolve().parents[2]
# The CLI is the composition root: it alone may register the harness's commands.
ENTRY_POINTS = {"pipeline.cli", "pipeline.__main__"}


def _modules(package: str) -> list[str]:
    root = REPO / package
    return sorted(
        ".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
        for p in root.rglob("*.py") if "harness" not in p.parts
    )


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = "import sys\nfor m in sys.argv[1:]:\n    __import__(m)\nprint('\\n'.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code, *modules], cwd=REPO, capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def test_the_core_never_imports_the_harness() -> None:
    core = [m for m in _modules("pipeline") if m not in ENTRY_POINTS]
    assert "pipeline.runner" in core and "pipeline.embedded" in core
    leaked = {m for m in _loaded_after_import(core) if m.startswith("pipeline.harness")}
    assert not leaked, f"core modules pull in the harness: {sorted(leaked)}"


def test_stages_never_import_pipeline() -> None:
    loaded = _loaded_after_import(_modules("stages"))
    assert not {m for m in loaded if m == "pipeline" or m.startswith("pipeline.")}


def test_packaging_finds_every_subpackage() -> None:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert isinstance(config["packages"], dict), "a listed package leaves its subpackages out of the wheel"
    found = set(setuptools.find_packages(str(REPO), **config["packages"]["find"]))
    assert {"pipeline", "pipeline.harness", "pipeline.harness.bench", "stages"} <= found
    assert not {p for p in found if p.split(".")[0] not in {"pipeline", "stages"}}


def _project_imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports, function-level imports included."""
    import ast

    graph: dict[str, set[str]] = {}
    for pkg in ("pipeline", "stages"):
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts).removesuffix(".__init__")
            package = name if path.name == "__init__.py" else name.rpartition(".")[0]
            deps: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    deps.update(a.name for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    base = node.module or ""
                    if node.level:
                        anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                        base = ".".join(anchor + ([node.module] if node.module else []))
                    deps.add(base)
                    deps.update(f"{base}.{a.name}" for a in node.names)
            graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles_function_level_imports_included() -> None:
    graph = _project_imports()
    # A package's __init__ importing its own submodules is not a cycle of design; none of ours does.
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        path.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d)
        path.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_satellites_are_imported_by_nothing_in_the_core() -> None:
    graph = _project_imports()
    satellites = ("pipeline.harness", "pipeline.pii")
    for m, deps in graph.items():
        if m.startswith(satellites) or m in ENTRY_POINTS:
            continue
        assert not {d for d in deps if d.startswith(satellites)}, f"{m} imports a satellite: {sorted(deps)}"


def test_no_module_a_reader_cannot_hold_in_their_head() -> None:
    long = {str(p.relative_to(REPO)): n for pkg in ("pipeline", "stages") for p in (REPO / pkg).rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long
