"""What a user sees in the MLflow UI, rendered by a real headless browser: a small tracked search, the UI
started with the command the search prints, and Chromium opening the parent run's page (its description)
and its plot artifacts. The screenshots are left in the test's temporary folder (its path is printed).

Slow (-m slow); needs Debian's chromium (`bash .ci/setup --browser`). Only loopback is used."""
import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from mlflowserver import wait_until_healthy
from netbuild import small_cnn

from explorer.cli import main
from explorer.tracking import read_search

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium")
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1400,1400",
                  "--virtual-time-budget=20000")  # the page's own requests finish within this much (virtual) time
PLOTS = ("convergence.png", "pareto.png")


@pytest.fixture(scope="module")
def tracked_search(tmp_path_factory):
    """A 5-trial random search of a small CNN on tegra-k1, tracked in its own runs folder: its --json."""
    folder = tmp_path_factory.mktemp("browser")
    model = folder / "small.onnx"
    onnx.save(small_cnn(), model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EXPLORER_RUNS", str(folder / "runs"))
        out = folder / "search.json"
        with out.open("w") as stdout, contextlib.redirect_stdout(stdout):
            assert main(["search", "--board", "tegra-k1", "--model", str(model), "--agent", "random", "--budget", "5",
                         "--json"]) == 0
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def mlflow_ui(tracked_search, tmp_path_factory):
    """The MLflow UI started with the command the search printed, on a free loopback port: its base URL."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = shlex.split(tracked_search["ui_command"])
    assert command[:2] == ["mlflow", "ui"], command
    command[0] = str(Path(sys.executable).parent / "mlflow")
    log = tmp_path_factory.mktemp("mlflow-ui") / "ui.log"
    with log.open("w") as output:
        server = subprocess.Popen([*command, "--host", "127.0.0.1", "--port", str(port)], stdout=output,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # its workers share its group
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(url, server, 120, log)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def _chromium(tmp_path: Path, *args: str) -> str:
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _rendered(tmp_path: Path, url: str, expected: str, screenshot: Path) -> str:
    """The page's DOM once `expected` is in it (a few tries: the page loads its data after the load event),
    and its screenshot."""
    for _ in range(3):
        dom = _chromium(tmp_path, "--dump-dom", url)
        if expected in dom:
            break
    _chromium(tmp_path, f"--screenshot={screenshot}", url)
    return dom


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: bash .ci/setup --browser installs Debian's chromium")
def test_the_parent_run_shows_its_description_and_plots_in_a_real_browser(tracked_search, mlflow_ui, tmp_path):
    from matplotlib.image import imread

    parent = read_search(tracked_search["tracking_uri"], tracked_search["run_id"]).parent
    page = f"{mlflow_ui}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    title = parent.data.tags["mlflow.note.content"].splitlines()[0].removeprefix("# ")  # the summary's heading
    assert title.startswith("random search")
    overview = _rendered(tmp_path, page, title, tmp_path / "parent-run.png")
    assert title in overview and "Description" in overview
    assert all(tag in overview for tag in ("measured_by", "objective"))  # the run's tags are shown
    for plot in PLOTS:
        artifacts = _rendered(tmp_path, f"{page}/artifacts/{plot}", f'alt="{plot}" src="blob:', tmp_path / plot)
        assert f'alt="{plot}" src="blob:' in artifacts  # the image was fetched from the server and shown
        assert all(name in artifacts for name in (*PLOTS, "summary.md", "best_plan.json"))
    print(f"screenshots: {tmp_path}")
    for shot in ("parent-run.png", *PLOTS):
        assert _png_size(tmp_path / shot) == (1400, 1400)
        pixels = imread(tmp_path / shot)
        assert pixels.std() > 0.05, f"{shot} is blank"  # a rendered page, not an empty one
