"""Small ONNX networks built by the tests: an MLP, a plain CNN and a residual CNN (fixed seeds)."""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.count = 0

    def weight(self, shape, fan_in: int) -> str:
        name = f"w{len(self.initializers)}"
        value = (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def bias(self, size: int) -> str:
        name = f"b{len(self.initializers)}"
        self.initializers.append(numpy_helper.from_array((0.1 * self.rng.standard_normal(size)).astype(np.float32), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        self.count += 1
        out = f"t{self.count}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{op.lower()}{self.count}", **attrs))
        return out

    def conv(self, x: str, c_in: int, c_out: int, k: int = 3, stride: int = 1, group: int = 1) -> str:
        w = self.weight((c_out, c_in // group, k, k), c_in // group * k * k)
        pad = k // 2
        return self.node("Conv", [x, w, self.bias(c_out)], kernel_shape=[k, k], pads=[pad] * 4,
                         strides=[stride, stride], group=group)

    def model(self, x_shape, output: str, out_shape) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes, "net",
            [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *x_shape[1:]])],
            [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", *out_shape[1:]])],
            self.initializers,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        onnx.checker.check_model(model, full_check=True)
        return model


def mlp(seed: int = 0, sizes=(64, 96, 80, 10)) -> onnx.ModelProto:
    """Gemm-ReLU-MatMul+Add-ReLU-Gemm classifier on a flat input."""
    b = _Builder(seed)
    x = "input"
    x = b.node("Relu", [b.node("Gemm", [x, b.weight((sizes[1], sizes[0]), sizes[0]), b.bias(sizes[1])], transB=1)])
    x = b.node("Relu", [b.node("Add", [b.node("MatMul", [x, b.weight((sizes[1], sizes[2]), sizes[1])]), b.bias(sizes[2])])])
    out = b.node("Gemm", [x, b.weight((sizes[2], sizes[3]), sizes[2]), b.bias(sizes[3])])  # transB=0
    return b.model((1, sizes[0]), out, (1, sizes[3]))


def small_cnn(seed: int = 0, channels: int = 16) -> onnx.ModelProto:
    """Conv stack with pooling, a strided conv, a depthwise conv and two fully connected layers."""
    b = _Builder(seed)
    c = channels
    x = b.node("Relu", [b.conv("input", 3, c)])
    x = b.node("Relu", [b.conv(x, c, 2 * c)])
    x = b.node("MaxPool", [x], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Relu", [b.conv(x, 2 * c, 2 * c, group=2 * c)])  # depthwise: kept as it is
    x = b.node("Relu", [b.conv(x, 2 * c, 4 * c, stride=2)])
    x = b.node("Flatten", [x])
    x = b.node("Relu", [b.node("Gemm", [x, b.weight((96, 4 * c * 16), 4 * c * 16), b.bias(96)], transB=1)])
    out = b.node("Gemm", [x, b.weight((10, 96), 96), b.bias(10)], transB=1)
    return b.model((1, 3, 16, 16), out, (1, 10))


def residual_cnn(seed: int = 0, channels: int = 16) -> onnx.ModelProto:
    """Two residual blocks (Add) and a Concat branch, then global pooling and a classifier."""
    b = _Builder(seed)
    c = channels
    x = b.node("Relu", [b.conv("input", 3, c)])
    for _ in range(2):
        y = b.node("Relu", [b.conv(x, c, c)])
        y = b.conv(y, c, c)
        x = b.node("Relu", [b.node("Add", [x, y])])
    left = b.conv(x, c, c, k=1)
    right = b.conv(x, c, c)
    x = b.node("Concat", [left, right], axis=1)
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    out = b.node("Gemm", [x, b.weight((10, 2 * c), 2 * c), b.bias(10)], transB=1)
    return b.model((1, 3, 16, 16), out, (1, 10))


def random_inputs(model: onnx.ModelProto, count: int, seed: int = 1) -> np.ndarray:
    """Standard-normal inputs of the model's input shape."""
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim][1:]
    return np.random.default_rng(seed).standard_normal((count, *dims)).astype(np.float32)


def branchy_cnn(seed: int = 0, channels: int = 32) -> onnx.ModelProto:
    """A stem, then a one-layer and a two-layer branch joined by Concat, then a classifier."""
    b = _Builder(seed)
    c = channels
    x = b.node("Relu", [b.conv("input", 3, c)])
    left = b.node("Relu", [b.conv(x, c, c)])
    right = b.node("Relu", [b.conv(x, c, c)])
    right = b.node("Relu", [b.conv(right, c, c)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Concat", [left, right], axis=1)])])
    out = b.node("Gemm", [x, b.weight((10, 2 * c), 2 * c), b.bias(10)], transB=1)
    return b.model((1, 3, 32, 32), out, (1, 10))


def redundant_mlp(seed: int = 0, inputs: int = 64, hidden: int = 1024, narrow: int = 32, true_rank: int = 8) -> onnx.ModelProto:
    """A large fully connected layer that is nearly low-rank (as trained large FC layers are), then a
    smaller full-rank one and a classifier."""
    b = _Builder(seed)
    low = (b.rng.standard_normal((hidden, true_rank)) @ b.rng.standard_normal((true_rank, inputs))) / np.sqrt(inputs)
    low += 0.001 * b.rng.standard_normal(low.shape)
    name = "w_big"
    b.initializers.append(numpy_helper.from_array(low.astype(np.float32), name))
    x = b.node("Relu", [b.node("Gemm", ["input", name, b.bias(hidden)], transB=1)])
    x = b.node("Relu", [b.node("Gemm", [x, b.weight((narrow, hidden), hidden), b.bias(narrow)], transB=1)])
    out = b.node("Gemm", [x, b.weight((10, narrow), narrow), b.bias(10)], transB=1)
    return b.model((1, inputs), out, (1, 10))


def _model_at(b: _Builder, x_shape, output: str, out_shape, opset: int, ir_version: int, input_name: str = "input",
              initializers_as_inputs: bool = False) -> onnx.ModelProto:
    """The builder's nodes as a checked model at an opset (dims may be ints or symbol names)."""
    inputs = [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, list(x_shape))]
    if initializers_as_inputs:  # as exporters of the IR 3/4 era wrote them
        inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in b.initializers]
    nodes = b.nodes
    if input_name != "input":
        for node in nodes:
            node.input[:] = [input_name if i == "input" else i for i in node.input]
    graph = helper.make_graph(nodes, "net", inputs, [helper.make_tensor_value_info(output, TensorProto.FLOAT, list(out_shape))],
                              b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def lenet5(opset: int = 9, batch: int | str = 10, seed: int = 0, initializers_as_inputs: bool = True) -> onnx.ModelProto:
    """LeNet-5 as the old ONNX model zoo published it: input `input_0` (batch, 1, 28, 28) with a fixed
    batch of 10, two 5x5 convolutions with pooling, three Gemm layers and a Softmax head, opset 9."""
    b = _Builder(seed)
    x = b.node("MaxPool", [b.node("Relu", [b.node("Conv", ["input", b.weight((6, 1, 5, 5), 25), b.bias(6)],
                                                  kernel_shape=[5, 5])])], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("MaxPool", [b.node("Relu", [b.node("Conv", [x, b.weight((16, 6, 5, 5), 150), b.bias(16)],
                                                  kernel_shape=[5, 5])])], kernel_shape=[2, 2], strides=[2, 2])
    x = b.node("Flatten", [x])
    x = b.node("Relu", [b.node("Gemm", [x, b.weight((120, 256), 256), b.bias(120)], transB=1)])
    x = b.node("Relu", [b.node("Gemm", [x, b.weight((84, 120), 120), b.bias(84)], transB=1)])
    out = b.node("Softmax", [b.node("Gemm", [x, b.weight((10, 84), 84), b.bias(10)], transB=1)])
    ir_version = {9: 4, 11: 6, 13: 7}.get(opset, 8)
    return _model_at(b, (batch, 1, 28, 28), out, (batch, 10), opset, ir_version, "input_0", initializers_as_inputs)


def ocr_cnn(height: int | str = "height", width: int | str = "width", opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """A text-line classifier with symbolic height and width (as OCR exports declare them): convolutions,
    global pooling and a Gemm, valid at any input size; input `x` (batch, 3, height, width)."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, 16)])
    x = b.node("Relu", [b.conv(x, 16, 32, stride=2)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    out = b.node("Gemm", [x, b.weight((10, 32), 32), b.bias(10)], transB=1)
    return _model_at(b, ("batch", 3, height, width), out, ("batch", 10), opset, 8 if opset < 17 else 9, "x")
