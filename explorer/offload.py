"""Cloud offload: a bundle's remote blocks run on an `explorer serve` measurement server, tensors in and out.

Server side (`explorer serve`, route ``POST /run/SHA256?provider=P&threads=N``): the block is a model
uploaded once by its SHA-256 (``PUT /models/SHA256``, the same store and token as measurement; a bundle's
block files are already named by that digest); the body is an ``.npz`` of the block's input tensors
(``numpy.savez``, no pickles), the answer an ``.npz`` of its outputs plus ``__explorer__``, a JSON string
with the compute milliseconds, the server's whole share of the call and the provider it ran on. A block runs
as a measurement does: checked against the server's memory budget (``--max-memory-mb``) from its model and
tensors before it queues, then in the server's memory-watched worker process, one request at a time on the
device; the worker keeps a few open sessions (least recently used closed first, and fewer where their models
and the next run would pass the budget).

Client side (:class:`OffloadClient`, used by :class:`explorer.runtime.Bundle` when loaded with
``remote=URL``): uploads a block the server lacks, sends the tensors, and measures every call: the network
part (wall time less the server's own time) and the bytes both ways give the link's round trip and
bandwidth that the runtime compares with what the plan assumed (the server's time, its ``server_ms``:
decoding, opening a session on a first call, running, is left out). Any failure (refused, reset, timed
out, an HTTP error, a malformed answer) is one :class:`OffloadFailed`; the runtime then finishes the
inference on a plan that needs no network. ``throttle`` delays every call in-process as a slower link would (round
trip plus bytes over bandwidth), for benchmarks and tests on loopback; it is a simulation and says so.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import io
import json
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
import onnxruntime as ort

from explorer.errors import ExplorerError, error_line
from explorer.http_api import INFO_PATH, RUN_META_KEY, RUN_PREFIX, auth_headers, model_path, run_path
from explorer.request_checks import (
    ORT_TYPES,
    RequestError,
    check_inputs,
    estimate_memory_bytes,
    model_missing,
    session_signature,
)
from explorer.sessions import CPU_PROVIDER, SessionError, open_session

MAX_SESSIONS = 16  # open sessions a server keeps for offloaded blocks
LINK_WINDOW = 8  # recent calls the link estimate reads


class OffloadFailed(Exception):
    """A remote block could not run on the server now (the runtime falls back to a local plan)."""


# ---- server side ----------------------------------------------------------------------------------
class SessionMissing(Exception):
    """The worker has no open session for a run job that came without its model (the server then sends it)."""


class _Sessions:
    """Open sessions of offloaded blocks in the server's worker process, by (model digest, provider, threads), least
    recently used closed first: at most `limit`, and their models (counted twice, as estimate_memory_bytes counts
    them) together with the next run's estimate within the worker's memory budget."""

    def __init__(self, limit: int = MAX_SESSIONS):
        self.limit = limit
        self._open: collections.OrderedDict[tuple, tuple[ort.InferenceSession, str, int]] = collections.OrderedDict()

    def get(self, key: tuple, data: bytes | None, needed_bytes, budget_bytes: int) -> tuple[ort.InferenceSession, str]:
        """The session for `key`, opened from `data` if need be (SessionMissing without it); others are closed
        first while they and `needed_bytes(model size)` (this run's estimate) would pass `budget_bytes`."""
        if key in self._open:
            size = self._open[key][2]
        elif data is None:
            raise SessionMissing(f"no open session for block {key[0][:12]}")
        else:
            size = len(data)
        others = [k for k in self._open if k != key]
        while others and (len(others) >= self.limit
                          or sum(2 * self._open[k][2] for k in others) + needed_bytes(size) > budget_bytes):
            del self._open[others.pop(0)]  # least recently used first
        if key not in self._open and data is not None:  # not open: `data` came (SessionMissing above otherwise)
            sha, provider, threads = key
            usable = provider if provider in ort.get_available_providers() else CPU_PROVIDER  # runs_on says which
            session = open_session(data, usable, threads, strict=False, what=f"model {sha}")
            self._open[key] = (session, session.get_providers()[0], size)
        self._open.move_to_end(key)
        return self._open[key][:2]

    def __len__(self) -> int:
        return len(self._open)


_SESSIONS = _Sessions()  # the worker process's own


def _input_specs(feeds: dict[str, np.ndarray]) -> dict[str, tuple[list[int], str]]:
    """The tensors as the server's request checks describe inputs: {name: (shape, dtype name)}."""
    return {name: (list(array.shape), array.dtype.name) for name, array in feeds.items()}


def _check_feeds(specs: dict[str, tuple[list[int], str]], signature: dict) -> None:
    """400 unless the tensors are exactly the block's inputs with their declared types, ranks and fixed sizes."""
    expected = [name for name, _, _ in signature["inputs"]]
    if set(specs) != set(expected):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the block takes {sorted(expected)}, the body has {sorted(specs)}")
    check_inputs(specs, [signature])


def run_job(job: dict, signatures: dict) -> dict:
    """In the server's worker (explorer.serve.Worker, memory-watched): run the block of a "run" job on its tensors;
    {"outputs": {name: array}, "compute_ms", "runs_on"}."""
    specs = _input_specs(job["feeds"])
    try:
        session, runs_on = _SESSIONS.get((job["sha"], job["provider"], job["threads"]), job["data"],
                                         lambda size: estimate_memory_bytes([], specs) + 2 * size,
                                         job["memory_bytes"])
    except SessionError as error:  # "ONNX Runtime cannot load model SHA: its first line"
        raise RequestError(HTTPStatus.BAD_REQUEST, str(error)) from None
    signatures[job["sha"]] = signature = session_signature(session)
    _check_feeds(specs, signature)
    started = time.perf_counter()
    try:
        outputs = session.run(None, job["feeds"])
    except Exception as error:  # tensors ONNX Runtime refuses at run time
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"the block cannot run on these tensors: {error_line(error)}") from None
    return {"outputs": dict(zip(signature["outputs"], outputs)), "compute_ms": 1e3 * (time.perf_counter() - started),
            "runs_on": runs_on}


