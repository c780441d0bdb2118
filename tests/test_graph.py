"""LayerGraph: decision layers, attached ops, FLOPs, crossing tensors, bad models."""
import numpy as np
import onnx
import pytest
from netbuild import mlp, residual_cnn, small_cnn
from onnx import TensorProto, helper

from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.zoo import load_graph


def test_mlp_layers_flops_and_params():
    graph = LayerGraph(mlp())
    assert [layer.op_type for layer in graph.layers] == ["Gemm", "MatMul", "Gemm"]
    first, second, last = graph.layers
    assert first.flops == 2 * 64 * 96 and first.params == 64 * 96 + 96
    assert second.flops == 2 * 96 * 80 and second.params == 96 * 80  # its bias Add travels along
    assert [graph.node_by_name[n].op_type for n in second.node_names] == ["MatMul", "Add", "Relu"]
    assert last.weight_shape == (80, 10) and last.flops == 2 * 80 * 10  # transB=0


def test_conv_flops_include_output_positions_and_groups():
    graph = LayerGraph(small_cnn())
    conv2 = graph.layers[1]
    assert conv2.output_shape == (1, 32, 16, 16)
    assert conv2.flops == 2 * 32 * 16 * 9 * 16 * 16
    depthwise = graph.layers[2]
    assert depthwise.groups == 32 and not depthwise.factorisable
    assert depthwise.flops == 2 * 32 * 1 * 9 * 8 * 8
    strided = graph.layers[3]
    assert strided.output_shape == (1, 64, 4, 4)


def test_residual_graph_crossing_tensors():
    graph = LayerGraph(residual_cnn())
    by_name = {layer.name: layer for layer in graph.layers}
    # the second conv of the first residual block consumes its input and the skip tensor (through Add)
    second_conv = graph.layers[2]
    assert len(second_conv.inputs) == 2 and graph.layers[0].outputs[0] in second_conv.inputs
    assert "Add" in [graph.node_by_name[n].op_type for n in second_conv.node_names]
    # every tensor a layer consumes from elsewhere is produced by an earlier layer or is the graph input
    produced = {"input"}
    for layer in graph.layers:
        assert set(layer.inputs) <= produced, layer.name
        produced |= {o for n in layer.node_names for o in graph.node_by_name[n].output}
    assert len(by_name) == len(graph.layers) == 8
    assert graph.layers[-1].outputs == graph.output_names


def test_layers_are_contiguous_runs_covering_every_node():
    graph = LayerGraph(residual_cnn())
    flat = [n for layer in graph.layers for n in layer.node_names]
    assert flat == [n.name for n in graph.nodes]


def test_unknown_ops_are_carried_along():
    model = small_cnn()
    graph_proto = model.graph
    # splice a node of an unknown domain between the first conv's ReLU and the second conv
    relu = graph_proto.node[1]
    mystery = helper.make_node("Mystery", [relu.output[0]], ["mystery_out"], name="mystery", domain="com.example")
    graph_proto.node.insert(2, mystery)
    graph_proto.node[3].input[0] = "mystery_out"
    model.opset_import.append(helper.make_opsetid("com.example", 1))
    graph = LayerGraph(model)
    assert "mystery" in graph.layers[0].node_names
    assert len(graph.layers) == 6


def test_unnamed_nodes_get_unique_names():
    model = mlp()
    for node in model.graph.node:
        node.name = ""
    graph = LayerGraph(model)
    names = [n.name for n in graph.nodes]
    assert len(set(names)) == len(names) and all(names)


def test_model_without_decision_layer_is_refused():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with pytest.raises(ExplorerError, match="no decision layer"):
        LayerGraph(model, "relu.onnx")


def test_load_errors(tmp_path):
    with pytest.raises(ExplorerError, match="not found"):
        load_graph(str(tmp_path / "missing.onnx"))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"this is not a protobuf at all \xff\xfe")
    with pytest.raises(ExplorerError, match="not an ONNX model"):
        load_graph(str(bad))
    with pytest.raises(ExplorerError, match="did you mean 'vgg'"):
        load_graph("vgg61")


def test_onnx_file_round_trip(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp(), path)
    graph = load_graph(str(path))
    assert graph.source == str(path) and len(graph.layers) == 3
    assert graph.input_shape == ["batch", 64]
    assert np.isclose(graph.total_flops, sum(layer.flops for layer in graph.layers))
