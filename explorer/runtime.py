"""Run an exported bundle (see :mod:`explorer.export`) with ONNX Runtime.

:meth:`Bundle.load` reads ``plan.json``, checks its schema and its own digest, refuses file names that point outside
the bundle, verifies the SHA-256 of every file, and opens one ONNX Runtime session per unit block
with the execution provider the board maps the block's processor to (its provider options and
intra-op threads, on top of :func:`explorer.sessions.session_options`: ONNX Runtime's defaults,
under which int8 QDQ nodes run on integer kernels exactly as they were scored). A provider this ONNX
Runtime lacks falls back to the CPU with a :class:`ProviderFallbackWarning`, or raises with
``strict=True``. :meth:`Bundle.run` chains the blocks (:func:`explorer.sessions.run_chain`): each gets
the tensors it needs from the input and the blocks before it.

A bundle with a plan set runs one plan at a time: :meth:`Bundle.select` / :meth:`Bundle.adapt` pick the plan
for conditions (:mod:`explorer.adapt`), ``adapt="auto"`` switches by itself with hysteresis, and with
``remote=URL`` the remote blocks run on an `explorer serve` agent (:mod:`explorer.offload`), an inference
whose remote call fails finishing on a plan that needs no network. docs/runtime.md tells the whole story.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, overload

import numpy as np
import onnxruntime as ort

from explorer.cache import atomic_write
from explorer.errors import ExplorerError
from explorer.export import BUNDLE_FORMAT, BUNDLE_SCHEMA_VERSION, MANIFEST_FILE, READABLE_SCHEMA_VERSIONS, manifest_digest
from explorer.sessions import (
    CPU_PROVIDER,
    ChainStep,
    ProviderMissing,
    ProviderNotStarted,
    SessionError,
    open_session,
    run_chain,
    run_in_batches,
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20
_EXPORT_AGAIN = "the bundle was modified; export it again"
log = logging.getLogger(__name__)
REMOTE_TIMEOUT_S = 2.0  # a remote block call longer than this finishes on a local plan
PROBE_EVERY_S = 1.0  # how often a down link is probed
RTT_TOLERANCE = 1.5  # a measured round trip beyond this multiple of the plan's assumption: the link is down for it


class ProviderFallbackWarning(RuntimeWarning):
    """A block runs on the CPU because ONNX Runtime here lacks the provider its processor maps to."""


@dataclass
class BlockSession:
    """One unit block of a loaded bundle and the ONNX Runtime session that runs it."""

    index: int
    file: str
    processor: str
    provider: str  # the provider the board maps the processor to
    runs_on: str  # the provider ONNX Runtime actually runs it on
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    session: ort.InferenceSession


@dataclass(frozen=True)
class Switch:
    """One change of the bundle's current plan: why, and what it cost."""

    before: str | None  # plan id (None: the first plan opened at load)
    after: str
    reason: str
    seconds: float  # wall time of the switch: opening the new plan's sessions, closing the unused ones
    opened: int  # sessions opened for the new plan
    kept: int  # sessions of blocks the plans share, kept open
    closed: int  # sessions no longer needed, released
    inference: int  # inferences run before the switch


