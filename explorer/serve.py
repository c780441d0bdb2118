"""`explorer serve`: the measurement server that runs on a board (the way TVM measures through RPC
servers on its boards).

It receives unit-block ONNX models and input shapes, runs them with ONNX Runtime (warm-up, repeats)
and answers with per-repeat, per-block timings, the energy of real counters where they cover the
providers asked for (RAPL, NVML), the peak resident memory and a device fingerprint; it also runs a
bundle's remote blocks on real tensors (explorer.offload). It needs only NumPy, ONNX Runtime and
nvidia-ml-py (`pip install "explorer[server]"`): nothing here imports the training or search stack.

HTTP API (explorer.http_api holds what server and clients share; docs/http-api.md describes every field;
every request carries `Authorization: Bearer TOKEN`; answers are JSON):

- `GET /info`: the fingerprint, the server's limits and `features` ("adaptive", "interleaved", "run-block";
  a server without them predates them).
- `HEAD /models/SHA256`: 200 when the server holds that model, else 404.
- `PUT /models/SHA256`: upload one ONNX file (body); its SHA-256 must match. Kept in a bounded
  in-memory store (least recently used out first).
- `POST /measure`: `{"blocks": [{"model": SHA256, "threads": N, "provider": "CPUExecutionProvider"}],
  "inputs": {"name": {"shape": [...], "dtype": "float32"}}, "warmup": 3, "repeats": 15, "seed": 0,
  "energy_providers": [...], "adaptive": {...}}`: inputs are drawn here (standard normal, `seed`); only
  ONNX and JSON cross the wire. With `adaptive` (explorer.blockrun.AdaptiveRepeats), repeats go on after
  `repeats` until the interval of the median is tight or the cap; without it, exactly `repeats`.
- `POST /measure-interleaved`: `{"chains": [{"blocks": [...], "inputs": {...}}, ...], ...}`: the chains timed
  interleaved in rounds (explorer.blockrun.time_interleaved; the first chain is the reference).
- `POST /run/SHA256?provider=P&threads=N`: run an uploaded block on the tensors of the body (.npz) and
  answer its outputs (.npz): a bundle's remote blocks (explorer.offload).
  One job runs at a time (the device is the shared resource); others wait in line up to the queue
  timeout (then 503), and a job past its time limit is stopped (504).

Errors: 401 without or with a wrong token, 413 for an upload over the size limit (the body is then
read and dropped, so that the client gets the answer and not a reset), 400 for malformed JSON, ONNX
or inputs (every field checked, the inputs against the blocks' declared ones, before anything is drawn:
explorer.request_checks) and for a job over the memory budget, 404 for an unknown model (upload it first),
503 with Retry-After when the line for the device (--max-queue) or the connections (--max-connections) are
full, 503 without it for a provider that does not start here (the client tries another server). The server
keeps serving.

Bounds: measurements and offloaded blocks run in a worker process (Worker) whose resident memory is
watched against --max-memory-mb (checked from the request's shapes before it queues, enforced while it runs).
"""
from __future__ import annotations

import argparse
import collections
import hashlib
import hmac
import ipaddress
import json
import multiprocessing
import os
import platform
import queue
import secrets
import selectors
import signal
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import cast

import numpy as np
import onnxruntime as ort

from explorer.blockrun import (
    CPU_PROVIDER,
    AdaptiveRepeats,
    BlockRunError,
    BlockSpec,
    MeasurementTimeout,
    ProviderUnavailable,
    int8_exact,
    readable_counters,
    time_blocks,
    time_interleaved,
)
from explorer.errors import ExplorerError
from explorer.http_api import (
    AUTHORIZATION,
    BEARER,
    DEPRECATED_TOKEN_ENV,
    FEATURES,
    INFO_PATH,
    MAX_BLOCKS,
    MAX_CHAINS,
    MAX_JSON_BYTES,
    MAX_REPEATS,
    MEASURE_INTERLEAVED_PATH,
    MEASURE_PATH,
    MODELS_PREFIX,
    PROTOCOL_VERSION,
    RETRY_AFTER,
    RUN_PREFIX,
    TOKEN_ENV,
    deprecated_names,
    model_path,
    token_from_environment,
)
from explorer.offload import SessionMissing, run_block, run_job
from explorer.request_checks import (
    WORKER_RUNTIME_BYTES,
    RequestError,
    Signature,
    bad_request,
    check_inputs,
    draw_inputs,
    estimate_memory_bytes,
    integer_field,
    model_missing,
    parse_inputs,
    session_signature,
)

