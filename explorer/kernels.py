"""Measured kernel tables: what each decision of a model costs on one device, fitted from measured unit blocks.

A plan's latency on a device is the sum of its unit blocks' times, and a block's time is modelled as a sum of
terms, each measured on the device as ONNX Runtime runs (and fuses) the nodes:

* a layer term: one layer at one (rung, precision, processor) alone in its block, with the weight-free ops that
  travel with it. It carries the block's fixed cost once (a session run, feeding its inputs, fetching its
  outputs);
* a merge term per processor and shape of the tensor between two neighbouring layers: what they save by sharing
  one block (one fixed cost less: a session run, handing that tensor over; negative), and a pair term per two
  neighbouring layers at two precisions on top of it (the casts and quantize/dequantize pairs that consecutive
  fp16 or int8 layers share);
* an edge term: a block followed by an int8 layer on another processor ends with that layer's QuantizeLinear
  (the crossing travels as uint8: :mod:`explorer.partition`).

So block = its layers' terms + a merge and a pair term per neighbouring pair + its edge term, and the whole model is additive
in choices and in pairs of neighbouring choices: exactly what the integer program solves (its states are
(processor, precision): :mod:`explorer.solver`). Terms are keyed by a signature of what the device runs (op
types, attributes and shapes of the layer's nodes, the rung, the precision, the processor and its provider and
threads), not by model: identical layers of two models share entries.

The terms are fitted by least squares (relative errors) to the measured blocks of designed plans: processors
alternating layer by layer (every block one layer: layer and edge terms), then pairs of layers on one processor
at every pair of precisions (pair terms). They are measured through the measurer protocol (this machine, or
measurement servers in parallel) in groups interleaved with the model's reference plan, each block kept as its time
over the reference's blocks on the same processor in the same rounds (scaled to their typical time), so that the
device's changing speed does not land on the terms measured in a slow or a fast second. Observations are kept per
device (its fingerprint and ONNX Runtime version: either changing starts a new table) in an append-only file,
so an interrupted profile resumes where it stopped.

One effect is not additive: cache pressure. Each block of a plan runs slower the more weight bytes the whole plan
streams through the caches every inference (its working set; on this project's 2-core VM a 16 MB fully connected
layer took 441 us in plans of 18 MB and 636 us in plans of 42 MB, and even a 80 kB one 17 vs 29 us). So terms are
the seconds at no working set, and a plan's blocks are priced times exp(pressure x working set in MB):
`cache_pressure` measures that slope from the blocks measured in several plans (0 where nothing shows it), and the
integer program, whose terms cannot see the whole plan, is solved at the working set of the plan it finds
(:func:`explorer.solver.at_plan_working_set`).
"""
from __future__ import annotations

import copy
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from scipy.sparse import csr_matrix, diags, vstack
from scipy.sparse.linalg import lsqr

from explorer.blockrun import AdaptiveRepeats
from explorer.cache import AppendOnlyCache, digest
from explorer.compress import Rung
from explorer.cost import BYTES_PER_ELEMENT, CostModel, PlanCost
from explorer.graph import Layer, LayerGraph
from explorer.measure import Device, Interleaved, Measurement, MeasurementFailed
from explorer.partition import block_boundaries
from explorer.paths import cache_dir
from explorer.plan import Decision, Plan

TABLE_VERSION = "kernels-v5"  # v5: interleaved chains warmed by an untimed pass each round
KINDS = ("layer", "merge", "pair", "edge")
# Pair and edge terms are corrections, each seen in few blocks: they are pulled towards 0 with this weight (a term
# of the median block's size costs the fit as much as this fraction of that block's relative error), so that a
# term only one noisy block supports does not take that block's noise whole.
_RIDGE = 0.3
_HUBER = 0.1  # blocks the fit misses by more than this (relative) are weighted down in proportion (robust fit)
_ROBUST_ROUNDS = 4
# Plans are measured in groups, interleaved with the model's reference plan, and kept as times over the reference's
# in the same rounds: a shared machine's speed changes within seconds (by half on this project's 2-core VM), and a
# time over a reference measured milliseconds apart stays put when absolute times do not.
PAIRED_GROUP = 6  # plans per interleaved run (with the reference plan)
PAIRED_REPEATS = AdaptiveRepeats(max_seconds=3.0)  # one run's cap, all its plans together
PAIRED_REPEATS_PER_ROUND = 2  # each plan's repeats in a round: short rounds pair closely in time
MEASURED_WEIGHT = 10  # a block of a plan the solver chose, measured beside the reference plan: this many designed blocks
SEARCHED_WEIGHT = 3  # a block of a search's trial (measured at the device's speed then): this many designed blocks
LONG_BLOCK_PLANS = 4  # designed plans per processor and precision with every layer in one block (random rungs)
MIXED_BLOCK_PLANS = 24  # designed plans of blocks of 1-4 layers at random choices, processors in turn
LONG_MIXED_PLANS = 6  # designed plans per processor with every layer in one block at random precisions and rungs
PRESSURE_SETTLED = 0.02  # the integer program is re-solved at its plan's working set until the factor moves less
SETTLE_SOLVES = 3  # ... at most this many times more


def term_kind(key: str) -> str:
    """'layer', 'pair' or 'edge'."""
    return key.partition(":")[0]


@dataclass
class TermInfo:
    """What a term is, for the predictor and for people: its kind and its features."""

    kind: str
    features: dict[str, float | str]


