"""The measurement server's bounds (issue 24, item 3): requests checked before anything is drawn or queued,
a memory budget enforced on the process a measurement runs in, connections and the queue capped with a
503 and Retry-After (never a reset), the 413 reaching a client that sends its body, every malformed field
a 400. Every server is started through tests/server_only.py (the server-only install)."""
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from netbuild import small_cnn
from test_serve import TOKEN, ServerProcess, _chain, _measure_request

from benchmarks.serve_bounds import tile_bomb

SHA_OF_NOTHING = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def _status(pid: int, key: str) -> int:
    """A field of /proc/PID/status (kB for memory, a count for Threads)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


@pytest.fixture
def bounded():
    started = ServerProcess("--max-memory-mb", "400", "--max-connections", "12", "--max-queue", "4")
    yield started
    started.stop()


def test_memory_bombs_are_stopped_and_the_server_stays_small(bounded):
    sha = bounded.upload(tile_bomb())
    before = _status(bounded.process.pid, "VmRSS")
    # an 8 MB input, 2.4 GB of output: the worker is stopped at its 400 MB budget; the server stays small
    request = {"blocks": [{"model": sha}], "inputs": {"x": {"shape": [2 << 20], "dtype": "float32"}}, "warmup": 0, "repeats": 1}
    status, answer = bounded.request("POST", "/measure", json.dumps(request).encode())
    assert status == 400 and "budget of 400 MB" in answer["error"] and "--max-memory-mb" in answer["error"]
    # many large inputs: refused from the shapes alone, before anything is drawn
    many = {"blocks": [{"model": sha}], "inputs": {f"x{i}": {"shape": [1 << 25], "dtype": "float32"} for i in range(60)}}
    status, answer = bounded.request("POST", "/measure", json.dumps(many).encode())
    assert status == 400 and "2^26" in answer["error"]
    # one input the model does not have, once its signature is known: refused before it queues
    wrong = {"blocks": [{"model": sha}], "inputs": {"x": {"shape": [4], "dtype": "float32"},
                                                   "y": {"shape": [1 << 24], "dtype": "float32"}}}
    status, answer = bounded.request("POST", "/measure", json.dumps(wrong).encode())
    assert status == 400 and "no input of the chain" in answer["error"]
    status, answer = bounded.request("POST", "/measure", json.dumps({**request, "inputs": {"x": {"shape": [1 << 25]}}}).encode())
    assert status == 400 and "at least" in answer["error"] and "budget" in answer["error"]  # the estimate alone
    assert _status(bounded.process.pid, "VmHWM") < before + 100 * 1024  # the server process itself never grew
    # and it keeps measuring: a small input of the same model, then another model
    status, answer = bounded.request("POST", "/measure", json.dumps({**request, "inputs": {"x": {"shape": [1000]}}}).encode())
    assert status == 200 and answer["times"]["peak_memory_mb"] < 400
    good = bounded.upload(small_cnn().SerializeToString())
    assert bounded.request("POST", "/measure", _measure_request(good, repeats=3))[0] == 200


def test_every_malformed_field_is_a_400(bounded):
    good = bounded.upload(small_cnn().SerializeToString())
    valid = {**_chain(good), "warmup": 0, "repeats": 1, "seed": 0}
    name = next(iter(valid["inputs"]))
    junk = [[], {}, "x", -1, 2**70, 1.5, None, True, [[]], {"a": 1}]
    variants = []
    for value in junk:
        variants += [{**valid, "blocks": value}, {**valid, "blocks": [value]},
                     {**valid, "blocks": [{"model": good, "threads": value}]},
                     {**valid, "blocks": [{"model": good, "provider": value}]},
                     {**valid, "inputs": value}, {**valid, "inputs": {name: value}},
                     {**valid, "inputs": {name: {"shape": value, "dtype": "float32"}}},
                     {**valid, "inputs": {name: {"shape": valid["inputs"][name]["shape"], "dtype": value}}},
                     {**valid, "warmup": value}, {**valid, "repeats": value}, {**valid, "seed": value},
                     {**valid, "energy_providers": value}, {**valid, "adaptive": value}]
    variants.append({**valid, "inputs": {name: {"shape": [1, 3, 16, 16], "dtype": "int64"}}})  # wrong element type
    variants.append({**valid, "inputs": {name: {"shape": [1, 3, 16], "dtype": "float32"}}})  # wrong rank
    variants.append({**valid, "inputs": {name: {"shape": [1, 3, 17, 16], "dtype": "float32"}}})  # wrong fixed dim
    codes = {}
    for variant in variants:
        status, answer = bounded.request("POST", "/measure", json.dumps(variant).encode())
        assert status in (200, 400), (variant, status, answer)  # 200: a junk value that happens to be valid (None, 0)
        assert status == 200 or answer["error"]
        codes[status] = codes.get(status, 0) + 1
    assert codes[400] > 100
    for body in (b"[" * 100_000, b'{"blocks": [], "inputs": 1e999}', b"\xff"):
        assert bounded.request("POST", "/measure", body)[0] == 400
    status, answer = bounded.request("POST", "/measure-interleaved", json.dumps({"chains": [valid, 3], "adaptive": {}}).encode())
    assert status == 400 and "chain 1" in answer["error"]
    assert bounded.request("POST", "/measure", json.dumps(valid).encode())[0] == 200  # still serving


def test_an_upload_over_the_limit_gets_its_413_while_sending_the_body():
    small = ServerProcess("--max-upload-mb", "1")
    try:
        data = b"x" * (8 << 20)
        connection = http.client.HTTPConnection("127.0.0.1", small.port, timeout=30)
        connection.request("PUT", "/models/" + "a" * 64, body=data, headers={"Authorization": f"Bearer {TOKEN}"})
        response = connection.getresponse()  # no reset: the server reads and drops the body after answering
        assert response.status == 413 and "--max-upload-mb" in json.loads(response.read())["error"]
        connection.close()
        status, answer = small.request("PUT", f"/models/{'0' * 64}", data, token="wrong")
        assert status == 401  # a refused body is drained too, so the answer arrives
        assert small.request("GET", "/info")[0] == 200
    finally:
        small.stop()


def test_fifty_concurrent_clients_get_200_or_503_never_a_reset(bounded):
    sha = bounded.upload(small_cnn().SerializeToString())
    body = _measure_request(sha, repeats=20, warmup=1)
    peak_threads = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak_threads[0] = max(peak_threads[0], _status(bounded.process.pid, "Threads"))
            time.sleep(0.01)

    def client(_):
        connection = http.client.HTTPConnection("127.0.0.1", bounded.port, timeout=120)
        try:
            connection.request("POST", "/measure", body=body, headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            return response.status, response.getheader("Retry-After"), response.read()
        finally:
            connection.close()

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(50) as pool:
            answers = list(pool.map(client, range(50)))  # an exception here (a reset) fails the test
    finally:
        done.set()
        watcher.join()
    statuses = [status for status, _, _ in answers]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 1 and statuses.count(503) >= 1
    assert all(retry is not None and int(retry) >= 1 for status, retry, _ in answers if status == 503)
    assert all("Retry-After" in json.loads(payload)["error"] for status, _, payload in answers if status == 503)
    assert peak_threads[0] <= 12 + 6  # the connection cap, the acceptor, the turn-away and the worker's pipe threads
    assert _status(bounded.process.pid, "VmHWM") < 300 * 1024  # the server process: no memory per waiting client


def test_idle_connections_are_capped_and_the_rest_get_503(bounded):
    idle = [socket.create_connection(("127.0.0.1", bounded.port), timeout=10) for _ in range(40)]
    try:
        time.sleep(0.5)
        assert _status(bounded.process.pid, "Threads") <= 12 + 6
        status, answer = bounded.request("GET", "/info")
        assert status == 503 and "--max-connections" in answer["error"]
    finally:
        for connection in idle:
            connection.close()
    deadline = time.monotonic() + 10
    while bounded.request("GET", "/info")[0] != 200:  # the served ones end when their clients go
        assert time.monotonic() < deadline
        time.sleep(0.1)


def test_the_server_refuses_limits_that_cannot_work():
    import subprocess
    import sys

    from test_serve import SERVER_ONLY

    for options, why in ((["--max-memory-mb", "10"], "--max-memory-mb"), (["--max-queue", "0"], "--max-queue"),
                         (["--max-connections", "0"], "--max-connections")):
        done = subprocess.run([sys.executable, str(SERVER_ONLY), "serve", "--port", "0", *options], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and why in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_an_offloaded_block_is_bounded_by_the_memory_budget_and_the_server_stays_small():
    """POST /run (explorer.offload) runs in the memory-watched worker: a block whose run passes --max-memory-mb is
    refused from its shapes, or stopped while it runs, with the 400 of /measure; the server process never grows."""
    from explorer.offload import OffloadClient, OffloadFailed

    started = ServerProcess("--max-memory-mb", "256")
    try:
        bomb = tile_bomb()
        client = OffloadClient(f"http://{started.address}", TOKEN, timeout_s=120)
        sha = started.upload(bomb)
        before = _status(started.process.pid, "VmRSS")
        # an 8 MB tensor, 2.4 GB of output: the worker is stopped at its budget
        with pytest.raises(OffloadFailed, match="answered 400: the measurement's process reached .* budget of 256 MB"):
            client.run(sha, lambda: bomb, {"x": np.ones(2 << 20, np.float32)}, "CPUExecutionProvider", 1)
        assert _status(started.process.pid, "VmHWM") < before + 100 * 1024  # the server process itself never grew
        # a 48 MB tensor: refused from the shapes alone (the runtime and three times the input pass 256 MB)
        with pytest.raises(OffloadFailed, match="answered 400: the block's run needs at least 27[0-9] MB .* budget of 256 MB"):
            client.run(sha, lambda: bomb, {"x": np.ones(12 << 20, np.float32)}, "CPUExecutionProvider", 1)
        with pytest.raises(OffloadFailed, match="answered 400: tensor 'x' is complex64"):
            client.run(sha, lambda: bomb, {"x": np.ones(4, np.complex64)}, "CPUExecutionProvider", 1)
        with pytest.raises(OffloadFailed, match="answered 400: input 'x' is tensor\\(float\\) in block 0, not int64"):
            client.run(sha, lambda: bomb, {"x": np.ones(4, np.int64)}, "CPUExecutionProvider", 1)  # checked before it queues
        # and it keeps running blocks: a small tensor of the same model, on a fresh worker
        x = np.arange(1000, dtype=np.float32)
        outputs = client.run(sha, lambda: bomb, {"x": x}, "CPUExecutionProvider", 1)
        np.testing.assert_array_equal(outputs["y"], np.tile(x, 300))
        status, info = started.request("GET", "/info")
        assert status == 200 and info["max_memory_bytes"] == 256 << 20
    finally:
        started.stop()


def test_the_workers_offload_sessions_close_the_least_recently_used_to_keep_within_the_budget():
    from explorer.offload import SessionMissing, _Sessions

    one, two = small_cnn().SerializeToString(), tile_bomb()

    def needed(size: int) -> int:  # this run's estimate for a model of `size` bytes
        return (1 << 20) + 2 * size

    sessions = _Sessions(limit=16)
    budget = (1 << 20) + 2 * len(one) + 2 * len(two)  # room for both models and the run
    sessions.get(("a", "CPUExecutionProvider", 1), one, needed, budget)
    sessions.get(("b", "CPUExecutionProvider", 1), two, needed, budget)
    assert len(sessions) == 2
    sessions.get(("a", "CPUExecutionProvider", 1), None, needed, budget)  # open: no model needed
    with pytest.raises(SessionMissing):
        sessions.get(("c", "CPUExecutionProvider", 1), None, needed, budget)
    sessions.get(("c", "CPUExecutionProvider", 1), two, needed, budget)  # b, least recently used, is closed for it
    with pytest.raises(SessionMissing):
        sessions.get(("b", "CPUExecutionProvider", 1), None, needed, budget)
    sessions.get(("a", "CPUExecutionProvider", 1), None, needed, budget)
    capped = _Sessions(limit=1)
    capped.get(("a", "CPUExecutionProvider", 1), one, needed, 1 << 40)
    capped.get(("b", "CPUExecutionProvider", 1), two, needed, 1 << 40)
    assert len(capped) == 1
