"""Tests for explorer.precision: per-node fp16 / int8 rewriting of small fp32 models."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from explorer.errors import ExplorerError
from explorer.precision import INT8_FOLLOWER_OPS, PRECISIONS, apply_precisions, calibration_ranges, int8_reduce_range, int8_scheme
from explorer.sessions import session_options

CNN_COMPUTE = ("conv1", "conv2", "fc1", "fc2")
MLP_COMPUTE = ("mm1", "mm2", "mm3", "mm4")


def _model(nodes, inits, x_shape, y_shape, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        nodes,
        "test",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)],
        [numpy_helper.from_array(value, name) for name, value in inits.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 9
    onnx.checker.check_model(model, full_check=True)
    return model


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _cnn() -> onnx.ModelProto:
    """Conv-Relu-Conv-Relu-Flatten-Gemm-Relu-Gemm classifier on Nx1x8x8 images, 10 classes."""
    rng = np.random.default_rng(0)
    inits = {
        "w1": _he(rng, (8, 1, 3, 3), 9),
        "b1": _he(rng, (8,), 50),
        "w2": _he(rng, (8, 8, 3, 3), 72),
        "b2": _he(rng, (8,), 50),
        "w3": _he(rng, (32, 512), 512),
        "b3": _he(rng, (32,), 50),
        "w4": _he(rng, (10, 32), 32),
        "b4": _he(rng, (10,), 50),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("Flatten", ["r2"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["g1"], name="fc1", transB=1),
        helper.make_node("Relu", ["g1"], ["r3"], name="relu3"),
        helper.make_node("Gemm", ["r3", "w4", "b4"], ["y"], name="fc2", transB=1),
    ]
    return _model(nodes, inits, ["N", 1, 8, 8], ["N", 10])


def _mlp() -> onnx.ModelProto:
    """MatMul+Add MLP whose mm2 and mm3 share weight w2, with a skip connection around them."""
    rng = np.random.default_rng(1)
    inits = {
        "w1": _he(rng, (16, 32), 16),
        "b1": _he(rng, (32,), 50),
        "w2": _he(rng, (32, 32), 32),
        "b2": _he(rng, (32,), 50),
        "w4": _he(rng, (32, 4), 32),
        "b4": _he(rng, (4,), 50),
    }
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["m1"], name="mm1"),
        helper.make_node("Add", ["m1", "b1"], ["a1"], name="add1"),
        helper.make_node("Relu", ["a1"], ["h"], name="relu1"),
        helper.make_node("MatMul", ["h", "w2"], ["m2"], name="mm2"),
        helper.make_node("Add", ["m2", "b2"], ["a2"], name="add2"),
        helper.make_node("Relu", ["a2"], ["h2"], name="relu2"),
        helper.make_node("MatMul", ["h2", "w2"], ["m3"], name="mm3"),
        helper.make_node("Add", ["m3", "h"], ["s"], name="skip"),
        helper.make_node("MatMul", ["s", "w4"], ["m4"], name="mm4"),
        helper.make_node("Add", ["m4", "b4"], ["y"], name="add4"),
    ]
    return _model(nodes, inits, ["N", 16], ["N", 4])


def _gemm_chain(batch: int | str = "N", opset: int = 17) -> onnx.ModelProto:
    """A low-rank pair: Gemm 24->6 directly followed by Gemm 6->12 (no bias on the first)."""
    rng = np.random.default_rng(2)
    inits = {"u": _he(rng, (6, 24), 24), "v": _he(rng, (12, 6), 6), "c": _he(rng, (12,), 50)}
    nodes = [
        helper.make_node("Gemm", ["x", "u"], ["t"], name="low", transB=1),
        helper.make_node("Gemm", ["t", "v", "c"], ["y"], name="high", transB=1),
    ]
    return _model(nodes, inits, [batch, 24], [batch, 12], opset)


CNN, MLP = _cnn(), _mlp()
CNN_X = np.random.default_rng(10).random((200, 1, 8, 8), dtype=np.float32)
CNN_CALIB = np.random.default_rng(11).random((64, 1, 8, 8), dtype=np.float32)
MLP_X = np.random.default_rng(12).standard_normal((200, 16)).astype(np.float32)
MLP_CALIB = np.random.default_rng(13).standard_normal((64, 16)).astype(np.float32)
CNN_RANGES = calibration_ranges(CNN, CNN_CALIB)


def _run(model: onnx.ModelProto, x: np.ndarray, options: ort.SessionOptions | None = None) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _checked(model: onnx.ModelProto) -> onnx.ModelProto:
    """Assert the rewritten model is valid ONNX that ORT accepts, with float32 graph inputs and outputs."""
    onnx.checker.check_model(model, full_check=True)
    assert model.ir_version <= 10
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == TensorProto.FLOAT
    return model


def _node(model: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(node for node in model.graph.node if node.name == name)


def _initializer_types(model: onnx.ModelProto, node_name: str) -> list[int]:
    initializers = {init.name: init.data_type for init in model.graph.initializer}
    return [initializers[t] for t in _node(model, node_name).input if t in initializers]


def _producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {t: node for node in model.graph.node for t in node.output}


def _max_rel_error(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y - ref).max() / np.abs(ref).max())


def _top1(y: np.ndarray, ref: np.ndarray) -> float:
    return float((y.argmax(1) == ref.argmax(1)).mean())


def test_all_fp32_returns_an_equal_model_and_leaves_the_input_alone():
    before = CNN.SerializeToString()
    result = apply_precisions(CNN, dict.fromkeys(CNN_COMPUTE, "fp32"))
    assert result is not CNN
    assert result.SerializeToString() == before == CNN.SerializeToString()
    assert apply_precisions(CNN, {}).SerializeToString() == before


@pytest.mark.parametrize("name", CNN_COMPUTE)
def test_fp16_on_one_cnn_node(name):
    result = _checked(apply_precisions(CNN, {name: "fp16"}))
    assert _initializer_types(result, name) == [TensorProto.FLOAT16] * 2
    for other in set(CNN_COMPUTE) - {name}:
        assert _initializer_types(result, other) == [TensorProto.FLOAT] * 2
    ref, y = _run(CNN, CNN_X), _run(result, CNN_X)
    assert _max_rel_error(y, ref) <= 1e-2
    assert _top1(y, ref) >= 0.99


def test_fp16_on_every_mlp_node():
    result = _checked(apply_precisions(MLP, dict.fromkeys(MLP_COMPUTE, "fp16")))
    assert all(_initializer_types(result, name) == [TensorProto.FLOAT16] for name in MLP_COMPUTE)
    assert _initializer_types(result, "add1") == [TensorProto.FLOAT]
    ref, y = _run(MLP, MLP_X), _run(result, MLP_X)
    assert _max_rel_error(y, ref) <= 1e-2
    assert _top1(y, ref) >= 0.99


def test_consecutive_fp16_nodes_share_their_casts():
    chain = _gemm_chain()
    result = _checked(apply_precisions(chain, {"low": "fp16", "high": "fp16"}))
    assert [node.op_type for node in result.graph.node] == ["Cast", "Gemm", "Gemm", "Cast"]
    x = np.random.default_rng(3).standard_normal((50, 24)).astype(np.float32)
    assert _max_rel_error(_run(result, x), _run(chain, x)) <= 1e-2


def test_fp16_weight_shared_with_an_fp32_node_is_copied():
    result = _checked(apply_precisions(MLP, {"mm2": "fp16"}))
    assert _node(result, "mm3").input[1] == "w2"
    assert _initializer_types(result, "mm3") == [TensorProto.FLOAT]
    assert _initializer_types(result, "mm2") == [TensorProto.FLOAT16]


def _followers(model: onnx.ModelProto, int8: set[str]) -> set[str]:
    """The weight-free nodes that carry an int8 node's output on (quantised with it)."""
    producer, quantised = _producers(model), set(int8)
    for node in model.graph.node:
        if node.op_type in INT8_FOLLOWER_OPS and producer.get(node.input[0], node).name in quantised:
            quantised.add(node.name)
    return quantised - int8