class Bundle:
    """A verified bundle with open sessions for its current plan: load once, run many inputs.

    A bundle with a plan set (``explorer export --plans``) runs one plan at a time: :meth:`select` and
    :meth:`adapt` pick the plan for given conditions and switch to it, keeping the sessions of the blocks
    both plans share; with ``adapt="auto"`` the bundle checks the conditions itself before every inference
    (memory the OS has available, the per-call latency budget, the network) and switches with hysteresis
    (:class:`explorer.adapt.Hysteresis`). Every switch is logged (logger ``explorer.runtime``) and kept in
    :attr:`switches` with its reason and cost.
    """

    def __init__(self, path: Path, manifest: dict[str, Any], strict: bool = False, adapt: str | None = None,
                 latency_ms: float | None = None, network=None, memory_probe: Callable[[], float | None] | None = None,
                 remote: str | None = None, token: str | None = None, remote_timeout_s: float = REMOTE_TIMEOUT_S,
                 throttle=None, probe_every_s: float = PROBE_EVERY_S, fall_back: bool = True):
        from explorer.adapt import Conditions, Hysteresis, available_memory_mb

        if adapt not in (None, "off", "auto"):
            raise ExplorerError(f"adapt={adapt!r}: use 'auto' (switch plans as conditions change) or None")
        self.path = path
        self.manifest = manifest
        self.strict = strict
        self.auto = adapt == "auto"
        self.plans: list[dict[str, Any]] = manifest["plans"]
        self.objective: dict | None = manifest.get("objective")
        self.fallbacks: list[str] = []  # one message per block session that fell back to the CPU
        self.switches: list[Switch] = []
        self.warnings: list[str] = list(manifest.get("_notes", []))  # what the bundle could not check
        self.inferences = 0
        self.last_plan: str | None = None  # the plan that answered the latest inference
        model = manifest["model"]
        self.input_name: str = model["input"]["name"]
        self.input_shape: list = model["input"]["shape"]  # symbolic dimensions as strings
        self.input_dtype = np.dtype(model["input"]["dtype"])
        self.inputs: list[dict[str, Any]] = model.get("inputs") or [model["input"]]  # every input: name, shape, dtype
        self.output_names: list[str] = model["outputs"]
        self.conditions = Conditions(latency_ms=latency_ms, network=network)  # what `adapt="auto"` starts from
        self._memory_probe = memory_probe or (lambda: self._os_memory_mb(available_memory_mb()))
        self._hysteresis = Hysteresis()
        self._sessions: dict[tuple, tuple[ort.InferenceSession, str]] = {}
        self.current: dict[str, Any] = {}  # the plan the sessions are open for ({} until load opens one)
        self.blocks: list[BlockSession] = []
        self._free_after: list[list[str]] = []
        self.client = None  # explorer.offload.OffloadClient: remote blocks run on that agent
        if remote is not None:
            from explorer.http_api import TOKEN_ENV, token_from_environment
            from explorer.offload import OffloadClient

            token = token or token_from_environment()
            if not token:
                raise ExplorerError(f"remote {remote}: give the server's token (token=... or ${TOKEN_ENV})")
            self.client = OffloadClient(remote, token, remote_timeout_s, throttle)
        self.link_down: str | None = None  # why the link is taken as down (None: up), until a probe answers
        self.fallbacks_to_local = 0  # inferences finished on a local plan after a remote block failed
        self._probe_every_s = probe_every_s
        self._fall_back_on_failure = fall_back
        self._last_probe = 0.0
        self._return_to: str | None = None  # without adapt="auto": the plan to go back to when the link recovers

    @classmethod
    def load(cls, path: Path | str, strict: bool = False, adapt: str | None = None, plan: str | None = None,
             latency_ms: float | None = None, network=None,
             memory_probe: Callable[[], float | None] | None = None, remote: str | None = None,
             token: str | None = None, remote_timeout_s: float = REMOTE_TIMEOUT_S, throttle=None,
             probe_every_s: float = PROBE_EVERY_S, fall_back: bool = True) -> Bundle:
        """Read, validate and verify the bundle in folder `path` and open the sessions of one plan.

        `strict`: raise instead of falling back to the CPU when a block's provider is missing. `plan`: the id
        of the plan to start with (default: the best, p0). `adapt="auto"`: switch plans by themselves before
        each inference, within `latency_ms` (or the budget passed to :meth:`run`), the megabytes of weights
        `memory_probe()` says the bundle may use (default: what the OS has available plus what the current
        plan's weights hold) and `network` (None: as the search assumed, 'off', 'RTT,MBPS').
        `remote`: the `explorer serve` server (http://HOST:PORT, its token in `token` or $EXPLORER_SERVER_TOKEN) that
        runs the remote blocks (without it they run on the local CPU, with a warning); a call that fails or
        takes longer than `remote_timeout_s` finishes the inference on a plan that needs no network, and the
        agent is probed every `probe_every_s` until it answers again. `throttle`: an explorer.adapt.Link every
        remote call is delayed to (a simulated slower link, for benchmarks on loopback). `fall_back=False`
        pins the plan (a static baseline): a failed remote call is an ExplorerError, the link is not watched.
        """
        root = Path(path).expanduser()
        manifest = _read_manifest(root)
        users: dict[str, list[str]] = {}
        for entry in manifest["plans"]:
            for block in entry["blocks"]:
                users.setdefault(block["file"], []).append(entry["id"])
        for name, expected in manifest["files"].items():  # every file, before any session: a changed one is refused
            if _file_sha256(_bundle_file(root, name)) != expected:
                used_by = f" (a block of plan{'s' if len(users.get(name, [])) > 1 else ''} {', '.join(users[name])})" \
                    if name in users else ""
                raise ExplorerError(f"{name}{used_by} does not match its checksum in plan.json: {_EXPORT_AGAIN}")
        bundle = cls(root, manifest, strict, adapt, latency_ms, network, memory_probe, remote, token, remote_timeout_s,
                     throttle, probe_every_s, fall_back)
        first = plan or manifest["plans"][0]["id"]
        bundle._switch_to(bundle._plan(first), "the bundle's best plan" if plan is None else "asked for at load")
        return bundle

    # ---- plans -----------------------------------------------------------------------------------
    @property
    def plan_ids(self) -> list[str]:
        return [entry["id"] for entry in self.plans]

    def _plan(self, plan_id: str) -> dict[str, Any]:
        for entry in self.plans:
            if entry["id"] == plan_id:
                return entry
        raise ExplorerError(f"the bundle has no plan {plan_id!r}: it has {', '.join(self.plan_ids)}")

    def select(self, latency_ms: float | None = None, memory_mb: float | None = None, network=None):
        """Switch to the plan with the lowest objective (least energy by default) that meets the conditions;
        returns the :class:`explorer.adapt.Selection` (which plan and why). ExplorerError naming the closest
        plan and what it needs when none meets them."""
        from explorer.adapt import Conditions

        return self._select(Conditions(latency_ms, memory_mb, network))

    def adapt(self, conditions) -> Switch | None:
        """Switch to the plan for `conditions` (an :class:`explorer.adapt.Conditions`) at once; the Switch made,
        or None when the current plan is already the one."""
        before = len(self.switches)
        self._select(conditions)
        return self.switches[-1] if len(self.switches) > before else None

    def use(self, plan_id: str, reason: str = "asked for by name") -> None:
        """Switch to the plan `plan_id` (e.g. 'p2'), whatever the conditions."""
        entry = self._plan(plan_id)
        if entry is not self.current:
            self._switch_to(entry, reason)

    def _os_memory_mb(self, available: float | None) -> float | None:
        """The memory the bundle may use: what the OS has available plus the current plan's weights (freed by a switch)."""
        held = (self.current.get("needs") or {}).get("memory_mb") or 0.0 if self.current else 0.0
        return None if available is None else available + held

    def _select(self, conditions):
        from explorer.adapt import choose

        selection = choose(self.plans, conditions, self.objective)
        if selection.plan_id != self.current["id"]:
            self._switch_to(self._plan(selection.plan_id), selection.reason)
        return selection

    def watch(self, latency_ms: float | None = None) -> Switch | None:
        """What `adapt="auto"` does before an inference: read the conditions now (the memory probe; the latency
        budget of this call or the bundle's; the network) and switch with hysteresis. No plan meeting them:
        warn (once per message) and keep the current plan, so that the inference still runs."""
        from explorer.adapt import Conditions

        memory = self._memory_probe()
        budget = latency_ms if latency_ms is not None else self.conditions.latency_ms
        conditions = Conditions(budget, memory, self._network_now())
        try:
            selection = self._hysteresis.decide(self.plans, self.current["id"], conditions, self.objective)
        except ExplorerError as error:
            message = f"keeping {self.current['id']}: {error}"
            if not self.warnings or self.warnings[-1] != message:
                self.warnings.append(message)
                log.warning(message)
            return None
        if selection is None:
            return None
        self._switch_to(self._plan(selection.plan_id), selection.reason)
        return self.switches[-1]

    def _network_now(self):
        """The network as the bundle knows it: off while the link is down, else what the recent remote calls
        measured, else what was given."""
        from explorer.adapt import NETWORK_OFF

        if self.link_down is not None:
            return NETWORK_OFF
        return self._measured_link() or self.conditions.network

    def _switch_to(self, entry: dict[str, Any], reason: str) -> None:
        """Make `entry` the current plan: open the sessions it lacks, keep the shared ones, release the rest."""
        started = time.perf_counter()
        keys = [_session_key(block) for block in entry["blocks"]]
        kept = sum(key in self._sessions for key in keys)
        opened = 0
        blocks = []
        for block, key in zip(entry["blocks"], keys):
            if self.client is not None and block.get("remote"):  # the agent runs it: no session here
                blocks.append(BlockSession(block["index"], block["file"], block["processor"], block["provider"],
                                           f"remote {self.client.url}", tuple(block["inputs"]), tuple(block["outputs"]),
                                           None))
                continue
            if key not in self._sessions:
                data = _bundle_file(self.path, block["file"]).read_bytes()
                # hashed again from the bytes the session reads: a block changed since load is refused too
                _check_sha256(block["file"], hashlib.sha256(data).hexdigest(), self.manifest["files"][block["file"]])
                self._sessions[key] = _open_session(block, data, self.strict, self.fallbacks)
                opened += 1
                del data
            session, runs_on = self._sessions[key]
            blocks.append(BlockSession(block["index"], block["file"], block["processor"], block["provider"], runs_on,
                                       tuple(block["inputs"]), tuple(block["outputs"]), session))
            _check_block_io(blocks[-1])
        unused = [key for key in self._sessions if key not in set(keys)]
        for key in unused:  # the memory goes back before the next inference
            del self._sessions[key]
        before = self.current["id"] if self.current else None
        self.current, self.blocks = entry, blocks
        last_use: dict[str, int] = {}
        for block in blocks:
            for name in block.inputs:
                last_use[name] = block.index
        self._free_after = [[n for n, i in last_use.items() if i == block.index and n not in self.output_names]
                            for block in blocks]
        switch = Switch(before, entry["id"], reason, time.perf_counter() - started, opened, kept, len(unused),
                        self.inferences)
        self.switches.append(switch)
        if before is not None:
            log.info("switched plan %s -> %s in %.1f ms (%d sessions opened, %d kept, %d closed): %s", before, entry["id"],
                     1e3 * switch.seconds, switch.opened, switch.kept, switch.closed, reason)

    @property
    def providers(self) -> list[str]:
        """The provider each block of the current plan actually runs on, in block order."""
        return [block.runs_on for block in self.blocks]

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model requires, or None when its batch dimension is dynamic."""
        batch = self.input_shape[0] if self.input_shape else None
        return batch if isinstance(batch, int) and batch > 0 else None

    @property
    def input_names(self) -> list[str]:
        return [entry["name"] for entry in self.inputs]

    @overload
    def run(self, x: np.ndarray | Mapping[str, np.ndarray], timing: Literal[False] = False,
            latency_ms: float | None = None) -> np.ndarray: ...

    @overload
    def run(self, x: np.ndarray | Mapping[str, np.ndarray], timing: Literal[True],
            latency_ms: float | None = None) -> tuple[np.ndarray, list[float]]: ...

    def run(self, x: np.ndarray | Mapping[str, np.ndarray], timing: bool = False,
            latency_ms: float | None = None) -> np.ndarray | tuple[np.ndarray, list[float]]:
        """The model's first output for the batch `x` (a model with several inputs: input name -> batch) on the
        current plan; with `timing`, also each block's milliseconds. `latency_ms`: this call's latency budget
        (with `adapt="auto"`)."""
        outputs, block_ms = self.run_all(x, timing=True, latency_ms=latency_ms)
        first = outputs[self.output_names[0]]
        return (first, block_ms) if timing else first

    @overload
    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray], timing: Literal[False] = False,
                latency_ms: float | None = None) -> dict[str, np.ndarray]: ...

    @overload
    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray], timing: Literal[True],
                latency_ms: float | None = None) -> tuple[dict[str, np.ndarray], list[float]]: ...

    def run_all(self, x: np.ndarray | Mapping[str, np.ndarray], timing: bool = False, latency_ms: float | None = None
                ) -> dict[str, np.ndarray] | tuple[dict[str, np.ndarray], list[float]]:
        """Every model output by name for the batch `x` (a model with several inputs: input name -> batch);
        with `timing`, also each block's milliseconds.

        A model with a fixed batch size runs `x` in chunks of that size (the last chunk padded).
        """
        from explorer.offload import OffloadFailed

        feeds = self._checked_inputs(x)
        if self.client is not None and not self._fall_back_on_failure:
            try:
                outputs, block_ms = self._run_all(feeds)
            except OffloadFailed as error:
                raise ExplorerError(f"remote block failed and the plan is pinned (fall_back=False): {error}") from None
            return (outputs, block_ms) if timing else outputs
        if self.client is not None:
            self._probe_link()
        if self.auto:
            self.watch(latency_ms)
        try:
            outputs, block_ms = self._run_all(feeds)
        except OffloadFailed as error:  # the same inference, finished on a plan that needs no network
            self._fall_back(f"remote block failed: {error}")
            self.fallbacks_to_local += 1
            outputs, block_ms = self._run_all(feeds)
        return (outputs, block_ms) if timing else outputs

    def _run_all(self, feeds: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[float]]:
        """Every output by name and each block's milliseconds, on the current plan."""
        self.last_plan = self.current["id"]  # the plan that answers this inference (a switch after it does not change it)
        block_ms = [0.0] * len(self.blocks)

        def run(chunk: dict[str, np.ndarray]) -> list[np.ndarray]:
            values = self._chain(chunk, block_ms)
            return [values[name] for name in self.output_names]

        step = self.fixed_batch or len(next(iter(feeds.values())))  # a fixed batch in chunks, the last one padded
        outputs = dict(zip(self.output_names, run_in_batches(run, feeds, step, pad=True)))
        self.inferences += 1
        self._check_link()
        return outputs, block_ms

    # ---- the network link to the agent -----------------------------------------------------------
    def _network_needs(self) -> dict | None:
        return (self.current.get("needs") or {}).get("network")

    def _check_link(self) -> None:
        """After an inference with remote blocks: a measured round trip beyond what the plan assumed (by
        RTT_TOLERANCE) takes the link as down for this plan: the next inferences run on a local plan."""
        needs = self._network_needs()
        if (self.client is None or needs is None or not self._fall_back_on_failure
                or not any(b.session is None for b in self.blocks)):
            return
        link = self._measured_link()
        if link is not None and link.rtt_ms > RTT_TOLERANCE * needs["rtt_ms"]:
            self._fall_back(f"measured round trip {link.rtt_ms:.1f} ms > {RTT_TOLERANCE:g} x the {needs['rtt_ms']:g} ms "
                            f"plan {self.current['id']} assumed")

    def _assumed_network(self) -> dict | None:
        """The network the bundle's remote plans assumed (the first one's), None when no plan needs one."""
        return next(((p.get("needs") or {}).get("network") for p in self.plans if (p.get("needs") or {}).get("network")),
                    None)

    def _measured_link(self):
        """The link as the agent's recent calls and probes measured it (explorer.adapt.Link; a bandwidth not yet
        measured is the one the plans assumed), None before any."""
        from explorer.adapt import Link

        measured = self.client.link() if self.client is not None else None
        assumed = self._assumed_network()
        if measured is None or assumed is None:
            return None
        rtt, bandwidth = measured
        return Link(round(rtt, 3), round(bandwidth if bandwidth is not None else assumed["bandwidth_mbit_s"], 3))

    def _fall_back(self, reason: str) -> None:
        """Take the link as down and switch to the best plan that needs no network."""
        from explorer.adapt import Conditions, choose

        self.link_down = reason
        self._last_probe = time.monotonic()
        if self._network_needs() is None:
            return
        if not self.auto and self._return_to is None:
            self._return_to = self.current["id"]
        local = choose(self.plans, Conditions(network="off"), self.objective)  # ExplorerError if no local plan
        self._switch_to(self._plan(local.plan_id), f"{reason}; {local.reason}")

    def _probe_link(self) -> None:
        """While the link is down, ask the agent (GET /info) every probe_every_s; when it answers within the
        round trip the plans assumed, the link is up again (adapt="auto": the hysteresis moves back; otherwise
        the plan used before the fall-back comes back at once)."""
        from explorer.offload import OffloadFailed

        client = self.client
        if client is None or time.monotonic() - self._last_probe < self._probe_every_s:
            return
        local_now = not any(b.session is None for b in self.blocks)
        if self.link_down is None and not (self.auto and local_now and self._assumed_network() is not None):
            return  # the link is up and its calls measure it (a local plan under adapt="auto" probes to know it)
        self._last_probe = time.monotonic()
        assumed = min((p["needs"]["network"]["rtt_ms"] for p in self.plans if (p.get("needs") or {}).get("network")),
                      default=None)
        try:
            rtt = client.ping(timeout_s=min(client.timeout_s, 1.0))
        except OffloadFailed as error:
            self.link_down = self.link_down or f"the agent did not answer a probe: {error}"
            return
        if self.link_down is None or (assumed is not None and rtt > RTT_TOLERANCE * assumed):
            return
        log.info("the link to %s is back (round trip %.1f ms)", client.url, rtt)
        self.link_down = None
        if self._return_to is not None:
            back, self._return_to = self._return_to, None
            self._switch_to(self._plan(back), f"the link to {client.url} is back (round trip {rtt:.1f} ms)")

    def _chain(self, inputs: dict[str, np.ndarray], block_ms: list[float]) -> dict[str, np.ndarray]:
        """Run the blocks in order on one batch, adding each block's wall time to `block_ms`; each tensor is
        dropped after its last use."""
        steps = [ChainStep(block.inputs, block.outputs, functools.partial(self._run_block, block, block_ms))
                 for block in self.blocks]
        return run_chain(steps, inputs, forget=self._free_after)

    def _run_block(self, block: BlockSession, block_ms: list[float], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One block's outputs (in block.outputs' order), locally or on the agent; its wall time added to `block_ms`."""
        start = time.perf_counter()
        if block.session is not None:
            results = block.session.run(list(block.outputs), feeds)
        elif self.client is None:  # remote blocks have no session only when a client runs them (_switch_to)
            raise ExplorerError(f"block {block.index} has no session and no server to run it: load the bundle again")
        else:  # a remote block: the agent runs it (OffloadFailed when it cannot)
            sha = self.manifest["files"][block.file]
            answer = self.client.run(sha, lambda: _bundle_file(self.path, block.file).read_bytes(), feeds,
                                     block.provider, self.current["blocks"][block.index]["threads"])
            results = [answer[name] for name in block.outputs]
        block_ms[block.index] += (time.perf_counter() - start) * 1e3
        return results

    def _checked_inputs(self, x: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Every input's batch by name, checked against its declared shape and dtype."""
        names = self.input_names
        if not isinstance(x, Mapping):
            if len(names) > 1:
                raise ExplorerError(f"the model takes {len(names)} inputs ({', '.join(names)}): give one array per input "
                                    f"by name (a .npz with arrays {', '.join(names)})")
            x = {names[0]: x}
        missing = [name for name in names if name not in x]
        if missing:
            raise ExplorerError(f"no array for the model input(s) {', '.join(missing)}: give one array per input by name "
                                f"({', '.join(names)})")
        feeds = {entry["name"]: self._checked_input(x[entry["name"]], entry) for entry in self.inputs}
        if len({len(value) for value in feeds.values()}) > 1:
            raise ExplorerError("the inputs have different numbers of samples: give every input the same samples")
        return feeds

    @staticmethod
    def _checked_input(x: np.ndarray, entry: dict[str, Any]) -> np.ndarray:
        x = np.asarray(x)
        dtype = np.dtype(entry["dtype"])
        if x.dtype != dtype:
            if not (np.issubdtype(x.dtype, np.floating) and np.issubdtype(dtype, np.floating)):
                raise ExplorerError(f"input {entry['name']!r} has dtype {x.dtype} but the model takes {dtype}: "
                                    f"convert it (x.astype('{dtype}')) after the model's preprocessing")
            x = x.astype(dtype)
        dims = entry["shape"]
        if x.ndim != len(dims) or not _fits(dims[1:], x.shape[1:]) or len(x) == 0:
            raise ExplorerError(f"input of shape {_shape_text(x.shape)} does not fit the model input "
                                f"{entry['name']!r} of shape {_shape_text(dims)} (batch first): reshape it")
        return x


