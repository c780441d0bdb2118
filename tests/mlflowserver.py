"""Waiting for an MLflow server the tests started (`mlflow server` or `mlflow ui`) to answer."""
import subprocess
import time
import urllib.request
from pathlib import Path


def wait_until_healthy(url: str, process: subprocess.Popen, timeout_s: float, log: Path) -> None:
    """Poll `url`/health until it answers 200; RuntimeError with the end of the server's `log` when the server
    exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the mlflow server at {url} did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.25)
