"""`--measure remote://HOST:PORT[,HOST:PORT...]`: measurement on boards running the measurement server
(`explorer serve`; explorer.http_api is what both sides agree on).

The plan is rewritten and split into unit blocks here; each block's ONNX file is uploaded once per
server (content-addressed by SHA-256) and the server times the chain, with repeats until the interval of
the median is tight or a cap (`adaptive`, sent with the request). With several servers, plans are
measured in parallel (`measure_many`), each taken by the next free server; interleaved measurements
(`measure_interleaved`, for confirmation) run all their plans on one server, in one request. A server that
fails (down, too slow, an error) is set aside for a while and the plan goes to another; a plan that no
server could measure raises MeasurementFailed, which the Problem turns into a failed trial, never a failed
search. A busy server (503 with Retry-After) is tried again after that long. Every wait has a deadline;
when no server can be reached at all they are probed for `wait_for_servers_s`, then ServersUnreachable
ends the search (with its summary). cancel() (Ctrl-C) cuts every request in flight. Only ONNX and JSON
cross the wire; the token comes from $EXPLORER_SERVER_TOKEN (or the deprecated $EXPLORER_AGENT_TOKEN).
"""
from __future__ import annotations

import hashlib
import http.client
import json
import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeVar

from explorer.blockrun import AdaptiveRepeats, BlockTimes
from explorer.boards import Board
from explorer.cache import digest
from explorer.errors import ExplorerError
from explorer.http_api import (
    ADAPTIVE_FEATURE,
    INFO_PATH,
    INTERLEAVED_FEATURE,
    MEASURE_INTERLEAVED_PATH,
    MEASURE_PATH,
    MODEL_MISSING,
    PROTOCOL_VERSION,
    RETRY_AFTER,
    TOKEN_ENV,
    auth_headers,
    busy_seconds,
    deprecated_names,
    device_kind,
    model_path,
    token_from_environment,
)
from explorer.measure import (
    SEARCH_REPEATS,
    Device,
    Interleaved,
    Measurement,
    MeasurementFailed,
    ServersUnreachable,
    block_specs,
    board_providers,
    failures_kept,
    interleaved_from_times,
    measurement_from_times,
)

log = logging.getLogger(__name__)
SCHEME = "remote://"
T = TypeVar("T")
R = TypeVar("R")


class ServerError(Exception):
    """One server failed one request: `retry` says whether another server may succeed, `unreachable` that no
    connection could be made, `busy_s` that the server is busy and asks to be tried again after that long
    (a 503 with Retry-After: not a failure)."""

    def __init__(self, message: str, retry: bool = True, unreachable: bool = False, busy_s: float | None = None,
                 broken: bool = False):
        super().__init__(message)
        self.retry, self.unreachable, self.busy_s = retry, unreachable, busy_s
        self.broken = broken  # the connection broke or timed out (no HTTP answer): the server may be gone


@dataclass
class ServerEndpoint:
    """One measurement server: its address, what it reported about itself, and when it may be tried again."""

    host: str
    port: int
    info: dict = field(default_factory=dict)
    resting_until: float = 0.0  # monotonic time before which it is not tried (after a failure, or busy)
    down_since: float | None = None  # monotonic time since which no connection could be made (None: reachable)
    down_why: str = ""

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_endpoints(spec: str) -> list[ServerEndpoint]:
    """remote://HOST:PORT[,HOST:PORT...] -> endpoints (ExplorerError naming what is wrong)."""
    usage = "use --measure remote://HOST:PORT[,HOST:PORT...] (measurement servers started with `explorer serve`)"
    if not spec.startswith(SCHEME) or not spec[len(SCHEME):]:
        raise ExplorerError(f"{spec!r} is not a remote measurer: {usage}")
    endpoints: list[ServerEndpoint] = []
    for part in spec[len(SCHEME):].split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ExplorerError(f"server address {part!r} needs HOST:PORT with a port 1-65535: {usage}")
        if any(e.host == host and e.port == int(port) for e in endpoints):
            raise ExplorerError(f"server {part} is listed twice in {spec!r}")
        endpoints.append(ServerEndpoint(host, int(port)))
    return endpoints