class Terms:
    """The terms of one model's plans on one board: signatures and features."""

    def __init__(self, graph: LayerGraph, board, compressor):
        self.graph, self.board, self.compressor = graph, board, compressor
        self.signatures = [self._signature(layer) for layer in graph.layers]
        self.index = {layer.name: layer.index for layer in graph.layers}

    def _signature(self, layer: Layer) -> str:
        """What the device runs for this layer, whatever the model: its nodes' op types and attributes, its shapes,
        and whether it reads the graph's input (an int8 first layer quantises that input itself)."""
        parts: list[str | bytes] = [layer.op_type, str(layer.weight_shape), str(layer.input_shape), str(layer.output_shape),
                                    str(len(layer.inputs)), str(len(layer.outputs)), str(layer.index == 0)]
        for name in layer.node_names:
            node = self.graph.node_by_name[name]
            parts += [node.op_type, *model_attributes(node)]
        return digest(*parts)[:24]

    def _processor(self, decision: Decision) -> str:
        processor = self.board.processor(decision.placed_processor)
        return f"{decision.placed_processor}|{processor.provider}|{processor.threads}"

    def layer(self, index: int, decision: Decision) -> str:
        return "layer:" + digest(self.signatures[index], decision.method, str(decision.rank), decision.precision,
                                 self._processor(decision))[:32]

    def merge(self, index: int, decision: Decision) -> str:
        """Layers index and index + 1 in one block on this decision's processor: keyed by the tensor between them
        (its shape) and the processor, any model (what one fixed cost less saves grows with what is handed over)."""
        return "merge:" + digest(str(self.graph.layers[index].output_shape), self._processor(decision))[:32]

    def pair(self, index: int, first: Decision, second: Decision) -> str:
        """Layers index and index + 1 in one block (on first's processor)."""
        return "pair:" + digest(self.signatures[index], self.signatures[index + 1], first.precision, second.precision,
                                self._processor(first))[:32]

    def edge(self, index: int, decision: Decision) -> str:
        """Layer index ends its block and the next layer, elsewhere, is int8."""
        return "edge:" + digest(self.signatures[index], decision.precision, self._processor(decision))[:32]

    def _each_block(self, plan: Plan) -> list[list[tuple[str, str, int, Decision, Decision | None]]]:
        """Every block's terms, in order: (key, kind, layer index, its decision, the next layer's decision)."""
        boundaries = block_boundaries(self.graph, plan)
        blocks = []
        for k, b in enumerate(boundaries):
            decisions = [plan.decisions[i][1] for i in range(b.start, b.end)]
            terms: list[tuple[str, str, int, Decision, Decision | None]] = [
                (self.layer(i, d), "layer", i, d, None) for i, d in zip(range(b.start, b.end), decisions)]
            for i, first, second in zip(range(b.start, b.end - 1), decisions, decisions[1:]):
                terms += [(self.merge(i, first), "merge", i, first, second),
                          (self.pair(i, first, second), "pair", i, first, second)]
            if k + 1 < len(boundaries) and plan.decisions[b.end][1].precision == "int8":  # the next block's first layer
                terms.append((self.edge(b.end - 1, decisions[-1]), "edge", b.end - 1, decisions[-1], None))
            blocks.append(terms)
        return blocks

    def working_set_mb(self, plan: Plan) -> float:
        """The plan's weight bytes in MB (what it streams through the caches every inference)."""
        return sum(self.compressor.rung(name, d.method, d.rank).params * BYTES_PER_ELEMENT[d.precision]
                   for name, d in plan.decisions) / 1e6

    def blocks(self, plan: Plan) -> list[list[str]]:
        """The terms of every block of `plan`, in order."""
        return [[key for key, *_ in block] for block in self._each_block(plan)]

    def info(self, key_kind: str, index: int, first: Decision, second: Decision | None = None) -> TermInfo:
        """Features of a term (what the predictor learns from): sizes, work, precision and processor."""
        layer = self.graph.layers[index]
        processor = self.board.processor(first.placed_processor)
        common: dict[str, float | str] = {"precision": first.precision, "provider": processor.provider,
                                          "threads": float(processor.threads), "op": layer.op_type,
                                          "out_elements": float(np.prod(layer.output_shape) if layer.output_shape else 0)}
        if key_kind == "layer":
            rung = self.compressor.rung(layer.name, first.method, first.rank)
            kernel = float(np.prod(layer.weight_shape[2:])) if len(layer.weight_shape) > 2 else 1.0
            return TermInfo("layer", {**common, "method": first.method, "flops": float(rung.flops),
                                      "params": float(rung.params), "rank": float(first.rank or 0),
                                      "in_elements": float(np.prod(layer.input_shape) if layer.input_shape else 0),
                                      "kernel": kernel, "nodes": float(len(layer.node_names)),
                                      "first": float(index == 0)})
        if key_kind == "pair":
            assert second is not None
            following = self.graph.layers[index + 1]
            return TermInfo("pair", {**common, "next_precision": second.precision, "next_op": following.op_type,
                                     "nodes": float(len(layer.node_names) + len(following.node_names))})
        return TermInfo(key_kind, common)

    def plan_infos(self, plan: Plan) -> dict[str, TermInfo]:
        """Every term of `plan` with its features."""
        return {key: self.info(kind, index, first, second)
                for block in self._each_block(plan) for key, kind, index, first, second in block}


# ---- the table: terms fitted to measured blocks --------------------------------------------------
@dataclass
class KernelTable:
    """Seconds per term on one device, fitted to its measured blocks; `observed`: blocks each term appeared in."""

    device: Device
    seconds: dict[str, float] = field(default_factory=dict)
    observed: dict[str, int] = field(default_factory=dict)
    infos: dict[str, TermInfo] = field(default_factory=dict)  # features of every term (the predictor's samples)
    blocks: int = 0  # measured blocks fitted
    # model fingerprint -> processor -> its reference plan's typical seconds on that processor
    references: dict[str, dict[str, float]] = field(default_factory=dict)
    observations: list[tuple[list[str], float]] = field(default_factory=list, repr=False)  # what it was fitted to
    # blocks of plans the solver chose and then measured beside the reference plan (KernelCostModel.with_measured),
    # each counted MEASURED_WEIGHT times and never weighted down as outliers
    chosen: list[tuple[list[str], float]] = field(default_factory=list, repr=False)
    pressure: float = 0.0  # d log(block seconds) / d (plan's working set, MB): `cache_pressure`; terms at no working set
    pressure_cap_mb: float = 0.0  # the largest working set measured: larger ones are priced as this one

    def pressure_factor(self, working_set_mb: float) -> float:
        """How much slower a plan's blocks run at this working set than at none."""
        return pressure_factor(self.pressure, self.pressure_cap_mb, working_set_mb)

    def pressure_note(self) -> str:
        """The cache pressure in words."""
        if self.pressure <= 0:
            return "no cache pressure measured (blocks as fast in plans of any weight bytes)"
        return (f"cache pressure: blocks {100 * (np.exp(self.pressure) - 1):.1f} % slower per MB of the plan's weights "
                f"(measured up to {self.pressure_cap_mb:.0f} MB)")

    def __contains__(self, key: str) -> bool:
        return key in self.seconds

    def block_seconds(self, keys: list[str]) -> float | None:
        """A block's predicted seconds, or None when a term is not in the table."""
        if any(key not in self.seconds for key in keys):
            return None
        return float(sum(self.seconds[key] for key in keys))

    def counts(self) -> dict[str, int]:
        """Entries per kind."""
        return {kind: sum(term_kind(k) == kind for k in self.seconds) for kind in KINDS}


