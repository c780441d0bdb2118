"""A corpus of small ONNX models shaped like the ones exported in the wild (onnx.helper, fixed seeds):
symbolic sizes, old opsets with a fixed batch, depthwise and squeeze-and-excitation blocks, an FPN-style
head, a transformer encoder block, an NHWC input, two inputs, two outputs. Each is well under 1 MB."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from netbuild import _Builder, lenet5, ocr_cnn
from onnx import TensorProto, helper, numpy_helper


@dataclass(frozen=True)
class Case:
    """One corpus model: how to build it, the per-sample shape of each input's data, the --input-shape it needs."""

    name: str
    build: Callable[[], onnx.ModelProto]
    sample_shapes: dict[str, tuple[int, ...]]  # input name -> per-sample shape of the data
    input_shapes: list[str] = field(default_factory=list)  # --input-shape values
    classifier: bool = True  # first output (N, classes): the data gets labels


def _const(b: _Builder, value, dtype=np.int64) -> str:
    name = f"c{len(b.initializers)}"
    b.initializers.append(numpy_helper.from_array(np.asarray(value, dtype), name))
    return name


def _checked(b: _Builder, inputs: list[tuple[str, list]], outputs: list[tuple[str, list]], opset: int,
             ir_version: int = 8) -> onnx.ModelProto:
    graph = helper.make_graph(b.nodes, "net", [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, d) for n, d in outputs], b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    onnx.checker.check_model(model, full_check=True)
    return model


def _head(b: _Builder, x: str, channels: int, classes: int = 10) -> str:
    """Global pooling, Flatten and a Gemm classifier."""
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    return b.node("Gemm", [x, b.weight((classes, channels), channels), b.bias(classes)], transB=1)


