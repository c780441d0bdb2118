"""What the rewrite writes is valid at the model's opset: every rung and precision of a Conv + Gemm
network at opsets 9, 11, 13 and 17 passes onnx.checker and runs in ONNX Runtime."""
import numpy as np
import onnx
import pytest
from netbuild import lenet5

from explorer.compress import Compressor, decision_for, full_rank_plan
from explorer.graph import LayerGraph
from explorer.partition import run_blocks, unit_blocks
from explorer.plan import Decision
from explorer.sessions import run_model

OPSETS = (9, 11, 13, 17)


def _opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


@pytest.mark.parametrize("opset", OPSETS)
def test_every_rung_and_precision_is_valid_at_the_opset(opset):
    graph = LayerGraph(lenet5(opset=opset, batch="N"))
    compressor = Compressor(graph)
    x = np.random.default_rng(0).standard_normal((24, 1, 28, 28)).astype(np.float32)
    reference = run_model(graph.model, x)
    checked = 0
    for layer in graph.layers:
        rungs = compressor.ladder(layer.name)
        assert layer.op_type != "Gemm" or len(rungs) > 1, "every Gemm of the network has a factorised rung"
        for rung in rungs:
            for precision in ("fp32", "fp16", "int8"):
                plan = full_rank_plan(graph).with_decision(layer.name, decision_for(rung, precision))
                model = compressor.rewrite(plan, x[:16])
                onnx.checker.check_model(model, full_check=True)
                out = run_model(model, x)
                assert out.shape == reference.shape and np.isfinite(out).all()
                if precision == "int8" and opset < 13:  # converted for per-channel QDQ, and it says so
                    assert _opset(model) == 13 and f"from ONNX opset {opset} to 13" in model.doc_string
                else:  # converted only where needed
                    assert _opset(model) == opset
                if rung.method == "full" and precision == "fp32":
                    np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-6)
                checked += 1
    assert checked >= 3 * 10


@pytest.mark.parametrize("opset", OPSETS)
def test_factorised_gemm_has_a_bias_where_the_opset_needs_one(opset):
    graph = LayerGraph(lenet5(opset=opset, batch=10))
    compressor = Compressor(graph)
    gemm = next(layer for layer in graph.layers if layer.op_type == "Gemm")
    rung = compressor.ladder(gemm.name)[1]
    model = compressor.rewrite(full_rank_plan(graph).with_decision(gemm.name, decision_for(rung)))
    first = next(node for node in model.graph.node if node.name == f"{gemm.name}.factor1")
    assert len(first.input) == (3 if opset < 11 else 2)
    onnx.checker.check_model(model, full_check=True)
    x = np.random.default_rng(1).standard_normal((13, 1, 28, 28)).astype(np.float32)  # 2 batches of 10, padded
    full = run_model(graph.model, x)
    assert np.mean(run_model(model, x).argmax(1) == full.argmax(1)) > 0.5


@pytest.mark.parametrize("opset", OPSETS)
def test_a_mixed_plan_split_into_blocks_is_valid_and_equals_the_model(opset):
    graph = LayerGraph(lenet5(opset=opset, batch=10))
    compressor = Compressor(graph)
    precisions = ("int8", "fp16", "fp32", "int8", "fp16")
    processors = ("a", "b", "a", "a", "b")
    plan = full_rank_plan(graph)
    for layer, precision, processor in zip(graph.layers, precisions, processors):
        rung = compressor.ladder(layer.name)[-1]
        plan = plan.with_decision(layer.name, Decision(rung.method, rung.rank, precision, processor))
    x = np.random.default_rng(2).standard_normal((20, 1, 28, 28)).astype(np.float32)
    model = compressor.rewrite(plan, x)
    onnx.checker.check_model(model, full_check=True)
    blocks = list(unit_blocks(graph, plan, model))
    assert len(blocks) == 4
    for block in blocks:
        onnx.checker.check_model(block.model, full_check=True)
    whole = run_model(model, x[:10])
    chained = run_blocks(blocks, {"input_0": x[:10]})[graph.output_names[0]]
    np.testing.assert_allclose(chained, whole, rtol=1e-5, atol=1e-6)
