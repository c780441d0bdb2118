"""Test configuration: tests import their helpers from this folder, and every cache goes to a
temporary runs folder for the whole session (never the repository's runs/)."""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ["EXPLORER_RUNS"] = tempfile.mkdtemp(prefix="explorer-test-runs-")