def depthwise_se(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """MobileNet-style: a stem, a depthwise 3x3 and pointwise 1x1 pair, a squeeze-and-excitation block
    (GlobalAveragePool, 1x1 Conv down and up, Sigmoid, Mul), a classifier; opset 13."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, c, stride=2)])
    x = b.node("Relu", [b.conv(x, c, c, group=c)])  # depthwise: kept as it is
    x = b.node("Relu", [b.conv(x, c, 2 * c, k=1)])
    squeeze = b.node("GlobalAveragePool", [x])
    squeeze = b.node("Relu", [b.conv(squeeze, 2 * c, c // 2, k=1)])
    gate = b.node("Sigmoid", [b.conv(squeeze, c // 2, 2 * c, k=1)])
    x = b.node("Mul", [x, gate])
    out = _head(b, x, 2 * c)
    return _checked(b, [("input", ["batch", 3, 32, 32])], [(out, ["batch", 10])], 13)


def fpn_head(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """An FPN-style dense head: two strided stages, the coarse one upsampled by a ConvTranspose and added
    to a 1x1 lateral of the finer one, then Resize back to the input size and a 1x1 conv to 4 maps; opset 13."""
    b = _Builder(seed)
    c1 = b.node("Relu", [b.conv("input", 3, c, stride=2)])  # 16x16
    c2 = b.node("Relu", [b.conv(c1, c, 2 * c, stride=2)])  # 8x8
    up = b.node("ConvTranspose", [c2, b.weight((2 * c, c, 2, 2), 2 * c * 4), b.bias(c)], kernel_shape=[2, 2], strides=[2, 2])
    lateral = b.conv(c1, c, c, k=1)
    p1 = b.node("Relu", [b.node("Add", [up, lateral])])
    roi = _const(b, [], np.float32)
    scales = _const(b, [1, 1, 2, 2], np.float32)
    p0 = b.node("Resize", [p1, roi, scales], mode="nearest")
    out = b.conv(p0, c, 4, k=1)
    return _checked(b, [("input", ["batch", 3, 32, 32])], [(out, ["batch", 4, 32, 32])], 13)


def transformer_block(seed: int = 0, seq: int = 8, d: int = 32, heads: int = 4, ff: int = 64) -> onnx.ModelProto:
    """One post-norm transformer encoder block as torch exports it (opset 17): Q, K and V MatMul weights,
    heads split by a Reshape to a shape computed from Shape/Gather/Concat, activation x activation MatMuls
    for the scores and the weighted values, Softmax, LayerNormalization, a feed-forward pair, mean pooling
    and a MatMul classifier. Input `tokens` (batch, seq, d) with a symbolic batch and sequence."""
    b = _Builder(seed)
    x = "tokens"
    head = d // heads
    batch = b.node("Gather", [b.node("Shape", [x]), _const(b, 0)], axis=0)
    length = b.node("Gather", [b.node("Shape", [x]), _const(b, 1)], axis=0)
    dims = [b.node("Unsqueeze", [batch, _const(b, [0])]), b.node("Unsqueeze", [length, _const(b, [0])])]
    split = b.node("Concat", dims + [_const(b, [heads, head])], axis=0)
    merge = b.node("Concat", dims + [_const(b, [d])], axis=0)

    def projection(source: str) -> str:
        return b.node("Add", [b.node("MatMul", [source, b.weight((d, d), d)]), b.bias(d)])

    def heads_first(t: str) -> str:  # (batch, seq, d) -> (batch, heads, seq, head)
        return b.node("Transpose", [b.node("Reshape", [t, split])], perm=[0, 2, 1, 3])

    q, k, v = (heads_first(projection(x)) for _ in range(3))
    scores = b.node("Div", [b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])]),
                            _const(b, np.sqrt(head), np.float32)])
    attention = b.node("MatMul", [b.node("Softmax", [scores], axis=-1), v])
    attention = b.node("Reshape", [b.node("Transpose", [attention], perm=[0, 2, 1, 3]), merge])
    x = b.node("Add", [x, projection(attention)])
    x = b.node("LayerNormalization", [x, _const(b, np.ones(d), np.float32), _const(b, np.zeros(d), np.float32)], axis=-1)
    hidden = b.node("Relu", [b.node("Add", [b.node("MatMul", [x, b.weight((d, ff), d)]), b.bias(ff)])])
    x = b.node("Add", [x, b.node("Add", [b.node("MatMul", [hidden, b.weight((ff, d), ff)]), b.bias(d)])])
    x = b.node("LayerNormalization", [x, _const(b, np.ones(d), np.float32), _const(b, np.zeros(d), np.float32)], axis=-1)
    pooled = b.node("ReduceMean", [x], axes=[1], keepdims=0)
    out = b.node("Add", [b.node("MatMul", [pooled, b.weight((d, 10), d)]), b.bias(10)])
    return _checked(b, [("tokens", ["batch", "sequence", d])], [(out, ["batch", 10])], 17, 9)


def nhwc_cnn(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """A TensorFlow-style export: input `image` (batch, 24, 24, 3) in NHWC, a Transpose to NCHW, two
    convolutions and a classifier; opset 11."""
    b = _Builder(seed)
    x = b.node("Transpose", ["image"], perm=[0, 3, 1, 2])
    x = b.node("Relu", [b.conv(x, 3, c)])
    x = b.node("Relu", [b.conv(x, c, 2 * c, stride=2)])
    out = _head(b, x, 2 * c)
    return _checked(b, [("image", ["N", 24, 24, 3])], [(out, ["N", 10])], 11, 6)


def two_inputs(seed: int = 0, c: int = 16, side: int = 8) -> onnx.ModelProto:
    """An image (batch, 3, 16, 16) and a side vector (batch, 8): a conv branch and a Gemm branch joined by
    Concat, then a classifier; opset 13."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("image", 3, c)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [b.node("Relu", [b.conv(x, c, c, stride=2)])])])
    y = b.node("Relu", [b.node("Gemm", ["meta", b.weight((c, side), side), b.bias(c)], transB=1)])
    joined = b.node("Concat", [x, y], axis=1)
    hidden = b.node("Relu", [b.node("Gemm", [joined, b.weight((32, 2 * c), 2 * c), b.bias(32)], transB=1)])
    out = b.node("Gemm", [hidden, b.weight((10, 32), 32), b.bias(10)], transB=1)
    return _checked(b, [("image", ["batch", 3, 16, 16]), ("meta", ["batch", side])], [(out, ["batch", 10])], 13)


def two_outputs(seed: int = 0, c: int = 16) -> onnx.ModelProto:
    """A conv trunk with two heads: class logits (batch, 10) first, a box (batch, 4) second; opset 13."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("input", 3, c)])
    x = b.node("Relu", [b.conv(x, c, 2 * c, stride=2)])
    x = b.node("Flatten", [b.node("GlobalAveragePool", [x])])
    logits = b.node("Gemm", [x, b.weight((10, 2 * c), 2 * c), b.bias(10)], transB=1)
    box = b.node("Sigmoid", [b.node("Gemm", [x, b.weight((4, 2 * c), 2 * c), b.bias(4)], transB=1)])
    return _checked(b, [("input", ["batch", 3, 16, 16])], [(logits, ["batch", 10]), (box, ["batch", 4])], 13)


def recogniser(seed: int = 0, c: int = 8) -> onnx.ModelProto:
    """A text recogniser's tail as exported (opset 13): a strided conv over (batch, 3, height, width), the
    feature map reshaped to (batch, C*H', W') by a shape computed with Mul (which ONNX's own shape
    inference cannot follow), transposed to a sequence, then two MatMul weight layers."""
    b = _Builder(seed)
    x = b.node("Relu", [b.conv("x", 3, c, stride=2)])
    s = b.node("Shape", [x])
    n, ch, h, w = (b.node("Gather", [s, _const(b, i)], axis=0) for i in range(4))
    flat = b.node("Concat", [b.node("Unsqueeze", [t, _const(b, [0])]) for t in (n, b.node("Mul", [ch, h]), w)], axis=0)
    x = b.node("Transpose", [b.node("Reshape", [x, flat])], perm=[0, 2, 1])  # (batch, W', C*H')
    x = b.node("Relu", [b.node("MatMul", [x, b.weight((c * 4, 24), c * 4)])])
    x = b.node("MatMul", [x, b.weight((24, 12), 24)])
    return _checked(b, [("x", ["batch", 3, "height", "width"])], [(x, ["batch", "steps", 12])], 13)


CASES = [
    Case("dynamic-hw", lambda: ocr_cnn(opset=13), {"x": (3, 24, 40)}, ["x=1x3x24x40"]),  # given and in the data: they agree
    Case("fixed-batch-opset9", lambda: lenet5(opset=9, batch=10), {"input_0": (1, 28, 28)}),
    Case("depthwise-se", depthwise_se, {"input": (3, 32, 32)}),
    Case("fpn-head", fpn_head, {"input": (3, 32, 32)}, classifier=False),
    Case("transformer", transformer_block, {"tokens": (8, 32)}),
    Case("nhwc", nhwc_cnn, {"image": (24, 24, 3)}),
    Case("two-inputs", two_inputs, {"image": (3, 16, 16), "meta": (8,)}),
    Case("two-outputs", two_outputs, {"input": (3, 16, 16)}),
    Case("recogniser", recogniser, {"x": (3, 8, 40)}, classifier=False),
]