def _session_key(block: dict[str, Any]) -> tuple:
    """What makes two plans' blocks one session: the same file on the same provider with the same settings, both
    local or both remote (a remote block is the server's to run, whatever runs it here meanwhile)."""
    return (block["file"], block["provider"], block["threads"], json.dumps(block["provider_options"], sort_keys=True),
            bool(block.get("remote")))


# ---- reading and checking a bundle ----------------------------------------------------------------
def _read_manifest(root: Path) -> dict[str, Any]:
    if not root.is_dir():
        raise ExplorerError(f"{root}: no such bundle folder; give a folder written by `explorer export`")
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise ExplorerError(f"{root} holds no {MANIFEST_FILE}, so it is not a bundle: give a folder written by `explorer export`")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExplorerError(f"{path} is not valid JSON ({exc}): {_EXPORT_AGAIN}") from None
    _validate_manifest(manifest, path)
    if manifest["schema_version"] == 1:  # one plan, no plan set, no digest of plan.json itself
        manifest["plans"] = [_single_plan(manifest)]
        manifest["_notes"] = [f"{path} was written before bundles had a digest of their own plan.json (schema 1): "
                              "its decisions are not verified; export it again to have them verified"]
    return manifest


def _single_plan(manifest: dict[str, Any]) -> dict[str, Any]:
    """The plan-set entry of a schema 1 bundle's one plan (its figures from what was measured, if anything)."""
    measured = manifest.get("measured") or {}
    by_processor = measured.get("memory_mb_by_processor") or {}
    remote = {b["processor"] for b in manifest["blocks"] if b.get("processor_kind") == "remote"}
    figures = ({"latency_ms": measured.get("latency_ms"), "energy_mj": measured.get("energy_mj"),
                "memory_mb": measured.get("memory_mb"), "objective": measured.get("objective"),
                "measured_by": measured.get("measured_by")} if measured else None)
    return {"id": "p0", "description": "the bundle's only plan", "roles": ["best"],
            "digest": (manifest.get("plan") or {}).get("digest"), "blocks": manifest["blocks"], "figures": figures,
            "needs": {"latency_ms": measured.get("latency_ms"),
                      "memory_mb": sum(mb for pid, mb in by_processor.items() if pid not in remote) if measured else None,
                      "network": {"remote_processors": sorted(remote), "transfers": 0, "bytes": 0, "rtt_ms": 0.0,
                                  "bandwidth_mbit_s": 1.0, "radio_power_w": 0.0} if remote else None}}


