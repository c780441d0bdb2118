"""`explorer serve`: the measurement agent that runs on a board (the way TVM measures through RPC
servers on its boards).

It receives unit-block ONNX models and input shapes, runs them with ONNX Runtime (warm-up, repeats)
and answers with per-repeat, per-block timings, the energy of real counters where they cover the
providers asked for (RAPL, NVML), the peak resident memory and a device fingerprint. It needs only
NumPy, ONNX Runtime and nvidia-ml-py (`pip install "explorer[agent]"`): nothing here imports the
training or search stack.

HTTP API (every request carries `Authorization: Bearer TOKEN`; answers are JSON):

- `GET /info`: the fingerprint and the agent's limits.
- `HEAD /models/SHA256`: 200 when the agent holds that model, else 404.
- `PUT /models/SHA256`: upload one ONNX file (body); its SHA-256 must match. Kept in a bounded
  in-memory store (least recently used out first).
- `POST /measure`: `{"blocks": [{"model": SHA256, "threads": N, "provider": "CPUExecutionProvider"}],
  "inputs": {"name": {"shape": [...], "dtype": "float32"}}, "warmup": 3, "repeats": 15, "seed": 0,
  "energy_providers": ["CPUExecutionProvider", ...]}` (the providers the energy counters must cover;
  default: the blocks'). Inputs are drawn on the agent (standard normal, `seed`); only ONNX and JSON
  cross the wire. A block whose provider ONNX Runtime here has but cannot start gets 503 (the client
  tries another agent). Optional `"adaptive": {"target": 0.03, "confidence": 0.95, "min_repeat_ms": 1.0,
  "max_seconds": 1.0, "max_repeats": 10000}` (any subset; explorer.blockrun.AdaptiveRepeats): after
  `repeats`, more until the interval of the median is tight or the cap (`max_seconds` below the
  agent's measure timeout). The answer's `times` holds the seconds of every repeat, `number` (passes
  each repeat averages) and `others_cores` (other processes' CPU use meanwhile); without `adaptive`,
  exactly `repeats` of one pass, as agents before it did.
- `POST /measure-interleaved`: `{"chains": [{"blocks": [...], "inputs": {...}}, ...], "warmup": 3,
  "repeats": 5, "seed": 0, "energy_providers": [...], "adaptive": {...}}`: the chains timed interleaved
  in rounds of `repeats` each (explorer.blockrun.time_interleaved; the first chain is the reference
  of the per-round ratios); `times` is one answer per chain, with `rounds` and `energy_uj_by_round`.
  `GET /info` lists `features` ("adaptive", "interleaved"); agents without them predate both.
  One measurement runs at a time (the device is the shared resource); others wait in line up to
  the queue timeout (then 503), and a measurement past its time limit is stopped (504).

Errors: 401 without or with a wrong token, 413 for an upload over the size limit, 400 for
malformed JSON, ONNX or inputs, 404 for an unknown model (upload it first). The agent keeps serving.
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import ipaddress
import json
import os
import platform
import secrets
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort

from explorer.blockrun import (AdaptiveRepeats, BlockRunError, BlockSpec, MeasurementTimeout, ProviderUnavailable,
                               int8_exact, readable_counters, time_blocks, time_interleaved)
from explorer.errors import ExplorerError

PROTOCOL_VERSION = 2  # 2: energy_providers in the request, energy counters (RAPL, NVML) in the fingerprint
TOKEN_ENV = "EXPLORER_AGENT_TOKEN"
MAX_JSON_BYTES = 1 << 20
MAX_REPEATS = 10_000
MAX_CHAINS = 64  # chains one interleaved request may time
# What this agent does beyond protocol 2's requests (optional fields: older clients' requests work unchanged).
ADAPTIVE_FEATURE, INTERLEAVED_FEATURE = "adaptive", "interleaved"
FEATURES = [ADAPTIVE_FEATURE, INTERLEAVED_FEATURE]
DTYPES = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32, "uint8": np.uint8}


class RequestError(Exception):
    """A bad request: the HTTP status and a message for the client."""

    def __init__(self, status: HTTPStatus, message: str):
        super().__init__(message)
        self.status = status


def fingerprint() -> dict:
    """What identifies the device: CPU model, cores, clocks, ONNX Runtime version and providers."""
    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "processor\t: arm")):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    clocks = {}
    for name in ("cpuinfo_max_freq", "scaling_cur_freq", "scaling_governor"):
        try:
            clocks[name] = Path(f"/sys/devices/system/cpu/cpu0/cpufreq/{name}").read_text().strip()
        except OSError:
            pass
    return {"protocol": PROTOCOL_VERSION, "hostname": socket.gethostname(), "machine": platform.machine(),
            "system": platform.system(), "cpu_model": cpu_model, "cpu_count": os.cpu_count(), "clocks": clocks,
            "onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
            "energy_counters": readable_counters(), "int8_exact": int8_exact()}


class ModelStore:
    """Uploaded models by SHA-256, bounded in bytes (least recently used dropped first)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._models: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, sha: str, data: bytes) -> None:
        with self._lock:
            self._models[sha] = data
            self._models.move_to_end(sha)
            while sum(map(len, self._models.values())) > self.max_bytes and len(self._models) > 1:
                self._models.popitem(last=False)

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            data = self._models.get(sha)
            if data is not None:
                self._models.move_to_end(sha)
            return data