def run_block(server, path: str, body: bytes) -> bytes:
    """The answer to ``POST /run/SHA256?provider=P&threads=N`` on `server` (an explorer.serve.MeasurementServer):
    the block's outputs for the tensors in `body`, as .npz bytes. RequestError for anything wrong.

    The block runs as measurements do: checked against the memory budget from its model and tensors before it
    queues (400 over it, as /measure), then in the server's memory-watched worker process with the device to
    itself (503 with Retry-After when the line is full or after the queue timeout; stopped past the budget: 400;
    past the measure timeout: 504), so an offloaded block cannot take the server down."""
    handled = time.perf_counter()  # the server's whole share of the call (decoding, opening a session, running)
    bad = HTTPStatus.BAD_REQUEST
    url = urllib.parse.urlsplit(path)
    sha = url.path[len(RUN_PREFIX):]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {url.path}: blocks run at /run/SHA256 (64 hex digits)")
    data = server.store.get(sha)
    if data is None:
        raise model_missing(sha)
    query = urllib.parse.parse_qs(url.query)
    provider = query.get("provider", ["CPUExecutionProvider"])[0]
    threads = query.get("threads", ["1"])[0]
    if not threads.isdigit() or not 0 <= int(threads) <= 1024:
        raise RequestError(bad, "'threads' must be an integer 0..1024")
    try:
        with np.load(io.BytesIO(body), allow_pickle=False) as archive:
            feeds = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError) as error:
        raise RequestError(bad, f"the body is not an .npz of tensors (numpy.savez, no pickles): {error}") from None
    specs = _input_specs(feeds)
    odd = sorted(name for name, (_, dtype) in specs.items() if dtype not in ORT_TYPES)
    if odd:
        raise RequestError(bad, f"tensor {odd[0]!r} is {specs[odd[0]][1]}: send one of {', '.join(ORT_TYPES)}")
    server.check_memory([{"blocks": [(sha, data, int(threads), provider)], "inputs": specs}], "the block's run")
    known = server.store.signatures([sha])
    if known is not None:  # else the worker checks them once the session is open
        _check_feeds(specs, known[0])
    job = {"kind": "run", "sha": sha, "provider": provider, "threads": int(threads), "feeds": feeds, "data": None,
           "memory_bytes": server.memory_bytes}
    answer, _, _ = server.run_in_worker(job, model=data)
    server.offload_runs += 1
    outputs = dict(answer["outputs"])
    _npz(outputs)  # encoding the answer: a small share of the server's time, left out of server_ms
    server_ms = 1e3 * (time.perf_counter() - handled)
    # agent_ms: server_ms under its old name, for older clients; it goes in the next release
    outputs[RUN_META_KEY] = np.array(json.dumps({"compute_ms": answer["compute_ms"], "runs_on": answer["runs_on"],
                                                 "server_ms": server_ms, "agent_ms": server_ms}))
    return _npz(outputs)


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    """The arrays as the bytes of an .npz file (numpy.savez; the other side loads it without pickles)."""
    buffer = io.BytesIO()
    # numpy's stub types **kwds as if an array could land on savez's keyword allow_pickle (numpy >= 2.1; older
    # numpy, which pyproject allows, would store it as an array: so it is not passed)
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    return buffer.getvalue()


