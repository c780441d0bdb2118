"""The remote measurer never hangs (issue 24, item 2): when every server is gone the search ends with its
summary and a FAILED parent run, or waits for --wait-for-servers and goes on when one is back; a busy
server's 503 with Retry-After is waited out; Ctrl-C ends a search whose servers hang, within 2 s."""
import os
import re
import signal
import threading
import time

import onnx
import pytest
from boardbuild import write_board
from netbuild import small_cnn
from test_search_flow import _InterruptedAgent
from test_serve import TOKEN, ServerProcess, _problem

from explorer import searching
from explorer.boards import load_board
from explorer.cli import main
from explorer.http_api import TOKEN_ENV
from explorer.measure import ServersUnreachable
from explorer.remote import RemoteMeasurer, ServerError
from explorer.tracking import default_tracking_uri, read_search

SEARCH = ["search", "--agent", "random", "--budget", "14", "--seed", "0", "--max-accuracy-drop", "100",
          "--latency-ms", "10000"]


@pytest.fixture
def remote_search(tmp_path, monkeypatch):
    """The CLI arguments of a search of a small CNN on a two-CPU board, measured remotely (fixed repeats)."""
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    model = tmp_path / "cnn.onnx"
    onnx.save(small_cnn(), model)
    board = write_board(tmp_path / "cpuboard.toml", ["cpu", "cpu1"], threads=[1, 1])
    real = RemoteMeasurer.__init__

    def quick(self, spec, **options):  # a few repeats: the test is about the lifecycle, not the figures
        real(self, spec, **({"warmup": 0, "repeats": 3, "adaptive": None} | options))

    monkeypatch.setattr(RemoteMeasurer, "__init__", quick)
    return SEARCH + ["--model", str(model), "--board", str(board)]


def _stop_after(monkeypatch, trials: int, action) -> None:
    real_make_agent = searching.make_agent
    monkeypatch.setattr(searching, "make_agent",
                        lambda name, **options: _InterruptedAgent(real_make_agent(name, **options), trials, action))


def test_a_search_whose_servers_all_die_ends_with_its_summary_and_a_failed_run(remote_search, monkeypatch, capsys):
    server = ServerProcess()
    try:
        _stop_after(monkeypatch, 4, server.kill)
        started = time.monotonic()
        code = main(remote_search + ["--measure", f"remote://{server.address}"])
        took = time.monotonic() - started
    finally:
        server.stop()
    captured = capsys.readouterr()
    assert code == 2 and took < 60
    done = int(re.search(r"ended early after (\d+) of 14", captured.err).group(1))  # 4, and any recalled from the cache
    assert 4 <= done < 14 and "no measurement server" in captured.err
    assert "Traceback" not in captured.err and "not confirmed" in captured.out
    run_id = next(line.split()[2] for line in captured.out.splitlines() if line.startswith("MLflow run:"))
    search = read_search(default_tracking_uri(), run_id)
    assert search.parent.info.status == "FAILED" and len(search.trials) == done
    from mlflow import MlflowClient

    summary = MlflowClient(default_tracking_uri()).download_artifacts(run_id, "summary.md")
    text = open(summary).read()
    assert "Ended early" in text and "can be reached" in text


def test_the_measurer_waits_for_servers_and_goes_on_when_one_is_back(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    board = load_board(str(write_board(tmp_path / "cpuboard.toml", ["cpu", "cpu1"], threads=[1, 1])))
    server = ServerProcess()
    port = server.port
    measurer = RemoteMeasurer(f"remote://{server.address}", warmup=0, repeats=3, adaptive=None, wait_for_servers_s=60)
    problem = _problem(board, measurer)
    plan = problem.uniform_plan("cpu")
    server.kill()
    back = {}

    def restart():  # the same port, after a few seconds of countdown
        time.sleep(3)
        back["server"] = ServerProcess("--port", str(port))

    thread = threading.Thread(target=restart)
    thread.start()
    try:
        started = time.monotonic()
        with caplog.at_level("WARNING", logger="explorer.remote"):
            evaluation = problem.evaluate(plan)
        assert not evaluation.failed and evaluation.latency_ms > 0
        assert 2.5 < time.monotonic() - started < 45
        assert any("giving up in" in record.getMessage() for record in caplog.records)  # the countdown
    finally:
        thread.join()
        back["server"].stop() if "server" in back else None
        server.stop()
    # without waiting, a measurer whose servers are all gone says so at once, and again for every plan after
    quick = RemoteMeasurer(f"remote://127.0.0.1:{port}", warmup=0, repeats=3, adaptive=None)
    quick.endpoints[0].info, quick._fingerprint = {}, measurer._fingerprint
    quick._free.put(quick.endpoints[0])
    for _ in range(2):
        started = time.monotonic()
        with pytest.raises(ServersUnreachable, match="--wait-for-servers"):
            quick.measure(problem.graph, problem.compressor, board, plan)
        assert time.monotonic() - started < 10


def test_a_busy_server_is_waited_for_not_set_aside(tmp_path, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    board = load_board(str(write_board(tmp_path / "cpuboard.toml", ["cpu", "cpu1"], threads=[1, 1])))
    server = ServerProcess()
    try:
        measurer = RemoteMeasurer(f"remote://{server.address}", warmup=0, repeats=3, adaptive=None, rest_s=600)
        problem = _problem(board, measurer)
        plans = [problem.uniform_plan("cpu"), problem.uniform_plan("cpu1")]
        request = RemoteMeasurer._request
        calls = []

        def first_busy(self, endpoint, method, path, *args, **kwargs):
            if path == "/measure" and not calls:  # the first measurement finds the server busy
                calls.append(path)
                raise ServerError("HTTP 503: busy", busy_s=1.0)
            return request(self, endpoint, method, path, *args, **kwargs)

        monkeypatch.setattr(RemoteMeasurer, "_request", first_busy)
        started = time.monotonic()
        evaluations = problem.evaluate_many(plans)
        assert calls and not any(e.failed for e in evaluations)
        assert time.monotonic() - started < 60  # not the 600 s rest of a failed server
    finally:
        server.stop()


def test_ctrl_c_ends_a_search_whose_servers_hang_within_2_s(remote_search, monkeypatch, capsys):
    hung = [ServerProcess(), ServerProcess()]
    pressed = {}

    def hang_then_press_ctrl_c():  # the servers stop answering (SIGSTOP: connections accepted, never answered)
        for server in hung:
            os.kill(server.process.pid, signal.SIGSTOP)

        def press():
            time.sleep(1.0)
            pressed["at"] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=press, daemon=True).start()

    try:
        _stop_after(monkeypatch, 4, hang_then_press_ctrl_c)
        code = main(remote_search + ["--measure", "remote://" + ",".join(a.address for a in hung)])
        ended = time.monotonic()
    finally:
        for server in hung:
            os.kill(server.process.pid, signal.SIGCONT)
            server.stop()
    err = capsys.readouterr().err
    assert code == 130 and "interrupted" in err and "KILLED" in err
    assert ended - pressed["at"] < 2.0, f"Ctrl-C took {ended - pressed['at']:.1f} s"