class RemoteMeasurer:
    """Measures plans on `explorer serve` measurement servers (real hardware, over the network)."""

    name = "remote"
    simulated = False

    def __init__(self, spec: str, token: str | None = None, warmup: int = 3, repeats: int = 15, batch: int = 1,
                 timeout_s: float = 600.0, rest_s: float = 30.0, tries: int | None = None,
                 adaptive: AdaptiveRepeats | None = SEARCH_REPEATS, wait_for_servers_s: float = 0.0,
                 connect_timeout_s: float = 5.0):
        """At least `repeats` timed repeats after `warmup` per plan; with `adaptive` (default) the server adds
        more until the interval of the median is tight or its cap (servers from before adaptive repeats are
        refused then), without it exactly `repeats`. A plan's measurement ends within `timeout_s` (every wait
        in it has that deadline); when no server can be reached, they are probed again for `wait_for_servers_s`
        (with a countdown on the log) and then ServersUnreachable ends the measuring. `token`: default from
        $EXPLORER_SERVER_TOKEN (or the deprecated $EXPLORER_AGENT_TOKEN)."""
        if not (isinstance(wait_for_servers_s, (int, float)) and 0 <= wait_for_servers_s <= 7 * 86_400):
            raise ExplorerError(f"--wait-for-servers must be 0 to 604800 seconds (got {wait_for_servers_s!r})")
        self.spec = spec
        self.endpoints = parse_endpoints(spec)
        token = token if token is not None else token_from_environment()
        if not token:
            raise ExplorerError(f"remote measurement needs the measurement servers' token: set {TOKEN_ENV} (the server "
                                "prints or reads it at start)")
        self.token: str = token
        self.warmup, self.repeats, self.batch, self.adaptive = warmup, repeats, batch, adaptive
        self.timeout_s = timeout_s
        self.rest_s = rest_s
        self.tries = tries or max(2, len(self.endpoints) + 1)
        self.wait_for_servers_s = float(wait_for_servers_s)
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.Lock()
        self._free: queue.Queue[ServerEndpoint] = queue.Queue()
        self._fingerprint: dict | None = None
        self._stop = threading.Event()  # set by cancel(): every wait ends, every request in flight is cut
        self._in_flight: set[http.client.HTTPConnection] = set()
        self._in_flight_lock = threading.Lock()
        self._probe_lock = threading.Lock()  # one thread probes unreachable servers, the others wait for its verdict
        self._unreachable: ServersUnreachable | None = None  # once every server stayed unreachable: for good

    @classmethod
    def from_spec(cls, spec: str, seed: int = 0, wait_for_servers_s: float = 0.0) -> RemoteMeasurer:
        """As `--measure remote://HOST:PORT[,...]` makes it (explorer.measure.make_measurer); no seed: real hardware."""
        return cls(spec, wait_for_servers_s=wait_for_servers_s)

    @property
    def parallelism(self) -> int:
        """Plans measured at once: one per server."""
        return len(self.endpoints)

    # ---- identity -----------------------------------------------------------------------------
    def _connect(self) -> dict:
        """Ask every server for its fingerprint (once); they must be one kind of device."""
        with self._lock:
            if self._fingerprint is not None:
                return self._fingerprint
            reached = []
            for endpoint in self.endpoints:
                try:
                    endpoint.info = self._request(endpoint, "GET", INFO_PATH, timeout_s=10.0) or {}
                    reached.append(endpoint)
                except ServerError as error:
                    log.warning("measurement server %s is not reachable now (%s); it will be tried again later",
                                endpoint.address, error)
                    self._failed(endpoint, error)
            if not reached:
                raise ExplorerError(f"no measurement server of {self.spec} answered: start them with `explorer serve` "
                                    f"(and the same {TOKEN_ENV}) or check the addresses")
            protocols = {e.info["fingerprint"].get("protocol") for e in reached}
            if protocols != {PROTOCOL_VERSION}:
                raise ExplorerError(f"server protocol {', '.join(map(str, protocols))} differs from this client's "
                                    f"{PROTOCOL_VERSION}: install the same explorer version on both sides")
            kinds = {device_kind(e.info["fingerprint"]): e.address for e in reached}
            if len(kinds) > 1:
                raise ExplorerError("the measurement servers are different kinds of device: "
                                    + "; ".join(f"{a}: {k}" for k, a in kinds.items()) + ": measure one board kind per search")
            if self.adaptive is not None:
                _require(reached, ADAPTIVE_FEATURE, "adaptive repeats")
            for endpoint in self.endpoints:
                self._free.put(endpoint)
            self._fingerprint = reached[0].info["fingerprint"]
            return self._fingerprint

    def device(self, board: Board) -> Device:
        fp = self._connect()
        return Device(f"{fp.get('cpu_model')} x{fp.get('cpu_count')} ({fp.get('machine')}), "
                      f"{'+'.join(fp.get('providers', []))}", str(fp.get("onnxruntime")))

    def identity(self, board: Board) -> str:
        fp = self._connect()
        fixed = f"{digest(device_kind(fp))}:w{self.warmup}:r{self.repeats}:b{self.batch}"
        return f"remote-v4:{fixed}:{self.adaptive.identity()}" if self.adaptive else f"remote-v2:{fixed}"

    def int8_exact(self) -> bool:
        """From the servers' fingerprint; a server too old to say counts as not exact (7-bit weights)."""
        return bool(self._connect().get("int8_exact", False))

    def label(self, board: Board, how: str | None = None) -> str:
        fp = self._connect()
        how = how or (self.adaptive.describe() if self.adaptive else f"median of {self.repeats}")
        return (f"remote ({fp['cpu_model']}, ONNX Runtime {fp['onnxruntime']} via explorer serve at "
                f"{', '.join(e.address for e in self.endpoints)}; {how})")

    # ---- measuring ----------------------------------------------------------------------------
    def measure(self, graph, compressor, board, plan, calibration_inputs=None) -> Measurement:
        """Measure one plan on the next free server (retried elsewhere when a server fails)."""
        blocks, chain, models = self._chain(graph, compressor, board, plan, calibration_inputs)
        request = {**chain, "warmup": self.warmup, "repeats": self.repeats, "seed": 0,
                   "energy_providers": board_providers(board)}
        if self.adaptive is not None:
            request["adaptive"] = self.adaptive.to_json()
        answer, endpoint = self._on_a_server(MEASURE_PATH, models, request, "the plan")
        return measurement_from_times(BlockTimes.from_json(answer["times"]), blocks, compressor, board, plan,
                                      self.label(board), f"server {endpoint.address}", self.adaptive)

    def measure_interleaved(self, graph, compressor, board, plans, calibration_inputs=None, repeats: int = 5,
                            adaptive: AdaptiveRepeats = SEARCH_REPEATS) -> list[Interleaved]:
        """Measure the plans interleaved on one server, in one request (another server takes the whole run over
        when one fails: rounds measured on two devices would not pair)."""
        self._connect()
        _require([e for e in self.endpoints if e.info], INTERLEAVED_FEATURE, "interleaved measurement")
        built = [self._chain(graph, compressor, board, plan, calibration_inputs) for plan in plans]
        models = {sha: data for _, _, chain_models in built for sha, data in chain_models.items()}
        request = {"chains": [chain for _, chain, _ in built], "warmup": self.warmup, "repeats": repeats, "seed": 0,
                   "energy_providers": board_providers(board), "adaptive": adaptive.to_json()}
        answer, endpoint = self._on_a_server(MEASURE_INTERLEAVED_PATH, models, request, "the plans")
        return interleaved_from_times([BlockTimes.from_json(t) for t in answer["times"]], [b for b, _, _ in built],
                                      compressor, board, plans, self.label(board, f"interleaved: {adaptive.describe()}"),
                                      f"server {endpoint.address}", adaptive)

    def _chain(self, graph, compressor, board, plan, calibration_inputs) -> tuple[list, dict, dict[str, bytes]]:
        """The plan's unit blocks, the request's description of its chain, and the models by SHA-256."""
        fp = self._connect()
        missing = sorted({board.processor(d.processor).provider for _, d in plan.decisions} - set(fp["providers"]))
        if missing:
            raise ExplorerError(f"the measurement servers lack {', '.join(missing)}, which {board.name}'s processors in this "
                                "plan need: measure a board whose providers the servers have (see the server's start line)")
        blocks, specs, inputs = block_specs(graph, compressor, board, plan, calibration_inputs, self.batch)
        shas = [hashlib.sha256(spec.model).hexdigest() for spec in specs]
        chain = {"blocks": [{"model": sha, "threads": s.threads, "provider": s.provider} for sha, s in zip(shas, specs)],
                 "inputs": {name: {"shape": list(value.shape), "dtype": str(value.dtype)} for name, value in inputs.items()}}
        return blocks, chain, {sha: spec.model for sha, spec in zip(shas, specs)}

    def _on_a_server(self, path: str, models: dict[str, bytes], request: dict, what: str) -> tuple[dict, ServerEndpoint]:
        """The answer of the next free server to the request, within `timeout_s` (retried elsewhere when a server
        fails; a busy server's Retry-After is waited out, not counted as a failure)."""
        deadline = time.monotonic() + self.timeout_s
        errors: list[str] = []
        while len(errors) < self.tries:
            endpoint = self._take(deadline)
            try:
                return self._measure_on(endpoint, models, request, path, deadline), endpoint
            except ServerError as error:
                if error.busy_s is not None:  # busy: it asks to be tried again then (another server may be free first)
                    endpoint.resting_until = time.monotonic() + min(error.busy_s, self.rest_s)
                    if time.monotonic() + min(error.busy_s, self.rest_s) >= deadline:
                        errors.append(f"{endpoint.address}: {error}")
                        break
                    continue
                errors.append(f"{endpoint.address}: {error}")
                if not error.retry:
                    raise MeasurementFailed(f"the measurement server rejected {what}: {error}") from None
                self._failed(endpoint, error)  # down, broken or too slow: another one tries
            finally:
                self._free.put(endpoint)
        raise MeasurementFailed(f"no measurement server could measure {what} after {len(errors)} tries: "
                                + "; ".join(errors))

    def _failed(self, endpoint: ServerEndpoint, error: ServerError) -> None:
        """Set a server aside after a failure (and note since when it cannot be reached, if it cannot)."""
        endpoint.resting_until = time.monotonic() + self.rest_s
        if error.broken and not self._stop.is_set():  # gone, or only slow? a connection says at once
            try:
                socket.create_connection((endpoint.host, endpoint.port), timeout=self.connect_timeout_s).close()
            except OSError as refused:
                error = ServerError(f"{error}; then cannot connect: {type(refused).__name__}: {refused}", unreachable=True)
        if error.unreachable:
            endpoint.down_since = endpoint.down_since or time.monotonic()
            endpoint.down_why = str(error)

    def cancel(self) -> None:
        """End every wait and cut every request in flight (Ctrl-C): measurements raise MeasurementFailed from now on,
        within a fraction of a second, so that threads measuring for the search do not keep it alive."""
        self._stop.set()
        with self._in_flight_lock:
            for connection in list(self._in_flight):
                if connection.sock is not None:
                    try:
                        connection.sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _check_stop(self) -> None:
        if self._stop.is_set():
            raise MeasurementFailed("measurement cancelled (interrupted)")

    def measure_many(self, graph, compressor, board, plans, calibration_inputs=None) -> list[Measurement | MeasurementFailed]:
        """Measure plans in parallel, one per server at a time; a plan that fails gives its MeasurementFailed."""
        return self._in_parallel(lambda plan: self.measure(graph, compressor, board, plan, calibration_inputs), plans)

    def measure_interleaved_many(self, graph, compressor, board, groups, calibration_inputs=None, repeats: int = 5,
                                 adaptive: AdaptiveRepeats = SEARCH_REPEATS) -> list[list[Interleaved] | MeasurementFailed]:
        """Interleaved runs in parallel, each group on one server; a group that fails gives its MeasurementFailed."""
        return self._in_parallel(lambda group: self.measure_interleaved(graph, compressor, board, group,
                                                                        calibration_inputs, repeats, adaptive), groups)

    def _in_parallel(self, measure: Callable[[T], R], items: list[T]) -> list[R | MeasurementFailed]:
        """`measure` of every item, as many at once as there are servers, in order (MeasurementFailed kept)."""
        self._connect()
        pool = ThreadPoolExecutor(max_workers=max(1, min(len(items), self.parallelism)))
        try:
            return list(pool.map(failures_kept(measure), items))
        except KeyboardInterrupt:  # the other waits end now, not at their deadlines
            self.cancel()
            raise
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _take(self, deadline: float) -> ServerEndpoint:
        """The next free server that is not resting (waiting for one until `deadline`); when every server is
        unreachable, they are probed again (see :meth:`_await_reachable`)."""
        held: list[ServerEndpoint] = []  # free but resting
        try:
            while True:
                self._check_stop()
                now = time.monotonic()
                ready = sorted((e for e in held if e.resting_until <= now), key=lambda e: e.down_since is not None)
                if ready:
                    held.remove(ready[0])
                    return ready[0]
                if all(e.down_since is not None for e in self.endpoints):
                    self._await_reachable()
                    continue
                if now >= deadline:
                    raise MeasurementFailed(f"no measurement server became free within {self.timeout_s:g} s")
                wake = min([e.resting_until for e in held] + [deadline, now + 0.25])  # short slices: cancel() is seen
                try:
                    held.append(self._free.get(timeout=max(0.01, wake - now)))
                except queue.Empty:
                    pass
        finally:
            for endpoint in held:
                self._free.put(endpoint)

    def _await_reachable(self) -> None:
        """Every server is unreachable: probe them all until one answers, for `wait_for_servers_s` after the last
        went down (a countdown on the log), then ServersUnreachable, for good (every later measurement raises it)."""
        with self._probe_lock:
            if self._unreachable is not None:
                raise self._unreachable
            give_up = max(e.down_since or 0.0 for e in self.endpoints) + self.wait_for_servers_s
            said = 0.0
            while all(e.down_since is not None for e in self.endpoints):
                for endpoint in self.endpoints:
                    self._check_stop()
                    try:
                        endpoint.info = self._request(endpoint, "GET", INFO_PATH, timeout_s=self.connect_timeout_s) or {}
                    except ServerError as error:
                        endpoint.down_why = str(error)
                        continue
                    endpoint.down_since, endpoint.resting_until = None, 0.0  # it answers again
                    log.warning("measurement server %s answers again", endpoint.address)
                    return
                now = time.monotonic()
                if now >= give_up:
                    why = "; ".join(f"{e.address}: {e.down_why}" for e in self.endpoints)
                    self._unreachable = ServersUnreachable(
                        f"no measurement server of {self.spec} can be reached ({why})"
                        + (f" after waiting {self.wait_for_servers_s:g} s" if self.wait_for_servers_s else "")
                        + ": start them again (`explorer serve`), or give --wait-for-servers SECONDS to wait for them")
                    raise self._unreachable
                if now - said >= 5.0:
                    log.warning("no measurement server of %s can be reached: probing again, giving up in %.0f s "
                                "(--wait-for-servers %g)", self.spec, give_up - now, self.wait_for_servers_s)
                    said = now
                self._stop.wait(min(1.0, give_up - now))

    def _measure_on(self, endpoint: ServerEndpoint, models: dict[str, bytes], request: dict,
                    path: str = MEASURE_PATH, deadline: float | None = None) -> dict:
        """Upload what the server lacks, then measure (uploading again if the server dropped a model meanwhile)."""
        limit = endpoint.info.get("max_upload_bytes") if endpoint.info else None
        for data in models.values():
            if limit is not None and len(data) > limit:
                raise ServerError(f"a block is {len(data)} bytes, over the server's upload limit of {limit} "
                                  "(restart it with a larger --max-upload-mb)", retry=False)
        for attempt in range(2):
            for sha, data in models.items():
                if self._request(endpoint, "HEAD", model_path(sha), ok=(200, 404), timeout_s=30.0, deadline=deadline) is None:
                    self._request(endpoint, "PUT", model_path(sha), body=data, content_type="application/octet-stream",
                                  deadline=deadline)
            try:
                answer = self._request(endpoint, "POST", path, body=json.dumps(request).encode(), deadline=deadline) or {}
                if device_kind(answer["fingerprint"]) != device_kind(self._fingerprint or {}):  # e.g. it was down at start
                    raise ServerError(f"it is another kind of device ({device_kind(answer['fingerprint'])})")
                return answer
            except ServerError as error:
                if MODEL_MISSING not in str(error) or attempt:
                    raise
        raise AssertionError("unreachable")

    def _request(self, endpoint: ServerEndpoint, method: str, path: str, body: bytes | None = None,
                 content_type: str = "application/json", ok: tuple[int, ...] = (200, 201),
                 timeout_s: float | None = None, deadline: float | None = None) -> dict | None:
        """One HTTP request, connected within `connect_timeout_s` and answered within `timeout_s` (default the
        measurer's) and before `deadline`; the JSON answer (None for a 404 that `ok` allows). ServerError
        otherwise (a 503 with Retry-After: busy)."""
        self._check_stop()
        timeout = timeout_s or self.timeout_s
        if deadline is not None:
            timeout = min(timeout, deadline - time.monotonic())
            if timeout <= 0:
                raise ServerError(f"no answer within the measurement's {self.timeout_s:g} s")
        connection = http.client.HTTPConnection(endpoint.host, endpoint.port, timeout=min(timeout, self.connect_timeout_s))
        headers = auth_headers(self.token) | {"Content-Type": content_type}
        with self._in_flight_lock:
            self._in_flight.add(connection)
        try:
            try:
                connection.connect()
            except OSError as error:
                raise ServerError(f"cannot connect: {type(error).__name__}: {error}", unreachable=True) from None
            connection.sock.settimeout(timeout)
            self._check_stop()
            connection.request(method, path, body=body, headers=headers)
            response = connection.getresponse()
            payload = response.read()
        except (OSError, http.client.HTTPException) as error:
            self._check_stop()
            raise ServerError(f"{type(error).__name__}: {error}", broken=True) from None
        finally:
            with self._in_flight_lock:
                self._in_flight.discard(connection)
            connection.close()
        endpoint.down_since = None  # it answered
        if response.status == 404 and 404 in ok:
            return None
        if response.status in ok:
            return json.loads(payload) if payload else {}
        try:
            message = json.loads(payload)["error"]
        except (ValueError, KeyError, TypeError):
            message = payload[:200].decode(errors="replace")
        if response.status == 401:
            raise ExplorerError(f"measurement server {endpoint.address} refused the token: set {TOKEN_ENV} to the token "
                                "the server uses")
        busy_s = busy_seconds(response.status, response.getheader(RETRY_AFTER))
        if busy_s is not None:
            raise ServerError(f"HTTP 503: {message}", busy_s=busy_s)
        retry = response.status >= 500  # timed out, broken: another server may do; 4xx: the request is bad
        raise ServerError(f"HTTP {response.status}: {message}", retry=retry)


def _require(endpoints: list[ServerEndpoint], feature: str, what: str) -> None:
    """ExplorerError when a reached server predates `feature` (it would ignore what the request asks)."""
    old = [e.address for e in endpoints if feature not in e.info.get("features", [])]
    if old:
        raise ExplorerError(f"measurement server {', '.join(old)} is an older `explorer serve` without {what}: install "
                            "this explorer version there and restart it")


# The names from before the measurement server was called a server: they work, with a DeprecationWarning, for one
# release more, then they go.
__getattr__ = deprecated_names(__name__, {"AgentError": "ServerError", "AgentEndpoint": "ServerEndpoint"}, globals())
