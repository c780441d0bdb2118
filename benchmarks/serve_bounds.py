"""The measurement server under abuse (issue 24, item 3): memory and threads of an `explorer serve` started from
a checkout, against the requests the issue reported.

    python benchmarks/serve_bounds.py [--checkout PATH] [--clients 50] [--serve-options '--max-memory-mb 1024']

Prints one JSON object: the server's peak resident memory (its process, and its worker where it has one) after
each scenario, the threads 300 idle connections cost, and how 50 concurrent /measure requests were answered
(statuses, resets). Run it on two checkouts to compare (e.g. the main branch and this one).
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

TOKEN = "bench-token-0123456789"


def _status(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _tree_hwm_mb(pid: int) -> dict[str, float]:
    """Peak resident memory of the server and of each child (its worker), MB."""
    found = {"server": _status(pid, "VmHWM") / 1024}
    children = Path(f"/proc/{pid}/task/{pid}/children")
    for child in (children.read_text().split() if children.exists() else []):
        found[f"child {child}"] = _status(int(child), "VmHWM") / 1024
    return found


def tile_bomb() -> bytes:
    """A model of about a hundred bytes whose output is 300 times its input (an 8 MB input gives 2.4 GB)."""
    repeats = numpy_helper.from_array(np.array([300], dtype=np.int64), "r")
    graph = helper.make_graph([helper.make_node("Tile", ["x", "r"], ["y"])], "bomb",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m"])], [repeats])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def _small_mlp() -> bytes:
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((256, 256)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


class Server:
    def __init__(self, checkout: Path, *options: str):
        # the token under both names: a checkout from before the server was called so reads only the old one
        env = os.environ | {"EXPLORER_SERVER_TOKEN": TOKEN, "EXPLORER_AGENT_TOKEN": TOKEN, "PYTHONPATH": str(checkout)}
        self.process = subprocess.Popen([sys.executable, "-m", "explorer.entry", "serve", "--port", "0", *options],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=checkout)
        line = self.process.stdout.readline()
        self.port = int(line.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
        time.sleep(2)  # the worker (where there is one) starts

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 300) -> tuple[int, str]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request(method, path, body=body, headers={"Authorization": f"Bearer {TOKEN}"})
            response = connection.getresponse()
            return response.status, response.read().decode(errors="replace")[:200]
        except OSError as error:
            return -1, f"{type(error).__name__}: {error}"
        finally:
            connection.close()

    def upload(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.request("PUT", f"/models/{sha}", data)
        return sha

    def stop(self) -> None:
        self.process.kill()
        self.process.wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkout", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--serve-options", default="", help="more `explorer serve` options, e.g. '--max-memory-mb 1024'")
    args = parser.parse_args()
    figures: dict = {"checkout": str(args.checkout)}

    server = Server(args.checkout, *args.serve_options.split())
    try:
        figures["idle_server_mb"] = _tree_hwm_mb(server.process.pid)
        bomb = server.upload(tile_bomb())
        many = {"blocks": [{"model": bomb}], "inputs": {f"x{i}": {"shape": [1 << 20, 8], "dtype": "float32"} for i in range(8)},
                "warmup": 0, "repeats": 1}
        figures["many_inputs"] = {"answer": server.request("POST", "/measure", json.dumps(many).encode()),
                                  "peak_mb": _tree_hwm_mb(server.process.pid)}
        tile = {"blocks": [{"model": bomb}], "inputs": {"x": {"shape": [2 << 20], "dtype": "float32"}}, "warmup": 0, "repeats": 1}
        figures["tile_bomb_8mb_input"] = {"answer": server.request("POST", "/measure", json.dumps(tile).encode()),
                                          "peak_mb": _tree_hwm_mb(server.process.pid)}
        figures["dtype_list"] = server.request("POST", "/measure", json.dumps(
            {"blocks": [{"model": bomb}], "inputs": {"x": {"shape": [4], "dtype": []}}}).encode())
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(300)]
        time.sleep(1)
        figures["threads_with_300_idle_connections"] = _status(server.process.pid, "Threads")
        for connection in idle:
            connection.close()
        time.sleep(3)
        mlp = server.upload(_small_mlp())
        body = json.dumps({"blocks": [{"model": mlp}], "inputs": {"x": {"shape": [64, 256]}}, "warmup": 1,
                           "repeats": 50}).encode()
        with ThreadPoolExecutor(args.clients) as pool:
            answers = list(pool.map(lambda _: server.request("POST", "/measure", body), range(args.clients)))
        statuses: dict[str, int] = {}
        for status, text in answers:
            key = str(status) if status > 0 else text.split(":")[0]
            statuses[key] = statuses.get(key, 0) + 1
        figures[f"{args.clients}_concurrent_measures"] = statuses
    finally:
        server.stop()
    server = Server(args.checkout, "--max-upload-mb", "1")
    try:
        figures["upload_8mb_over_1mb_limit"] = server.request("PUT", "/models/" + "a" * 64, b"x" * (8 << 20))
    finally:
        server.stop()
    print(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