class Agent:
    """The agent's state: token, limits, model store and the device lock."""

    def __init__(self, token: str, max_upload_bytes: int, queue_timeout_s: float, measure_timeout_s: float,
                 store_bytes: int):
        self.token = token
        self.max_upload_bytes = max_upload_bytes
        self.queue_timeout_s = queue_timeout_s
        self.measure_timeout_s = measure_timeout_s
        self.store = ModelStore(store_bytes)
        self.device = threading.Lock()  # one measurement at a time on this device
        self.fingerprint = fingerprint()
        self.measurements = 0

    def info(self) -> dict:
        return {"fingerprint": self.fingerprint, "max_upload_bytes": self.max_upload_bytes,
                "queue_timeout_s": self.queue_timeout_s, "measure_timeout_s": self.measure_timeout_s,
                "measurements": self.measurements, "features": FEATURES}

    def measure(self, request: dict) -> dict:
        """Check the request, wait for the device, time the blocks."""
        blocks, inputs = self._chain(request)
        warmup, repeats, energy_providers = self._settings(request)
        adaptive = self._adaptive(request, required=False)
        return self._on_device(lambda: time_blocks(blocks, inputs, warmup, repeats, timeout_s=self.measure_timeout_s,
                                                   energy_providers=energy_providers, adaptive=adaptive).to_json())

    def measure_interleaved(self, request: dict) -> dict:
        """Check the request, wait for the device, time the chains interleaved."""
        chains = request.get("chains") if isinstance(request, dict) else None
        if not isinstance(chains, list) or not 1 <= len(chains) <= MAX_CHAINS:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the request needs a list 'chains' of 1 to {MAX_CHAINS} "
                                                       "{\"blocks\": [...], \"inputs\": {...}}")
        warmup, repeats, energy_providers = self._settings(request)
        parsed = [self._chain({**chain, "seed": request.get("seed", 0)}, f"chain {i}: ") if isinstance(chain, dict)
                  else self._chain({}, f"chain {i}: ") for i, chain in enumerate(chains)]
        adaptive = self._adaptive(request, required=True)
        return self._on_device(lambda: [t.to_json() for t in time_interleaved(
            parsed, warmup, repeats, adaptive, timeout_s=self.measure_timeout_s, energy_providers=energy_providers)])

    def _on_device(self, run) -> dict:
        """Run a timing with the device to itself (waiting in line up to the queue timeout)."""
        queued = time.perf_counter()
        if not self.device.acquire(timeout=self.queue_timeout_s):
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE,
                               f"the device stayed busy for {self.queue_timeout_s:g} s (queue timeout): try another agent or later")
        try:
            started = time.perf_counter()
            times = run()
            self.measurements += 1
        except MeasurementTimeout as error:
            raise RequestError(HTTPStatus.GATEWAY_TIMEOUT, str(error)) from None
        except ProviderUnavailable as error:  # this machine's fault: the client tries another agent
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(error)) from None
        except BlockRunError as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        finally:
            self.device.release()
        return {"times": times, "fingerprint": self.fingerprint, "queued_s": started - queued,
                "measure_s": time.perf_counter() - started}

    def _chain(self, request: dict, where: str = "") -> tuple[list[BlockSpec], dict[str, np.ndarray]]:
        """A chain's blocks (uploaded models) and inputs (drawn with the request's seed)."""
        bad = HTTPStatus.BAD_REQUEST
        if not isinstance(request, dict) or not isinstance(request.get("blocks"), list) or not request["blocks"]:
            raise RequestError(bad, f"{where}the request needs a non-empty list 'blocks'")
        blocks = []
        for index, block in enumerate(request["blocks"]):
            if not isinstance(block, dict) or not isinstance(block.get("model"), str):
                raise RequestError(bad, f"{where}block {index} needs 'model': the SHA-256 of an uploaded ONNX file")
            data = self.store.get(block["model"])
            if data is None:
                raise RequestError(HTTPStatus.NOT_FOUND, f"model {block['model']} is not on this agent: upload it first "
                                                         f"(PUT /models/{block['model']})")
            threads, provider = block.get("threads", 1), block.get("provider", "CPUExecutionProvider")
            if not isinstance(threads, int) or not 0 <= threads <= 1024 or not isinstance(provider, str):
                raise RequestError(bad, f"{where}block {index}: 'threads' must be an integer 0..1024 and 'provider' a string")
            blocks.append(BlockSpec(data, threads, provider))
        seed = request.get("seed", 0)
        if not isinstance(seed, int):
            raise RequestError(bad, "'seed' must be an integer")
        rng = np.random.default_rng(seed)
        inputs = {}
        specs = request.get("inputs", {})
        if not isinstance(specs, dict):
            raise RequestError(bad, f"{where}'inputs' must map input names to {{\"shape\": [...], \"dtype\": ...}}")
        for name, spec in specs.items():
            shape = spec.get("shape") if isinstance(spec, dict) else None
            dtype = DTYPES.get(spec.get("dtype", "float32")) if isinstance(spec, dict) else None
            if (not isinstance(shape, list) or not all(isinstance(d, int) and 0 < d <= 1 << 20 for d in shape)
                    or dtype is None or np.prod(shape, dtype=np.int64) > 1 << 26):
                raise RequestError(bad, f"{where}input {name!r}: give 'shape' as positive integers (at most 2^26 elements) "
                                        f"and 'dtype' one of {', '.join(DTYPES)}")
            inputs[name] = rng.standard_normal(shape).astype(dtype)
        return blocks, inputs

    def _settings(self, request: dict) -> tuple[int, int, list[str] | None]:
        """warmup, repeats and energy_providers of a request."""
        bad = HTTPStatus.BAD_REQUEST
        warmup, repeats, seed = request.get("warmup", 3), request.get("repeats", 15), request.get("seed", 0)
        if not all(isinstance(v, int) for v in (warmup, repeats, seed)) or not (0 <= warmup <= MAX_REPEATS and 1 <= repeats <= MAX_REPEATS):
            raise RequestError(bad, f"'warmup' (0..{MAX_REPEATS}), 'repeats' (1..{MAX_REPEATS}) and 'seed' must be integers")
        energy_providers = request.get("energy_providers")
        if energy_providers is not None and not (isinstance(energy_providers, list)
                                                 and all(isinstance(p, str) for p in energy_providers)):
            raise RequestError(bad, "'energy_providers' must be a list of ONNX Runtime provider names")
        return warmup, repeats, energy_providers

    def _adaptive(self, request: dict, required: bool) -> AdaptiveRepeats | None:
        """The request's adaptive repeats (None when absent and not required), within the measure timeout."""
        if request.get("adaptive") is None:
            if required:
                raise RequestError(HTTPStatus.BAD_REQUEST, "interleaved measurement needs 'adaptive' (its target and cap)")
            return None
        try:
            adaptive = AdaptiveRepeats.from_json(request["adaptive"])
        except ExplorerError as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
        if adaptive.max_seconds >= self.measure_timeout_s:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"'adaptive' max_seconds {adaptive.max_seconds:g} must stay below this "
                                                       f"agent's measure timeout of {self.measure_timeout_s:g} s (restart it "
                                                       "with a larger --measure-timeout)")
        return adaptive