def _check_qdq_only_around(model: onnx.ModelProto, result: onnx.ModelProto, int8: set[str]) -> None:
    """Q/DQ feed exactly the int8 nodes and the weight-free nodes that follow them, and follow only their
    outputs; a Relu right after a quantised node is folded into its output range; the rest is unchanged."""
    qdq = ("QuantizeLinear", "DequantizeLinear")
    quantised = int8 | _followers(model, int8)
    kept = [(n.name, n.op_type) for n in result.graph.node if n.op_type not in qdq]
    folded = {n.name for n in model.graph.node if (n.name, n.op_type) not in kept}
    assert kept == [(n.name, n.op_type) for n in model.graph.node if n.name not in folded]
    assert all(name in quantised - int8 and _node(model, name).op_type in ("Relu", "Clip") for name in folded)
    produced_by, original = _producers(result), {n.name: n for n in model.graph.node}
    quantised_outputs = {t for name in quantised for t in original[name].output}
    for node in result.graph.node:
        if node.op_type in qdq:
            continue
        if node.name in quantised:
            assert all(produced_by[t].op_type == "DequantizeLinear" for t in node.input if t in produced_by)
            consumers = [n for n in result.graph.node if node.output[0] in n.input]
            assert [n.op_type for n in consumers] == ["QuantizeLinear"]
            continue
        for tensor, before in zip(node.input, original[node.name].input):
            if before in quantised_outputs:  # reads a quantised node's (dequantised) output
                assert produced_by[tensor].op_type == "DequantizeLinear"
            else:
                assert tensor == before
    initializers = {init.name: init for init in result.graph.initializer}
    for init in model.graph.initializer:
        if init.name in initializers:
            assert initializers[init.name] == init


