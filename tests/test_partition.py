"""Unit blocks: maximal same-processor runs, valid ONNX each, chained they reproduce the model."""
import numpy as np
import onnx
from netbuild import random_inputs, residual_cnn, small_cnn

from explorer.compress import Compressor, decision_for
from explorer.graph import LayerGraph
from explorer.partition import block_boundaries, run_blocks, unit_blocks
from explorer.plan import Plan
from explorer.sessions import run_model
from explorer.zoo import load_graph, zoo_validation_data


def _random_plan(graph, compressor, rng, processors=("cpu", "gpu", "dsp"), precisions=("fp32", "fp16", "int8")):
    decisions = {}
    for layer in graph.layers:
        ladder = compressor.ladder(layer.name)
        decisions[layer.name] = decision_for(ladder[rng.integers(len(ladder))], str(rng.choice(precisions)),
                                             str(rng.choice(processors)))
    return Plan.from_dict(decisions)


def _check_chain(graph, compressor, x, plans):
    for plan in plans:
        model = compressor.rewrite(plan, x[:32])
        blocks = unit_blocks(graph, plan, model)
        processors = [b.processor for b in blocks]
        assert all(a != b for a, b in zip(processors, processors[1:]))  # maximal runs
        assert [n for b in blocks for n in b.boundary.layer_names] == [l.name for l in graph.layers]
        for block in blocks:
            onnx.checker.check_model(block.model, full_check=True)
        chained = run_blocks(blocks, {graph.input_names[0]: x})[graph.output_names[0]]
        whole = run_model(model, x)
        assert np.max(np.abs(chained - whole)) <= 1e-5 * np.max(np.abs(whole)), plan


def test_blocks_reproduce_residual_network_under_random_plans():
    graph = LayerGraph(residual_cnn())
    compressor = Compressor(graph)
    rng = np.random.default_rng(0)
    _check_chain(graph, compressor, random_inputs(graph.model, 16), [_random_plan(graph, compressor, rng) for _ in range(8)])


def test_blocks_reproduce_vgg_under_random_plans():
    graph = load_graph("vgg")
    compressor = Compressor(graph)
    rng = np.random.default_rng(1)
    x = zoo_validation_data("vgg").x[:64]
    _check_chain(graph, compressor, x, [_random_plan(graph, compressor, rng) for _ in range(4)])


def test_cut_across_a_branch_moves_every_crossing_tensor():
    graph = LayerGraph(residual_cnn())
    names = [layer.name for layer in graph.layers]
    # cut between the two convolutions of the first residual block: the skip tensor must cross too
    plan = Plan.from_dict({n: decision_for(Compressor(graph).ladder(n)[0], "fp32", "cpu" if i < 2 else "gpu")
                           for i, n in enumerate(names)})
    first, second = block_boundaries(graph, plan)
    assert len(second.inputs) == 2 and set(second.inputs) <= set(first.outputs)


def test_single_processor_plan_is_one_block():
    graph = LayerGraph(small_cnn())
    plan = Plan.from_dict({layer.name: decision_for(Compressor(graph).ladder(layer.name)[0], "fp32", "cpu")
                           for layer in graph.layers})
    [block] = block_boundaries(graph, plan)
    assert block.inputs == ("input",) and block.outputs == tuple(graph.output_names)
