"""The measurement server (`explorer serve`) and the remote measurer, on loopback.

Every server here is started through tests/server_only.py, where the search and training stack cannot
be imported: the server runs on the small `explorer[server]` install.
"""
import hashlib
import http.client
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from boardbuild import write_board
from netbuild import random_inputs, small_cnn

from explorer.accuracy import AccuracyScorer
from explorer.blockrun import AdaptiveRepeats
from explorer.boards import load_board
from explorer.confirm import confirm
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.http_api import DEPRECATED_TOKEN_ENV, FEATURES, TOKEN_ENV
from explorer.measure import HostMeasurer
from explorer.plan import Decision
from explorer.problem import Constraints, Objective, Problem
from explorer.remote import RemoteMeasurer, ServerError, parse_endpoints
from explorer.searching import make_agent

TOKEN = "test-token-0123456789"
SERVER_ONLY = Path(__file__).with_name("server_only.py")


def _without_token() -> dict[str, str]:
    """This process's environment without a server token (neither the variable nor its deprecated name)."""
    return {k: v for k, v in os.environ.items() if k not in (TOKEN_ENV, DEPRECATED_TOKEN_ENV)}


class ServerProcess:
    """An `explorer serve` subprocess on a free loopback port."""

    def __init__(self, *options: str, token: str | None = TOKEN):
        env = _without_token() | ({TOKEN_ENV: token} if token else {})
        self.process = subprocess.Popen([sys.executable, str(SERVER_ONLY), "serve", "--port", "0", *options],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
                                        cwd=Path(__file__).parent.parent)
        line = self.process.stdout.readline()
        while line.startswith("no token given"):
            line = self.process.stdout.readline()
        assert "listening on" in line, line
        self.port = int(line.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
        self.address = f"127.0.0.1:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = TOKEN,
                headers: dict | None = None) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        all_headers = ({"Authorization": f"Bearer {token}"} if token else {}) | (headers or {})
        connection.request(method, path, body=body, headers=all_headers)
        response = connection.getresponse()
        payload = response.read()
        connection.close()
        return response.status, (json.loads(payload) if payload else {})

    def upload(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        status, answer = self.request("PUT", f"/models/{sha}", data)
        assert status == 201, answer
        return sha

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.kill()
        self.process.stdout.close()


@pytest.fixture
def server():
    started = ServerProcess()
    yield started
    started.stop()


@pytest.fixture
def two_servers():
    started = [ServerProcess(), ServerProcess()]
    yield started
    for a in started:
        a.stop()


@pytest.fixture
def board(tmp_path):
    return load_board(str(write_board(tmp_path / "cpuboard.toml", ["cpu", "cpu1"], threads=[1, 1])))


NO_LIMITS = Constraints(latency_ms=None, max_accuracy_drop=None)


def _problem(board, measurer, constraints=NO_LIMITS) -> Problem:
    graph = LayerGraph(small_cnn())
    scorer = AccuracyScorer(graph.model, Dataset(random_inputs(graph.model, 50), None, "random inputs"))
    return Problem(graph, board, measurer, scorer, constraints, Objective.parse("latency"), use_disk_cache=False)


def _chain(sha: str) -> dict:
    graph = LayerGraph(small_cnn())
    shape = [1] + list(graph.input_shape[1:])
    return {"blocks": [{"model": sha, "threads": 1}], "inputs": {graph.input_names[0]: {"shape": shape, "dtype": "float32"}}}


def _measure_request(sha: str, repeats: int = 5, warmup: int = 1, **more) -> bytes:
    return json.dumps({**_chain(sha), "warmup": warmup, "repeats": repeats, **more}).encode()


def test_remote_measurement_matches_the_host_measurement(server, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    remote = _problem(board, RemoteMeasurer(f"remote://{server.address}", warmup=2, repeats=15))
    host = _problem(board, HostMeasurer(warmup=2, repeats=15))
    plan = remote.uniform_plan("cpu").with_decision(remote.graph.layers[2].name, Decision(processor="cpu1"))
    r, h = remote.evaluate(plan), host.evaluate(plan)
    assert "remote" in r.measured_by and server.address in r.measured_by and "ONNX Runtime" in r.measured_by
    assert [b.layers for b in r.blocks] == [b.layers for b in h.blocks] and len(r.blocks) == 3
    assert r.memory_mb_by_processor == h.memory_mb_by_processor and r.accuracy == h.accuracy
    assert r.latency_ms > 0 and all(b.latency_ms > 0 for b in r.blocks)
    # the same machine runs both: the medians agree within a factor of 3 (a busy machine varies)
    assert h.latency_ms / 3 <= r.latency_ms <= 3 * h.latency_ms
    assert f"server {server.address}" in r.energy_source or "RAPL" in r.energy_source
    assert r.peak_memory_mb is None or r.peak_memory_mb > 10


def test_remote_measurements_carry_their_interval_and_the_servers_load(server, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    adaptive = AdaptiveRepeats(max_seconds=1.0)
    measurer = RemoteMeasurer(f"remote://{server.address}", warmup=1, repeats=15, adaptive=adaptive)
    problem = _problem(board, measurer)
    plan = problem.uniform_plan("cpu")
    m = measurer.measure(problem.graph, problem.compressor, board, plan)
    assert m.repeats >= 15 and m.passes_per_repeat >= 1 and m.ci_target == 0.03 and m.ci_confidence == 0.95
    assert m.latency_ci_ms[0] <= m.latency_ms <= m.latency_ci_ms[1] and m.others_cores is not None
    assert m.ci_target_met == (max(m.latency_ms - m.latency_ci_ms[0], m.latency_ci_ms[1] - m.latency_ms)
                               <= 0.03 * m.latency_ms)
    assert "cap 1 s" in m.measured_by and measurer.identity(board).startswith("remote-v4:")
    other = plan.with_decision(problem.graph.layers[2].name, Decision(processor="cpu1"))
    results = measurer.measure_interleaved(problem.graph, problem.compressor, board, [plan, other], None, 5, adaptive)
    assert len(results) == 2 and len(results[0].rounds) == len(results[1].rounds) >= 1
    assert all(r.measurement.repeats == 5 * len(r.rounds) and "interleaved" in r.measurement.measured_by for r in results)
    assert all(r.measurement.peak_memory_mb is None for r in results)
    confirmation = confirm(problem, [other], plan, adaptive=adaptive)
    assert not confirmation.simulated and confirmation.baseline.ratio == 1.0 and confirmation.best() is not None


def test_the_server_keeps_answering_old_requests_and_checks_the_new_fields(server):
    status, info = server.request("GET", "/info")
    assert info["features"] == FEATURES
    sha = server.upload(small_cnn().SerializeToString())
    status, answer = server.request("POST", "/measure", _measure_request(sha, repeats=7))  # no 'adaptive': as before
    assert status == 200 and np.array(answer["times"]["seconds"]).shape == (7, 1) and answer["times"]["number"] == 1
    status, answer = server.request("POST", "/measure", _measure_request(sha, adaptive={"max_seconds": 0.3}))
    assert status == 200 and len(answer["times"]["seconds"]) >= 5 and answer["times"]["others_cores"] is not None
    for bad, why in (({"target": 2}, "target"), ({"tries": 3}, "no setting tries"), ({"max_seconds": 1000}, "measure timeout")):
        status, answer = server.request("POST", "/measure", _measure_request(sha, adaptive=bad))
        assert status == 400 and why in answer["error"]
    interleaved = json.dumps({"chains": [_chain(sha), _chain(sha)], "repeats": 3, "warmup": 0,
                              "adaptive": {"max_seconds": 0.3}}).encode()
    status, answer = server.request("POST", "/measure-interleaved", interleaved)
    assert status == 200 and len(answer["times"]) == 2
    first, second = answer["times"]
    assert first["rounds"] == second["rounds"] and len(first["seconds"]) == len(first["rounds"]) >= 3
    status, answer = server.request("POST", "/measure-interleaved", json.dumps({"chains": [_chain(sha)]}).encode())
    assert status == 400 and "needs 'adaptive'" in answer["error"]
    status, answer = server.request("POST", "/measure-interleaved", json.dumps({"chains": [{}], "adaptive": {}}).encode())
    assert status == 400 and "chain 0" in answer["error"]


def test_a_server_from_before_adaptive_repeats_is_refused_when_they_are_asked_for(server, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    request = RemoteMeasurer._request

    def old_server(self, endpoint, method, path, *args, **kwargs):
        answer = request(self, endpoint, method, path, *args, **kwargs)
        return {k: v for k, v in answer.items() if k != "features"} if path == "/info" else answer

    monkeypatch.setattr(RemoteMeasurer, "_request", old_server)
    with pytest.raises(ExplorerError, match="older `explorer serve` without adaptive repeats"):
        _problem(board, RemoteMeasurer(f"remote://{server.address}"))
    fixed = _problem(board, RemoteMeasurer(f"remote://{server.address}", adaptive=None))  # fixed repeats still work
    assert fixed.evaluate(fixed.uniform_plan("cpu")).latency_ms > 0
    with pytest.raises(ExplorerError, match="without interleaved measurement"):
        confirm(fixed, [], fixed.uniform_plan("cpu"))


def test_server_reports_a_fingerprint_and_refuses_missing_or_wrong_tokens(server):
    status, info = server.request("GET", "/info")
    assert status == 200
    fp = info["fingerprint"]
    assert fp["onnxruntime"] and "CPUExecutionProvider" in fp["providers"] and fp["cpu_model"] and fp["cpu_count"] >= 1
    from explorer.blockrun import int8_exact

    assert fp["int8_exact"] is int8_exact()  # how plans measured there are quantised
    for token in (None, "wrong-token"):
        status, answer = server.request("GET", "/info", token=token)
        assert status == 401 and "token" in answer["error"]
        status, _ = server.request("PUT", "/models/" + "0" * 64, b"x", token=token)
        assert status == 401


def test_remote_measurer_with_a_wrong_token_says_so(server, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "not-the-token")
    with pytest.raises(ExplorerError, match="refused the token"):
        _problem(board, RemoteMeasurer(f"remote://{server.address}"))


def test_oversized_upload_gets_413_and_the_server_keeps_serving(board):
    small = ServerProcess("--max-upload-mb", "0.001")  # 1 KB
    try:
        connection = http.client.HTTPConnection("127.0.0.1", small.port, timeout=30)
        connection.putrequest("PUT", "/models/" + "a" * 64)
        connection.putheader("Authorization", f"Bearer {TOKEN}")
        connection.putheader("Content-Length", str(10 * 2**20))
        connection.endheaders()  # the body is never sent: the server answers from the headers
        response = connection.getresponse()
        assert response.status == 413 and "limit" in json.loads(response.read())["error"]
        connection.close()
        assert small.request("GET", "/info")[0] == 200
    finally:
        small.stop()


def test_malformed_onnx_and_inputs_get_400_and_the_server_keeps_serving(server):
    garbage = server.upload(b"this is not an ONNX model")
    status, answer = server.request("POST", "/measure", _measure_request(garbage))
    assert status == 400 and "could not load block 0" in answer["error"]
    status, answer = server.request("POST", "/measure", b"{not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = server.request("POST", "/measure", json.dumps({"blocks": []}).encode())
    assert status == 400 and "blocks" in answer["error"]
    good = server.upload(small_cnn().SerializeToString())
    status, answer = server.request("POST", "/measure", json.dumps({"blocks": [{"model": good}], "inputs": {}}).encode())
    assert status == 400 and "needs input" in answer["error"]
    status, answer = server.request("POST", "/measure", _measure_request("f" * 64))
    assert status == 404 and "upload it first" in answer["error"]
    status, answer = server.request("PUT", "/models/" + "0" * 64, b"bytes whose hash is not zero")
    assert status == 400 and "SHA-256" in answer["error"]
    # still serving, and measuring correctly
    status, answer = server.request("POST", "/measure", _measure_request(good, repeats=7))
    assert status == 200
    seconds = np.array(answer["times"]["seconds"])
    assert seconds.shape == (7, 1) and (seconds > 0).all()


def test_measurements_queue_one_at_a_time(server):
    sha = server.upload(small_cnn().SerializeToString())
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(3) as pool:
        answers = list(pool.map(lambda _: server.request("POST", "/measure", _measure_request(sha, repeats=2000)), range(3)))
    assert all(status == 200 for status, _ in answers)
    # one at a time: the measurements do not overlap, so at least two of the three waited in line (each
    # measurement long, ~0.1 s, next to how far apart the three requests may arrive: a few ms under load)
    waited = sorted(answer["queued_s"] for _, answer in answers)
    assert waited[1] > 0.5 * min(answer["measure_s"] for _, answer in answers)


def test_a_non_loopback_bind_needs_a_token():
    env = _without_token()
    done = subprocess.run([sys.executable, str(SERVER_ONLY), "serve", "--host", "0.0.0.0", "--port", "0"],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 2 and "token" in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_endpoint_list_is_checked():
    assert [e.address for e in parse_endpoints("remote://a:1,b.example:9190")] == ["a:1", "b.example:9190"]
    for bad in ("remote://", "remote://host", "remote://host:0", "remote://h:1,h:1", "http://h:1"):
        with pytest.raises(ExplorerError):
            parse_endpoints(bad)


def test_parallel_servers_share_the_plans_and_a_killed_server_means_retry_elsewhere(two_servers, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    measurer = RemoteMeasurer(",".join(["remote://" + two_servers[0].address, two_servers[1].address]), warmup=1,
                              repeats=3, rest_s=60, adaptive=None)
    problem = _problem(board, measurer)
    assert problem.parallelism == 2
    killed = {}

    def kill_one_midway(trial, result):
        if len(result.trials) == 6 and not killed:
            two_servers[0].kill()
            killed["at"] = len(result.trials)

    result = make_agent("random").search(problem, 16, seed=0, callback=kill_one_midway)
    assert killed and len(result.trials) == 16
    assert not any(t.failed for t in result.trials)  # every plan the dead server had was measured by the other
    status, info = two_servers[1].request("GET", "/info")
    assert info["measurements"] >= 16 - killed["at"]


def test_interleaved_runs_of_a_profile_are_shared_among_servers(two_servers, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    measurer = RemoteMeasurer(",".join(["remote://" + two_servers[0].address, two_servers[1].address]), warmup=1,
                              repeats=3)
    problem = _problem(board, measurer)
    plan = problem.uniform_plan("cpu")
    other = plan.with_decision(problem.graph.layers[2].name, Decision(processor="cpu1"))
    before = [server.request("GET", "/info")[1]["measurements"] for server in two_servers]
    groups = [[plan, other], [other, plan]]
    results = measurer.measure_interleaved_many(problem.graph, problem.compressor, board, groups, None, 2,
                                                AdaptiveRepeats(max_seconds=0.3))
    assert [len(r) for r in results] == [2, 2] and all(len(r.rounds) >= 1 for group in results for r in group)
    after = [server.request("GET", "/info")[1]["measurements"] for server in two_servers]
    assert [a - b for a, b in zip(after, before)] == [1, 1]  # one run on each server, at once


def test_when_no_server_can_measure_the_trial_fails_and_the_search_completes(server, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    problem = _problem(board, RemoteMeasurer(f"remote://{server.address}", warmup=1, repeats=3, rest_s=0.1, adaptive=None),
                       constraints=Constraints(latency_ms=None, max_accuracy_drop=None))
    events = []
    request = RemoteMeasurer._request
    broken = {}

    def broken_server(self, endpoint, method, path, *args, **kwargs):  # reachable, but every measurement fails
        if broken and method == "POST":
            raise ServerError("HTTP 500: server error: broken")
        return request(self, endpoint, method, path, *args, **kwargs)

    monkeypatch.setattr(RemoteMeasurer, "_request", broken_server)

    def break_after_three(trial, result):
        events.append(trial.failed)
        if len(result.trials) == 3:
            broken["yes"] = True

    result = make_agent("optuna-tpe", storage="memory").search(problem, 8, seed=0, callback=break_after_three)
    assert len(result.trials) == 8  # the budget is spent: failed trials count
    assert events[:3] == [False, False, False] and all(events[3:])
    assert result.best is not None and not result.best_trial.failed and result.best.feasible
    failed = result.trials[-1].evaluation
    assert not failed.feasible and "measurement failed" in failed.violations[0]
    assert "no measurement server could measure" in failed.error
    # failed plans are not cached: the plan is measured again once a server is back
    assert failed.plan_digest not in problem._memory_cache


def test_the_server_only_install_runs_serve_and_explains_the_rest():
    done = subprocess.run([sys.executable, str(SERVER_ONLY), "search"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "needs the full install" in done.stderr and "explorer[full]" in done.stderr


def test_remote_measure_option_errors_are_one_line(capsys, monkeypatch):
    from explorer.cli import main

    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert main(["measure", "--model", "vgg", "--measure", "remote://nohost"]) == 2
    assert "HOST:PORT" in capsys.readouterr().err
    assert main(["measure", "--model", "vgg", "--measure", "remote://127.0.0.1:9"]) == 2  # nothing listens on port 9
    assert "no measurement server of remote://127.0.0.1:9 answered" in capsys.readouterr().err
    monkeypatch.delenv(TOKEN_ENV)
    assert main(["measure", "--model", "vgg", "--measure", "remote://127.0.0.1:9"]) == 2
    assert TOKEN_ENV in capsys.readouterr().err


def test_a_measurement_past_its_time_limit_is_stopped_with_504():
    slow = ServerProcess("--measure-timeout", "0.2")
    try:
        sha = slow.upload(small_cnn().SerializeToString())
        started = time.perf_counter()
        status, answer = slow.request("POST", "/measure", _measure_request(sha, repeats=10_000, warmup=10_000))
        assert status == 504 and "limit" in answer["error"] and time.perf_counter() - started < 10
        status, answer = slow.request("POST", "/measure", _measure_request(sha, repeats=3))
        assert status == 200  # the next measurement runs normally
    finally:
        slow.stop()


def test_ppo_measures_the_episodes_it_ends_together_on_several_servers(two_servers, board, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    spec = "remote://" + ",".join(a.address for a in two_servers)
    problem = _problem(board, RemoteMeasurer(spec, warmup=1, repeats=3, adaptive=None))
    batches = []
    evaluate_many = problem.evaluate_many
    monkeypatch.setattr(problem, "evaluate_many", lambda plans: batches.append(len(plans)) or evaluate_many(plans))
    result = make_agent("ppo").search(problem, 12, seed=0)
    assert len(result.trials) == 12 and result.best is not None and not any(t.failed for t in result.trials)
    assert max(batches) > 1  # episodes ending on one step were measured together
    counts = [a.request("GET", "/info")[1]["measurements"] for a in two_servers]
    assert all(c > 0 for c in counts) and sum(counts) >= 12  # both servers measured (the baselines come on top)