@pytest.mark.parametrize("int8", [{"conv2"}, {"fc1"}, {"conv1", "fc2"}, set(CNN_COMPUTE)])
def test_int8_quantizes_exactly_the_chosen_cnn_nodes(int8):
    result = _checked(apply_precisions(CNN, dict.fromkeys(int8, "int8"), CNN_CALIB))
    _check_qdq_only_around(CNN, result, int8)
    for name in int8:
        assert _initializer_types(result, name) == []  # weights come from DQ nodes
    ref = _run(CNN, CNN_X)
    y = _run(result, CNN_X, session_options())
    # Measured on this random-weight net: 0.985-1.0 top-1 agreement, max relative error 0.011-0.031.
    assert _top1(y, ref) >= 0.97
    assert _max_rel_error(y, ref) <= 0.1
    _run(result, CNN_X)  # ORT's own integer kernels accept it too


def test_int8_on_a_shared_weight_and_a_skip_connection():
    result = _checked(apply_precisions(MLP, {"mm2": "int8"}, MLP_CALIB))
    _check_qdq_only_around(MLP, result, {"mm2"})
    assert _node(result, "mm3").input[1] == "w2"  # the fp32 sharer keeps the float weight
    assert _node(result, "skip").input[1] == "h"  # the skip input is not quantised
    ref, y = _run(MLP, MLP_X), _run(result, MLP_X, session_options())
    assert _top1(y, ref) >= 0.97


def test_int8_ranges_can_be_computed_once():
    inline = apply_precisions(CNN, {"conv2": "int8"}, CNN_CALIB)
    reused = apply_precisions(CNN, {"conv2": "int8"}, ranges=CNN_RANGES)
    assert inline.SerializeToString() == reused.SerializeToString()
    assert {"x", "c1", "r1", "c2", "y"} <= CNN_RANGES.keys()


