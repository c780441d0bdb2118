"""The simulated board: deterministic for a seed, and richer than the additive cost model."""
import pytest
from boardbuild import write_board
from netbuild import branchy_cnn, small_cnn

from explorer.boards import load_board
from explorer.compress import Compressor, decision_for
from explorer.cost import CostModel
from explorer.graph import LayerGraph
from explorer.plan import Plan
from explorer.sim import simulate


def _plan(graph, processors, rungs=None, precision="fp32"):
    compressor = Compressor(graph)
    return Plan.from_dict({layer.name: decision_for(compressor.ladder(layer.name)[(rungs or {}).get(i, 0)], precision, p)
                           for i, (layer, p) in enumerate(zip(graph.layers, processors))})


def test_deterministic_for_a_seed():
    graph = LayerGraph(small_cnn())
    compressor = Compressor(graph)
    board = load_board("tegra-k1")
    plan = _plan(graph, ["cpu", "gpu", "gpu", "lpc", "cpu", "cpu"])
    first, again = simulate(board, graph, compressor, plan, seed=3), simulate(board, graph, compressor, plan, seed=3)
    assert first.latency_s == again.latency_s and first.energy_j == again.energy_j
    other = simulate(board, graph, compressor, plan, seed=4)
    assert other.latency_s != first.latency_s
    assert first.latency_spread_s > 0


def test_low_rank_on_the_gpu_pays_launch_overhead_and_poor_utilisation():
    """The additive model credits a low rank with its FLOP savings; the sim charges two skinny kernels."""
    graph = LayerGraph(small_cnn(channels=64))
    compressor = Compressor(graph)
    board = load_board("tegra-k1")
    full_plan = _plan(graph, ["gpu"] * len(graph.layers))
    low_plan = _plan(graph, ["gpu"] * len(graph.layers), rungs={1: 1})  # layer 1: 64 -> 128 channels at 16x16
    model = CostModel(board, graph, compressor)
    additive_saving = model.plan_cost(full_plan).latency_s - model.plan_cost(low_plan).latency_s
    simulated_saving = (simulate(board, graph, compressor, full_plan, repeats=1).latency_s
                        - simulate(board, graph, compressor, low_plan, repeats=1).latency_s)
    assert additive_saving > 0
    assert simulated_saving < 0.75 * additive_saving


def test_two_processors_contending_for_dram_slow_each_other(tmp_path):
    board = load_board(str(write_board(tmp_path / "twins.toml", ["a", "b"], dram_gbps=0.5, peak_gflops=1000.0,
                                       cache_kb=1, link_gbps=1000.0)))
    graph = LayerGraph(branchy_cnn())
    compressor = Compressor(graph)
    # stem on a; the one-layer branch on b runs at the same time as the first layer of the other on a
    plan = _plan(graph, ["a", "b", "a", "b", "b"])
    narrow = simulate(board, graph, compressor, plan, repeats=1)
    wide = simulate(board, graph, compressor, plan, repeats=1, dram_bandwidth_gbps=1e6)
    branch_a, branch_b = narrow.blocks[1], narrow.blocks[2]
    assert branch_b.start_s < branch_a.start_s + branch_a.latency_s  # they overlap
    assert branch_a.latency_s > 1.2 * wide.blocks[1].latency_s
    assert branch_b.latency_s > 1.2 * wide.blocks[2].latency_s
    assert narrow.latency_s > wide.latency_s


def test_waiting_processors_draw_idle_power():
    graph = LayerGraph(small_cnn())
    compressor = Compressor(graph)
    board = load_board("tegra-k1")
    result = simulate(board, graph, compressor, _plan(graph, ["cpu"] * len(graph.layers)), repeats=1)
    active = sum(b.energy_j for b in result.blocks)
    idle = sum(p.idle_power_w for pid, p in board.processors.items() if pid != "cpu") * result.latency_s
    assert result.energy_j == pytest.approx(active + idle, rel=0.02)


def test_crossing_to_the_remote_server_pays_the_network():
    graph = LayerGraph(small_cnn())
    compressor = Compressor(graph)
    board = load_board("tegra-k1-cloud")
    local = simulate(board, graph, compressor, _plan(graph, ["cpu"] * len(graph.layers)), repeats=1)
    offloaded = simulate(board, graph, compressor, _plan(graph, ["cloud"] * len(graph.layers)), repeats=1)
    round_trip_s = board.network.rtt_ms / 1e3
    assert offloaded.latency_s > round_trip_s > local.latency_s
