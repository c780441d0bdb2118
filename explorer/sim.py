"""`sim`: a simulated board. A model of the hardware described by targets/NAME.toml, never a
measurement of it. It is richer than the additive cost model in the ways real boards differ:

- every op pays the processor's fixed launch overhead (factorised layers launch two compute ops,
  fp16 adds casts, int8 adds quantize/dequantize ops, weight-free ops count too);
- efficiency falls for small or skinny operations: a low rank or a small layer cannot fill a
  GPU's or DSP's lanes (utilisation = min(1, narrowest dimension / tile) x work / (work + half-work));
- a layer whose weights and activations fit in the processor's cache streams them at a multiple
  of the DRAM bandwidth;
- unit blocks run as a dependency graph: blocks on different processors whose inputs are ready run
  at the same time and then share the board's DRAM bandwidth (a fluid model), so two processors
  contending for memory slow each other;
- every tensor crossing between processors pays its link (bandwidth, latency, energy), including
  skip connections, and the input comes from / the output returns to the first processor;
- processors that wait draw their idle power, DRAM traffic costs energy per byte;
- repeats differ by seeded multiplicative noise; the result is the median over repeats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from explorer.boards import Board, Processor
from explorer.compress import Compressor
from explorer.cost import ACTIVATION_BYTES, BYTES_PER_ELEMENT, compute_nodes, extra_nodes
from explorer.graph import LayerGraph
from explorer.partition import block_boundaries
from explorer.plan import Plan

#: Per processor kind: (tile: the narrowest dimension that fills the lanes, half-work FLOPs: the op
#: size at which utilisation is one half). Modelling assumptions of this simulator, not data.
SHAPE_EFFICIENCY = {"cpu": (4, 2e4), "lpc": (4, 1e4), "gpu": (32, 2e6), "dsp": (16, 5e5), "remote": (64, 2e7)}
CACHE_SPEEDUP = 4.0  # bandwidth multiple for a working set that fits in the processor's cache
NOISE_SIGMA = 0.03  # repeat-to-repeat log-normal noise of block times
REPEATS = 5


@dataclass
class SimBlock:
    """One unit block's simulated figures (medians over the repeats)."""

    index: int
    processor: str
    layers: tuple[str, ...]
    latency_s: float  # compute time of the block, contention included
    transfer_in_s: float  # time to bring its inputs over links
    energy_j: float  # active energy of its processor + DRAM + incoming transfers
    weight_bytes: int
    start_s: float = 0.0


@dataclass
class SimResult:
    """Simulated totals of a plan."""

    latency_s: float
    latency_spread_s: float  # max - min over repeats
    energy_j: float
    weight_bytes_by_processor: dict[str, int]
    blocks: list[SimBlock]


def layer_work(graph: LayerGraph, compressor: Compressor, plan: Plan):
    """Per layer: (FLOPs, DRAM bytes, narrowest dim, op count, weight bytes) of its decision."""
    work = []
    for (name, decision), layer in zip(plan.decisions, graph.layers):
        rung = compressor.rung(name, decision.method, decision.rank)
        weight_bytes = rung.params * BYTES_PER_ELEMENT[decision.precision]
        activations = ACTIVATION_BYTES * (math.prod(layer.input_shape or (0,)) + math.prod(layer.output_shape or (0,)))
        rank = rung.rank if rung.method != "full" else None  # a factorised layer's rank
        if rank is not None:  # the hidden tensor between the two factors
            activations += ACTIVATION_BYTES * rank * max(1, math.prod(layer.output_shape[2:]))
        narrowest = rank if rank is not None else min(layer.weight_shape[:2])
        compute = compute_nodes(rung)
        ops = compute + extra_nodes(decision.precision, compute) + len(layer.node_names) - 1
        work.append((rung.flops, weight_bytes + activations, narrowest, ops, weight_bytes))
    return work


def layer_time(processor: Processor, kind: str, precision: str, flops: float, nbytes: float,
               narrowest: int, ops: int) -> tuple[float, float]:
    """(compute-bound seconds, memory-bound seconds) of one layer on a processor, alone."""
    tile, half_work = SHAPE_EFFICIENCY[processor.kind]
    utilisation = min(1.0, narrowest / tile) * flops / (flops + half_work) if flops else 1.0
    peak = processor.peak_gflops[precision] * 1e9 * processor.efficiency[kind] * max(utilisation, 1e-3)
    bandwidth = processor.bandwidth_gbps * 1e9
    if nbytes <= processor.cache_kb * 1024:
        bandwidth *= CACHE_SPEEDUP
    compute_s = flops / peak + ops * processor.launch_overhead_us * 1e-6
    return compute_s, nbytes / bandwidth