def test_int8_ranges_missing_a_tensor_fall_back_to_calibration():
    partial = {k: v for k, v in CNN_RANGES.items() if k != "c2"}
    result = apply_precisions(CNN, {"conv2": "int8"}, CNN_CALIB, ranges=partial)
    assert result.SerializeToString() == apply_precisions(CNN, {"conv2": "int8"}, CNN_CALIB).SerializeToString()
    with pytest.raises(ExplorerError, match="calibration inputs"):
        apply_precisions(CNN, {"conv2": "int8"}, ranges=partial)


def test_int8_and_fp16_mix_in_one_model():
    precisions = {"conv1": "fp16", "conv2": "int8", "fc1": "int8", "fc2": "fp16"}
    result = _checked(apply_precisions(CNN, precisions, ranges=CNN_RANGES))
    assert _initializer_types(result, "conv1") == _initializer_types(result, "fc2") == [TensorProto.FLOAT16] * 2
    assert _initializer_types(result, "conv2") == _initializer_types(result, "fc1") == []
    ref, y = _run(CNN, CNN_X), _run(result, CNN_X, session_options())
    assert _top1(y, ref) >= 0.97


def test_int8_feeding_fp16_directly():
    chain = _gemm_chain()
    x = np.random.default_rng(4).standard_normal((64, 24)).astype(np.float32)
    result = _checked(apply_precisions(chain, {"low": "int8", "high": "fp16"}, x))
    high = _node(result, "high")
    cast = _producers(result)[high.input[0]]
    assert cast.op_type == "Cast" and _producers(result)[cast.input[0]].op_type == "DequantizeLinear"
    assert _max_rel_error(_run(result, x, session_options()), _run(chain, x)) <= 0.05


def test_int8_with_fixed_batch_and_old_opset():
    chain = _gemm_chain(batch=1, opset=11)
    x = np.random.default_rng(5).standard_normal((16, 1, 24)).astype(np.float32)
    result = _checked(apply_precisions(chain, {"low": "int8"}, x.reshape(16, 24)))
    assert max(op.version for op in result.opset_import if op.domain == "") >= 13
    for sample in x[:4]:
        assert _max_rel_error(_run(result, sample, session_options()), _run(chain, sample)) <= 0.05


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(PRECISIONS), min_size=len(CNN_COMPUTE), max_size=len(CNN_COMPUTE)))
def test_any_precision_assignment_gives_a_valid_close_model(precisions):
    assignment = dict(zip(CNN_COMPUTE, precisions))
    result = _checked(apply_precisions(CNN, assignment, ranges=CNN_RANGES))
    int8 = {name for name, p in assignment.items() if p == "int8"}
    for name, precision in assignment.items():
        expected = {"fp32": [TensorProto.FLOAT] * 2, "fp16": [TensorProto.FLOAT16] * 2, "int8": []}[precision]
        assert _initializer_types(result, name) == expected
    if not int8:
        assert not any(node.op_type == "QuantizeLinear" for node in result.graph.node)
    assert _top1(_run(result, CNN_X, session_options()), _run(CNN, CNN_X)) >= 0.95


def test_unknown_precision_is_named_with_the_choices():
    with pytest.raises(ExplorerError) as error:
        apply_precisions(CNN, {"conv1": "bf16"})
    assert "'bf16'" in str(error.value)
    assert all(p in str(error.value) for p in PRECISIONS)


@pytest.mark.parametrize("name", ["conv9", ""])
def test_unknown_node_is_an_error(name):
    with pytest.raises(ExplorerError, match="no node named"):
        apply_precisions(CNN, {name: "fp16"})


def test_non_compute_node_is_an_error():
    with pytest.raises(ExplorerError, match="Relu"):
        apply_precisions(CNN, {"relu1": "int8"}, CNN_CALIB)


