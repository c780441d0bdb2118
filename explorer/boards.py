"""Board profiles: the processors, memory and transfer paths of a target board (``targets/NAME.toml``).

Where a name is looked up: the user's own ``targets/`` folder in the working directory first (where
``explorer calibrate`` writes ``host.toml``), then the profiles shipped with explorer (the package data
of ``explorer.targets``, read with importlib.resources, so an installed wheel finds them from any
folder). A path to a .toml file is read as it is.

A profile is validated in full when it is loaded; any problem is one :class:`ExplorerError` whose
message names the file, the key path (``processors.gpu.peak_gflops.int4``) and the fix.
``targets/README.md`` documents the schema and units.

Transfer paths: every pair of processors has one (:meth:`Board.link`). A pair declared in
``[[links]]`` uses that entry; a pair with a remote processor goes over ``[network]``; any other pair
on a shared-memory board is a copy through DRAM (each byte read and written once). A processor's
"link" to itself costs nothing.
"""
from __future__ import annotations

import difflib
import hashlib
import math
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from explorer.errors import ExplorerError
from explorer.paths import PACKAGE_DIR, TARGETS_DIR

PRECISIONS = ("fp32", "fp16", "int8")
KINDS = ("cpu", "lpc", "gpu", "dsp", "remote")
OPS = ("Conv", "Gemm", "MatMul")
OP_KINDS = ("conv", "fc")  # efficiency classes: Conv -> conv, Gemm/MatMul -> fc (Layer.kind)
HOST = "host"  # the profile `explorer calibrate` writes for this machine; absent until then

_SCHEMA_HINT = "see targets/README.md"
_ID = re.compile(r"^[a-z][a-z0-9_-]*$")
_TOP_KEYS = ("board", "memory", "processors", "links", "network")
_BOARD_KEYS = ("name", "description")
_MEMORY_KEYS = ("size_mb", "available_mb", "bandwidth_gbps", "shared", "energy_nj_per_byte",
                "transfer_latency_us")
_NETWORK_KEYS = ("description", "bandwidth_mbit_s", "rtt_ms", "radio_power_w")
_PROCESSOR_KEYS = ("kind", "description", "cores", "clock_ghz", "cache_kb", "precisions", "peak_gflops",
                   "efficiency", "memory_mb", "bandwidth_gbps", "active_power_w", "idle_power_w",
                   "launch_overhead_us", "ops", "provider", "provider_options", "threads")
_LINK_KEYS = ("between", "bandwidth_gbps", "latency_us", "energy_nj_per_byte", "energy_uj_per_transfer")


@dataclass(frozen=True)
class Memory:
    """The board's DRAM."""

    size_mb: float  # installed DRAM
    available_mb: float  # what a model may use after the OS and runtime
    bandwidth_gbps: float  # GB/s (10^9 bytes/s), peak, shared by all local processors when `shared`
    shared: bool  # one DRAM for all local processors (a unified-memory SoC)
    energy_nj_per_byte: float  # energy of reading or writing one byte of DRAM
    transfer_latency_us: float  # fixed cost of handing a tensor to another processor through DRAM


@dataclass(frozen=True)
class Network:
    """The radio link between the board and its remote processor(s)."""

    description: str
    bandwidth_mbit_s: float  # effective throughput, Mbit/s (10^6 bits/s)
    rtt_ms: float  # round-trip time
    radio_power_w: float  # board-side radio power while a transfer is under way


@dataclass(frozen=True)
class Processor:
    """One processor of the board (or a remote one reached over the network)."""

    id: str
    kind: str  # cpu | lpc | gpu | dsp | remote
    description: str
    cores: int  # parallel units as counted for the peak (CPU cores, GPU ALU lanes, DSP threads)
    clock_ghz: float
    cache_kb: int  # last-level cache (or on-chip memory) private to this processor or its cluster
    precisions: tuple[str, ...]  # subset of PRECISIONS
    peak_gflops: dict[str, float] = field(hash=False)  # per precision: GFLOP/s (int8: GOP/s)
    efficiency: dict[str, float] = field(hash=False)  # per op kind (conv, fc): fraction of peak
    memory_mb: float  # memory it can hold weights and activations in
    bandwidth_gbps: float  # GB/s it sustains to its memory
    active_power_w: float  # drawn from the board's supply while it computes
    idle_power_w: float  # drawn from the board's supply while others compute
    launch_overhead_us: float  # fixed cost per op (dispatch, kernel launch)
    ops: tuple[str, ...]  # decision ops it runs (subset of OPS)
    provider: str  # ONNX Runtime execution provider the runtime uses for it
    provider_options: dict[str, str] = field(hash=False)  # passed to that provider
    threads: int  # ONNX Runtime intra-op threads

    @property
    def is_remote(self) -> bool:
        """True for a processor behind the network (its energy is not the board's)."""
        return self.kind == "remote"


