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
