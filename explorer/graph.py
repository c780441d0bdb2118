"""LayerGraph: an ONNX model seen as a sequence of decision layers.

A *decision layer* is a node with weights (Conv, Gemm, or MatMul with a constant operand). Every
weight-free node (ReLU, pooling, Add, Flatten...) travels with the decision layer before it in
topological order; nodes before the first decision layer travel with the first one. Each layer is
therefore a contiguous run of the topologically sorted nodes, so any run of consecutive layers is
a valid sub-model whose inputs are the tensors that cross into it.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from explorer.errors import ExplorerError

DECISION_OPS = ("Conv", "Gemm", "MatMul")
MAX_IR_VERSION = 10  # ONNX Runtime 1.31 refuses models newer than this


@dataclass
class Layer:
    """One decision layer and the weight-free nodes that travel with it."""

    index: int
    name: str  # the ONNX node name of the weighted node
    op_type: str  # Conv | Gemm | MatMul
    node_names: list[str]  # all nodes of the layer, topological order
    weight_name: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # activation input of the weighted node (batch 1)
    output_shape: tuple[int, ...]  # output of the weighted node (batch 1)
    flops: int  # 2 x multiply-accumulates of the weighted node, batch 1
    params: int  # weights + bias of the weighted node
    weight_bytes: int
    activation_bytes: int  # bytes of every tensor the layer's nodes produce, batch 1
    inputs: list[str] = field(default_factory=list)  # tensors crossing into the layer
    outputs: list[str] = field(default_factory=list)  # tensors crossing out of it
    groups: int = 1

    @property
    def kind(self) -> str:
        """'conv' or 'fc'."""
        return "conv" if self.op_type == "Conv" else "fc"

    @property
    def factorisable(self) -> bool:
        """Grouped/depthwise convolutions and non-2D kernels are kept as they are."""
        if self.op_type == "Conv":
            return self.groups == 1 and len(self.weight_shape) == 4
        return len(self.weight_shape) == 2


class LayerGraph:
    """A shape-inferred ONNX model with its decision layers, FLOPs, bytes and crossing tensors.

    The model is taken over, not copied (full-size models are hundreds of MB): its nodes get unique
    names, its IR version is capped for ONNX Runtime and its value_info holds the inferred shapes.
    """

    def __init__(self, model: onnx.ModelProto, source: str = "<memory>"):
        self.source = source
        self.model = _prepared(model, source)
        self._fingerprint: str | None = None
        self._tensor_bytes: dict[str, int] = {}
        graph = self.model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.constants: set[str] = set(self.initializers) | {
            o for n in graph.node if n.op_type == "Constant" for o in n.output
        }
        self.shapes = _tensor_shapes(self.model)
        self.dtypes = _tensor_dtypes(self.model)
        self.nodes: list[onnx.NodeProto] = list(graph.node)
        self.node_by_name = {n.name: n for n in self.nodes}
        self.input_names = [i.name for i in graph.input if i.name not in self.initializers]
        self.output_names = [o.name for o in graph.output]
        self.layers = self._build_layers()
        if not self.layers:
            raise ExplorerError(
                f"{source}: the model has no decision layer (Conv, Gemm, or MatMul with a constant "
                "weight): there is nothing to compress or place"
            )
        self.layer_by_name = {layer.name: layer for layer in self.layers}

    # ---- construction -------------------------------------------------------------------------
    def _weight_input(self, node: onnx.NodeProto) -> str | None:
        """The constant weight operand of a decision node, or None if it has none."""
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 1 and node.input[1] in self.constants:
            return node.input[1]
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in self.constants:
            return node.input[1]
        return None

    def _build_layers(self) -> list[Layer]:
        groups: list[list[onnx.NodeProto]] = []
        prologue: list[onnx.NodeProto] = []
        for node in self.nodes:
            if node.op_type in DECISION_OPS and self._weight_input(node) is not None:
                groups.append(prologue + [node])
                prologue = []
            elif groups:
                groups[-1].append(node)
            else:
                prologue.append(node)
        produced_by: dict[str, int] = {}
        for index, group in enumerate(groups):
            for node in group:
                for out in node.output:
                    produced_by[out] = index
        consumed_by: dict[str, set[int]] = defaultdict(set)
        for index, group in enumerate(groups):
            for node in group:
                for name in node.input:
                    consumed_by[name].add(index)
        layers = []
        for index, group in enumerate(groups):
            node = next(n for n in group if n.op_type in DECISION_OPS and self._weight_input(n))
            layers.append(self._make_layer(index, node, group, produced_by, consumed_by))
        return layers

    def _make_layer(self, index, node, group, produced_by, consumed_by) -> Layer:
        weight_name = self._weight_input(node)
        weight_shape = self.constant_shape(weight_name)
        params = int(np.prod(weight_shape))
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name and bias_name in self.constants:
            params += int(np.prod(self.constant_shape(bias_name)))
        input_shape = self.shape(node.input[0])
        output_shape = self.shape(node.output[0])
        groups = next((a.i for a in node.attribute if a.name == "group"), 1)
        inputs, outputs = [], []
        for n in group:
            for name in n.input:
                if name and name not in self.constants and produced_by.get(name) != index and name not in inputs:
                    inputs.append(name)
            for name in n.output:
                crosses = any(c != index for c in consumed_by.get(name, ())) or name in self.output_names
                if crosses and name not in outputs:
                    outputs.append(name)
        activation_bytes = sum(self.tensor_bytes(o) for n in group for o in n.output)
        return Layer(
            index=index, name=node.name, op_type=node.op_type,
            node_names=[n.name for n in group], weight_name=weight_name, weight_shape=weight_shape,
            input_shape=input_shape, output_shape=output_shape,
            flops=_flops(node.op_type, weight_shape, input_shape, output_shape, groups, node),
            params=params, weight_bytes=params * 4, activation_bytes=activation_bytes,
            inputs=inputs, outputs=outputs, groups=groups,
        )

    # ---- queries ------------------------------------------------------------------------------
    def shape(self, tensor: str) -> tuple[int, ...]:
        """Static shape of a tensor with the batch (and any other symbolic) dimension set to 1."""
        return self.shapes.get(tensor, ())

    def tensor_bytes(self, tensor: str) -> int:
        """Bytes of one tensor at batch 1 (0 if its shape is unknown)."""
        cached = self._tensor_bytes.get(tensor)
        if cached is None:
            shape = self.shapes.get(tensor)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(self.dtypes.get(tensor, onnx.TensorProto.FLOAT)).itemsize
            cached = 0 if shape is None else int(np.prod(shape, dtype=np.int64)) * itemsize
            self._tensor_bytes[tensor] = cached
        return cached

    def constant_shape(self, name: str) -> tuple[int, ...]:
        """Shape of an initializer or Constant-node output (without converting its data)."""
        if name in self.initializers:
            return tuple(self.initializers[name].dims)
        return tuple(self.constant_array(name).shape)

    def constant_array(self, name: str) -> np.ndarray:
        """The value of an initializer or Constant-node output."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        for node in self.nodes:
            if node.op_type == "Constant" and name in node.output:
                return numpy_helper.to_array(node.attribute[0].t)
        raise KeyError(name)

    @property
    def input_shape(self) -> list:
        """Shape of the first graph input as declared (symbolic dims as strings)."""
        value = next(i for i in self.model.graph.input if i.name == self.input_names[0])
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    @property
    def total_flops(self) -> int:
        return sum(layer.flops for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def fingerprint(self) -> str:
        """SHA-256 of the model's serialised bytes (identifies the model in caches and bundles)."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.model.SerializeToString()).hexdigest()
        return self._fingerprint


# ---- loading --------------------------------------------------------------------------------------
def load_model(name_or_path: str) -> tuple[onnx.ModelProto, str]:
    """Load a zoo model by name or an ONNX file by path; return the model and a description."""
    path = Path(name_or_path)
    if path.suffix == ".onnx" or path.exists() or "/" in name_or_path:
        if not path.exists():
            raise ExplorerError(f"model file not found: {path} (give an existing .onnx file or a zoo name from `explorer models`)")
        try:
            model = onnx.load(str(path))
        except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes
            raise ExplorerError(f"{path} is not an ONNX model ({type(exc).__name__}): export your network to ONNX first") from None
        if not model.graph.node:
            raise ExplorerError(f"{path} is not an ONNX model (no graph nodes): export your network to ONNX first")
        return model, str(path)
    from explorer.zoo import zoo_model

    return zoo_model(name_or_path), name_or_path


def load_graph(name_or_path: str) -> LayerGraph:
    """LayerGraph of a zoo model name or ONNX file path."""
    model, source = load_model(name_or_path)
    return LayerGraph(model, source)


def _prepared(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """The model, in place, with unique node names, an IR version ONNX Runtime accepts, and inferred shapes."""
    model.ir_version = min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    try:
        inferred = shape_inference.infer_shapes(_skeleton(model), data_prop=True)
    except Exception as exc:
        raise ExplorerError(f"{source}: ONNX shape inference failed ({exc}); check the model with onnx.checker") from None
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    return model


def _skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A light copy for shape inference: large initializers become typed graph inputs (no data copied)."""
    skeleton = onnx.ModelProto()
    for field_name in ("ir_version", "opset_import", "producer_name", "domain", "model_version"):
        value = getattr(model, field_name)
        if field_name == "opset_import":
            skeleton.opset_import.extend(value)
        else:
            setattr(skeleton, field_name, value)
    graph = skeleton.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    declared = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if tensor.ByteSize() <= keep_bytes:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _dims(type_proto: onnx.TypeProto) -> tuple[int, ...] | None:
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else 1
                 for d in type_proto.tensor_type.shape.dim)


def _tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    graph = model.graph
    shapes: dict[str, tuple[int, ...]] = {}
    for value in list(graph.input) + list(graph.value_info) + list(graph.output):
        dims = _dims(value.type)
        if dims is not None:
            shapes[value.name] = dims
    for init in graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def _tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    dtypes = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    dtypes.update({t.name: t.data_type for t in graph.initializer})
    return dtypes


def _flops(op_type: str, weight_shape, input_shape, output_shape, groups: int, node) -> int:
    """2 x MACs of a decision node at batch 1."""
    if op_type == "Conv":
        out_spatial = int(np.prod(output_shape[2:])) if len(output_shape) > 2 else 1
        return 2 * int(np.prod(weight_shape)) * out_spatial
    if op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        k, n = (weight_shape[1], weight_shape[0]) if trans_b else weight_shape
        rows = output_shape[0] if output_shape else 1
        return 2 * rows * k * n
    k, n = weight_shape[-2], weight_shape[-1]  # MatMul with constant right operand
    rows = int(np.prod(output_shape[:-1])) if output_shape else 1
    return 2 * rows * k * n
