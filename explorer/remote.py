"""`--measure remote://HOST:PORT[,HOST:PORT...]`: measurement on boards running `explorer serve`.

The plan is rewritten and split into unit blocks here; each block's ONNX file is uploaded once per
agent (content-addressed by SHA-256) and the agent times the chain, with repeats until the interval of
the median is tight or a cap (`adaptive`, sent with the request). With several agents, plans are
measured in parallel (`measure_many`), each taken by the next free agent; interleaved measurements
(`measure_interleaved`, for confirmation) run all their plans on one agent, in one request. An agent that fails (down,
too slow, an error) is set aside for a while and the plan goes to another; a plan that no agent
could measure raises MeasurementFailed, which the Problem turns into a failed trial, never a failed
search. Only ONNX and JSON cross the wire; the token comes from $EXPLORER_AGENT_TOKEN.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from explorer.blockrun import AdaptiveRepeats, BlockTimes
from explorer.boards import Board
from explorer.cache import digest
from explorer.errors import ExplorerError
from explorer.measure import (SEARCH_REPEATS, Interleaved, Measurement, MeasurementFailed, block_specs, board_providers,
                              interleaved_from_times, measurement_from_times)
from explorer.serve import ADAPTIVE_FEATURE, INTERLEAVED_FEATURE, PROTOCOL_VERSION, TOKEN_ENV

log = logging.getLogger(__name__)
SCHEME = "remote://"


class AgentError(Exception):
    """One agent failed one request: `retry` says whether another agent may succeed."""

    def __init__(self, message: str, retry: bool = True):
        super().__init__(message)
        self.retry = retry


@dataclass
class AgentEndpoint:
    """One agent: its address, what it reported about itself, and when it may be tried again."""

    host: str
    port: int
    info: dict = field(default_factory=dict)
    resting_until: float = 0.0  # monotonic time before which it is not tried (after a failure)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(spec: str) -> list[AgentEndpoint]:
    """remote://HOST:PORT[,HOST:PORT...] -> endpoints (ExplorerError naming what is wrong)."""
    usage = "use --measure remote://HOST:PORT[,HOST:PORT...] (agents started with `explorer serve`)"
    if not spec.startswith(SCHEME) or not spec[len(SCHEME):]:
        raise ExplorerError(f"{spec!r} is not a remote measurer: {usage}")
    endpoints = []
    for part in spec[len(SCHEME):].split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ExplorerError(f"agent address {part!r} needs HOST:PORT with a port 1-65535: {usage}")
        if any(e.host == host and e.port == int(port) for e in endpoints):
            raise ExplorerError(f"agent {part} is listed twice in {spec!r}")
        endpoints.append(AgentEndpoint(host, int(port)))
    return endpoints


