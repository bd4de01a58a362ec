"""Colab's setup, in one place: install the tutorial into Colab's own Python and keep ``runs/`` on Google Drive.

Each notebook's first code cell clones the repository on Colab and calls ``setup()``; on any other machine it does
nothing (``make tutorial`` installs there). Only the core and the ``gpu`` extra are installed: Colab's own Jupyter
stays as it is. With Google Drive, every stage's outputs survive the runtime, so notebook 03 can resume and 04 finds
03's encoders in a later session (``JPSDXL_RUNS``).
"""

from __future__ import annotations

import os
import subprocess
import sys


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