# ---- client side ----------------------------------------------------------------------------------
def _error(body: bytes) -> str:
    """The server's error message from a JSON answer (or the start of whatever it sent)."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return repr(body[:200])


@dataclass(frozen=True)
class Call:
    """One offloaded block call as the client measured it."""

    total_ms: float  # wall time of the call, the throttle's delay included
    compute_ms: float  # the server's time running the block
    server_ms: float  # the server's whole share: decoding, opening the session (first call), running
    sent_bytes: int
    received_bytes: int

    @property
    def network_ms(self) -> float:
        return max(self.total_ms - self.server_ms, 0.0)


class OffloadClient:
    """Runs blocks on one `explorer serve` measurement server (see the module's docstring)."""

    def __init__(self, url: str, token: str, timeout_s: float = 5.0, throttle=None):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            raise ExplorerError(f"remote {url!r}: give the server as http://HOST:PORT (a running `explorer serve`)")
        self.host, self.port = parsed.hostname, parsed.port
        self.url = f"http://{self.host}:{self.port}"
        self.token = token
        self.timeout_s = timeout_s
        self.throttle = throttle  # an explorer.adapt.Link: delays each call as that link would (simulated)
        self.calls: collections.deque[Call] = collections.deque(maxlen=LINK_WINDOW)
        self.last_ping_ms: float | None = None  # the round trip of the latest GET /info, if newer than the latest call

        self.uploads = 0

    def _request(self, method: str, path: str, body: bytes = b"", timeout_s: float | None = None) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout_s or self.timeout_s)
        try:
            connection.request(method, path, body=body, headers=auth_headers(self.token) | {"Content-Length": str(len(body))})
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut off
            raise OffloadFailed(f"the server at {self.url} did not answer ({type(error).__name__}: {error})") from None
        finally:
            connection.close()

    def ping(self, timeout_s: float = 1.0) -> float:
        """Round trip of a GET /info in ms (the throttle's round trip added); OffloadFailed when it fails."""
        started = time.perf_counter()
        status, _ = self._request("GET", INFO_PATH, timeout_s=timeout_s)
        if status != 200:
            raise OffloadFailed(f"the server at {self.url} answered {status} to GET {INFO_PATH}")
        if self.throttle is not None:
            time.sleep(self.throttle.rtt_ms / 1e3)
        self.last_ping_ms = 1e3 * (time.perf_counter() - started)
        return self.last_ping_ms

    def run(self, sha: str, model_bytes, feeds: dict[str, np.ndarray], provider: str, threads: int) -> dict[str, np.ndarray]:
        """The block's outputs for `feeds`, run on the server; `model_bytes()` gives the block file's bytes when
        the server needs the upload (once per digest)."""
        body = _npz(feeds)
        path = run_path(sha, provider, threads)
        started = time.perf_counter()
        status, answer = self._request("POST", path, body)
        if status == 404:  # a fresh or restarted server: upload the block, then ask again (once)
            data = model_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                raise OffloadFailed(f"block {sha} does not match its digest here: it is not uploaded")
            code, text = self._request("PUT", model_path(sha), data)
            if code != 201:
                raise OffloadFailed(f"the server at {self.url} refused the upload of block {sha[:12]}: {code} {_error(text)}")
            self.uploads += 1
            started = time.perf_counter()
            status, answer = self._request("POST", path, body)
        if status != 200:
            raise OffloadFailed(f"the server at {self.url} answered {status}: {_error(answer)}")
        try:
            with np.load(io.BytesIO(answer), allow_pickle=False) as archive:
                outputs = {name: archive[name] for name in archive.files if name != RUN_META_KEY}
                meta = json.loads(str(archive[RUN_META_KEY]))
                server_ms = float(meta["server_ms"] if "server_ms" in meta else meta["agent_ms"])  # agent_ms: older servers
        except (ValueError, OSError, EOFError, KeyError) as error:
            raise OffloadFailed(f"the server at {self.url} sent a malformed answer: {error}") from None
        if self.throttle is not None:  # what a slower link would add (simulated)
            delay_s = self.throttle.rtt_ms / 1e3 + 8 * (len(body) + len(answer)) / (self.throttle.bandwidth_mbit_s * 1e6)
            if delay_s > self.timeout_s:
                time.sleep(self.timeout_s)
                raise OffloadFailed(f"the server at {self.url} did not answer within {self.timeout_s:g} s "
                                    "(throttled link, simulated)")
            time.sleep(delay_s)
        self.last_ping_ms = None
        self.calls.append(Call(1e3 * (time.perf_counter() - started), float(meta["compute_ms"]), server_ms,
                               len(body), len(answer)))
        return outputs

    def link(self) -> tuple[float, float | None] | None:
        """(round trip ms, bandwidth Mbit/s or None) as the recent calls measured it; None before any call or ping.

        Bandwidth: the slope of network time against bytes over the recent calls, where their sizes differ
        enough (by 2x) to tell the two apart; else None (unknown: the runtime takes the plan's assumption).
        Round trip: the latest observation - a ping newer than every call, else the latest call's network time
        less its bytes' time - so that a link that degrades shows at once.
        """
        if not self.calls:
            return (self.last_ping_ms, None) if self.last_ping_ms is not None else None
        calls = list(self.calls)
        sizes = np.array([8.0 * (c.sent_bytes + c.received_bytes) for c in calls])  # bits
        times = np.array([c.network_ms for c in calls])
        bandwidth = None
        if sizes.max() >= 2 * sizes.min():
            slope = np.polyfit(sizes, times, 1)[0]  # ms per bit
            bandwidth = float(min(1e-3 / slope, 1e4)) if slope > 0 else 1e4  # Mbit/s
        if self.last_ping_ms is not None:
            return self.last_ping_ms, bandwidth
        per_bit = 1e-3 / bandwidth if bandwidth else 0.0
        return max(float(times[-1] - sizes[-1] * per_bit), 0.0), bandwidth