# Memory: one job's budget defaults to this share of the RAM (the worker's runtime counted in).
DEFAULT_MEMORY_FRACTION = 0.5
MIN_MEMORY_MB = 256
WORKER_GRACE_S = 30.0  # past the measure timeout, for loading the blocks and drawing the inputs
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# Connections: threads are bounded by the connections served at once; the listen backlog holds a burst.
DEFAULT_MAX_CONNECTIONS = 64
DEFAULT_MAX_QUEUE = 32
LISTEN_BACKLOG = 1024
TURN_AWAY_S = 2.0  # how long a turned-away client may take to read its 503 and close
LINGER_S = 10.0  # how long an unread body is read and dropped after the answer (so the client gets the answer)


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


def physical_memory_bytes() -> int | None:
    """This machine's RAM (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None


def default_memory_mb() -> float:
    """The default memory budget of one measurement: a fraction of the RAM (4096 MB where it is unknown)."""
    ram = physical_memory_bytes()
    return DEFAULT_MEMORY_FRACTION * ram / 2**20 if ram else 4096.0


def parse_blocks(request: dict, store: ModelStore, where: str = "") -> list[tuple[str, bytes, int, str]]:
    """A chain's blocks as (SHA-256, model bytes, threads, provider): 400 for a malformed field, 404 for a model
    that is not uploaded."""
    blocks = request.get("blocks")
    if not isinstance(blocks, list) or not blocks or len(blocks) > MAX_BLOCKS:
        raise bad_request(f"{where}the request needs a non-empty list 'blocks' (at most {MAX_BLOCKS})")
    parsed = []
    for index, block in enumerate(blocks):
        sha = block.get("model") if isinstance(block, dict) else None
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise bad_request(f"{where}block {index} needs 'model': the SHA-256 (64 lower-case hex digits) of an uploaded "
                              "ONNX file")
        threads = integer_field(block.get("threads", 1), "threads", 0, 1024, f"{where}block {index}: ")
        provider = block.get("provider", CPU_PROVIDER)
        if not isinstance(provider, str) or not provider:
            raise bad_request(f"{where}block {index}: 'provider' must be an ONNX Runtime provider name such as {CPU_PROVIDER}")
        data = store.get(sha)
        if data is None:
            raise model_missing(sha)
        parsed.append((sha, data, threads, provider))
    return parsed


class ModelStore:
    """Uploaded models by SHA-256, bounded in bytes (least recently used dropped first), with the signature of
    each model once the worker has opened it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._models: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._signatures: dict[str, Signature] = {}
        self._lock = threading.Lock()

    def put(self, sha: str, data: bytes) -> None:
        with self._lock:
            self._models[sha] = data
            self._models.move_to_end(sha)
            while sum(map(len, self._models.values())) > self.max_bytes and len(self._models) > 1:
                dropped, _ = self._models.popitem(last=False)
                self._signatures.pop(dropped, None)

    def get(self, sha: str) -> bytes | None:
        with self._lock:
            data = self._models.get(sha)
            if data is not None:
                self._models.move_to_end(sha)
            return data

    def signatures(self, shas: list[str]) -> list[Signature] | None:
        """The signatures of these models, or None while one of them is not known yet."""
        with self._lock:
            found = [self._signatures[sha] for sha in shas if sha in self._signatures]
        return found if len(found) == len(shas) else None

    def learn(self, signatures: dict[str, Signature]) -> None:
        with self._lock:
            self._signatures.update({sha: sig for sha, sig in signatures.items() if sha in self._models})


# ---- the worker: the measurement runs in a child process with bounded memory -------------------------------
def _worker_main(connection) -> None:
    """The worker process: measure (or run offloaded blocks, explorer.offload) what the server sends until its end
    of the pipe closes (the server ended)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the server, which stops the worker
    while True:
        try:
            job = connection.recv()
        except (EOFError, OSError):
            return
        signatures: dict[str, Signature] = {}
        try:
            connection.send(("ok", _run_job(job, signatures), signatures))
        except SessionMissing as error:  # the server sends the model, once
            connection.send(("missing", str(error), signatures))
        except MeasurementTimeout as error:
            connection.send(("timeout", str(error), signatures))
        except ProviderUnavailable as error:
            connection.send(("unavailable", str(error), signatures))
        except (BlockRunError, RequestError) as error:
            connection.send(("bad", str(error), signatures))
        except MemoryError:
            connection.send(("memory", "ran out of memory", signatures))
        except Exception as error:  # a bug: the server answers 500 and keeps serving
            connection.send(("bug", f"{type(error).__name__}: {error}", signatures))


def _run_job(job: dict, signatures: dict[str, Signature]):
    """Time one job; each chain's inputs are checked against its open sessions, then drawn. A "run" job is an
    offloaded block on real tensors (explorer.offload.run_job)."""
    if job["kind"] == "run":
        return run_job(job, signatures)

    def chain(spec: dict):
        blocks = [BlockSpec(data, threads, provider) for _, data, threads, provider in spec["blocks"]]

        def inputs(sessions: list[ort.InferenceSession]) -> dict[str, np.ndarray]:
            found = [session_signature(session) for session in sessions]
            signatures.update({sha: sig for (sha, *_), sig in zip(spec["blocks"], found)})
            check_inputs(spec["inputs"], found, spec["where"])
            return draw_inputs(spec["inputs"], job["seed"])
        return blocks, inputs

    adaptive = AdaptiveRepeats(**job["adaptive"]) if job["adaptive"] is not None else None
    if job["kind"] == "measure":
        blocks, inputs = chain(job["chains"][0])
        return time_blocks(blocks, inputs, job["warmup"], job["repeats"], timeout_s=job["timeout_s"],
                           energy_providers=job["energy_providers"], adaptive=adaptive).to_json()
    assert adaptive is not None  # an interleaved request without it is refused before it queues
    return [t.to_json() for t in time_interleaved([chain(spec) for spec in job["chains"]], job["warmup"], job["repeats"],
                                                  adaptive, timeout_s=job["timeout_s"],
                                                  energy_providers=job["energy_providers"])]


def _resident_bytes(pid: int | None) -> int | None:
    """A process's resident memory (Linux /proc; None elsewhere or once it is gone)."""
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