def test_int8_without_calibration_is_an_error():
    with pytest.raises(ExplorerError, match=r"^int8 needs calibration inputs: pass --data"):
        apply_precisions(CNN, {"conv1": "int8"})


def test_calibration_inputs_of_the_wrong_shape_are_an_error():
    with pytest.raises(ExplorerError, match="do not fit"):
        apply_precisions(CNN, {"conv1": "int8"}, np.zeros((4, 1, 6, 6), np.float32))
    with pytest.raises(ExplorerError, match="do not fit"):
        apply_precisions(_gemm_chain(batch=2), {"low": "int8"}, np.zeros((3, 24), np.float32))


def _optimised_op_types(model: onnx.ModelProto, tmp_path) -> list[str]:
    """The op types of ONNX Runtime's optimised graph of `model` under the options models run with."""
    options = session_options()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return [node.op_type for node in onnx.load(tmp_path / "optimised.onnx").graph.node]


def test_int8_runs_on_integer_kernels_with_the_chain_in_uint8(tmp_path):
    result = apply_precisions(CNN, dict.fromkeys(CNN_COMPUTE, "int8"), ranges=CNN_RANGES)
    ops = _optimised_op_types(result, tmp_path)
    assert ops.count("QLinearConv") == 2 and "Conv" not in ops  # ORT fused DQ -> Conv -> Q
    assert "Gemm" not in ops and "FusedGemm" not in ops
    # Between the integer kernels only the graph's own ends are (de)quantised: Relu folded, Flatten in uint8
    assert ops.count("QuantizeLinear") == 1 and ops.count("DequantizeLinear") == 1
    assert _top1(_run(result, CNN_X, session_options()), _run(CNN, CNN_X)) >= 0.97


def test_reduce_range_keeps_weights_7_bit():
    # 7-bit: |w| <= 64, so a pair of u8 x s8 products sums to at most 2 x 255 x 64 = 32,640 < 2**15
    for reduce_range, bound in ((True, 64), (False, 127)):
        result = apply_precisions(CNN, {"conv2": "int8"}, ranges=CNN_RANGES, reduce_range=reduce_range)
        values = next(numpy_helper.to_array(i) for i in result.graph.initializer
                      if i.data_type == TensorProto.INT8 and len(i.dims) == 4)  # conv2's weights (zero points: 1-D)
        magnitude = int(np.abs(values.astype(np.int32)).max())
        assert bound // 2 < magnitude <= bound  # the range is used, not exceeded


@pytest.mark.parametrize("machine, flags, reduce", [
    ("x86_64", {"avx2", "avx512f", "avx512_vnni"}, False),
    ("x86_64", {"avx2", "avx_vnni"}, False),
    ("x86_64", {"avx2", "avx512f", "avx512bw"}, True),  # VPMADDUBSW: int16 pair sums saturate
    ("x86_64", set(), True),
    ("aarch64", set(), False),
    ("riscv64", set(), True),
])
def test_reduce_range_where_integer_kernels_could_saturate(machine, flags, reduce):
    assert int8_reduce_range(flags, machine) is reduce
    assert int8_scheme(reduce) != int8_scheme(not reduce)


class _SaturatingDevice:
    """A measurer of a device whose int8 kernels could saturate (an x86 CPU without VNNI)."""

    name = "fake"

    def identity(self, board):
        return "fake"

    def int8_exact(self):
        return False


def test_a_device_whose_int8_could_saturate_gets_7_bit_weights():
    from explorer.accuracy import AccuracyScorer
    from explorer.boards import load_board
    from explorer.graph import LayerGraph
    from explorer.problem import Problem

    graph = LayerGraph(CNN)
    problem = Problem(graph, load_board("tegra-k1"), _SaturatingDevice(), AccuracyScorer(graph.model, None))
    assert problem.compressor.reduce_range and "7-bit" in problem.compressor.int8_scheme