def _validate_manifest(manifest: Any, path: Path) -> None:
    """ExplorerError naming the first thing in plan.json that the runtime cannot use."""
    def fail(what: str) -> None:
        raise ExplorerError(f"{path}: {what}; {_EXPORT_AGAIN}")

    def need(table: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
        if not isinstance(table, dict) or key not in table:
            fail(f"{where}{key} is missing")
        if not isinstance(table[key], kind) or isinstance(table[key], bool) and kind is int:
            fail(f"{where}{key} has the wrong type ({type(table[key]).__name__})")
        return table[key]

    def names(table: dict, key: str, where: str) -> list[str]:
        value = need(table, key, list, where)
        if not all(isinstance(v, str) and v for v in value):
            fail(f"{where}{key} must be a list of tensor names")
        return value

    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        fail(f"not an explorer bundle manifest (format is not {BUNDLE_FORMAT!r})")
    version = need(manifest, "schema_version", int, "")
    if version > BUNDLE_SCHEMA_VERSION:
        raise ExplorerError(f"{path}: bundle schema {version} is newer than this explorer reads ({BUNDLE_SCHEMA_VERSION}): "
                            "upgrade explorer")
    if version not in READABLE_SCHEMA_VERSIONS:
        fail(f"bundle schema {version} is not supported (this explorer reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))})")
    if version >= 2:
        recorded = manifest.get("digest")
        if not isinstance(recorded, str) or not _SHA256.match(recorded):
            fail("digest (the SHA-256 of plan.json itself) is missing")
        if manifest_digest(manifest) != recorded:
            fail("plan.json does not match its own digest")
    files = need(manifest, "files", dict, "")
    for name, checksum in files.items():
        if not (isinstance(checksum, str) and _SHA256.match(checksum)):
            fail(f"files.{name} is not a SHA-256 hex digest")
    model = need(manifest, "model", dict, "")
    if need(model, "file", str, "model.") not in files:
        fail(f"model.file {model['file']!r} has no checksum in files")
    model_inputs = [need(model, "input", dict, "model.")]
    if "inputs" in model:
        model_inputs = need(model, "inputs", list, "model.")
        if not model_inputs or model_inputs[0] != model["input"]:
            fail("model.inputs must list every input, model.input first")
    for i, model_input in enumerate(model_inputs):
        where = "model.input." if i == 0 else f"model.inputs[{i}]."
        need(model_input, "name", str, where)
        shape = need(model_input, "shape", list, where)
        if not all(isinstance(d, (int, str)) for d in shape):
            fail(f"{where}shape must list dimensions (numbers or names)")
        try:
            np.dtype(need(model_input, "dtype", str, where))
        except TypeError:
            fail(f"{where}dtype {model_input['dtype']!r} is not a numpy dtype")
    if not names(model, "outputs", "model."):
        fail("model.outputs is empty")

    def check_blocks(blocks: Any, where: str) -> None:
        if not isinstance(blocks, list) or not blocks:
            fail(f"{where}blocks is empty or not a list")
        for i, block in enumerate(blocks):
            at = f"{where}blocks[{i}]."
            if need(block, "index", int, at) != i:
                fail(f"{at}index is {block['index']}, expected {i}")
            if need(block, "file", str, at) not in files:
                fail(f"{at}file {block['file']!r} has no checksum in files")
            need(block, "processor", str, at)
            need(block, "provider", str, at)
            options = need(block, "provider_options", dict, at)
            if not all(isinstance(v, str) for v in options.values()):
                fail(f"{at}provider_options values must be strings")
            if need(block, "threads", int, at) < 1:
                fail(f"{at}threads must be 1 or more")
            names(block, "inputs", at)
            names(block, "outputs", at)
        available = {model_input["name"] for model_input in model_inputs}
        for i, block in enumerate(blocks):
            missing = [t for t in block["inputs"] if t not in available]
            if missing:
                fail(f"{where}block {i} needs {', '.join(missing)}, which neither the input nor an earlier block provides")
            available.update(block["outputs"])
        missing = [t for t in model["outputs"] if t not in available]
        if missing:
            fail(f"{where}no block computes the model output(s) {', '.join(missing)}")

    check_blocks(need(manifest, "blocks", list, ""), "")
    if version >= 2:
        plans = need(manifest, "plans", list, "")
        if not plans:
            fail("plans is empty")
        seen = set()
        for i, entry in enumerate(plans):
            where = f"plans[{i}]."
            plan_id = need(entry, "id", str, where)
            if plan_id in seen:
                fail(f"{where}id {plan_id!r} is used twice")
            seen.add(plan_id)
            for key in ("figures", "needs"):
                if key in entry and entry[key] is not None and not isinstance(entry[key], dict):
                    fail(f"{where}{key} has the wrong type ({type(entry[key]).__name__})")
            network = (entry.get("needs") or {}).get("network")
            if network is not None:
                for key in ("rtt_ms", "bandwidth_mbit_s", "radio_power_w", "transfers", "bytes"):
                    if isinstance(need(network, key, (int, float), f"{where}needs.network."), bool):
                        fail(f"{where}needs.network.{key} must be a number")
                need(network, "remote_processors", list, f"{where}needs.network.")
            check_blocks(need(entry, "blocks", list, where), f"plan {plan_id}: ")
        if plans[0]["blocks"] != manifest["blocks"]:
            fail("blocks are not the first plan's blocks")


def _bundle_file(root: Path, name: str) -> Path:
    """The file `name` from plan.json inside `root`; ExplorerError if it points outside the bundle."""
    outside = ExplorerError(f"plan.json refers to {name!r}, which is outside the bundle folder {root}: a bundle refers "
                            f"only to files inside its folder; {_EXPORT_AGAIN}")
    windows = PureWindowsPath(name)
    if (not name or "\0" in name or "\\" in name or PurePosixPath(name).is_absolute() or windows.drive
            or ".." in PurePosixPath(name).parts):
        raise outside
    resolved = (root / name).resolve()
    if not resolved.is_relative_to(root.resolve()):  # a symlink that leads out
        raise outside
    if not resolved.is_file():
        raise ExplorerError(f"{name} is listed in plan.json but missing from the bundle {root}: {_EXPORT_AGAIN}")
    return resolved


def _file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def _check_sha256(name: str, actual: str, expected: str) -> None:
    if actual != expected:
        raise ExplorerError(f"{name} does not match its checksum in plan.json: {_EXPORT_AGAIN}")


def _open_session(entry: dict[str, Any], data: bytes, strict: bool,
                  fallbacks: list[str]) -> tuple[ort.InferenceSession, str]:
    """A session for one block on its provider (or on the CPU, warning, when that is missing)."""
    provider, threads = entry["provider"], entry["threads"]
    where = f"block {entry['index']} (processor {entry['processor']})"

    def fall_back(reason: str) -> ort.InferenceSession:
        if strict:
            raise ExplorerError(f"{where}: {reason}; install an ONNX Runtime build with {provider}, "
                                "or run without --strict to fall back to the CPU")
        message = f"{where}: {reason}; running it on {CPU_PROVIDER} instead"
        fallbacks.append(message)
        warnings.warn(message, ProviderFallbackWarning, stacklevel=4)
        return open_session(data, CPU_PROVIDER, threads, what=entry["file"])

    try:
        session = open_session(data, provider, threads, provider_options=entry["provider_options"], what=entry["file"])
    except ProviderMissing as missing:
        return fall_back(f"this ONNX Runtime has no {provider} (it has {', '.join(missing.available)})"), CPU_PROVIDER
    except ProviderNotStarted:  # ORT gave up on the provider (e.g. missing driver libraries) on its own
        return fall_back(f"{provider} is installed but ONNX Runtime could not start it"), CPU_PROVIDER
    except SessionError as error:
        if provider == CPU_PROVIDER:
            raise
        return fall_back(f"{provider} could not open it ({error})"), CPU_PROVIDER
    return session, session.get_providers()[0]


def _check_block_io(block: BlockSession) -> None:
    """The session's inputs and outputs are the tensors plan.json says cross the block's edges."""
    inputs = {i.name for i in block.session.get_inputs()}
    outputs = {o.name for o in block.session.get_outputs()}
    if inputs != set(block.inputs) or not set(block.outputs) <= outputs:
        raise ExplorerError(f"{block.file} takes {sorted(inputs)} and gives {sorted(outputs)}, but plan.json says "
                            f"{list(block.inputs)} and {list(block.outputs)}: {_EXPORT_AGAIN}")


def _fits(dims: list, shape: tuple[int, ...]) -> bool:
    """Whether an array shape matches declared dimensions (named or unknown ones match any size)."""
    return len(dims) == len(shape) and all(not (isinstance(d, int) and d > 0) or d == n for d, n in zip(dims, shape))


def _shape_text(shape) -> str:
    """'batchx1x32x32': named dimensions by name, unknown ones as '?'."""
    return "x".join("?" if isinstance(d, int) and d <= 0 else str(d) for d in shape) or "scalar"


# ---- the `explorer run` command -----------------------------------------------------------------
def read_input(path: Path | str, names: list[str] | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """The input batch in a .npy file, or the array `x` of a .npz file; for a model with several inputs
    (`names`), a .npz with one array per input by name (`x` may stand for the first)."""
    path = Path(path).expanduser()
    if path.suffix not in (".npy", ".npz"):
        raise ExplorerError(f"{path}: give the input as a .npy file, or a .npz file with an array x")
    if not path.is_file():
        raise ExplorerError(f"input file not found: {path}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if names and len(names) > 1:
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise ExplorerError(f"{path}: the model takes {len(names)} inputs ({', '.join(names)}): give a .npz with one "
                                    f"array per input (numpy.savez(path, {', '.join(f'{n}=...' for n in names)}))")
            with loaded:
                arrays = {name: loaded[name] for name in loaded.files}
            if names[0] not in arrays and "x" in arrays:
                arrays[names[0]] = arrays.pop("x")
            missing = [name for name in names if name not in arrays]
            if missing:
                raise ExplorerError(f"{path} has no array for the input(s) {', '.join(missing)} (it has: "
                                    f"{', '.join(arrays) or 'nothing'}): save one array per input by name")
            for name in names:
                if not (np.issubdtype(arrays[name].dtype, np.number) or arrays[name].dtype == np.bool_):
                    raise ExplorerError(f"{path}: input {name} has dtype {arrays[name].dtype}; give a numeric array")
            return {name: arrays[name] for name in names}
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "x" not in loaded.files and names and names[0] in loaded.files:  # the input by its name
                    return _numeric(path, loaded[names[0]])
                if "x" not in loaded.files:
                    raise ExplorerError(f"{path} has no array x (it has: {', '.join(loaded.files) or 'nothing'}): "
                                        "save the inputs with numpy.savez(path, x=inputs)")
                x = loaded["x"]
        else:
            x = loaded
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise ExplorerError(f"{path} is not a valid {path.suffix} file ({exc}): save it with numpy.save / numpy.savez") from None
    return _numeric(path, x)


def _numeric(path: Path, x: np.ndarray) -> np.ndarray:
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise ExplorerError(f"{path}: the input has dtype {x.dtype}; give a numeric array")
    return x


def run_bundle_cli(bundle_dir: Path | str, input_path: Path | str, output_path: Path | str | None = None,
                   strict: bool = False, timing: bool = False, latency_ms: float | None = None,
                   memory_mb: float | None = None, network: str | None = None,
                   remote: str | None = None) -> dict[str, Any]:
    """Load a bundle, pick its plan for the conditions given (if any), run it on the input file, optionally
    save the output (.npy); returns a summary.

    A single sample without the batch axis runs as a batch of one. With `timing`, the input is run
    TIMING_WARMUP times untimed, then timed as :func:`time_bundle` does; each block's figure and the total
    are medians with the 95 % interval of the median. :func:`format_run_summary` renders the summary.
    """
    from explorer.adapt import Conditions

    conditions = Conditions(latency_ms, memory_mb, network)  # bad conditions are refused before any work
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ProviderFallbackWarning)  # reported in the summary instead
        bundle = Bundle.load(bundle_dir, strict=strict, remote=remote)
        selection = bundle._select(conditions) if conditions != Conditions() else None
    x = read_input(input_path, bundle.input_names)
    if isinstance(x, dict):  # several inputs: each a batch with its batch axis
        added_batch_axis = False
        shape = list(next(iter(x.values())).shape)
    else:
        added_batch_axis = _fits(bundle.input_shape[1:], x.shape)
        if added_batch_axis:
            x = x[None]
        shape = list(x.shape)
    timed = time_bundle(bundle, x) if timing else None
    outputs = bundle.run_all(x)
    output = outputs[bundle.output_names[0]]
    if output_path is not None:  # .npy: the first output; .npz: every output by name
        output_path = Path(output_path).expanduser()
        output_path = _save_npy(output_path, outputs if output_path.suffix == ".npz" else output)
    return {
        "bundle": str(bundle.path),
        "board": bundle.manifest["board"].get("name"),
        "model": bundle.manifest["model"].get("source"),
        "input_shape": shape,
        "added_batch_axis": added_batch_axis,
        "output_name": bundle.output_names[0],
        "output_shape": list(output.shape),
        "top1": output.argmax(axis=1).tolist() if output.ndim == 2 else None,
        "blocks": [{"index": b.index, "processor": b.processor, "provider": b.provider, "runs_on": b.runs_on,
                    "ms": timed["block_ms"][b.index] if timed else None,
                    "ms_ci": timed["block_ci"][b.index] if timed else None} for b in bundle.blocks],
        "total_ms": timed["total_ms"] if timed else None,  # the median run
        "timing": {key: timed[key] for key in ("total_ci", "total_p10_p90", "runs", "warmup")} if timed else None,
        "fallbacks": list(bundle.fallbacks),
        "notes": list(bundle.warnings),
        "plan": bundle.current["id"],
        "plans": len(bundle.plans),
        "selection": selection.reason if selection is not None else None,
        "switch_ms": 1e3 * bundle.switches[1].seconds if len(bundle.switches) > 1 else None,
        "fell_back": bundle.switches[-1].reason if bundle.fallbacks_to_local else None,
        "output_path": str(output_path) if output_path is not None else None,
    }


TIMING_WARMUP = 3  # untimed runs first: the first run of a shape allocates and plans, the next ones warm caches
TIMING_MIN_RUNS = 10  # timed runs at least (the 95 % interval of the median needs 6)


def time_bundle(bundle: Bundle, x, adaptive=None) -> dict[str, Any]:
    """Time the bundle's current plan on `x`: TIMING_WARMUP untimed runs, then timed runs until the 95 % interval
    of the median total lies within the target of `adaptive` (explorer.blockrun.AdaptiveRepeats; default +/-3 %,
    at least TIMING_MIN_RUNS runs), or its time cap (1 s) once the interval exists, or its most repeats.

    {"block_ms": [median per block], "block_ci": [(low, high)], "total_ms": median total, "total_ci": (low, high),
    "total_p10_p90": (p10, p90) of the runs, "runs": n, "warmup": TIMING_WARMUP}. A run that switched plans (a
    remote block failed) starts the timing again on the plan that answered."""
    from explorer.blockrun import AdaptiveRepeats, ci_within, median_ci, min_samples

    adaptive = adaptive or AdaptiveRepeats()
    for _ in range(TIMING_WARMUP):
        bundle.run_all(x)
    runs: list[list[float]] = []
    plan, started = bundle.current["id"], time.perf_counter()
    while len(runs) < adaptive.max_repeats:
        _, block_ms = bundle.run_all(x, timing=True)
        if bundle.last_plan != plan:  # another plan answered: time that one from here
            runs, plan = [], bundle.last_plan
        runs.append(block_ms)
        totals = [sum(run) for run in runs]
        if len(runs) >= TIMING_MIN_RUNS and ci_within(totals, adaptive.target, adaptive.confidence):
            break
        if len(runs) >= min_samples(adaptive.confidence) and time.perf_counter() - started >= adaptive.max_seconds:
            break
    table = np.array(runs)
    totals = table.sum(axis=1)
    return {"block_ms": np.median(table, axis=0).tolist(),
            "block_ci": [median_ci(column, adaptive.confidence) for column in table.T],
            "total_ms": float(np.median(totals)), "total_ci": median_ci(totals, adaptive.confidence),
            "total_p10_p90": tuple(float(v) for v in np.percentile(totals, [10, 90])), "runs": len(runs),
            "warmup": TIMING_WARMUP}


def _ms_interval(interval) -> str:
    return f"95 % CI {interval[0]:.3f}-{interval[1]:.3f}" if interval else "too few runs for an interval"


def format_run_summary(summary: dict[str, Any], max_top1: int = 20) -> str:
    """Plain-text lines for a run_bundle_cli summary."""
    lines = [f"bundle {summary['bundle']} ({summary['model']} on {summary['board']})"]
    lines += [f"warning: {message}" for message in summary["fallbacks"]]
    lines += [f"note: {message}" for message in summary.get("notes", [])]
    if summary.get("selection"):
        switched = f" (switched from p0 in {summary['switch_ms']:.1f} ms)" if summary.get("switch_ms") is not None else ""
        lines.append(f"plan {summary['selection']}{switched}")
    elif summary.get("plans", 1) > 1:
        lines.append(f"plan {summary['plan']}: the best of the bundle's {summary['plans']} plans (no conditions given)")
    batch_note = " (no batch axis given: ran as a batch of 1)" if summary["added_batch_axis"] else ""
    lines.append(f"input {_shape_text(summary['input_shape'])}{batch_note} -> {summary['output_name']} "
                 f"{_shape_text(summary['output_shape'])}")
    for block in summary["blocks"]:
        ms = f", {block['ms']:.3f} ms ({_ms_interval(block.get('ms_ci'))})" if block["ms"] is not None else ""
        lines.append(f"  block {block['index']}: {block['processor']} on {block['runs_on']}{ms}")
    if summary.get("fell_back"):
        lines.append(f"the measurement server failed: finished on a local plan ({summary['fell_back']})")
    if summary["total_ms"] is not None:
        timing = summary.get("timing") or {}
        spread = timing.get("total_p10_p90")
        lines.append(f"total {summary['total_ms']:.3f} ms ({_ms_interval(timing.get('total_ci'))}"
                     + (f"; p10-p90 {spread[0]:.3f}-{spread[1]:.3f}" if spread else "")
                     + f"): median of {timing.get('runs', 1)} runs after {timing.get('warmup', 1)} warm-up runs")
    if summary["top1"] is not None:
        shown = summary["top1"][:max_top1]
        more = f" ... ({len(summary['top1'])} in all)" if len(summary["top1"]) > max_top1 else ""
        lines.append(f"top-1: {' '.join(map(str, shown))}{more}")
    if summary["output_path"]:
        lines.append(f"wrote {summary['output_path']}")
    return "\n".join(lines)


def _save_npy(path: Path, array: np.ndarray | dict[str, np.ndarray]) -> Path:
    """Write `array` to `path` (.npy) atomically, or arrays by name to a .npz."""
    if path.suffix != (".npz" if isinstance(array, dict) else ".npy"):
        raise ExplorerError(f"{path}: the output is written as .npy (the first output) or .npz (every output by name); "
                            "give a file name ending in .npy or .npz")
    if isinstance(array, dict):
        named: dict[str, Any] = array  # savez's keywords are array names (typed, the flag allow_pickle too)
        return atomic_write(path, lambda handle: np.savez(handle, **named))
    return atomic_write(path, lambda handle: np.save(handle, array))