class Worker:
    """The child process measurements run in, so that one measurement's memory cannot take the server down: its
    resident memory is watched every few milliseconds and the process killed past the budget (a fresh one is
    started for the next). An address-space limit (RLIMIT_AS) would not do: ONNX Runtime's thread pools and
    glibc's per-thread arenas reserve far more address space than they touch, and by the core count."""

    def __init__(self, memory_bytes: int, poll_s: float = 0.005):
        self.memory_bytes = memory_bytes
        self.poll_s = poll_s
        self._context = multiprocessing.get_context("spawn")  # a fork of a threaded server could deadlock
        self._process: BaseProcess | None = None
        self._connection: Connection | None = None

    def start(self) -> tuple[BaseProcess, Connection]:
        """The running worker process and this end of its pipe (a fresh one started where there is none)."""
        if self._process is not None and self._connection is not None and self._process.is_alive():
            return self._process, self._connection
        ours, theirs = self._context.Pipe()
        process = self._context.Process(target=_worker_main, args=(theirs,), daemon=True, name="explorer-server-worker")
        process.start()
        theirs.close()
        self._process, self._connection = process, ours
        return process, ours

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.join(5)
            if self._connection is not None:
                self._connection.close()
            self._process = self._connection = None

    def restart(self) -> None:
        """Kill the worker and start a fresh one now (it loads NumPy and ONNX Runtime while the answer goes out)."""
        self.stop()
        self.start()

    def run(self, job: dict, deadline_s: float) -> tuple[str, object, dict]:
        """(status, answer or message, signatures learnt); the worker is killed past the memory budget or the
        deadline (then status "memory" or "timeout")."""
        process, connection = self.start()
        try:
            connection.send(job)
            deadline = time.monotonic() + deadline_s
            while not connection.poll(self.poll_s):
                resident = _resident_bytes(process.pid) or 0
                if resident > self.memory_bytes:
                    self.restart()
                    return "memory", (f"the measurement's process reached {resident / 2**20:.0f} MB, over this server's "
                                      f"budget of {self.memory_bytes / 2**20:.0f} MB (--max-memory-mb), and was stopped: "
                                      "measure smaller blocks or inputs, or restart the server with a larger "
                                      "--max-memory-mb"), {}
                if time.monotonic() > deadline:
                    self.restart()
                    return "timeout", f"the measurement ran past its {deadline_s:g} s limit and was stopped", {}
                if not process.is_alive():
                    break
            return connection.recv()
        except (EOFError, OSError, BrokenPipeError):  # it died (e.g. the kernel's OOM killer): a fresh one next time
            code = process.exitcode
            self.restart()
            return "bug", f"the measurement's process ended unexpectedly (exit code {code})", {}


