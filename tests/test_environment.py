"""Dependencies: environment.yml and pyproject.toml agree, installed versions meet the declared bounds, the core
(what Colab installs) holds no Jupyter stack, and the package's modules import each other without a cycle."""

import ast
import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
JUPYTER = {"jupyterlab", "ipykernel", "papermill", "nbconvert", "nbval", "notebook", "jupyter-client"}


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _all_requirements() -> list[str]:
    extras = [r for group in PROJECT["optional-dependencies"].values() for r in group if _name(r) != "jpsdxl"]
    return PROJECT["dependencies"] + extras


def test_environment_yml_matches_pyproject():
    wanted = {Requirement(r).name.lower().replace("_", "-"): str(Requirement(r).specifier) for r in _all_requirements()}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = [Requirement(line.strip()[2:].strip("\"")) for line in lines[start + 1:] if line.strip().startswith("- ")]
    have = {r.name.lower().replace("_", "-"): str(r.specifier) for r in reqs}
    assert have == wanted, {k: (have.get(k), wanted.get(k)) for k in have.keys() | wanted.keys() if have.get(k) != wanted.get(k)}
    python = next(line for line in lines if line.strip().startswith("- python"))
    assert PROJECT["requires-python"].lstrip(">=") in python


def test_installed_versions_meet_declared_bounds():
    """A lower bound that the tested environment does not meet is a bound nobody checked."""
    for text in _all_requirements():
        req = Requirement(text)
        installed = metadata.version(req.name)
        assert req.specifier.contains(installed, prereleases=True), f"{req.name} {installed} does not satisfy {req}"


def test_constraints_pin_every_direct_dependency():
    pinned = {_name(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    missing = {_name(r) for r in _all_requirements()} - pinned
    assert not missing, f"constraints.txt does not pin {missing}"


def test_core_install_leaves_colabs_jupyter_alone():
    assert not {_name(r) for r in PROJECT["dependencies"]} & JUPYTER
    assert {"papermill", "nbval", "jupyterlab"} <= {_name(r) for g in PROJECT["optional-dependencies"].values() for r in g}
    setup = (ROOT / "notebooks" / "00_overview.ipynb").read_text()
    assert "pip\\\", \\\"install\\\", \\\"-q\\\", \\\"-e\\\", \\\"/content/jpsdxl\\\"" in setup  # the core, no extras


def _local_imports(path: Path) -> set[str]:
    """jpsdxl modules that ``path`` imports anywhere (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jpsdxl."):
            found.add(node.module.split(".")[1])
    return found


def test_no_import_cycles():
    graph = {p.stem: _local_imports(p) for p in (ROOT / "jpsdxl").glob("*.py")}

    def visit(node, path):
        for nxt in graph.get(node, ()):
            assert nxt not in path, f"import cycle: {' -> '.join(path + [nxt])}"
            visit(nxt, path + [nxt])

    for module in graph:
        visit(module, [module])