def fit_terms(observations: list[tuple[list[str], float]],
              chosen: Sequence[tuple[list[str], float]] = ()) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds per term from measured blocks (terms, seconds), by least squares on relative errors (each block
    weighted by 1 / its time), pair and edge terms held towards 0 (see _RIDGE), then clipped to what each kind can be
    (layer and edge terms not negative, merge terms not positive). `chosen`: blocks of plans the solver chose, each
    counted MEASURED_WEIGHT times and kept whole by the robust fit (the table errs most where the solver looks)."""
    trusted = len(observations)
    observations = [*observations, *chosen]
    keys = sorted({key for terms, _ in observations for key in terms})
    if not keys:
        return {}, {}
    column = {key: j for j, key in enumerate(keys)}
    times = np.array([seconds for _, seconds in observations], dtype=float)
    weight = 1.0 / np.maximum(times, 1e-7)
    emphasis = np.ones(len(observations))
    emphasis[trusted:] = np.sqrt(MEASURED_WEIGHT)  # as if each were there MEASURED_WEIGHT times
    entries = [(r, column[key]) for r, (terms, _) in enumerate(observations) for key in terms]
    rows = csr_matrix((np.ones(len(entries)), ([r for r, _ in entries], [c for _, c in entries])),
                      shape=(len(observations), len(keys)))  # a key twice in a block counts twice
    counts = np.asarray(rows.sum(axis=0)).ravel()
    ridge = np.array([_RIDGE if term_kind(key) in ("pair", "edge") else 0.0 for key in keys]) / float(np.median(times))
    robust = np.ones(len(observations))
    solution = np.zeros(len(keys))
    for _ in range(_ROBUST_ROUNDS):  # Huber weights: a block measured in a burst of load pulls its terms less
        a = vstack([diags(weight * robust * emphasis) @ rows, diags(ridge)]).tocsr()
        b = np.concatenate([robust * emphasis, np.zeros(len(keys))])
        solution = lsqr(a, b, atol=1e-14, btol=1e-14, conlim=1e12, iter_lim=50 * len(keys), x0=solution)[0]
        relative = np.abs(rows @ solution / times - 1.0)
        robust = 1.0 / np.maximum(1.0, relative / _HUBER)
        robust[trusted:] = 1.0
    # what each kind of term can be: a layer and a QuantizeLinear take time, one fixed cost less saves it
    lower = np.array([-np.inf if term_kind(key) in ("merge", "pair") else 0.0 for key in keys])
    upper = np.array([0.0 if term_kind(key) == "merge" else np.inf for key in keys])
    solution = np.clip(solution, lower, upper)
    return {key: float(solution[column[key]]) for key in keys}, {key: int(counts[column[key]]) for key in keys}


def pressure_factor(pressure: float, cap_mb: float, working_set_mb: float) -> float:
    """exp(pressure x the working set), the working set capped at the largest measured (`cap_mb`)."""
    return float(np.exp(pressure * min(working_set_mb, cap_mb)))


def entry_working_set_mb(entry: dict) -> float:
    """The weight bytes (MB) of a stored measured plan: every layer term of its blocks (each layer once)."""
    layers = [entry["terms"][key][1] for keys, *_ in entry["blocks"] for key in keys if entry["terms"][key][0] == "layer"]
    return sum(float(f["params"]) * BYTES_PER_ELEMENT[str(f["precision"])] for f in layers) / 1e6


def cache_pressure(plans: Sequence[tuple[float, Sequence[tuple[list[str], float]]]]) -> float:
    """The slope of log(block seconds) in the plan's working set (MB), from (working set, [(block terms, seconds)])
    per measured plan: within each block made of the same terms, measured in plans of different working sets, so
    that no term's own time enters it (a pooled within-group regression). 0 when no block was measured in plans of
    different working sets, or when they do not run slower in larger ones."""
    groups: dict[tuple[str, ...], list[tuple[float, float]]] = {}
    for working_set, blocks in plans:
        for keys, seconds in blocks:
            if seconds > 0:
                groups.setdefault(tuple(sorted(keys)), []).append((working_set, float(np.log(seconds))))
    covariance = variance = 0.0
    for members in groups.values():
        if len(members) > 1:
            x, y = np.array(members).T
            covariance += float((x - x.mean()) @ (y - y.mean()))
            variance += float((x - x.mean()) @ (x - x.mean()))
    return max(0.0, covariance / variance) if variance > 0 else 0.0


class KernelStore:
    """One device's measured blocks (every model profiled on it), in an append-only file under
    runs/cache/kernels named by the device's key: a new device or ONNX Runtime version starts a new file."""

    def __init__(self, device: Device):
        self.device = device
        self.path = cache_dir("kernels") / f"{device.key(TABLE_VERSION)}.jsonl"
        self.cache = AppendOnlyCache(self.path)

    @staticmethod
    def plan_key(graph: LayerGraph, compressor, plan: Plan, batch: int) -> str:
        return digest(TABLE_VERSION, graph.fingerprint(), compressor.int8_scheme, plan.digest(), str(batch))

    def get(self, key: str) -> dict | None:
        return self.cache.get(key)

    def put(self, key: str, terms: Terms, plan: Plan, paired: Paired) -> None:
        """Keep a measured plan's blocks as (terms, time over the reference plan's on its processor, processor), with
        every term's features and the reference plan's seconds per processor meanwhile (the device's speed then)."""
        per_block = terms.blocks(plan)
        if len(per_block) != len(paired.block_ratios):
            raise ValueError("a measurement's blocks are not the plan's")
        infos = terms.plan_infos(plan)
        self.cache.put(key, {"device": self.device.fingerprint, "onnxruntime": self.device.onnxruntime,
                             "model": terms.graph.fingerprint(), "plan": plan.digest(), "reference_s": paired.reference_s,
                             "blocks": [[keys, ratio, processor] for keys, ratio, processor
                                        in zip(per_block, paired.block_ratios, paired.processors)],
                             "terms": {k: [info.kind, info.features] for k, info in infos.items()}})

    def entries(self) -> list[dict]:
        return [value for value in self.cache._load().values() if isinstance(value, dict)]

    def references(self, entries: list[dict] | None = None) -> dict[str, dict[str, float]]:
        """Model fingerprint -> processor -> its reference plan's typical seconds on it: the median over the plans
        measured beside it (of `entries`, by default every one in the store)."""
        measured: dict[str, dict[str, list[float]]] = {}
        for entry in self.entries() if entries is None else entries:
            for processor, seconds in entry["reference_s"].items():
                measured.setdefault(entry["model"], {}).setdefault(processor, []).append(float(seconds))
        return {model: {processor: float(np.median(values)) for processor, values in by_processor.items()}
                for model, by_processor in measured.items()}

    def table(self, models: set[str] | None = None) -> KernelTable:
        """The table fitted to every block measured on this device (of the models with these fingerprints only, when
        given: e.g. to predict a model the table has not seen), each at the device's typical speed: its time over
        the reference plan's on its processor (paired in time) times the median of its model's reference
        measurements on that processor."""
        entries = [e for e in self.entries() if models is None or e["model"] in models]
        typical = self.references(entries)
        plans: list[tuple[float, list[tuple[list[str], float]]]] = []
        infos: dict[str, TermInfo] = {}
        for entry in entries:
            blocks = entry["blocks"]  # [terms, time over the reference on its processor, processor]
            at_typical = seconds_at([b[1] for b in blocks], [b[2] for b in blocks], typical.get(entry["model"], {}))
            plans.append((entry_working_set_mb(entry), [(list(b[0]), s) for b, s in zip(blocks, at_typical)]))
            infos.update({k: TermInfo(kind, features) for k, (kind, features) in entry["terms"].items()})
        pressure = cache_pressure(plans)
        cap = max((working_set for working_set, _ in plans), default=0.0)
        observations = [(keys, seconds / pressure_factor(pressure, cap, working_set))  # at no working set
                        for working_set, blocks in plans for keys, seconds in blocks]
        seconds, observed = fit_terms(observations)
        return KernelTable(self.device, seconds, observed, infos, len(observations), typical, observations,
                           pressure=pressure, pressure_cap_mb=cap)