class MeasurementServer:
    """The server's state: token, limits, model store, the device lock and the worker that measures."""

    def __init__(self, token: str, max_upload_bytes: int, queue_timeout_s: float, measure_timeout_s: float,
                 store_bytes: int, memory_bytes: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS):
        self.token = token
        self.max_upload_bytes = max_upload_bytes
        self.queue_timeout_s = queue_timeout_s
        self.measure_timeout_s = measure_timeout_s
        self.memory_bytes = memory_bytes if memory_bytes is not None else int(default_memory_mb() * 2**20)
        self.max_queue = max_queue
        self.max_connections = max_connections
        self.store = ModelStore(store_bytes)
        self.device = threading.Lock()  # one measurement at a time on this device
        self.worker = Worker(self.memory_bytes)
        self.fingerprint = fingerprint()
        self.measurements = 0
        self.offload_runs = 0  # offloaded blocks run (explorer.offload)
        self._waiting = 0  # requests in line for the device (bounded by max_queue)
        self._uploading = 0  # bytes of upload bodies being read (bounded by max_upload_bytes)
        self._lock = threading.Lock()
        self._recent_s = 1.0  # how long a measurement took lately (what Retry-After is estimated from)

    def info(self) -> dict:
        return {"fingerprint": self.fingerprint, "max_upload_bytes": self.max_upload_bytes,
                "queue_timeout_s": self.queue_timeout_s, "measure_timeout_s": self.measure_timeout_s,
                "max_memory_bytes": self.memory_bytes, "max_queue": self.max_queue,
                "max_connections": self.max_connections, "measurements": self.measurements, "features": FEATURES}

    def retry_after_s(self) -> float:
        """When a turned-away request may find room: the line ahead of it times a recent measurement."""
        return float(max(1, min(60, int(np.ceil((self._waiting + 1) * self._recent_s)))))

    def busy(self, message: str) -> RequestError:
        return RequestError(HTTPStatus.SERVICE_UNAVAILABLE, message, self.retry_after_s())

    def measure(self, request: dict) -> dict:
        """Check the request, wait for the device, time the blocks in the worker."""
        chain = self._chain(request)
        warmup, repeats, energy_providers, seed = self._settings(request)
        adaptive = self._adaptive(request, required=False)
        return self._on_device({"kind": "measure", "chains": [chain], "warmup": warmup, "repeats": repeats,
                                "seed": seed, "energy_providers": energy_providers, "adaptive": adaptive})

    def measure_interleaved(self, request: dict) -> dict:
        """Check the request, wait for the device, time the chains interleaved in the worker."""
        chains = request.get("chains")
        if not isinstance(chains, list) or not 1 <= len(chains) <= MAX_CHAINS:
            raise bad_request(f"the request needs a list 'chains' of 1 to {MAX_CHAINS} "
                              "{\"blocks\": [...], \"inputs\": {...}}")
        warmup, repeats, energy_providers, seed = self._settings(request)
        parsed = [self._chain(chain if isinstance(chain, dict) else {}, f"chain {i}: ") for i, chain in enumerate(chains)]
        adaptive = self._adaptive(request, required=True)
        return self._on_device({"kind": "interleaved", "chains": parsed, "warmup": warmup, "repeats": repeats,
                                "seed": seed, "energy_providers": energy_providers, "adaptive": adaptive})

    def check_memory(self, chains: list[dict], what: str = "the measurement") -> None:
        """400 when what a job needs at least (estimate_memory_bytes) exceeds the budget: nothing is drawn then."""
        models = list({sha: data for chain in chains for sha, data, _, _ in chain["blocks"]}.values())
        inputs = {f"{i}:{name}": spec for i, chain in enumerate(chains) for name, spec in chain["inputs"].items()}
        needed = estimate_memory_bytes(models, inputs)
        if needed > self.memory_bytes:
            raise bad_request(f"{what} needs at least {needed / 2**20:.0f} MB (its models twice, its inputs three times, "
                              f"the runtime), over this server's budget of {self.memory_bytes / 2**20:.0f} MB: send smaller "
                              "inputs or restart the server with a larger --max-memory-mb")

    def _on_device(self, job: dict) -> dict:
        """Check a measurement's memory, then run it in the worker (run_in_worker)."""
        self.check_memory(job["chains"])
        answer, queued_s, measure_s = self.run_in_worker(job)
        self.measurements += 1
        return {"times": answer, "fingerprint": self.fingerprint, "queued_s": queued_s, "measure_s": measure_s}

    def run_in_worker(self, job: dict, model: bytes | None = None) -> tuple[object, float, float]:
        """(answer, seconds queued, seconds run) of a job run in the worker with the device to itself: it waits in
        line up to the queue timeout (503 with Retry-After when the line is full); the worker's memory budget and
        time limit apply, and its failures become the HTTP errors of the API. `model`: sent once more with the
        job when the worker answers that it lacks the job's session (explorer.offload)."""
        job["timeout_s"] = self.measure_timeout_s
        with self._lock:
            if self._waiting >= self.max_queue:
                raise self.busy(f"{self._waiting} requests wait for the device already (--max-queue {self.max_queue}): "
                                "try again after Retry-After or another server")
            self._waiting += 1
        queued = time.perf_counter()
        try:
            if not self.device.acquire(timeout=self.queue_timeout_s):
                raise self.busy(f"the device stayed busy for {self.queue_timeout_s:g} s (queue timeout): try another "
                                "server or later")
        finally:
            with self._lock:
                self._waiting -= 1
        try:
            started = time.perf_counter()
            # the worker's own limit stops ONNX Runtime; the deadline here also covers loading and drawing
            status, answer, signatures = self.worker.run(job, self.measure_timeout_s + WORKER_GRACE_S)
            if status == "missing" and model is not None:  # a fresh worker, or its session was closed: send the model
                status, answer, signatures = self.worker.run({**job, "data": model}, self.measure_timeout_s + WORKER_GRACE_S)
            self.store.learn(signatures)
            measure_s = time.perf_counter() - started
            if status == "ok":
                self._recent_s = 0.5 * self._recent_s + 0.5 * measure_s
        finally:
            self.device.release()
        if status == "timeout":
            raise RequestError(HTTPStatus.GATEWAY_TIMEOUT, str(answer))
        if status == "unavailable":  # this machine's fault: the client tries another server
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, str(answer))
        if status in ("bad", "memory"):
            raise bad_request(str(answer))
        if status != "ok":
            raise RequestError(HTTPStatus.INTERNAL_SERVER_ERROR, f"server error: {answer}")
        return answer, started - queued, measure_s

    def _chain(self, request: dict, where: str = "") -> dict:
        """A chain's blocks and input descriptions, checked against the models' signatures where they are known."""
        if not isinstance(request, dict):
            raise bad_request(f"{where}a chain must be an object {{\"blocks\": [...], \"inputs\": {{...}}}}")
        blocks = parse_blocks(request, self.store, where)
        inputs = parse_inputs(request.get("inputs", {}), where)
        signatures = self.store.signatures([sha for sha, *_ in blocks])
        if signatures is not None:  # else the worker checks them once the sessions are open, before drawing
            check_inputs(inputs, signatures, where)
        return {"blocks": blocks, "inputs": inputs, "where": where}

    def _settings(self, request: dict) -> tuple[int, int, list[str] | None, int]:
        """warmup, repeats, energy_providers and seed of a request."""
        warmup = integer_field(request.get("warmup", 3), "warmup", 0, MAX_REPEATS)
        repeats = integer_field(request.get("repeats", 15), "repeats", 1, MAX_REPEATS)
        seed = integer_field(request.get("seed", 0), "seed", 0, 2**63 - 1)
        energy_providers = request.get("energy_providers")
        if energy_providers is not None and not (isinstance(energy_providers, list) and len(energy_providers) <= 16
                                                 and all(isinstance(p, str) for p in energy_providers)):
            raise bad_request("'energy_providers' must be a list of ONNX Runtime provider names")
        return warmup, repeats, energy_providers, seed

    def _adaptive(self, request: dict, required: bool) -> dict | None:
        """The request's adaptive repeats as JSON (None when absent and not required), within the measure timeout."""
        if request.get("adaptive") is None:
            if required:
                raise bad_request("interleaved measurement needs 'adaptive' (its target and cap)")
            return None
        try:
            adaptive = AdaptiveRepeats.from_json(request["adaptive"])
        except (ExplorerError, TypeError) as error:
            raise bad_request(str(error)) from None
        if adaptive.max_seconds >= self.measure_timeout_s:
            raise bad_request(f"'adaptive' max_seconds {adaptive.max_seconds:g} must stay below this server's measure timeout "
                              f"of {self.measure_timeout_s:g} s (restart it with a larger --measure-timeout)")
        return adaptive.to_json()

    def reserve_upload(self, length: int) -> None:
        """Count an upload body about to be read; 503 with Retry-After while others fill the upload allowance."""
        with self._lock:
            if self._uploading and self._uploading + length > self.max_upload_bytes:
                raise self.busy(f"other uploads fill this server's allowance of {self.max_upload_bytes} bytes in flight: "
                                "try again after Retry-After")
            self._uploading += length

    def release_upload(self, length: int) -> None:
        with self._lock:
            self._uploading -= length


