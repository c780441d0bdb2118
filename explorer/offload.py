"""Cloud offload: a bundle's remote blocks run on an `explorer serve` agent, tensors in and out.

Server side (`explorer serve`, route ``POST /run/SHA256?provider=P&threads=N``): the block is a model
uploaded once by its SHA-256 (``PUT /models/SHA256``, the same store and token as measurement; a bundle's
block files are already named by that digest); the body is an ``.npz`` of the block's input tensors
(``numpy.savez``, no pickles), the answer an ``.npz`` of its outputs plus ``__explorer__``, a JSON string
with the compute milliseconds and the provider it ran on. The agent keeps a few open sessions (least
recently used closed first) and runs one request at a time on the device, as it measures.

Client side (:class:`OffloadClient`, used by :class:`explorer.runtime.Bundle` when loaded with
``remote=URL``): uploads a block the agent lacks, sends the tensors, and measures every call: the network
part (wall time less the agent's compute time) and the bytes both ways give the link's round trip and
bandwidth that the runtime compares with what the plan assumed.
The agent's time (its ``agent_ms``: decoding, opening a session on a first call, running) is left out. Any failure (refused, reset, timed out,
an HTTP error, a malformed answer) is one :class:`OffloadFailed`; the runtime then finishes the inference
on a plan that needs no network. ``throttle`` delays every call in-process as a slower link would (round
trip plus bytes over bandwidth), for benchmarks and tests on loopback; it is a simulation and says so.
"""
from __future__ import annotations

import collections
import hashlib
import http.client
import io
import json
import threading
import time
import urllib.parse
from dataclasses import dataclass
from http import HTTPStatus

import numpy as np
import onnxruntime as ort

RUN_PREFIX = "/run/"
RUN_FEATURE = "run-block"
MAX_SESSIONS = 16  # open sessions an agent keeps for offloaded blocks
META_KEY = "__explorer__"
LINK_WINDOW = 8  # recent calls the link estimate reads


class OffloadFailed(Exception):
    """A remote block could not run on the agent now (the runtime falls back to a local plan)."""


# ---- server side ----------------------------------------------------------------------------------
class _Sessions:
    """Open sessions of offloaded blocks, by (model digest, provider, threads), least recently used out first."""

    def __init__(self, limit: int = MAX_SESSIONS):
        self.limit = limit
        self._open: collections.OrderedDict[tuple, tuple[ort.InferenceSession, str]] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple, data: bytes) -> tuple[ort.InferenceSession, str]:
        with self._lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
        _, provider, threads = key
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = list(dict.fromkeys([provider, "CPUExecutionProvider"])) if provider in ort.get_available_providers() \
            else ["CPUExecutionProvider"]
        session = ort.InferenceSession(data, options, providers=providers)
        with self._lock:
            self._open[key] = (session, session.get_providers()[0])
            while len(self._open) > self.limit:
                self._open.popitem(last=False)
            return self._open[key]


def run_block(agent, path: str, body: bytes) -> bytes:
    """The answer to ``POST /run/SHA256?provider=P&threads=N`` on `agent` (an explorer.serve.Agent): the
    block's outputs for the tensors in `body`, as .npz bytes. RequestError for anything wrong."""
    from explorer.serve import RequestError

    handled = time.perf_counter()  # the agent's whole share of the call (decoding, opening a session, running)
    bad = HTTPStatus.BAD_REQUEST
    url = urllib.parse.urlsplit(path)
    sha = url.path[len(RUN_PREFIX):]
    if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
        raise RequestError(HTTPStatus.NOT_FOUND, f"no such resource {url.path}: blocks run at /run/SHA256 (64 hex digits)")
    data = agent.store.get(sha)
    if data is None:
        raise RequestError(HTTPStatus.NOT_FOUND, f"model {sha} is not on this agent: upload it first (PUT /models/{sha})")
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
    sessions = getattr(agent, "offload_sessions", None)
    if sessions is None:
        sessions = agent.offload_sessions = _Sessions()
    try:
        session, runs_on = sessions.get((sha, provider, int(threads)), data)
    except Exception as error:  # ORT's own exception types for models it cannot load
        raise RequestError(bad, f"ONNX Runtime cannot load model {sha}: {str(error).strip().splitlines()[0]}") from None
    expected = {i.name for i in session.get_inputs()}
    if set(feeds) != expected:
        raise RequestError(bad, f"the block takes {sorted(expected)}, the body has {sorted(feeds)}")
    if not agent.device.acquire(timeout=agent.queue_timeout_s):
        raise agent.busy(f"the device stayed busy for {agent.queue_timeout_s:g} s (queue timeout): try later")
    try:
        started = time.perf_counter()
        try:
            outputs = session.run(None, feeds)
        except Exception as error:  # wrong shapes or types of the tensors
            raise RequestError(bad, f"the block cannot run on these tensors: {str(error).strip().splitlines()[0]}") from None
        compute_ms = 1e3 * (time.perf_counter() - started)
    finally:
        agent.device.release()
    answer = {o.name: value for o, value in zip(session.get_outputs(), outputs)}
    buffer = io.BytesIO()
    np.savez(buffer, **answer)  # encoding the answer: a small share of the agent's time, left out of agent_ms
    answer[META_KEY] = np.array(json.dumps({"compute_ms": compute_ms, "runs_on": runs_on,
                                            "agent_ms": 1e3 * (time.perf_counter() - handled)}))
    buffer = io.BytesIO()
    np.savez(buffer, **answer)
    return buffer.getvalue()


