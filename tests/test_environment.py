"""environment.yml (conda users) and pyproject.toml (pip users) must ask for the same packages."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {_name(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    pip_deps = {_name(line.strip()[2:].strip("\"")) for line in lines[start + 1:] if line.strip().startswith("- ")}
    assert pip_deps == wanted, f"only in environment.yml: {pip_deps - wanted}; only in pyproject: {wanted - pip_deps}"
    python = next(line for line in lines if line.strip().startswith("- python"))
    assert project["requires-python"].lstrip(">=") in python


def test_constraints_pin_every_direct_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pinned = {_name(line) for line in (ROOT / "constraints.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")}
    missing = {_name(r) for r in project["dependencies"]} - pinned
    assert not missing, f"constraints.txt does not pin {missing}"