class Handler(BaseHTTPRequestHandler):
    """One HTTP request; the MeasurementServer is the HTTP server's `measurement_server` attribute."""

    server_version = "explorer-server"
    protocol_version = "HTTP/1.1"
    timeout = 60  # seconds a client may take to send its request (socket timeout)

    @property
    def measurement_server(self) -> MeasurementServer:
        return self.server.measurement_server  # type: ignore[attr-defined]

    def log_message(self, format: str, *args) -> None:  # one line per request on stderr, with the client
        sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:
        self._handle(lambda: self._info())

    def do_HEAD(self) -> None:
        self._handle(lambda: self._has_model(), head=True)

    def do_PUT(self) -> None:
        self._handle(lambda: self._upload())

    def do_POST(self) -> None:
        if self.path.startswith(RUN_PREFIX):  # a bundle's remote block on tensors (explorer.offload)
            self._handle(lambda: self._run_block())
        else:
            self._handle(lambda: self._measure())

    # ---- routes -----------------------------------------------------------------------------------
    def _info(self) -> tuple[HTTPStatus, dict]:
        if self.path != INFO_PATH:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {self.path}: use {INFO_PATH}, {model_path('SHA256')} "
                                                     f"or {MEASURE_PATH}")
        return HTTPStatus.OK, self.measurement_server.info()

    def _has_model(self) -> tuple[HTTPStatus, dict]:
        sha = self._model_sha()
        return (HTTPStatus.OK if self.measurement_server.store.get(sha) is not None else HTTPStatus.NOT_FOUND), {}

    def _upload(self) -> tuple[HTTPStatus, dict]:
        sha = self._model_sha()
        length = self._length(self.measurement_server.max_upload_bytes)
        self.measurement_server.reserve_upload(length)  # the bodies read at once are bounded, not one per connection
        try:
            data = self._read(length)
        finally:
            self.measurement_server.release_upload(length)
        if hashlib.sha256(data).hexdigest() != sha:
            raise RequestError(HTTPStatus.BAD_REQUEST, "the upload's SHA-256 does not match its URL (corrupted on the way?)")
        self.measurement_server.store.put(sha, data)
        return HTTPStatus.CREATED, {"model": sha, "bytes": len(data)}

    def _measure(self) -> tuple[HTTPStatus, dict]:
        server = self.measurement_server
        routes = {MEASURE_PATH: server.measure, MEASURE_INTERLEAVED_PATH: server.measure_interleaved}
        if self.path not in routes:
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {self.path}: POST {MEASURE_PATH} or "
                                                     f"{MEASURE_INTERLEAVED_PATH}")
        body = self._read(self._length(MAX_JSON_BYTES))
        try:
            request = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
            raise RequestError(HTTPStatus.BAD_REQUEST, f"the request body is not JSON: {error}") from None
        if not isinstance(request, dict):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the request body must be a JSON object")
        return HTTPStatus.OK, routes[self.path](request)

    def _run_block(self) -> tuple[HTTPStatus, bytes]:
        length = self._length(self.measurement_server.max_upload_bytes)
        self.measurement_server.reserve_upload(length)  # tensors count against the bodies read at once, as uploads do
        try:
            body = self._read(length)
        finally:
            self.measurement_server.release_upload(length)
        return HTTPStatus.OK, run_block(self.measurement_server, self.path, body)

    # ---- plumbing ---------------------------------------------------------------------------------
    def _model_sha(self) -> str:
        sha = self.path[len(MODELS_PREFIX):] if self.path.startswith(MODELS_PREFIX) else ""
        if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {self.path}: models live at {model_path('SHA256')} "
                                                     "(64 hex digits)")
        return sha

    def _length(self, limit: int) -> int:
        """The body's Content-Length: 411 without one, 413 over `limit` (the body is then left unread)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        if int(length) > limit:
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the body is {int(length)} bytes, over this server's limit of {limit} bytes "
                               "(start the server with a larger --max-upload-mb)")
        return int(length)

    def _read(self, length: int) -> bytes:
        data = self.rfile.read(length)
        self._body_read = True
        return data

    def _unread_body(self) -> bool:
        """Whether the client sent (or is sending) a body this request did not read."""
        length = self.headers.get("Content-Length", "0") if self.headers else "0"
        return not getattr(self, "_body_read", False) and (not length.strip().isdigit() or int(length) > 0)

    def _linger(self) -> None:
        """Read and drop what the client still sends, up to a deadline, after the answer went out: closing a socket
        with unread data resets the connection, and the client would see the reset instead of the answer."""
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline:
                self.connection.settimeout(max(0.05, deadline - time.monotonic()))
                if not self.connection.recv(1 << 16):
                    break
        except OSError:
            pass

    def _authorised(self) -> bool:
        header = self.headers.get(AUTHORIZATION, "")
        scheme, _, token = header.partition(" ")
        return scheme == BEARER and hmac.compare_digest(token.encode(), self.measurement_server.token.encode())

    def _handle(self, route, head: bool = False) -> None:
        self._body_read = False
        retry_after = None
        try:
            if not self._authorised():
                raise RequestError(HTTPStatus.UNAUTHORIZED, f"missing or wrong token: send '{AUTHORIZATION}: {BEARER} TOKEN' "
                                                            f"(the client reads it from {TOKEN_ENV})")
            status, payload = route()
        except RequestError as error:
            status, payload, retry_after = error.status, {"error": str(error)}, error.retry_after_s
        except TimeoutError:
            self.close_connection = True
            return
        except Exception as error:  # a bug: answer 500, keep serving
            status, payload = HTTPStatus.INTERNAL_SERVER_ERROR, {"error": f"server error: {type(error).__name__}: {error}"}
        linger = self._unread_body()
        if linger or status == HTTPStatus.UNAUTHORIZED:
            self.close_connection = True  # an unread body leaves the connection unusable
        binary = isinstance(payload, bytes)  # an offloaded block's output tensors (.npz)
        body = payload if binary else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream" if binary else "application/json")
            self.send_header("Content-Length", str(len(body)))
            if retry_after is not None:
                self.send_header(RETRY_AFTER, str(int(np.ceil(retry_after))))
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if not head:
                self.wfile.write(body)
        except OSError:  # the client went away
            self.close_connection = True
            return
        if linger:
            self._linger()


def is_loopback(host: str) -> bool:
    """Whether binding to `host` keeps the server reachable from this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class BoundedHTTPServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection up to the server's `max_connections`; a connection beyond that
    gets a 503 with Retry-After from one thread that turns them away (never a reset), and the listen backlog
    holds a burst of connections (socketserver's default of 5 resets the sixth)."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address, measurement_server: MeasurementServer):
        self.measurement_server = measurement_server
        self._active = 0
        self._active_lock = threading.Lock()
        self._turned_away: queue.Queue[socket.socket] = queue.Queue(maxsize=LISTEN_BACKLOG)
        threading.Thread(target=self._turn_away_loop, daemon=True, name="explorer-server-turn-away").start()
        super().__init__(address, Handler)

    def process_request(self, request, client_address) -> None:
        with self._active_lock:
            full = self._active >= self.measurement_server.max_connections
            if not full:
                self._active += 1
        if not full:
            try:
                super().process_request(request, client_address)
            except Exception:
                self._done()
                raise
            return
        try:
            self._turned_away.put_nowait(request)
        except queue.Full:  # more than a backlog's worth waits to be turned away: drop this one
            self.shutdown_request(request)

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done()

    def _done(self) -> None:
        with self._active_lock:
            self._active -= 1

    def _turn_away_loop(self) -> None:
        """Answer each connection beyond the cap with a 503 and Retry-After, then read and drop what its client sends
        until it closes or TURN_AWAY_S pass (closing with unread data would reset the connection before the client
        read the answer); one thread and a selector for all of them, so idle clients do not hold the others up."""
        selector = selectors.DefaultSelector()
        deadlines: dict[socket.socket, float] = {}
        while True:
            fresh: list[socket.socket] = []
            try:
                fresh.append(self._turned_away.get(timeout=0.05 if deadlines else None))
                while len(fresh) < 256:
                    fresh.append(self._turned_away.get_nowait())
            except queue.Empty:
                pass
            for connection in fresh:
                if self._answer_busy(connection):
                    selector.register(connection, selectors.EVENT_READ)
                    deadlines[connection] = time.monotonic() + TURN_AWAY_S
            for key, _ in selector.select(timeout=0) if deadlines else []:
                reading = cast(socket.socket, key.fileobj)  # what was registered: a socket
                try:
                    more = reading.recv(1 << 16)
                except OSError:
                    more = b""
                if not more:
                    deadlines[reading] = 0.0
            now = time.monotonic()
            for connection in [c for c, deadline in deadlines.items() if deadline <= now]:
                selector.unregister(connection)
                connection.close()
                del deadlines[connection]

    def _answer_busy(self, connection: socket.socket) -> bool:
        """Send the 503 and end the writing side; False (and closed) when the client is gone already."""
        body = json.dumps({"error": f"this server serves {self.measurement_server.max_connections} connections at once "
                                    "(--max-connections): try again after Retry-After"}).encode()
        answer = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                  f"{RETRY_AFTER}: {int(self.measurement_server.retry_after_s())}\r\nConnection: close\r\n\r\n").encode() + body
        try:
            connection.settimeout(0.5)
            connection.sendall(answer)
            connection.shutdown(socket.SHUT_WR)
            connection.setblocking(False)
            return True
        except OSError:
            connection.close()
            return False


