"""Test configuration: tests import their helpers from this folder, and every cache goes to a
temporary runs folder for the whole session (never the repository's runs/), removed at the end."""
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
TEST_RUNS = tempfile.mkdtemp(prefix="explorer-test-runs-")
os.environ["EXPLORER_RUNS"] = TEST_RUNS


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(TEST_RUNS, ignore_errors=True)


def pytest_configure(config) -> None:
    """Tests press Ctrl-C (SIGINT) on themselves and their searches: a shell that starts pytest in the background
    hands it SIGINT ignored, and then Ctrl-C would neither stop a search nor reach its workers."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
