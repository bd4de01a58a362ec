"""Colab's setup, in one place: install the core and the ``gpu`` extra into Colab's own Python (its Jupyter left as
it is) and keep ``runs/`` on Google Drive, so stages resume across runtimes; run each stage unless its outputs are
current (the all-stages notebook); the repository's address in its copies. Elsewhere ``setup()`` does nothing.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

# where the repository's address appears besides pyproject.toml's [project.urls]: badges, clone cells, docs
ADDRESS = re.compile(r"(?<=github\.com/)[\w.-]+/[\w.-]+?(?=\.git\b|/blob/|\)|\s|\"|$)|"
                     r"(?<=colab\.research\.google\.com/github/)[\w.-]+/[\w.-]+?(?=/blob/)")
COPIES = ("notebooks/*.ipynb", "docs/*.md", "README.md")


def install_command(repo: str) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "-q", "-e", f"{repo}[gpu]"]


def setup(repo: str = "/content/jpsdxl", drive: bool = True, runs: str = "/content/drive/MyDrive/jpsdxl/runs") -> str:
    """Install ``repo`` (editable, core + gpu extra); with ``drive``, mount Google Drive (Colab asks for permission
    once) and send the stage outputs there. Returns where they go."""
    subprocess.run(install_command(repo), check=True)
    if drive:
        from google.colab import drive as google_drive

        google_drive.mount("/content/drive")
        os.environ.setdefault("JPSDXL_RUNS", runs)
    where = os.environ.get("JPSDXL_RUNS", "runs/ in this runtime (lost with it)")
    print(f"jpsdxl installed; stage outputs go to {where}")
    return where


def run_stage(profile, stage: str, **options) -> bool:
    """Stage ``stage`` of the table (``runs.STAGES``) by its ``run``, unless ``runs.require`` accepts the outputs
    already in its folder (made from what is there now) and they were made with the profile's settings: then they
    are kept and nothing is repeated. Returns whether it ran. A stage cut off midway runs again: ``distill`` continues
    from its newest checkpoint (``distill.resume``)."""
    from ..core.runs import STAGES, StageOutputMissing, StaleStageOutput, settings_changed, stage_dir

    try:
        if not settings_changed(profile, stage):
            print(f"{stage}: current, kept ({stage_dir(profile, stage, create=False)})")
            return False
        print(f"{stage}: running (its outputs were made with other settings than profile {profile.name!r} holds)")
    except (StageOutputMissing, StaleStageOutput) as why:
        print(f"{stage}: running ({str(why).split(': run ')[0]})")
    STAGES[stage].function()(profile, **options)
    return True


def repository(root: str | Path) -> str:
    """``owner/name`` of the repository, from the checkout's pyproject.toml (``[project.urls] Repository``)."""
    import tomllib

    url = tomllib.loads((Path(root) / "pyproject.toml").read_text(encoding="utf-8"))["project"]["urls"]["Repository"]
    return url.removeprefix("https://github.com/").strip("/")


def addresses(root: str | Path) -> dict[str, set[str]]:
    """Every GitHub ``owner/name`` each copy names (the Colab badges, the clone cells, the docs): file -> names."""
    found = {}
    for pattern in COPIES:
        for path in sorted(Path(root).glob(pattern)):
            names = {m.group(0) for m in ADDRESS.finditer(path.read_text(encoding="utf-8"))}
            if names:
                found[str(path.relative_to(root))] = names
    return found


def set_repository(root: str | Path, url: str) -> list[str]:
    """Point pyproject.toml and every copy at ``url`` (``https://github.com/<owner>/<name>``): what a fork runs once
    (``make repository URL=...``). Returns the files changed."""
    new = url.removeprefix("https://github.com/").strip("/")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", new):
        raise ValueError(f"URL={url}: give https://github.com/<owner>/<name>")
    root, old = Path(root), repository(root)
    changed = []
    for path in [root / "pyproject.toml", *(p for pattern in COPIES for p in sorted(root.glob(pattern)))]:
        text = path.read_text(encoding="utf-8")
        if path.name == "pyproject.toml":
            edited = text.replace(f'Repository = "https://github.com/{old}"', f'Repository = "https://github.com/{new}"')
        else:
            edited = ADDRESS.sub(lambda m: new if m.group(0) == old else m.group(0), text)
        if edited != text:
            path.write_text(edited, encoding="utf-8")
            changed.append(str(path.relative_to(root)))
    return changed


if __name__ == "__main__":  # make repository URL=...
    print("\n".join(set_repository(Path.cwd(), sys.argv[1])))