class BoundedHTTPServerV6(BoundedHTTPServer):
    address_family = socket.AF_INET6


def make_server(host: str, port: int, measurement_server: MeasurementServer) -> BoundedHTTPServer:
    """The HTTP server (not yet serving); port 0 picks a free port."""
    server_class = BoundedHTTPServerV6 if ":" in host else BoundedHTTPServer
    return server_class((host, port), measurement_server)


def read_token(token_file: str | None) -> str | None:
    """The token from --token-file, else from the environment (never from the command line: ps shows it): $EXPLORER_SERVER_TOKEN,
    or the deprecated $EXPLORER_AGENT_TOKEN with a warning."""
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as error:
            raise SystemExit(f"explorer serve: error: cannot read the token file {token_file}: {error.strerror}") from None
        if not token:
            raise SystemExit(f"explorer serve: error: the token file {token_file} is empty")
        return token
    return token_from_environment()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="explorer serve", description="Measurement server: runs unit-block ONNX models "
                                     "with ONNX Runtime on this device for `--measure remote://HOST:PORT`.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only; "
                        "any other address needs a token)")
    parser.add_argument("--port", type=int, default=9190, help="port (default 9190; 0 picks a free one)")
    parser.add_argument("--token-file", help=f"file holding the token clients must send (default: ${TOKEN_ENV}, or the "
                        f"deprecated ${DEPRECATED_TOKEN_ENV}; on loopback without one, a random token is made and printed)")
    parser.add_argument("--max-upload-mb", type=float, default=512.0, help="largest ONNX upload accepted (default 512)")
    parser.add_argument("--store-mb", type=float, default=2048.0, help="memory kept for uploaded models (default 2048)")
    parser.add_argument("--queue-timeout", type=float, default=600.0, help="seconds a request waits for the device (default 600)")
    parser.add_argument("--measure-timeout", type=float, default=300.0, help="seconds one measurement may run (default 300)")
    parser.add_argument("--max-memory-mb", type=float, default=None,
                        help=f"memory one measurement may use (default {100 * DEFAULT_MEMORY_FRACTION:g} %% of this machine's "
                             f"RAM; at least {MIN_MEMORY_MB}): checked from the request before it queues, enforced on "
                             "the process the measurement runs in (stopped past it: 400)")
    parser.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                        help=f"measurement requests that may wait for the device (default {DEFAULT_MAX_QUEUE}); "
                             "beyond them 503 with Retry-After")
    parser.add_argument("--max-connections", type=int, default=DEFAULT_MAX_CONNECTIONS,
                        help=f"connections served at once, one thread each (default {DEFAULT_MAX_CONNECTIONS}); "
                             "beyond them 503 with Retry-After")
    return parser


