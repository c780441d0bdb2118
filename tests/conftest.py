"""Test configuration: tests import their network builders from this folder, and caches go to a temp dir."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _isolated_runs(tmp_path_factory, monkeypatch):
    """Each test session writes caches into its own runs folder, never the repository's."""
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path_factory.getbasetemp() / "runs"))