@dataclass(frozen=True)
class Link:
    """A transfer path between two processors (symmetric)."""

    between: tuple[str, str]
    bandwidth_gbps: float  # GB/s (10^9 bytes/s); inf for a processor's link to itself
    latency_us: float  # fixed time per transfer (one way)
    energy_nj_per_byte: float
    energy_uj_per_transfer: float  # fixed energy per transfer (e.g. the radio awake through the latency)
    via: str  # "link" (declared) | "memory" (default copy through DRAM) | "network" | "none" (same processor)

    def transfer_time_s(self, nbytes: float) -> float:
        """Seconds to move `nbytes` over this path (0 when nothing moves)."""
        if nbytes <= 0:
            return 0.0
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gbps * 1e9)

    def transfer_energy_j(self, nbytes: float) -> float:
        """Joules the board spends moving `nbytes` over this path (0 when nothing moves)."""
        if nbytes <= 0:
            return 0.0
        return self.energy_uj_per_transfer * 1e-6 + nbytes * self.energy_nj_per_byte * 1e-9


@dataclass(frozen=True)
class Board:
    """A validated board profile."""

    name: str
    description: str
    path: Path  # the TOML file it was loaded from
    digest: str  # sha256 of that file's bytes: a cache key that changes whenever the profile does
    memory: Memory
    network: Network | None  # present exactly when a remote processor is
    processors: dict[str, Processor] = field(hash=False)  # by id, in file order
    links: tuple[Link, ...]  # one resolved path per pair of distinct processors

    @property
    def processor_ids(self) -> tuple[str, ...]:
        """Processor ids in file order."""
        return tuple(self.processors)

    def processor(self, processor_id: str) -> Processor:
        """The processor with this id; an ExplorerError naming the closest id otherwise."""
        try:
            return self.processors[processor_id]
        except KeyError:
            close = difflib.get_close_matches(processor_id, self.processors, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ExplorerError(f"board '{self.name}' has no processor '{processor_id}'; {hint}"
                                f"its processors are {', '.join(self.processors)}") from None

    def link(self, a: str, b: str) -> Link:
        """The transfer path between processors `a` and `b`; a zero-cost Link (via "none") when a == b."""
        self.processor(a)
        self.processor(b)
        if a == b:
            return Link((a, a), math.inf, 0.0, 0.0, 0.0, "none")
        return next(link for link in self.links if set(link.between) == {a, b})

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description of the board for display."""
        return {
            "name": self.name,
            "description": self.description,
            "path": str(self.path),
            "digest": self.digest,
            "memory": asdict(self.memory),
            "network": asdict(self.network) if self.network else None,
            "processors": {pid: asdict(p) for pid, p in self.processors.items()},
            "links": [asdict(link) for link in self.links],
        }


def shipped_dir() -> Path:
    """The folder of the board profiles shipped with explorer (the package data of explorer.targets)."""
    try:
        return Path(str(resources.files("explorer.targets")))
    except ModuleNotFoundError:  # a source tree used without installing it (the package-dir mapping is the install's)
        return PACKAGE_DIR.parent / "targets"


def board_dirs() -> tuple[Path, ...]:
    """Where board names are looked up, first match winning: the user's targets/ folder, then the shipped one."""
    return Path(TARGETS_DIR).resolve(), shipped_dir()


def board_files() -> dict[str, Path]:
    """Each board name and the profile it loads ('host' only once `explorer calibrate` wrote it), sorted by name."""
    files: dict[str, Path] = {}
    for folder in reversed(board_dirs()):  # the user's folder last, so that its files replace the shipped ones
        files.update((path.stem, path) for path in folder.glob("*.toml"))
    return dict(sorted(files.items()))


def board_names() -> list[str]:
    """Names of the board profiles (the user's targets/ and the shipped ones), sorted."""
    return list(board_files())


def load_board(name_or_path: str | Path) -> Board:
    """Load and validate a board: a name (targets/NAME.toml, the user's or a shipped one) or a path to a .toml file."""
    path, name = _locate(str(name_or_path))
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExplorerError(f"{path}: cannot read the board profile: {exc.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ExplorerError(f"{path}: not UTF-8 text; save the board profile as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ExplorerError(f"{path}: TOML syntax error: {exc}; fix the syntax there") from None
    return _parse_board(path, data, hashlib.sha256(raw).hexdigest(), name)


def _locate(name_or_path: str) -> tuple[Path, str | None]:
    """The file to read, and the board name when it was given as a name."""
    if name_or_path.endswith(".toml") or Path(name_or_path).name != name_or_path:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ExplorerError(f"{path}: no such board profile; give an existing .toml file or a "
                                "board name (`explorer boards` lists them)")
        return path, None
    files = board_files()
    if name_or_path in files:
        return files[name_or_path], name_or_path
    own = board_dirs()[0] / f"{name_or_path}.toml"
    if name_or_path == HOST:
        raise ExplorerError(f"{own}: no profile of this machine yet; run `explorer calibrate` to "
                            "measure it and write this file")
    close = difflib.get_close_matches(name_or_path, files, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ExplorerError(f"{own}: unknown board '{name_or_path}' (not there nor among the shipped profiles); {hint}"
                        "`explorer boards` lists them")


# ---- validation -----------------------------------------------------------------------------------
def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"{'integer' if isinstance(value, int) else 'number'} {value:g}"
    if isinstance(value, str):
        return f"string '{value}'"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


class _Table:
    """One TOML table being read: checks keys and types, and fails with the file and key path."""

    def __init__(self, file: Path, data: object, path: str, allowed: tuple[str, ...] | None,
                 what: str = "key") -> None:
        self.file, self.path = file, path
        if not isinstance(data, dict):
            self.fail(None, f"expected a table, got {_type_name(data)}; {_SCHEMA_HINT}")
        self.data: dict[str, Any] = data
        unknown = [key for key in data if key not in allowed] if allowed is not None else []
        if unknown and allowed is not None:
            close = difflib.get_close_matches(unknown[0], allowed, n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            self.fail(unknown[0], f"unknown {what} '{unknown[0]}'; {hint}allowed: {', '.join(allowed)}")

    def at(self, key: str | None) -> str:
        """The dotted key path of `key` in this table."""
        if key is None:
            return self.path or "(top level)"
        return f"{self.path}.{key}" if self.path else key

    def fail(self, key: str | None, message: str) -> NoReturn:
        raise ExplorerError(f"{self.file}: {self.at(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def raw(self, key: str) -> Any:
        if key not in self.data:
            self.fail(key, f"missing required key; add it ({_SCHEMA_HINT})")
        return self.data[key]

    def string(self, key: str) -> str:
        value = self.raw(key)
        if not isinstance(value, str) or not value.strip():
            self.fail(key, f"expected a non-empty string, got {_type_name(value)}")
        return value

    def identifier(self, key: str) -> str:
        value = self.string(key)
        if not _ID.match(value):
            self.fail(key, f"'{value}' is not a valid name; use lowercase letters, digits, '-' and '_'")
        return value

    def boolean(self, key: str) -> bool:
        value = self.raw(key)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {_type_name(value)}")
        return value

    def integer(self, key: str) -> int:
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, f"expected a whole number, got {_type_name(value)}")
        if value < 1:
            self.fail(key, f"must be 1 or more, got {value}")
        return value

    def number(self, key: str, *, zero_ok: bool = False, at_most: tuple[float, str] | None = None,
               default: float | None = None) -> float:
        """A finite number > 0 (>= 0 with zero_ok; <= at_most = (limit, what it is)); integers accepted."""
        if default is not None and key not in self.data:
            return default
        value = self.raw(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.fail(key, f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):
            self.fail(key, f"must be a finite number, got {value}")
        if value < 0 or (value == 0 and not zero_ok):
            self.fail(key, f"must be {'zero or more' if zero_ok else 'more than zero'}, got {value:g}")
        if at_most is not None and value > at_most[0]:
            self.fail(key, f"must be at most {at_most[0]:g} ({at_most[1]}), got {value:g}")
        return float(value)

    def names(self, key: str, choices: tuple[str, ...], what: str) -> tuple[str, ...]:
        """A non-empty array of distinct strings, each one of `choices`."""
        value = self.raw(key)
        if not isinstance(value, list) or not value:
            got = "an empty array" if value == [] else _type_name(value)
            self.fail(key, f"expected a non-empty array of {what} names, got {got}")
        for item in value:
            if item not in choices:
                shown = item if isinstance(item, str) else _type_name(item)
                self.fail(key, f"unknown {what} '{shown}'; use {', '.join(choices)}")
        if len(set(value)) != len(value):
            self.fail(key, f"lists a {what} twice; list each once")
        return tuple(value)

    def table(self, key: str, allowed: tuple[str, ...] | None, what: str = "key") -> _Table:
        return _Table(self.file, self.raw(key), self.at(key), allowed, what)


def _parse_board(file: Path, data: dict[str, Any], digest: str, expected_name: str | None) -> Board:
    top = _Table(file, data, "", _TOP_KEYS)
    head = top.table("board", _BOARD_KEYS)
    name = head.identifier("name")
    if expected_name is not None and name != expected_name:
        head.fail("name", f"is '{name}' but the file is {expected_name}.toml; make them the same")
    memory = _parse_memory(top.table("memory", _MEMORY_KEYS))
    procs = top.table("processors", None)
    if not procs.data:
        procs.fail(None, "no processors; add at least one [processors.ID] table")
    processors = {pid: _parse_processor(procs, pid, memory) for pid in procs.data}
    remote = [pid for pid, p in processors.items() if p.is_remote]
    if len(remote) == len(processors):
        procs.fail(None, "every processor is remote; add the board's own processors")
    network = None
    if top.has("network"):
        if not remote:
            top.fail("network", "no processor has kind 'remote'; add one or remove [network]")
        network = _parse_network(top.table("network", _NETWORK_KEYS))
    elif remote:
        top.fail("network", f"missing: processor '{remote[0]}' is remote, so add a [network] table "
                            f"({_SCHEMA_HINT})")
    return Board(name=name, description=head.string("description"), path=file, digest=digest,
                 memory=memory, network=network, processors=processors,
                 links=_resolve_links(top, processors, memory, network))


def _parse_memory(t: _Table) -> Memory:
    size = t.number("size_mb")
    return Memory(
        size_mb=size, available_mb=t.number("available_mb", at_most=(size, "memory.size_mb")),
        bandwidth_gbps=t.number("bandwidth_gbps"), shared=t.boolean("shared"),
        energy_nj_per_byte=t.number("energy_nj_per_byte", zero_ok=True),
        transfer_latency_us=t.number("transfer_latency_us", zero_ok=True),
    )


def _parse_network(t: _Table) -> Network:
    return Network(
        description=t.string("description"), bandwidth_mbit_s=t.number("bandwidth_mbit_s"),
        rtt_ms=t.number("rtt_ms", zero_ok=True), radio_power_w=t.number("radio_power_w", zero_ok=True),
    )


def _parse_processor(procs: _Table, pid: str, memory: Memory) -> Processor:
    if not _ID.match(pid):
        procs.fail(pid, f"'{pid}' is not a valid processor id; use lowercase letters, digits, '-' and '_'")
    t = procs.table(pid, _PROCESSOR_KEYS)
    kind = t.string("kind")
    if kind not in KINDS:
        t.fail("kind", f"unknown kind '{kind}'; use one of {', '.join(KINDS)}")
    precisions = t.names("precisions", PRECISIONS, "precision")
    peaks = t.table("peak_gflops", PRECISIONS, "precision")
    for listed in peaks.data:
        if listed not in precisions:
            peaks.fail(listed, f"'{listed}' is not in {t.at('precisions')}; add it there or remove this entry")
    for listed in precisions:
        if not peaks.has(listed):
            peaks.fail(listed, f"missing: '{listed}' is in {t.at('precisions')}, so give its peak (GFLOP/s) "
                               "or remove it there")
    efficiency = t.table("efficiency", OP_KINDS, "op kind")
    cores, threads = t.integer("cores"), t.integer("threads")
    if kind in ("cpu", "lpc") and threads > cores:
        t.fail("threads", f"{threads} threads on {cores} cores; use at most {cores}")
    options = t.table("provider_options", None) if t.has("provider_options") else None
    for key, value in (options.data if options else {}).items():
        if options is not None and not isinstance(value, str):
            options.fail(key, f"expected a string, got {_type_name(value)}")
    provider = t.string("provider")
    if not provider.endswith("ExecutionProvider"):
        t.fail("provider", f"'{provider}' is not an ONNX Runtime execution provider name; use e.g. "
                           "CPUExecutionProvider, CUDAExecutionProvider, QNNExecutionProvider")
    in_shared_dram = memory.shared and kind != "remote"
    memory_limit = (memory.available_mb, "memory.available_mb") if in_shared_dram else None
    bandwidth_limit = (memory.bandwidth_gbps, "memory.bandwidth_gbps") if in_shared_dram else None
    active = t.number("active_power_w", zero_ok=True)
    return Processor(
        id=pid, kind=kind, description=t.string("description"), cores=cores,
        clock_ghz=t.number("clock_ghz"), cache_kb=t.integer("cache_kb"), precisions=precisions,
        peak_gflops={p: peaks.number(p) for p in precisions},
        efficiency={k: efficiency.number(k, at_most=(1.0, "a fraction of peak")) for k in OP_KINDS},
        memory_mb=t.number("memory_mb", at_most=memory_limit),
        bandwidth_gbps=t.number("bandwidth_gbps", at_most=bandwidth_limit),
        active_power_w=active,
        idle_power_w=t.number("idle_power_w", zero_ok=True, at_most=(active, "active_power_w")),
        launch_overhead_us=t.number("launch_overhead_us", zero_ok=True),
        ops=t.names("ops", OPS, "op"), provider=provider,
        provider_options=dict(options.data) if options else {}, threads=threads,
    )


def _resolve_links(top: _Table, processors: dict[str, Processor], memory: Memory,
                   network: Network | None) -> tuple[Link, ...]:
    """One Link per pair of distinct processors: declared, over the network, or through shared DRAM."""
    entries = top.raw("links") if top.has("links") else []
    if not isinstance(entries, list):
        top.fail("links", f"expected [[links]] tables, got {_type_name(entries)}")
    declared: dict[frozenset[str], Link] = {}
    for i, entry in enumerate(entries):
        t = _Table(top.file, entry, f"links[{i}]", _LINK_KEYS)
        pair = t.raw("between")
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            t.fail("between", 'expected two processor ids, e.g. between = ["cpu", "gpu"]')
        for pid in pair:
            if pid not in processors:
                t.fail("between", f"unknown processor '{pid}'; the board's processors are "
                                  f"{', '.join(processors)}")
            if processors[pid].is_remote:
                t.fail("between", f"'{pid}' is remote: its links come from [network]; remove this entry")
        if pair[0] == pair[1]:
            t.fail("between", "a link joins two different processors")
        if frozenset(pair) in declared:
            t.fail("between", f"a second link between {pair[0]} and {pair[1]}; keep one")
        declared[frozenset(pair)] = Link(
            (pair[0], pair[1]), t.number("bandwidth_gbps"), t.number("latency_us", zero_ok=True),
            t.number("energy_nj_per_byte", zero_ok=True),
            t.number("energy_uj_per_transfer", zero_ok=True, default=0.0), "link")
    ids = list(processors)
    links = []
    for i, a in enumerate(ids):
        for b in ids[i + 1:]:
            if frozenset((a, b)) in declared:
                links.append(declared[frozenset((a, b))])
            elif network is not None and (processors[a].is_remote or processors[b].is_remote):
                links.append(_network_link(a, b, network))  # (_parse_board requires [network] with a remote processor)
            elif memory.shared:
                links.append(Link((a, b), memory.bandwidth_gbps / 2, memory.transfer_latency_us,
                                  2 * memory.energy_nj_per_byte, 0.0, "memory"))
            else:
                top.fail("links", f"no transfer path between {a} and {b}: memory.shared is false, so "
                                  f'add [[links]] with between = ["{a}", "{b}"]')
    return tuple(links)


def _network_link(a: str, b: str, network: Network) -> Link:
    """The radio path: half the round trip per transfer; the radio is on for the whole transfer."""
    bandwidth_gbps = network.bandwidth_mbit_s / 8e3
    latency_us = network.rtt_ms * 1e3 / 2
    return Link((a, b), bandwidth_gbps, latency_us, network.radio_power_w / bandwidth_gbps,
                network.radio_power_w * latency_us, "network")