# ---- profiling: designed plans measured on the device -------------------------------------------
def design_plans(problem, seed: int = 0) -> list[Plan]:
    """Plans whose blocks identify every term of the model: for each pair of processors, the layers alternate
    between them (every block one layer) until each layer has had each of its decisions on each processor; the
    same with every other layer int8 (the edge terms); then layers in pairs on one processor (P P Q Q ...) at
    every pair of precisions, at random rungs, so that each neighbouring pair of layers shares a block at each
    pair of precisions; whole plans on one processor at one precision (random rungs), the long blocks where
    merge and pair terms add up; plans of blocks of 1-4 layers at random choices, the processors in turn (the
    neighbours a layer meets inside the blocks of a search's plans); and whole plans on one processor at random
    precisions and rungs (the long mixed blocks the integer program favours). Deterministic with `seed`."""
    rng = np.random.default_rng(seed)
    graph = problem.graph
    layers = graph.layers
    options = {layer.index: problem.choices(layer) for layer in layers}
    processors = list(problem.board.processor_ids)

    def on(index: int, processor: str, precision: str | None = None) -> list[Decision]:
        return [d for d in options[index] if d.processor == processor and (precision is None or d.precision == precision)]

    def default(index: int, processor: str) -> Decision:
        full = [d for d in on(index, processor) if d.method == "full" and d.precision == "fp32"]
        return (full or on(index, processor) or options[index])[0]

    plans: dict[str, Plan] = {}

    def add(decisions: list[Decision]) -> None:
        plan = Plan.from_dict({layer.name: d for layer, d in zip(layers, decisions)})
        plans.setdefault(plan.digest(), plan)

    for p in processors:  # long blocks: every layer on p at one precision (random rungs), where merges add up
        for precision in problem.board.processor(p).precisions:
            for _ in range(LONG_BLOCK_PLANS):
                decisions = []
                for i in range(len(layers)):
                    choices = on(i, p, precision) or on(i, p)
                    decisions.append(choices[int(rng.integers(len(choices)))] if choices else default(i, p))
                add(decisions)
    if len(processors) == 1:  # one processor: every plan is one block; whole plans at each precision, random rungs
        p = processors[0]
        for _ in range(3 * max(len(options[layer.index]) for layer in layers)):
            add([on(layer.index, p)[int(rng.integers(len(on(layer.index, p))))] for layer in layers])
        return list(plans.values())
    couples = [(processors[k], processors[(k + 1) % len(processors)]) for k in range(len(processors))]
    for p, q in couples:  # singles: every decision on p, its neighbours on q
        for parity in (0, 1):
            measured = [layer.index for layer in layers if layer.index % 2 == parity and on(layer.index, p)]
            if not measured:
                continue
            orders = {i: rng.permutation(len(on(i, p))) for i in measured}
            for t in range(max(len(on(i, p)) for i in measured)):
                add([on(i, p)[orders[i][t % len(orders[i])]] if i in orders else default(i, q) for i in range(len(layers))])
    for p, q in couples:  # edges: every other layer on p at each precision, each followed by an int8 layer on q
        for parity in (0, 1):
            for precision in problem.board.processor(p).precisions:
                decisions = []
                for i in range(len(layers)):
                    int8_next = [d for d in on(i, q, "int8") if d.method == "full"]
                    choices = on(i, p, precision)
                    if i % 2 == parity and choices:
                        decisions.append(choices[int(rng.integers(len(choices)))])
                    else:
                        decisions.append(int8_next[0] if int8_next else default(i, q))
                add(decisions)
    for p, q in couples[: max(1, len(couples) // 2) if len(processors) == 2 else len(couples)]:  # pairs: P P Q Q ...
        precisions = sorted(set(problem.board.processor(p).precisions) | set(problem.board.processor(q).precisions))
        for offset in range(4):
            for a in precisions:
                for b in precisions:
                    decisions = []
                    for i in range(len(layers)):
                        where = p if (i + offset) % 4 < 2 else q
                        precision = a if (i + offset) % 2 == 0 else b
                        choices = on(i, where, precision)
                        decisions.append(choices[int(rng.integers(len(choices)))] if choices else default(i, where))
                    add(decisions)
    for _ in range(MIXED_BLOCK_PLANS):  # blocks of 1-4 layers at random choices: neighbours as searches meet them
        decisions, k = [], int(rng.integers(len(processors)))
        while len(decisions) < len(layers):
            p = processors[k % len(processors)]
            for i in range(len(decisions), min(len(decisions) + int(rng.integers(1, 5)), len(layers))):
                choices = on(i, p)
                decisions.append(choices[int(rng.integers(len(choices)))] if choices else default(i, p))
            k += 1
        add(decisions)
    # long blocks at mixed precisions, the integer program's favourites (a pair of precisions inside a long block
    # saves less than in the short blocks above); their own random stream keeps the plans above as they were
    mixed = np.random.default_rng([seed, 1])
    for p in processors:
        if len(problem.board.processor(p).precisions) < 2:
            continue
        for _ in range(LONG_MIXED_PLANS):
            decisions = []
            for i in range(len(layers)):
                choices = on(i, p)
                decisions.append(choices[int(mixed.integers(len(choices)))] if choices else default(i, p))
            add(decisions)
    return list(plans.values())


def reference_plan(problem) -> Plan:
    """The plan a profile measures beside every plan to follow the device's speed on each processor: fp32 at full
    rank, the layers taking the processors in turn (a chain of blocks like those it measures), or the baseline."""
    processors = list(problem.board.processor_ids)
    if len(processors) < 2:
        return problem.baseline_plan()
    decisions = {}
    for layer in problem.graph.layers:
        wanted = processors[layer.index % len(processors)]
        options = [d for d in problem.choices(layer) if d.method == "full" and d.precision == "fp32"]
        decisions[layer.name] = next((d for d in options if d.processor == wanted), options[0] if options else
                                     problem.choices(layer)[0])
    return Plan.from_dict(decisions)


@dataclass
class Paired:
    """A plan measured interleaved with the model's reference plan. Each block's time is taken over the time of the
    reference's blocks on the same processor in the same round (a shared machine slows its processors unevenly:
    two-thread sessions far more than one-thread ones), median over the rounds; the reference's seconds per
    processor meanwhile (the device's speed then)."""

    block_ratios: list[float]
    processors: list[str]  # each block's processor
    reference_s: dict[str, float]  # processor -> the reference plan's blocks on it, seconds (median over the rounds)
    measurement: Measurement  # the plan's own measurement over all rounds (absolute: the device's speed then)

    def blocks_at(self, typical: dict[str, float]) -> list[float]:
        """Each block's seconds at the speed whose reference seconds per processor are `typical`."""
        return seconds_at(self.block_ratios, self.processors, typical)

    def speed(self, typical: dict[str, float]) -> float:
        """The device's speed during this measurement: the reference's seconds then over `typical` (1: the same)."""
        usual = sum(typical.get(p, 0.0) for p in self.reference_s)
        return sum(self.reference_s.values()) / usual if usual > 0 else 1.0


def seconds_at(ratios: Sequence[float], processors: Sequence[str], typical: dict[str, float]) -> list[float]:
    """Blocks' seconds from their times over the reference's blocks on their processor, at the speed whose reference
    seconds per processor are `typical` (a processor the reference does not use: over the whole reference)."""
    whole = sum(typical.values())
    return [float(ratio) * typical.get(processor, whole) for ratio, processor in zip(ratios, processors)]


def measure_paired(problem, plans: list[Plan]) -> list[Paired | MeasurementFailed]:
    """`plans` measured in groups of PAIRED_GROUP, each group interleaved with the reference plan (groups on as many
    measurement servers at once as the measurer has); a group that fails is measured again plan by plan, so one
    plan that cannot be measured fails alone."""
    reference = reference_plan(problem)
    groups = [plans[i:i + PAIRED_GROUP] for i in range(0, len(plans), PAIRED_GROUP)]

    def run(groups: list[list[Plan]]) -> list[list[Interleaved] | MeasurementFailed]:
        return problem.measurer.measure_interleaved_many(
            problem.graph, problem.compressor, problem.board, [[reference, *group] for group in groups],
            problem.calibration_inputs, PAIRED_REPEATS_PER_ROUND, PAIRED_REPEATS)

    results: list[Paired | MeasurementFailed] = []
    for group, answer in zip(groups, run(groups)):
        if isinstance(answer, MeasurementFailed) and len(group) > 1:
            results += [one for alone in run([[plan] for plan in group]) for one in _paired(alone, 1)]
        else:
            results += _paired(answer, len(group))
    return results


def _paired(answer: list[Interleaved] | MeasurementFailed, plans: int) -> list[Paired | MeasurementFailed]:
    """Each plan of one interleaved run (the reference first) over the reference, round by round and processor by
    processor (a processor the reference does not use: over the whole reference)."""
    if isinstance(answer, MeasurementFailed):
        return [answer] * plans
    reference, *measured = answer
    by_processor: dict[str, np.ndarray] = {}  # processor -> the reference's ms on it in each round
    for j, one_round in enumerate(reference.rounds):
        for block in one_round.blocks:
            by_processor.setdefault(block.processor, np.zeros(len(reference.rounds)))[j] += block.latency_ms
    whole = np.array([r.latency_ms for r in reference.rounds])
    paired: list[Paired | MeasurementFailed] = []
    for one in measured:
        processors = [block.processor for block in one.measurement.blocks]
        blocks = np.array([[block.latency_ms for block in r.blocks] for r in one.rounds])  # rounds x blocks
        over = np.stack([by_processor.get(p, whole) for p in processors], axis=1)
        paired.append(Paired([float(x) for x in np.median(blocks / over, axis=0)], processors,
                             {p: float(np.median(ms)) / 1e3 for p, ms in by_processor.items()}, one.measurement))
    return paired


@dataclass
class ProfileResult:
    """What `profile` did: plans measured now, found from before, failed; the time it took; the table."""

    measured: int
    recalled: int
    failed: int
    seconds: float
    table: KernelTable
    store: KernelStore
    blocks_now: int = 0


def profile(problem, progress: Callable[[int, int], None] | None = None, seed: int = 0,
            plans: Iterable[Plan] | None = None, budget: int | None = None) -> ProfileResult:
    """Measure the designed plans of `problem` (or `plans`) on its measurer's device that are not yet in the
    device's store, `problem.measurer.parallelism` at a time, each kept as soon as it is measured (Ctrl-C loses at
    most the plans in flight). With `budget`, at most that many: in rounds, each measuring the plans whose
    unmeasured layer terms the predictor (fitted to everything measured on the device so far) is least sure of.
    `progress(done, total)` after each batch, first with what was there before."""
    measurer = problem.measurer
    store = KernelStore(measurer.device(problem.board))
    terms = Terms(problem.graph, problem.board, problem.compressor)
    wanted = list(plans) if plans is not None else design_plans(problem, seed)
    batch = getattr(measurer, "batch", 1)
    keyed = [(store.plan_key(problem.graph, problem.compressor, plan, batch), plan) for plan in wanted]
    todo = [(key, plan) for key, plan in keyed if store.get(key) is None]
    recalled = len(keyed) - len(todo)
    total = len(keyed) if budget is None else recalled + min(budget, len(todo))
    started, measured, failed, blocks_now = time.monotonic(), 0, 0, 0
    if progress:
        progress(recalled, total)
    if todo:
        warm_up(problem)
    step = max(1, measurer.parallelism) * PAIRED_GROUP
    round_size = len(todo) if budget is None else max(step, budget // 4)
    while todo and recalled + measured + failed < total:
        left = total - recalled - measured - failed
        if budget is not None and measured + failed:
            todo = _least_sure_first(store.table(), terms, todo)
        chosen, todo = todo[:min(round_size, left)], todo[min(round_size, left):]
        for start in range(0, len(chosen), step):
            chunk = chosen[start:start + step]
            results = measure_paired(problem, [plan for _, plan in chunk])
            for (key, plan), result in zip(chunk, results):
                if isinstance(result, Paired):
                    store.put(key, terms, plan, result)
                    measured += 1
                    blocks_now += len(result.block_ratios)
                else:
                    failed += 1
            if progress:
                progress(recalled + measured + failed, total)
    return ProfileResult(measured, recalled, failed, time.monotonic() - started, store.table(), store, blocks_now)


def _least_sure_first(table: KernelTable, terms: Terms, todo: list[tuple[str, Plan]]) -> list[tuple[str, Plan]]:
    """`todo` ordered by how unsure the predictor (fitted to `table`) is of the plans' layer terms the table
    lacks (adaptive sampling: measure next where it knows least)."""
    from explorer.predictor import KernelPredictor

    predictor = KernelPredictor.from_table(table)
    unknown = {key: info for _, plan in todo for key, info in terms.plan_infos(plan).items()
               if info.kind == "layer" and key not in table.seconds}
    spreads = dict(zip(unknown, (min(spread, 10.0) for _, spread in predictor.predict_many(list(unknown.values())))))

    def unsure(plan: Plan) -> float:
        return sum(spreads.get(key, 0.0) for key in terms.plan_infos(plan))

    return sorted(todo, key=lambda item: -unsure(item[1]))


@dataclass
class CheckResult:
    """Table against measurement on held-out plans: relative errors (predicted / measured - 1) of each plan's blocks
    and whole plans, how many terms the table lacked (priced by the fallback), the device's speed meanwhile."""

    block_errors: list[float]
    plan_errors: list[float]
    fallback_terms: int
    speeds: list[float] = field(default_factory=list)  # the device's speed at each check against the table's (1: same)

    @property
    def speed(self) -> float:
        """The device's speed during the check: the reference plan's time then over its typical time in the table
        (1: as fast as while profiling; measured times are compared over the reference, so it scales nothing)."""
        return float(np.median(self.speeds)) if self.speeds else 1.0

    def within(self, errors: list[float], tolerance: float) -> float:
        return float(np.mean(np.abs(np.asarray(errors)) <= tolerance)) if len(errors) else float("nan")


def warm_up(problem) -> None:
    """Measure the baseline plan once and forget it: a process's first measurements run slow (lazy initialisation,
    cold caches and allocator), which would bias the first plans measured."""
    problem.measurer.measure(problem.graph, problem.compressor, problem.board, problem.baseline_plan(),
                             problem.calibration_inputs)


def check(problem, model: KernelCostModel, plans: list[Plan]) -> CheckResult:
    """Measure `plans` (not used in the fit) as the table's plans were measured (over the reference plan, paired in
    time) and compare every block and plan with `model`'s prediction; `speeds` keeps the device's speed during each
    plan's run (the reference's seconds then over its typical seconds in the table)."""
    warm_up(problem)
    typical = typical_reference_s(problem, model)
    block_errors, plan_errors, speeds = [], [], []
    for plan, result in zip(plans, measure_paired(problem, plans)):
        if not isinstance(result, Paired):
            continue
        predicted, measured = model.block_seconds(plan), result.blocks_at(typical)
        block_errors += [p / m - 1 for p, m in zip(predicted, measured)]
        plan_errors.append(sum(predicted) / sum(measured) - 1)
        speeds.append(result.speed(typical))
    return CheckResult(block_errors, plan_errors, model.sources.get("predictor", 0) + model.sources.get("roofline", 0),
                       speeds)


def typical_reference_s(problem, model: KernelCostModel) -> dict[str, float]:
    """The model's reference plan's typical seconds on the device per processor: the median of its measurements
    while profiling, or (a model the table never measured) its prediction."""
    typical = model.table.references.get(problem.graph.fingerprint())
    if typical is not None:
        return typical
    plan = reference_plan(problem)
    predicted: dict[str, float] = {}
    for boundary, seconds in zip(block_boundaries(problem.graph, plan), model.block_seconds(plan)):
        predicted[boundary.processor] = predicted.get(boundary.processor, 0.0) + seconds
    return predicted


def blocks_at_typical_speed(problem, model: KernelCostModel, plan: Plan) -> tuple[list[float], float] | None:
    """The plan's blocks' seconds at the device's typical speed in `model`'s table (measured now, paired with the
    reference plan) and the device's speed meanwhile; None when the measurement failed."""
    typical = typical_reference_s(problem, model)
    result = measure_paired(problem, [plan])[0]
    if not isinstance(result, Paired):
        return None
    return result.blocks_at(typical), result.speed(typical)


def at_typical_speed(problem, plan: Plan) -> tuple[float, float] | None:
    """The plan's seconds at the device's typical speed in the problem's kernel table and the device's speed
    meanwhile (`blocks_at_typical_speed`); None when the cost model is no kernel table or the measurement failed."""
    model = problem.cost_model
    measured = blocks_at_typical_speed(problem, model, plan) if isinstance(model, KernelCostModel) else None
    return None if measured is None else (sum(measured[0]), measured[1])


def plan_seconds(table: KernelTable, terms: Terms, plan: Plan) -> tuple[float | None, list[float | None]]:
    """A plan's predicted seconds from the table alone and per block (None where a term is missing), at its working
    set."""
    factor = table.pressure_factor(terms.working_set_mb(plan))
    per_block = [None if b is None else b * factor for b in map(table.block_seconds, terms.blocks(plan))]
    total = None if any(b is None for b in per_block) else float(sum(b for b in per_block if b is not None))
    return total, per_block


def model_attributes(node: onnx.NodeProto) -> list[bytes]:
    """A node's attributes, serialised in name order (part of a layer's signature)."""
    return [attribute.SerializeToString() for attribute in sorted(node.attribute, key=lambda a: a.name)]


# ---- the cost model on a kernel table -------------------------------------------------------------
class KernelCostModel(CostModel):
    """The cost model on one device's kernel table: a layer's latency is its layer term, the cost between two
    neighbouring layers a pair term (one processor) or an edge term (a cut before an int8 layer); energy follows
    from that latency as in CostModel (the board's powers). A term the table lacks comes from the predictor
    when there is one, else from the roofline model; `sources` counts which priced what. A plan's blocks are priced at
    its working set (`KernelTable.pressure_factor`); the terms the integer program sums, at `working_set_mb`
    (`at_working_set`)."""

    by_precision = True

    def __init__(self, board, graph: LayerGraph, compressor, table: KernelTable, predictor=None,
                 working_set_mb: float = 0.0):
        super().__init__(board, graph, compressor)
        self.table, self.predictor = table, predictor
        self.terms = Terms(graph, board, compressor)
        self.sources: Counter[str] = Counter()
        self._priced: dict[str, tuple[float, str]] = {}  # seconds at no working set, and where they came from
        self.working_set_mb = working_set_mb
        self.scale = table.pressure_factor(working_set_mb)  # on every term the integer program sums

    def at_working_set(self, working_set_mb: float) -> KernelCostModel:
        """The same table with the integer program's terms priced at this working set (MB)."""
        model = copy.copy(self)
        model.working_set_mb, model.scale = working_set_mb, self.table.pressure_factor(working_set_mb)
        return model

    def _price(self, key: str, info: Callable[[], TermInfo], roofline: Callable[[], float]) -> float:
        if key not in self._priced:
            if key in self.table.seconds:
                self._priced[key] = self.table.seconds[key], "table"
            elif self.predictor is not None:
                self._priced[key] = self.predictor.predict(info())[0], "predictor"
            else:
                self._priced[key] = roofline(), "roofline"
            self.sources[self._priced[key][1]] += 1
        return self._priced[key][0]

    def prime(self, problem) -> None:
        """Predict, in one batch, every term of `problem`'s integer program that the table lacks (the predictor is
        far faster on many terms at once than on one at a time)."""
        if self.predictor is None:
            return
        wanted: dict[str, TermInfo] = {}
        states = set()
        for layer in self.graph.layers:
            for decision in problem.choices(layer):
                states.add((decision.placed_processor, decision.precision))
                key = self.terms.layer(layer.index, decision)
                if key not in self.table.seconds:
                    wanted[key] = self.terms.info("layer", layer.index, decision)
        for index in range(len(self.graph.layers) - 1):
            for p, a in states:
                first = Decision(precision=a, processor=p)
                for q, b in states:
                    second = Decision(precision=b, processor=q)
                    if p == q:
                        needed = [(self.terms.merge(index, first), "merge"), (self.terms.pair(index, first, second), "pair")]
                    else:
                        needed = [(self.terms.edge(index, first), "edge")] if b == "int8" else []
                    for key, kind in needed:
                        if key not in self.table.seconds:
                            wanted[key] = self.terms.info(kind, index, first, second)
        fresh = {k: info for k, info in wanted.items() if k not in self._priced}
        for key, (seconds, _) in zip(fresh, self.predictor.predict_many(list(fresh.values()))):
            self._priced[key] = seconds, "predictor"
            self.sources["predictor"] += 1

    def source(self, key: str) -> str | None:
        """Where a priced term's seconds came from: table, predictor or roofline (None: not priced yet)."""
        return self._priced[key][1] if key in self._priced else None

    def layer_latency_s(self, layer: Layer, rung: Rung, precision: str, processor_id: str) -> float:
        return self._layer_s(layer, rung, precision, processor_id) * self.scale

    def _layer_s(self, layer: Layer, rung: Rung, precision: str, processor_id: str) -> float:
        decision = Decision(rung.method, rung.rank, precision, processor_id)
        return self._price(self.terms.layer(layer.index, decision), lambda: self.terms.info("layer", layer.index, decision),
                           lambda: super(KernelCostModel, self).layer_latency_s(layer, rung, precision, processor_id))

    def boundary(self, index: int, first: Decision, second: Decision) -> tuple[float, float]:
        seconds = self._boundary_s(index, first, second) * self.scale
        _, joules = super().boundary(index, first, second)  # the link's energy (the time is in the measured blocks)
        processor = self.board.processor(first.placed_processor)
        return seconds, joules + seconds * processor.active_power_w

    def _boundary_s(self, index: int, first: Decision, second: Decision) -> float:
        if first.placed_processor == second.placed_processor:
            seconds = self._price(self.terms.merge(index, first), lambda: self.terms.info("merge", index, first), lambda: 0.0)
            seconds += self._price(self.terms.pair(index, first, second),
                                   lambda: self.terms.info("pair", index, first, second), lambda: 0.0)
        elif second.precision == "int8":
            seconds = self._price(self.terms.edge(index, first), lambda: self.terms.info("edge", index, first), lambda: 0.0)
        else:
            seconds = 0.0
        return seconds

    def input_transfer(self, processor_id: str) -> tuple[float, float]:
        return 0.0, super().input_transfer(processor_id)[1]  # feeding the first block is in its measured time

    def output_transfer(self, processor_id: str) -> tuple[float, float]:
        return 0.0, super().output_transfer(processor_id)[1]

    def block_seconds(self, plan: Plan) -> list[float]:
        """Each unit block's predicted seconds (table, else predictor, else roofline for each term) at the plan's
        working set."""
        factor = self.table.pressure_factor(self.terms.working_set_mb(plan))
        blocks = []
        for boundary in block_boundaries(self.graph, plan):
            seconds = 0.0
            for i in range(boundary.start, boundary.end):
                name, decision = plan.decisions[i]
                rung = self.compressor.rung(name, decision.method, decision.rank)
                seconds += self._layer_s(self.graph.layers[i], rung, decision.precision, decision.placed_processor)
                if i + 1 < len(plan.decisions):
                    seconds += self._boundary_s(i, decision, plan.decisions[i + 1][1])
            blocks.append(seconds * factor)
        return blocks

    def plan_cost(self, plan: Plan) -> PlanCost:
        """The additive totals at the plan's own working set (its time and the energy that follows from it scaled
        from the integer program's working set)."""
        cost = super().plan_cost(plan)
        ratio = self.table.pressure_factor(self.terms.working_set_mb(plan)) / self.scale
        if ratio == 1.0:
            return cost
        return PlanCost(cost.latency_s * ratio, cost.energy_j * ratio, cost.weight_bytes_by_processor,
                        [seconds * ratio for seconds in cost.layer_latency_s], cost.transfer_latency_s * ratio)

    def plan_prediction(self, plan: Plan) -> tuple[PlanCost, bool]:
        """The plan's predicted cost (as the solver sees it) and whether the table priced every term of it (False:
        some came from the predictor or the roofline model, so the prediction is less sure)."""
        cost = self.plan_cost(plan)
        every = list(self.terms.plan_infos(plan))
        return cost, all(self.source(key) == "table" for key in every if self.source(key) is not None)

    def with_measured(self, measured: list[tuple[Plan, list[float], bool]]) -> KernelCostModel:
        """A copy whose table is fitted again with the blocks of these measured plans added: (plan, its blocks'
        seconds, whether at the table's typical speed). The integer program's plan is where the table errs in its
        favour, and its measured blocks correct exactly the terms it leaned on: blocks at the typical speed (the
        measured solver's rounds, paired as the table's own) are kept whole, MEASURED_WEIGHT times; blocks at the
        device's speed then (a search's trials) are fitted as designed blocks are, SEARCHED_WEIGHT times (the robust
        fit weighs down those of a slow second)."""
        def blocks(typical: bool) -> list[tuple[list[str], float]]:  # at no working set, as the table's
            return [(keys, seconds / self.table.pressure_factor(self.terms.working_set_mb(plan)))
                    for plan, times, at_typical in measured if at_typical == typical
                    for keys, seconds in zip(self.terms.blocks(plan), times)]

        observations = self.table.observations + blocks(False) * SEARCHED_WEIGHT
        chosen = self.table.chosen + blocks(True)
        seconds, observed = fit_terms(observations, chosen)
        table = KernelTable(self.table.device, seconds, observed, self.table.infos, len(observations) + len(chosen),
                            self.table.references, observations, chosen, self.table.pressure, self.table.pressure_cap_mb)
        return KernelCostModel(self.board, self.graph, self.compressor, table, self.predictor, self.working_set_mb)

    def calibrated(self, observations: list[tuple[str, str, str, float, float]]) -> KernelCostModel:
        """Itself: its terms are measured, and the per-(processor, op kind, precision) factors that correct the
        roofline would scale layer terms against the merge terms they were fitted with (`explorer profile` adds
        measurements to the table)."""
        return self

    def describe(self) -> str:
        """Where its figures come from, in words (shown with every solve and search on a real device)."""
        counts = self.table.counts()
        text = (f"kernel table of {self.table.device.fingerprint}, ONNX Runtime {self.table.device.onnxruntime} "
                f"({counts['layer']} layer, {counts['merge']} merge, {counts['pair']} pair, {counts['edge']} edge terms "
                f"from {self.table.blocks} "
                "measured blocks)")
        if self.table.pressure > 0:
            text += f"; {self.table.pressure_note()}"
        if self.sources:
            text += "; terms priced: " + ", ".join(f"{n} from the {what}" for what, n in sorted(self.sources.items()))
        if self.sources.get("roofline"):
            text += " (the roofline model for terms not in the table: `explorer profile` measures them)"
        return text


# ---- which cost model a problem gets -----------------------------------------------------------------
def profile_command(problem) -> str:
    """The command that profiles this problem's model on its device."""
    settings = getattr(problem, "settings", None) or {}
    model = settings.get("model", problem.graph.source)
    board = settings.get("board", problem.board.name)
    measure = settings.get("measure", problem.measurer.name)
    return f"explorer profile --board {board} --model {model} --measure {measure}"


def device_cost_model(problem) -> tuple[CostModel, str]:
    """The cost model a problem on a real device should solve on, and what it is in words: its kernel table when
    this device has one (terms it lacks predicted from every term measured on the device, when there are enough),
    else the roofline model, which says so. A simulated board keeps its roofline model (the simulator is the
    device)."""
    if problem.measurer.simulated:
        return problem.cost_model, "roofline model of the simulated board"
    store = KernelStore(problem.measurer.device(problem.board))
    table = store.table()
    terms = Terms(problem.graph, problem.board, problem.compressor)
    wanted = {terms.layer(layer.index, d) for layer in problem.graph.layers for d in problem.choices(layer)}
    missing = len(wanted - set(table.seconds))
    if not table.seconds:
        return problem.cost_model, (f"roofline model (no kernel table of this device: `{profile_command(problem)}` measures "
                                    "one; predictions on a real device are guesses without it)")
    predictor = None
    if missing:
        from explorer.predictor import KernelPredictor

        predictor = KernelPredictor.from_table(table)
        if not predictor.knows("layer"):
            predictor = None
    model = KernelCostModel(problem.board, problem.graph, problem.compressor, table, predictor)
    model.prime(problem)
    note = model.describe()
    if missing:
        share = f"{missing} of the model's {len(wanted)} layer choices are not in the table"
        note += (f"; {share}: predicted by {predictor.describe()}" if predictor else
                 f"; {share}: the roofline model prices them") + f" (`{profile_command(problem)}` measures them)"
    return model, note
