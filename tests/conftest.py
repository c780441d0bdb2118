"""Test configuration: tests import their helpers from this folder, and every cache goes to a
temporary runs folder for the whole session (never the repository's runs/), removed at the end."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
TEST_RUNS = tempfile.mkdtemp(prefix="explorer-test-runs-")
os.environ["EXPLORER_RUNS"] = TEST_RUNS


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_RUNS, ignore_errors=True)