class Handler(BaseHTTPRequestHandler):
    """One HTTP request; the Agent is the server's `agent` attribute."""

    server_version = "explorer-agent"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may take to send its request (socket timeout)

    @property
    def agent(self) -> Agent:
        return self.server.agent  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr, with the client
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._handle(lambda: self._info())

    def do_HEAD(self) -> None:
        self._handle(lambda: self._has_model(), head=True)

    def do_PUT(self) -> None:
        self._handle(lambda: self._upload())

    def do_POST(self) -> None:
        self._handle(lambda: self._measure())

    # ---- routes -----------------------------------------------------------------------------------
    def _info(self) -> tuple[HTTPStatus, dict]:
        if self.path != "/info":
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {self.path}: use /info, /models/SHA256 or /measure")
        return HTTPStatus.OK, self.agent.info()

    def _has_model(self) -> tuple[HTTPStatus, dict]:
        sha = self._model_sha()
        return (HTTPStatus.OK if self.agent.store.get(sha) is not None else HTTPStatus.NOT_FOUND), {}

    def _upload(self) -> tuple[HTTPStatus, dict]:
        sha = self._model_sha()
        data = self._body(self.agent.max_upload_bytes)
        if hashlib.sha256(data).hexdigest() != sha:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the upload's SHA-256 does not match its URL (corrupted on the way?)")
        self.agent.store.put(sha, data)
        return HTTPStatus.CREATED, {"model": sha, "bytes": len(data)}

    def _measure(self) -> tuple[HTTPStatus, dict]:
        routes = {"/measure": self.agent.measure, "/measure-interleaved": self.agent.measure_interleaved}
        if self.path not in routes:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {self.path}: POST /measure or /measure-interleaved")
        body = self._body(MAX_JSON_BYTES)
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the request body is not JSON: {error}") from None
        if not isinstance(request, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return HTTPStatus.OK, routes[self.path](request)

    # ---- plumbing ---------------------------------------------------------------------------------
    def _model_sha(self) -> str:
        parts = self.path.split("/")
        if len(parts) != 3 or parts[1] != "models" or len(parts[2]) != 64 or any(c not in "0123456789abcdef" for c in parts[2]):
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {self.path}: models live at /models/SHA256 (64 hex digits)")
        return parts[2]

    def _body(self, limit: int) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        if int(length) > limit:
            self.close_connection = True  # the body is not read: the connection cannot be reused
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the body is {int(length)} bytes, over this agent's limit of {limit} bytes "
                               "(start the agent with a larger --max-upload-mb)")
        return self.rfile.read(int(length))

    def _authorised(self) -> bool:
        header = self.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return scheme == "Bearer" and hmac.compare_digest(token.encode(), self.agent.token.encode())

    def _handle(self, route, head: bool = False) -> None:
        try:
            if not self._authorised():
                self.close_connection = True
                raise RequestError(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send 'Authorization: Bearer TOKEN' "
                                                            f"(the client reads it from {TOKEN_ENV})")
            status, payload = route()
        except RequestError as error:
            status, payload = error.status, {"error": str(error)}
        except TimeoutError:
            self.close_connection = True
            return
        except Exception as error:  # a bug: answer 500, keep serving
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"agent error: {type(error).__name__}: {error}"}
        body = json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except OSError:  # the client went away
            self.close_connection = True


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the agent reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_server(host: str, port: int, agent: Agent) -> ThreadingHTTPServer:
    """The HTTP server (not yet serving); port 0 picks a free port."""
    server_class = ThreadingHTTPServer
    if ":" in host:
        server_class = type("ThreadingHTTPServerV6", (ThreadingHTTPServer,), {"address_family": socket.AF_INET6})
    server = server_class((host, port), Handler)
    server.daemon_threads = True
    server.agent = agent  # type: ignore[attr-defined]
    return server