def check_limits(args: argparse.Namespace) -> str | None:
    """What is wrong with the limits given (one line), or None."""
    if args.max_memory_mb is not None and not args.max_memory_mb >= MIN_MEMORY_MB:
        return (f"--max-memory-mb {args.max_memory_mb:g} leaves no room for a measurement: the worker's runtime alone "
                f"takes about {WORKER_RUNTIME_BYTES >> 20} MB; give at least {MIN_MEMORY_MB}")
    for name in ("max_upload_mb", "store_mb", "queue_timeout", "measure_timeout"):
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be above 0 (got {getattr(args, name):g})"
    for name in ("max_queue", "max_connections"):
        if not 1 <= getattr(args, name) <= 10_000:
            return f"--{name.replace('_', '-')} must be 1..10000 (got {getattr(args, name)})"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the server until interrupted."""
    args = build_parser().parse_args(argv)
    try:
        token = read_token(args.token_file)
    except SystemExit as error:
        print(error, file=sys.stderr)
        return 2
    if token is None:
        if not is_loopback(args.host):
            print(f"explorer serve: error: binding to {args.host} exposes the server to the network: give a token "
                  f"(--token-file FILE or ${TOKEN_ENV}) that clients send, or bind to 127.0.0.1", file=sys.stderr)
            return 2
        token = secrets.token_urlsafe(24)
        print(f"no token given: clients must set {TOKEN_ENV}={token}", flush=True)
    wrong = check_limits(args)
    if wrong:
        print(f"explorer serve: error: {wrong}", file=sys.stderr)
        return 2
    memory_mb = args.max_memory_mb if args.max_memory_mb is not None else default_memory_mb()
    measurement_server = MeasurementServer(token, int(args.max_upload_mb * 2**20), args.queue_timeout,
                                           args.measure_timeout, int(args.store_mb * 2**20), int(memory_mb * 2**20),
                                           args.max_queue, args.max_connections)
    try:
        server = make_server(args.host, args.port, measurement_server)
    except OSError as error:
        print(f"explorer serve: error: cannot listen on {args.host}:{args.port}: {error.strerror}: pick another --port",
              file=sys.stderr)
        return 2
    host, port = cast(tuple[str, int], server.server_address[:2])  # an AF_INET or AF_INET6 address
    measurement_server.worker.start()  # the measurements' process, ready before the first request
    fp = measurement_server.fingerprint
    print(f"explorer measurement server listening on {host}:{port} ({fp['cpu_model']}, ONNX Runtime {fp['onnxruntime']}, "
          f"providers {', '.join(fp['providers'])}; energy counters: {', '.join(fp['energy_counters']) or 'none'})",
          flush=True)
    print(f"limits: {memory_mb:.0f} MB per measurement, {args.max_queue} in line for the device, "
          f"{args.max_connections} connections", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("explorer measurement server: stopped", flush=True)
    finally:
        server.server_close()
        measurement_server.worker.stop()
    return 0


# The names from before the measurement server was called a server: they work, with a DeprecationWarning, for one
# release more, then they go.
__getattr__ = deprecated_names(__name__, {"Agent": "MeasurementServer", "AgentServer": "BoundedHTTPServer"}, globals())


if __name__ == "__main__":
    sys.exit(main())
