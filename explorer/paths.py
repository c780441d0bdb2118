"""Where explorer keeps its output (caches, tracking stores, bundles)."""
from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ZOO_DATA_DIR = PACKAGE_DIR / "zoo_data"
TARGETS_DIR = Path("targets")  # the user's own board profiles, in the working directory (calibrate writes host.toml there)


def runs_dir() -> Path:
    """The output folder: $EXPLORER_RUNS if set, else ./runs next to the working directory."""
    path = Path(os.environ.get("EXPLORER_RUNS", "runs"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def cache_dir(kind: str) -> Path:
    """A sub-folder of the runs folder for one kind of cache (e.g. 'sensitivity')."""
    path = runs_dir() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