def read_token(token_file: str | None) -> str | None:
    """The token from --token-file, else from the environment (never from the command line: ps shows it)."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise SystemExit(f"explorer serve: error: cannot read the token file {token_file}: {error.strerror}")
        if not token:
            raise SystemExit(f"explorer serve: error: the token file {token_file} is empty")
        return token
    return os.environ.get(TOKEN_ENV) or None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explorer serve", description="Measurement agent: runs unit-block ONNX models "
                                     "with ONNX Runtime on this device for `--measure remote://HOST:PORT`.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; "
                        "any other address needs a token)")
    parser.add_argument("--port", type=int, default=9190, help="port (default 9190; 0 picks a free one)")
    parser.add_argument("--token-file", help=f"file holding the token clients must send (default: ${TOKEN_ENV}; "
                        "on loopback without one, a random token is made and printed)")
    parser.add_argument("--max-upload-mb", type=float, default=512.0, help="largest ONNX upload accepted (default 512)")
    parser.add_argument("--store-mb", type=float, default=2048.0, help="memory kept for uploaded models (default 2048)")
    parser.add_argument("--queue-timeout", type=float, default=600.0, help="seconds a request waits for the device (default 600)")
    parser.add_argument("--measure-timeout", type=float, default=300.0, help="seconds one measurement may run (default 300)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the agent until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        token = read_token(args.token_file)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return 2
    if token is None:
        if not is_loopback(args.host):
            print(f"explorer serve: error: binding to {args.host} exposes the agent to the network: give a token "
                  f"(--token-file FILE or ${TOKEN_ENV}) that clients send, or bind to 127.0.0.1", file=sys.stderr)
            return 2
        token = secrets.token_urlsafe(24)
        print(f"no token given: clients must set {TOKEN_ENV}={token}", flush=True)
    agent = Agent(token, int(args.max_upload_mb * 2**20), args.queue_timeout, args.measure_timeout, int(args.store_mb * 2**20))
    try:
        server = make_server(args.host, args.port, agent)
    except OSError as error:
        print(f"explorer serve: error: cannot listen on {args.host}:{args.port}: {error.strerror}: pick another --port",
              file=sys.stderr)
        return 2
    host, port = server.server_address[:2]
    fp = agent.fingerprint
    print(f"explorer agent listening on {host}:{port} ({fp['cpu_model']}, ONNX Runtime {fp['onnxruntime']}, "
          f"providers {', '.join(fp['providers'])}; energy counters: {', '.join(fp['energy_counters']) or 'none'})",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("explorer agent: stopped", flush=True)
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