# ---- client side ----------------------------------------------------------------------------------
def _error(body: bytes) -> str:
    """The agent's error message from a JSON answer (or the start of whatever it sent)."""
    try:
        return str(json.loads(body)["error"])
    except (ValueError, KeyError, TypeError):
        return repr(body[:200])


@dataclass(frozen=True)
class Call:
    """One offloaded block call as the client measured it."""

    total_ms: float  # wall time of the call, the throttle's delay included
    compute_ms: float  # the agent's time running the block
    agent_ms: float  # the agent's whole share: decoding, opening the session (first call), running
    sent_bytes: int
    received_bytes: int

    @property
    def network_ms(self) -> float:
        return max(self.total_ms - self.agent_ms, 0.0)


class OffloadClient:
    """Runs blocks on one `explorer serve` agent (see the module's docstring)."""

    def __init__(self, url: str, token: str, timeout_s: float = 5.0, throttle=None):
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme != "http" or not parsed.hostname or not parsed.port:
            from explorer.errors import ExplorerError

            raise ExplorerError(f"remote {url!r}: give the agent as http://HOST:PORT (a running `explorer serve`)")
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
            connection.request(method, path, body=body, headers={"Authorization": f"Bearer {self.token}",
                                                                 "Content-Length": str(len(body))})
            response = connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException) as error:  # refused, reset, timed out, cut off
            raise OffloadFailed(f"the agent at {self.url} did not answer ({type(error).__name__}: {error})") from None
        finally:
            connection.close()

    def ping(self, timeout_s: float = 1.0) -> float:
        """Round trip of a GET /info in ms (the throttle's round trip added); OffloadFailed when it fails."""
        started = time.perf_counter()
        status, _ = self._request("GET", "/info", timeout_s=timeout_s)
        if status != 200:
            raise OffloadFailed(f"the agent at {self.url} answered {status} to GET /info")
        if self.throttle is not None:
            time.sleep(self.throttle.rtt_ms / 1e3)
        self.last_ping_ms = 1e3 * (time.perf_counter() - started)
        return self.last_ping_ms

    def run(self, sha: str, model_bytes, feeds: dict[str, np.ndarray], provider: str, threads: int) -> dict[str, np.ndarray]:
        """The block's outputs for `feeds`, run on the agent; `model_bytes()` gives the block file's bytes when
        the agent needs the upload (once per digest)."""
        buffer = io.BytesIO()
        np.savez(buffer, **feeds)
        body = buffer.getvalue()
        path = f"{RUN_PREFIX}{sha}?" + urllib.parse.urlencode({"provider": provider, "threads": threads})
        started = time.perf_counter()
        status, answer = self._request("POST", path, body)
        if status == 404:  # a fresh or restarted agent: upload the block, then ask again (once)
            data = model_bytes()
            if hashlib.sha256(data).hexdigest() != sha:
                raise OffloadFailed(f"block {sha} does not match its digest here: it is not uploaded")
            code, text = self._request("PUT", f"/models/{sha}", data)
            if code != 201:
                raise OffloadFailed(f"the agent at {self.url} refused the upload of block {sha[:12]}: {code} {_error(text)}")
            self.uploads += 1
            started = time.perf_counter()
            status, answer = self._request("POST", path, body)
        if status != 200:
            raise OffloadFailed(f"the agent at {self.url} answered {status}: {_error(answer)}")
        try:
            with np.load(io.BytesIO(answer), allow_pickle=False) as archive:
                outputs = {name: archive[name] for name in archive.files if name != META_KEY}
                meta = json.loads(str(archive[META_KEY]))
        except (ValueError, OSError, EOFError, KeyError) as error:
            raise OffloadFailed(f"the agent at {self.url} sent a malformed answer: {error}") from None
        if self.throttle is not None:  # what a slower link would add (simulated)
            delay_s = self.throttle.rtt_ms / 1e3 + 8 * (len(body) + len(answer)) / (self.throttle.bandwidth_mbit_s * 1e6)
            if delay_s > self.timeout_s:
                time.sleep(self.timeout_s)
                raise OffloadFailed(f"the agent at {self.url} did not answer within {self.timeout_s:g} s "
                                    "(throttled link, simulated)")
            time.sleep(delay_s)
        self.last_ping_ms = None
        self.calls.append(Call(1e3 * (time.perf_counter() - started), float(meta["compute_ms"]), float(meta["agent_ms"]),
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
