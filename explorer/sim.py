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
    layers: list[str]
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
        if rung.method != "full":  # the hidden tensor between the two factors
            activations += ACTIVATION_BYTES * rung.rank * max(1, math.prod(layer.output_shape[2:]))
        narrowest = rung.rank if rung.method != "full" else min(layer.weight_shape[:2])
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
             repeats: int = REPEATS, dram_bandwidth_gbps: float | None = None) -> SimResult:
    """Simulate one inference of the plan on the board (median of `repeats` noisy runs)."""
    work = layer_work(graph, compressor, plan)
    boundaries = block_boundaries(graph, plan)
    decisions = [d for _, d in plan.decisions]
    host = board.processor_ids[0]
    blocks = []
    for index, boundary in enumerate(boundaries):
        processor = board.processor(boundary.processor)
        compute_s = memory_s = dram_bytes = weight_bytes = 0.0
        for i in range(boundary.start, boundary.end):
            flops, nbytes, narrowest, ops, weights = work[i]
            c, m = layer_time(processor, graph.layers[i].kind, decisions[i].precision, flops, nbytes, narrowest, ops)
            compute_s, memory_s = compute_s + c, memory_s + m
            dram_bytes += nbytes
            weight_bytes += weights
        blocks.append((boundary, processor, compute_s, memory_s, dram_bytes, int(weight_bytes)))
    rng = np.random.default_rng([seed, int(plan.digest()[:12], 16)])
    runs = [_schedule(board, graph, blocks, host, rng.lognormal(0.0, NOISE_SIGMA, len(blocks)), dram_bandwidth_gbps)
            for _ in range(repeats)]
    totals = [run[0] for run in runs]
    median_index = int(np.argsort(totals)[len(totals) // 2])
    latency, energy, sim_blocks = runs[median_index]
    weights_by_processor: dict[str, int] = {}
    for block in sim_blocks:
        weights_by_processor[block.processor] = weights_by_processor.get(block.processor, 0) + block.weight_bytes
    return SimResult(latency, max(totals) - min(totals), energy, weights_by_processor, sim_blocks)


def _schedule(board: Board, graph: LayerGraph, blocks, host: str, noise: np.ndarray,
              dram_bandwidth_gbps: float | None):
    """Fluid-model schedule of the blocks: returns (latency, energy, SimBlocks)."""
    dram = (dram_bandwidth_gbps or board.memory.bandwidth_gbps) * 1e9
    producer = {}
    for index, (boundary, *_rest) in enumerate(blocks):
        for tensor in boundary.outputs:
            producer[tensor] = index
    finish: dict[int, float] = {}
    ready_at: list[float] = []
    transfer_s: list[float] = []
    transfer_j: list[float] = []
    for index, (boundary, processor, *_rest) in enumerate(blocks):
        ready, seconds, joules = 0.0, 0.0, 0.0
        for tensor in boundary.inputs:
            source = blocks[producer[tensor]][1].id if tensor in producer else host
            link = board.link(source, processor.id)
            nbytes = graph.tensor_bytes(tensor)
            seconds += link.transfer_time_s(nbytes)
            joules += link.transfer_energy_j(nbytes)
        ready_at.append(seconds)  # plus the producers' finish times, added when they are known
        transfer_s.append(seconds)
        transfer_j.append(joules)
    # remaining standalone seconds of each block; progress is slowed when DRAM is oversubscribed
    remaining = [(c + m) * n if True else 0.0 for (_, _, c, m, _, _), n in zip(blocks, noise)]
    demand = [d / max(r, 1e-12) if not blocks[i][1].is_remote else 0.0
              for i, ((_, _, _, _, d, _), r) in enumerate(zip(blocks, remaining))]
    memory_share = [m / max(c + m, 1e-12) for (_, _, c, m, _, _) in blocks]
    depends = [{producer[t] for t in b.inputs if t in producer} for b, *_ in blocks]
    start: dict[int, float] = {}
    busy_until: dict[str, float] = {}
    now = 0.0
    running: set[int] = set()
    pending = set(range(len(blocks)))
    while pending or running:
        for i in sorted(pending):
            if depends[i] <= set(finish):
                earliest = max([finish[d] for d in depends[i]] + [0.0]) + ready_at[i]
                pid = blocks[i][1].id
                if earliest <= now + 1e-15 and busy_until.get(pid, 0.0) <= now + 1e-15 and \
                        all(blocks[r][1].id != pid for r in running):
                    running.add(i)
                    start[i] = now
                    pending.discard(i)
        if not running:  # jump to the next time something becomes ready
            candidates = [max([finish[d] for d in depends[i]] + [0.0]) + ready_at[i]
                          for i in pending if depends[i] <= set(finish)]
            now = max(now, min(candidates))
            continue
        local_demand = sum(demand[i] for i in running)
        squeeze = max(1.0, local_demand / dram)
        rates = {i: 1.0 / (1.0 + memory_share[i] * (squeeze - 1.0)) for i in running}
        step = min(remaining[i] / rates[i] for i in running)
        next_ready = [max([finish[d] for d in depends[i]] + [0.0]) + ready_at[i]
                      for i in pending if depends[i] <= set(finish)]
        later = [t - now for t in next_ready if t > now + 1e-15]
        if later:
            step = min(step, min(later))
        now += step
        for i in list(running):
            remaining[i] -= step * rates[i]
            if remaining[i] <= 1e-15:
                running.discard(i)
                finish[i] = now
                busy_until[blocks[i][1].id] = now
    last = max(range(len(blocks)), key=lambda i: finish[i])
    out_link = board.link(blocks[last][1].id, host)
    out_bytes = sum(graph.tensor_bytes(t) for t in graph.output_names)
    latency = finish[last] + out_link.transfer_time_s(out_bytes)
    energy = out_link.transfer_energy_j(out_bytes)
    sim_blocks = []
    busy: dict[str, float] = {}
    for i, (boundary, processor, _c, _m, dram_bytes, weight_bytes) in enumerate(blocks):
        duration = finish[i] - start[i]
        block_energy = duration * processor.active_power_w + transfer_j[i]
        if not processor.is_remote:
            block_energy += dram_bytes * board.memory.energy_nj_per_byte * 1e-9
        busy[processor.id] = busy.get(processor.id, 0.0) + duration
        energy += block_energy
        sim_blocks.append(SimBlock(i, processor.id, boundary.layer_names, duration, transfer_s[i],
                                   block_energy, weight_bytes, start[i]))
    for pid, processor in board.processors.items():  # waiting processors draw idle power
        if not processor.is_remote:
            energy += max(0.0, latency - busy.get(pid, 0.0)) * processor.idle_power_w
    return latency, energy, sim_blocks