def simulate(board: Board, graph: LayerGraph, compressor: Compressor, plan: Plan, seed: int = 0,
             repeats: int = REPEATS, dram_bandwidth_gbps: float | None = None, plan_digest: str | None = None) -> SimResult:
    """Simulate one inference of the plan on the board (median of `repeats` noisy runs)."""
    plan_digest = (plan_digest or plan.digest())[:12]
    work = layer_work(graph, compressor, plan)
    boundaries = block_boundaries(graph, plan)
    decisions = [d for _, d in plan.decisions]
    host = board.processor_ids[0]
    blocks = []
    for boundary in boundaries:
        processor = board.processor(decisions[boundary.start].placed_processor)  # the block's processor
        compute_s = memory_s = dram_bytes = weight_bytes = 0.0
        for i in range(boundary.start, boundary.end):
            flops, nbytes, narrowest, ops, weights = work[i]
            c, m = layer_time(processor, graph.layers[i].kind, decisions[i].precision, flops, nbytes, narrowest, ops)
            compute_s, memory_s = compute_s + c, memory_s + m
            dram_bytes += nbytes
            weight_bytes += weights
        blocks.append((boundary, processor, compute_s, memory_s, dram_bytes, int(weight_bytes)))
    transfers = [_incoming(board, graph, blocks, index, host) for index in range(len(blocks))]
    rng = np.random.default_rng([seed, int(plan_digest, 16)])
    dram = (dram_bandwidth_gbps or board.memory.bandwidth_gbps) * 1e9
    last_processor = blocks[-1][1].id
    out_link = board.link(last_processor, host)
    out_bytes = sum(graph.tensor_bytes(t) for t in graph.output_names)
    timelines = [_timeline(blocks, transfers, rng.lognormal(0.0, NOISE_SIGMA, len(blocks)), dram) for _ in range(repeats)]
    totals = [max(finish) + out_link.transfer_time_s(out_bytes) for _, finish in timelines]
    median = int(np.argsort(totals)[len(totals) // 2])
    start, finish = timelines[median]
    latency = totals[median]
    energy = out_link.transfer_energy_j(out_bytes)
    sim_blocks = []
    busy: dict[str, float] = {}
    for i, (boundary, processor, _c, _m, dram_bytes, weight_bytes) in enumerate(blocks):
        duration = finish[i] - start[i]
        block_energy = duration * processor.active_power_w + transfers[i][1]
        if not processor.is_remote:
            block_energy += dram_bytes * board.memory.energy_nj_per_byte * 1e-9
        busy[processor.id] = busy.get(processor.id, 0.0) + duration
        energy += block_energy
        sim_blocks.append(SimBlock(i, processor.id, boundary.layer_names, duration, transfers[i][0],
                                   block_energy, weight_bytes, start[i]))
    for pid, processor in board.processors.items():  # waiting processors draw idle power
        if not processor.is_remote:
            energy += max(0.0, latency - busy.get(pid, 0.0)) * processor.idle_power_w
    weights_by_processor: dict[str, int] = {}
    for block in sim_blocks:
        weights_by_processor[block.processor] = weights_by_processor.get(block.processor, 0) + block.weight_bytes
    return SimResult(latency, max(totals) - min(totals), energy, weights_by_processor, sim_blocks)


def _incoming(board: Board, graph: LayerGraph, blocks, index: int, host: str) -> tuple[float, float, list[int]]:
    """(seconds, joules, producing blocks) of the tensors a block receives over links."""
    boundary, processor = blocks[index][0], blocks[index][1]
    seconds = joules = 0.0
    producers = []
    for tensor in boundary.inputs:
        source = next((i for i in range(index) if tensor in blocks[i][0].outputs), None)
        link = board.link(blocks[source][1].id if source is not None else host, processor.id)
        nbytes = graph.tensor_bytes(tensor)
        seconds += link.transfer_time_s(nbytes)
        joules += link.transfer_energy_j(nbytes)
        if source is not None:
            producers.append(source)
    return seconds, joules, producers


def _timeline(blocks, transfers, noise: np.ndarray, dram: float) -> tuple[list[float], list[float]]:
    """Start and finish time of every block: a dependency-driven fluid schedule in which blocks
    running at the same time on different processors share the DRAM bandwidth."""
    durations = [(c + m) * n for (_, _, c, m, _, _), n in zip(blocks, noise)]
    depends = [t[2] for t in transfers]
    if all(i - 1 in depends[i] for i in range(1, len(blocks))):  # a chain: nothing can overlap
        start, finish, now = [], [], 0.0
        for i, duration in enumerate(durations):
            now += transfers[i][0]
            start.append(now)
            now += duration
            finish.append(now)
        return start, finish
    remaining = list(durations)
    demand = [0.0 if b[1].is_remote else b[4] / max(r, 1e-12) for b, r in zip(blocks, remaining)]
    memory_share = [m / max(c + m, 1e-12) for (_, _, c, m, _, _) in blocks]
    start_at: dict[int, float] = {}
    finish_at: dict[int, float] = {}
    now = 0.0
    running: set[int] = set()
    pending = set(range(len(blocks)))

    def ready_time(i: int) -> float | None:
        if not all(d in finish_at for d in depends[i]):
            return None
        return max((finish_at[d] for d in depends[i]), default=0.0) + transfers[i][0]

    while pending or running:
        busy = {blocks[r][1].id for r in running}
        for i in sorted(pending):
            ready = ready_time(i)
            if ready is not None and ready <= now + 1e-15 and blocks[i][1].id not in busy:
                running.add(i)
                busy.add(blocks[i][1].id)
                start_at[i] = now
                pending.discard(i)
        upcoming = [t for t in (ready_time(i) for i in pending) if t is not None and t > now + 1e-15]
        if not running:  # jump to the next time something becomes ready
            now = min(upcoming)
            continue
        squeeze = max(1.0, sum(demand[i] for i in running) / dram)
        rates = {i: 1.0 / (1.0 + memory_share[i] * (squeeze - 1.0)) for i in running}
        step = min(remaining[i] / rates[i] for i in running)
        if upcoming:
            step = min(step, min(upcoming) - now)
        now += step
        for i in list(running):
            remaining[i] -= step * rates[i]
            if remaining[i] <= 1e-15:
                running.discard(i)
                finish_at[i] = now
    return [start_at[i] for i in range(len(blocks))], [finish_at[i] for i in range(len(blocks))]