class RemoteMeasurer:
    """Measures plans on `explorer serve` agents (real hardware, over the network)."""

    name = "remote"
    simulated = False

    def __init__(self, spec: str, token: str | None = None, warmup: int = 3, repeats: int = 15, batch: int = 1,
                 timeout_s: float = 600.0, rest_s: float = 30.0, tries: int | None = None,
                 adaptive: AdaptiveRepeats | None = SEARCH_REPEATS):
        """At least `repeats` timed repeats after `warmup` per plan; with `adaptive` (default) the agent adds
        more until the interval of the median is tight or its cap (agents from before adaptive repeats are
        refused then), without it exactly `repeats`."""
        self.spec = spec
        self.endpoints = parse_endpoints(spec)
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not self.token:
            raise ExplorerError(f"remote measurement needs the agents' token: set {TOKEN_ENV} (the agent prints or "
                                "reads it at start)")
        self.warmup, self.repeats, self.batch, self.adaptive = warmup, repeats, batch, adaptive
        self.timeout_s = timeout_s
        self.rest_s = rest_s
        self.tries = tries or max(2, len(self.endpoints) + 1)
        self._lock = threading.Lock()
        self._free: queue.Queue[AgentEndpoint] = queue.Queue()
        self._fingerprint: dict | None = None

    @property
    def parallelism(self) -> int:
        """Plans measured at once: one per agent."""
        return len(self.endpoints)

    # ---- identity -----------------------------------------------------------------------------
    def _connect(self) -> dict:
        """Ask every agent for its fingerprint (once); they must be one kind of device."""
        with self._lock:
            if self._fingerprint is not None:
                return self._fingerprint
            reached = []
            for endpoint in self.endpoints:
                try:
                    endpoint.info = self._request(endpoint, "GET", "/info", timeout_s=10.0)
                    reached.append(endpoint)
                except AgentError as error:
                    log.warning("agent %s is not reachable now (%s); it will be tried again later", endpoint.address, error)
                    endpoint.resting_until = time.monotonic() + self.rest_s
            if not reached:
                raise ExplorerError(f"no agent of {self.spec} answered: start them with `explorer serve` (and the same "
                                    f"{TOKEN_ENV}) or check the addresses")
            protocols = {e.info["fingerprint"].get("protocol") for e in reached}
            if protocols != {PROTOCOL_VERSION}:
                raise ExplorerError(f"agent protocol {', '.join(map(str, protocols))} differs from this client's "
                                    f"{PROTOCOL_VERSION}: install the same explorer version on both sides")
            kinds = {_device_kind(e.info["fingerprint"]): e.address for e in reached}
            if len(kinds) > 1:
                raise ExplorerError("the agents are different kinds of device: " + "; ".join(f"{a}: {k}" for k, a in kinds.items())
                                    + ": measure one board kind per search")
            if self.adaptive is not None:
                _require(reached, ADAPTIVE_FEATURE, "adaptive repeats")
            for endpoint in self.endpoints:
                self._free.put(endpoint)
            self._fingerprint = reached[0].info["fingerprint"]
            return self._fingerprint

    def identity(self, board: Board) -> str:
        fp = self._connect()
        fixed = f"{digest(_device_kind(fp))}:w{self.warmup}:r{self.repeats}:b{self.batch}"
        return f"remote-v3:{fixed}:{self.adaptive.identity()}" if self.adaptive else f"remote-v2:{fixed}"

    def int8_exact(self) -> bool:
        """From the agents' fingerprint; an agent too old to say counts as not exact (7-bit weights)."""
        return bool(self._connect().get("int8_exact", False))

    def label(self, board: Board, how: str | None = None) -> str:
        fp = self._connect()
        how = how or (self.adaptive.describe() if self.adaptive else f"median of {self.repeats}")
        return (f"remote ({fp['cpu_model']}, ONNX Runtime {fp['onnxruntime']} via explorer serve at "
                f"{', '.join(e.address for e in self.endpoints)}; {how})")

    # ---- measuring ----------------------------------------------------------------------------
    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        """Measure one plan on the next free agent (retried elsewhere when an agent fails)."""
        blocks, chain, models = self._chain(graph, compressor, board, plan, calibration_inputs)
        request = {**chain, "warmup": self.warmup, "repeats": self.repeats, "seed": 0,
                   "energy_providers": board_providers(board)}
        if self.adaptive is not None:
            request["adaptive"] = self.adaptive.to_json()
        answer, endpoint = self._on_an_agent("/measure", models, request, "the plan")
        return measurement_from_times(BlockTimes.from_json(answer["times"]), blocks, compressor, board, plan,
                                      self.label(board), f"agent {endpoint.address}", self.adaptive)

    def measure_interleaved(self, graph, compressor, board, plans, calibration_inputs=None, repeats: int = 5,
                            adaptive: AdaptiveRepeats = SEARCH_REPEATS) -> list[Interleaved]:
        """Measure the plans interleaved on one agent, in one request (another agent takes the whole run over
        when one fails: rounds measured on two devices would not pair)."""
        self._connect()
        _require([e for e in self.endpoints if e.info], INTERLEAVED_FEATURE, "interleaved measurement")
        built = [self._chain(graph, compressor, board, plan, calibration_inputs) for plan in plans]
        models = {sha: data for _, _, chain_models in built for sha, data in chain_models.items()}
        request = {"chains": [chain for _, chain, _ in built], "warmup": self.warmup, "repeats": repeats, "seed": 0,
                   "energy_providers": board_providers(board), "adaptive": adaptive.to_json()}
        answer, endpoint = self._on_an_agent("/measure-interleaved", models, request, "the plans")
        return interleaved_from_times([BlockTimes.from_json(t) for t in answer["times"]], [b for b, _, _ in built],
                                      compressor, board, plans, self.label(board, f"interleaved: {adaptive.describe()}"),
                                      f"agent {endpoint.address}", adaptive)

    def _chain(self, graph, compressor, board, plan, calibration_inputs) -> tuple[list, dict, dict[str, bytes]]:
        """The plan's unit blocks, the request's description of its chain, and the models by SHA-256."""
        fp = self._connect()
        missing = sorted({board.processor(d.processor).provider for _, d in plan.decisions} - set(fp["providers"]))
        if missing:
            raise ExplorerError(f"the agents lack {', '.join(missing)}, which {board.name}'s processors in this plan need: "
                                "measure a board whose providers the agents have (see the agent's start line)")
        blocks, specs, inputs = block_specs(graph, compressor, board, plan, calibration_inputs, self.batch)
        shas = [hashlib.sha256(spec.model).hexdigest() for spec in specs]
        chain = {"blocks": [{"model": sha, "threads": s.threads, "provider": s.provider} for sha, s in zip(shas, specs)],
                 "inputs": {name: {"shape": list(value.shape), "dtype": str(value.dtype)} for name, value in inputs.items()}}
        return blocks, chain, {sha: spec.model for sha, spec in zip(shas, specs)}

    def _on_an_agent(self, path: str, models: dict[str, bytes], request: dict, what: str) -> tuple[dict, AgentEndpoint]:
        """The answer of the next free agent to the request (retried elsewhere when an agent fails)."""
        errors = []
        for _ in range(self.tries):
            endpoint = self._take()
            try:
                return self._measure_on(endpoint, models, request, path), endpoint
            except AgentError as error:
                errors.append(f"{endpoint.address}: {error}")
                if not error.retry:
                    raise MeasurementFailed(f"the agent rejected {what}: {error}") from None
                endpoint.resting_until = time.monotonic() + self.rest_s  # down, busy or too slow: another one tries
            finally:
                self._free.put(endpoint)
        raise MeasurementFailed(f"no agent could measure {what} after {len(errors)} tries: " + "; ".join(errors))

    def measure_many(self, graph, compressor, board, plans, calibration_inputs=None) -> list[Measurement | MeasurementFailed]:
        """Measure plans in parallel, one per agent at a time; a plan that fails gives its MeasurementFailed."""
        self._connect()

        def one(plan):
            try:
                return self.measure(graph, compressor, board, plan, calibration_inputs)
            except MeasurementFailed as error:
                return error

        with ThreadPoolExecutor(max_workers=max(1, min(len(plans), self.parallelism))) as pool:
            return list(pool.map(one, plans))

    def _take(self) -> AgentEndpoint:
        """The next free agent that is not resting after a failure (waiting for one when none is)."""
        deadline = time.monotonic() + self.timeout_s
        held: list[AgentEndpoint] = []  # free but resting
        try:
            while True:
                now = time.monotonic()
                for endpoint in held:
                    if endpoint.resting_until <= now:
                        held.remove(endpoint)
                        return endpoint
                if now >= deadline:
                    raise MeasurementFailed(f"no agent became free within {self.timeout_s:g} s")
                wake = min([e.resting_until for e in held] + [deadline])
                try:
                    held.append(self._free.get(timeout=max(0.01, wake - now)))
                except queue.Empty:
                    pass
        finally:
            for endpoint in held:
                self._free.put(endpoint)

    def _measure_on(self, endpoint: AgentEndpoint, models: dict[str, bytes], request: dict,
                    path: str = "/measure") -> dict:
        """Upload what the agent lacks, then measure (uploading again if the agent dropped a model meanwhile)."""
        limit = endpoint.info.get("max_upload_bytes") if endpoint.info else None
        for sha, data in models.items():
            if limit is not None and len(data) > limit:
                raise AgentError(f"a block is {len(data)} bytes, over the agent's upload limit of {limit} "
                                 "(restart it with a larger --max-upload-mb)", retry=False)
        for attempt in range(2):
            for sha, data in models.items():
                if self._request(endpoint, "HEAD", f"/models/{sha}", ok=(200, 404), timeout_s=30.0) is None:
                    self._request(endpoint, "PUT", f"/models/{sha}", body=data, content_type="application/octet-stream")
            try:
                answer = self._request(endpoint, "POST", path, body=json.dumps(request).encode())
                if _device_kind(answer["fingerprint"]) != _device_kind(self._fingerprint):  # e.g. it was down at start
                    raise AgentError(f"it is another kind of device ({_device_kind(answer['fingerprint'])})")
                return answer
            except AgentError as error:
                if "upload it first" not in str(error) or attempt:
                    raise
        raise AssertionError("unreachable")

    def _request(self, endpoint: AgentEndpoint, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", ok: tuple[int, ...] = (200, 201),
                 timeout_s: float | None = None) -> dict | None:
        """One HTTP request; the JSON answer (None for a 404 that `ok` allows). AgentError otherwise."""
        connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=timeout_s or self.timeout_s)
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": content_type}
        try:
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            raise AgentError(f"{type(error).__name__}: {error}") from None
        finally:
            connection.close()
        if response.status == 404 and 404 in ok:
            return None
        if response.status in ok:
            return json.loads(payload) if payload else {}
        try:
            message = json.loads(payload)["error"]
        except (ValueError, KeyError, TypeError):
            message = payload[:200].decode(errors="replace")
        if response.status == 401:
            raise ExplorerError(f"agent {endpoint.address} refused the token: set {TOKEN_ENV} to the token the agent uses")
        retry = response.status >= 500  # busy, timed out, broken: another agent may do; 4xx: the request is bad
        raise AgentError(f"HTTP {response.status}: {message}", retry=retry)


def _require(endpoints: list[AgentEndpoint], feature: str, what: str) -> None:
    """ExplorerError when a reached agent predates `feature` (it would ignore what the request asks)."""
    old = [e.address for e in endpoints if feature not in e.info.get("features", [])]
    if old:
        raise ExplorerError(f"agent {', '.join(old)} is an older `explorer serve` without {what}: install this "
                            "explorer version there and restart it")


def _device_kind(fp: dict) -> str:
    """What must match between agents of one search: CPU, cores, ONNX Runtime, its providers, energy counters."""
    return f"{fp.get('cpu_model')} x{fp.get('cpu_count')}, {fp.get('machine')}, ONNX Runtime {fp.get('onnxruntime')}, " \
           f"{'+'.join(fp.get('providers', []))}, energy counters: {', '.join(fp.get('energy_counters', [])) or 'none'}"
