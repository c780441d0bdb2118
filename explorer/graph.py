"""LayerGraph: an ONNX model seen as a sequence of decision layers.

A *decision layer* is a node with weights (Conv, Gemm, or MatMul with a constant operand). Every
weight-free node (ReLU, pooling, Add, Flatten...) travels with the decision layer before it in
topological order; nodes before the first decision layer travel with the first one. Each layer is
therefore a contiguous run of the topologically sorted nodes, so any run of consecutive layers is
a valid sub-model whose inputs are the tensors that cross into it.

Shapes are facts: a symbolic input dimension other than the batch is resolved from `--input-shape`
(NAME=1x3x48x320) or from the validation data and written into the model's input before shape
inference, never guessed. A symbolic batch stays symbolic in the model (scoring sends the data's
batches) and is batch 1 for every figure; a fixed batch is kept everywhere, figures included.
Every intermediate shape is a fact too: ONNX's shape inference, then ONNX Runtime's symbolic shape
inference where ONNX's loses shapes (Reshapes to computed shapes), then one run on a synthetic input
for what neither sizes.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper, shape_inference

from explorer.errors import ExplorerError, error_line

DECISION_OPS = ("Conv", "Gemm", "MatMul")
MAX_IR_VERSION = 10  # ONNX Runtime 1.31 refuses models newer than this
#: Oldest opset the rewrite writes valid ops for (Gemm broadcasts its bias from opset 7; older needs `broadcast`).
MIN_OPSET = 7


@dataclass(frozen=True)
class InputShape:
    """A graph input with every dimension resolved; dims[0] is the batch (1 where the model leaves it symbolic)."""

    name: str
    dims: tuple[int, ...]
    fixed_batch: bool  # the model runs only batches of dims[0]


@dataclass
class Layer:
    """One decision layer and the weight-free nodes that travel with it."""

    index: int
    name: str  # the ONNX node name of the weighted node
    op_type: str  # Conv | Gemm | MatMul
    node_names: list[str]  # all nodes of the layer, topological order
    weight_name: str
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # activation input of the weighted node (the graph's batch: 1 or the fixed one)
    output_shape: tuple[int, ...]  # output of the weighted node (the graph's batch)
    flops: int  # 2 x multiply-accumulates of the weighted node, at the graph's batch
    params: int  # weights + bias of the weighted node
    weight_bytes: int
    activation_bytes: int  # bytes of every tensor the layer's nodes produce, at the graph's batch
    inputs: list[str] = field(default_factory=list)  # tensors crossing into the layer
    outputs: list[str] = field(default_factory=list)  # tensors crossing out of it
    groups: int = 1
    attached_flops: int = 0  # 2 x MACs of the weight-free MatMuls travelling with it (activation x activation)
    weight_on_left: bool = False  # a MatMul W @ x (the constant is its first operand)

    @property
    def all_flops(self) -> int:
        """FLOPs of every node of the layer that multiplies: the weighted node and attached MatMuls."""
        return self.flops + self.attached_flops

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
    names, its IR version is capped for ONNX Runtime, its inputs' symbolic non-batch dimensions are
    set to the resolved sizes (`input_shapes`, NAME -> dims, or the per-sample shape of `data_shape`,
    the validation data's x.shape) and its value_info holds the inferred shapes. Every shape, FLOPs
    and bytes figure is at the graph's batch: the model's fixed batch, else 1.
    """

    def __init__(self, model: onnx.ModelProto, source: str = "<memory>",
                 input_shapes: Mapping[str, Sequence[int]] | None = None,
                 data_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None):
        self.source = source
        self.inputs = resolve_input_shapes(model, source, input_shapes, data_shape)
        self.model, self.shapes = _prepared(model, source, self.inputs)
        self._fingerprint: str | None = None
        self._tensor_bytes: dict[str, int] = {}
        graph = self.model.graph
        self.initializers: dict[str, onnx.TensorProto] = {t.name: t for t in graph.initializer}
        self.constants: set[str] = set(self.initializers) | {
            o for n in graph.node if n.op_type == "Constant" for o in n.output
        }
        self.dtypes = _tensor_dtypes(self.model)
        self.opset = next((o.version for o in self.model.opset_import if o.domain in ("", "ai.onnx")), 0)
        if self.opset < MIN_OPSET:
            raise ExplorerError(f"{source}: the model uses ONNX opset {self.opset}, below {MIN_OPSET}, the oldest the rewrite "
                                f"supports: convert it first (onnx.version_converter.convert_version(model, {MIN_OPSET}))")
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
        if node.op_type == "MatMul" and len(node.input) > 1:
            if node.input[1] in self.constants:
                return node.input[1]
            if node.input[0] in self.constants:  # W @ x (e.g. a projection over the sequence axis)
                return node.input[0]
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
            node, weight_name = next((n, w) for n in group if n.op_type in DECISION_OPS and (w := self._weight_input(n)))
            layers.append(self._make_layer(index, node, weight_name, group, produced_by, consumed_by))
        return layers

    def _make_layer(self, index, node, weight_name: str, group, produced_by, consumed_by) -> Layer:
        weight_shape = self.constant_shape(weight_name)
        params = int(np.prod(weight_shape))
        bias_name = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if bias_name and bias_name in self.constants:
            params += int(np.prod(self.constant_shape(bias_name)))
        weight_on_left = node.op_type == "MatMul" and weight_name == node.input[0] and node.input[1] != weight_name
        input_shape = self.shape(node.input[1] if weight_on_left else node.input[0])
        output_shape = self.shape(node.output[0])
        attached_flops = sum(_matmul_flops(self.shape(n.input[0]), self.shape(n.output[0]))
                             for n in group if n is not node and n.op_type == "MatMul")
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
            flops=_flops(node.op_type, weight_shape, input_shape, output_shape, groups, node, weight_on_left),
            params=params, weight_bytes=params * 4, activation_bytes=activation_bytes,
            inputs=inputs, outputs=outputs, groups=groups, attached_flops=attached_flops, weight_on_left=weight_on_left,
        )

    # ---- queries ------------------------------------------------------------------------------
    def shape(self, tensor: str) -> tuple[int, ...]:
        """Static shape of a tensor at the graph's batch (the fixed one, else 1); () if unknown."""
        return self.shapes.get(tensor, ())

    @property
    def fixed_batch(self) -> int | None:
        """The batch size the model's (first) input requires, or None where its batch is symbolic."""
        first = self.inputs[self.input_names[0]]
        return first.dims[0] if first.fixed_batch else None

    def feed_shape(self, batch: int = 1) -> tuple[int, ...]:
        """Shape of an input batch for the first input: `batch` samples, or the model's fixed batch."""
        first = self.inputs[self.input_names[0]]
        return first.dims if first.fixed_batch else (batch, *first.dims[1:])

    def synthetic_feeds(self, count: int | None = None, seed: int = 0) -> dict[str, np.ndarray]:
        """A synthetic input for every graph input at its resolved shape, `count` samples (default: the
        graph's batch, 1 or the fixed one): standard-normal floats, zero integers (ids stay valid)."""
        return _synthetic_feeds({name: self.inputs[name] for name in self.input_names}, self.dtypes, count, seed)

    def tensor_bytes(self, tensor: str) -> int:
        """Bytes of one tensor at the graph's batch (0 if its shape is unknown)."""
        cached = self._tensor_bytes.get(tensor)
        if cached is None:
            shape = self.shapes.get(tensor)
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(self.dtypes.get(tensor) or onnx.TensorProto.FLOAT).itemsize
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
        """Shape of the first graph input as the model now declares it (a symbolic batch as its name)."""
        value = next(i for i in self.model.graph.input if i.name == self.input_names[0])
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    @property
    def total_flops(self) -> int:
        """FLOPs of every multiplying node: decision layers and the activation x activation MatMuls."""
        return sum(layer.all_flops for layer in self.layers)

    @property
    def total_params(self) -> int:
        return sum(layer.params for layer in self.layers)

    def fingerprint(self) -> str:
        """SHA-256 of the model's serialised bytes (identifies the model in caches and bundles)."""
        if self._fingerprint is None:
            self._fingerprint = hashlib.sha256(self.model.SerializeToString()).hexdigest()
        return self._fingerprint


# ---- loading --------------------------------------------------------------------------------------
def is_model_path(name_or_path: str) -> bool:
    """Whether a --model value names an ONNX file (else a zoo model: explorer.zoo resolves names)."""
    path = Path(name_or_path)
    return path.suffix == ".onnx" or path.exists() or "/" in name_or_path


def load_onnx(path: str | Path) -> onnx.ModelProto:
    """The ONNX model in a file; one ExplorerError when it is missing or not an ONNX model."""
    path = Path(path)
    if not path.exists():
        raise ExplorerError(f"model file not found: {path} (give an existing .onnx file or a zoo name from `explorer models`)")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and others for non-ONNX bytes
        raise ExplorerError(f"{path} is not an ONNX model ({type(exc).__name__}): export your network to ONNX first") from None
    if not model.graph.node:
        raise ExplorerError(f"{path} is not an ONNX model (no graph nodes): export your network to ONNX first")
    return model


# ---- input shapes ---------------------------------------------------------------------------------
_SHAPE_HINT = "write it as NAME=1x3x48x320 (positive sizes, batch first)"


def parse_input_shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    """`--input-shape` values (NAME=1x3x48x320, one per input) as {name: dims}."""
    shapes: dict[str, tuple[int, ...]] = {}
    for spec in specs or ():
        name, sep, text = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ExplorerError(f"--input-shape {spec!r} {'names no input' if sep else 'has no ='}: {_SHAPE_HINT}")
        parts = text.strip().lower().split("x")
        if not all(p.strip().isdigit() and int(p) > 0 for p in parts):
            raise ExplorerError(f"--input-shape {spec!r}: {text!r} is not a list of sizes: {_SHAPE_HINT}")
        if name in shapes:
            raise ExplorerError(f"--input-shape gives input {name!r} twice: give each input once")
        shapes[name] = tuple(int(p) for p in parts)
    return shapes


def declared_input_shapes(model: onnx.ModelProto) -> dict[str, list[int | str | None] | None]:
    """The model's inputs (initializers excluded) with their declared dims: sizes, symbol names, None
    for a dimension without either; None for an input declared without a shape."""
    initializers = {t.name for t in model.graph.initializer}
    declared: dict[str, list[int | str | None] | None] = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        declared[value.name] = ([d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor.shape.dim]
                                if tensor.HasField("shape") else None)
    return declared


def _shape_text(dims) -> str:
    return "x".join("?" if d is None else str(d) for d in dims)


def resolve_input_shapes(model: onnx.ModelProto, source: str, given: Mapping[str, Sequence[int]] | None = None,
                         data_shape: Sequence[int] | Mapping[str, Sequence[int]] | None = None) -> dict[str, InputShape]:
    """Every input's dimensions from the model, `given` (--input-shape) and the data's shapes (x.shape for
    the first input, or input name -> shape for several).

    A symbolic non-batch dimension needs a size from `given` or the data (they must agree); a fixed one
    must not be contradicted. The batch is dims[0]: a fixed batch is kept (the data must fill one); a
    symbolic one stays symbolic (figures at batch 1) unless `given` sets it above 1, which fixes it.
    """
    declared = declared_input_shapes(model)
    given = dict(given or {})
    if data_shape is not None and not isinstance(data_shape, Mapping):  # the first input's
        data_shape = {next(iter(declared), ""): data_shape}
    data_shapes = dict(data_shape or {})
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise ExplorerError(f"--input-shape names {', '.join(map(repr, unknown))}, which the model {source} does not take "
                            f"(its inputs: {', '.join(map(repr, declared))})")
    resolved: dict[str, InputShape] = {}
    for position, (name, dims) in enumerate(declared.items()):
        want = given.get(name)
        data = tuple(data_shapes[name]) if name in data_shapes else None
        x_name = "x" if position == 0 else name  # how the data names this input's array
        if dims is None:  # no declared shape: the rank comes from what is given
            rank = len(want) if want is not None else len(data) if data is not None else None
            if rank is None:
                raise ExplorerError(f"{source}: input {name!r} declares no shape: give it with --input-shape "
                                    f"{name}=1x... or give validation data with --data")
            dims = [None] * rank
        shown = _shape_text(dims)
        if want is not None and len(want) != len(dims):
            raise ExplorerError(f"--input-shape {name}={_shape_text(want)} has {len(want)} dimensions, but input {name!r} "
                                f"of {source} has {len(dims)} ({shown}): give all {len(dims)}, batch first")
        if data is not None and len(data) != len(dims):
            raise ExplorerError(f"the data's {x_name} has shape {_shape_text(data)}, but input {name!r} of {source} is "
                                f"{shown}: give {x_name} as (N, {_shape_text(dims[1:])})")
        sizes: list[int | None] = []
        missing: list[str] = []
        for axis, dim in enumerate(dims):
            if axis == 0:
                continue
            from_data = data[axis] if data is not None else None
            size: int | None
            if isinstance(dim, int) and dim > 0:
                if want is not None and want[axis] != dim:
                    raise ExplorerError(f"--input-shape {name}={_shape_text(want)} contradicts the model: dimension {axis} of "
                                        f"input {name!r} is fixed at {dim} ({shown})")
                size = dim
            elif want is not None and from_data is not None and want[axis] != from_data:
                raise ExplorerError(f"--input-shape {name}={_shape_text(want)} contradicts the data: its {x_name} has shape "
                                    f"{_shape_text(data)}; give the data's sizes or leave --input-shape out")
            else:
                size = want[axis] if want is not None else from_data
                if size is None:
                    missing.append(str(dim or "?"))
            if size is not None and from_data is not None and size != from_data:
                raise ExplorerError(f"the data's {x_name} has shape {_shape_text(data)}, which does not fit input {name!r} "
                                    f"of {source} ({shown}): dimension {axis} must be {size}")
            sizes.append(size)
        if missing:
            example = "x".join(["1"] + [str(s) if s is not None else str(d or "?") for s, d in zip(sizes, dims[1:])])
            raise ExplorerError(f"{source}: input {name!r} has symbolic dimensions {shown} ({', '.join(missing)} unknown): "
                                f"give their sizes with --input-shape {name}={example} (your sizes), or give data with --data")
        declared_batch = dims[0]
        fixed: int | None = declared_batch if isinstance(declared_batch, int) and declared_batch > 0 else None
        if fixed is not None and want is not None and want[0] != fixed:
            raise ExplorerError(f"--input-shape {name}={_shape_text(want)} contradicts the model: input {name!r} has a "
                                f"fixed batch of {fixed} ({shown}); give {fixed} as the first dimension")
        if fixed is None and want is not None and want[0] > 1:
            fixed = want[0]  # the user fixes the batch
        fixed_batch = fixed is not None
        batch = fixed if fixed is not None else 1
        if fixed_batch and data is not None and data[0] < batch:
            raise ExplorerError(f"the data has {data[0]} samples, fewer than the fixed batch of {batch} of input {name!r}: "
                                f"give at least {batch} samples (the last batch is padded)")
        resolved[name] = InputShape(name, (batch, *(s for s in sizes if s is not None)), fixed_batch)  # none missing
    return resolved


def _set_input_dims(model: onnx.ModelProto, inputs: Mapping[str, InputShape]) -> None:
    """Write the resolved sizes into the model's inputs; a symbolic batch stays symbolic."""
    for value in model.graph.input:
        resolved = inputs.get(value.name)
        if resolved is None:
            continue
        shape = value.type.tensor_type.shape
        while len(shape.dim) < len(resolved.dims):  # an input declared without a shape
            shape.dim.add()
        for axis, (dim, size) in enumerate(zip(shape.dim, resolved.dims)):
            if axis == 0 and not resolved.fixed_batch:
                if not dim.dim_param:  # unnamed or non-positive: name it, so it stays symbolic
                    dim.dim_param = "batch"
            else:
                dim.dim_value = size


def _prepared(model: onnx.ModelProto, source: str,
              inputs: Mapping[str, InputShape]) -> tuple[onnx.ModelProto, dict[str, tuple[int, ...]]]:
    """The model, in place, with unique node names, an IR version ONNX Runtime accepts, the resolved input
    sizes and inferred shapes (symbolic batch kept); and every tensor's shape at the graph's batch."""
    model.ir_version = min(model.ir_version or MAX_IR_VERSION, MAX_IR_VERSION)
    weights = {t.name for t in model.graph.initializer}
    if any(i.name in weights for i in model.graph.input):
        # Old exporters list weights as graph inputs too; ONNX Runtime then treats them as overridable
        # inputs (no constant folding; its int8 calibrator asks to be fed them). They are constants here:
        # IR version 4 allows initializers that are no input.
        kept = [i for i in model.graph.input if i.name not in weights]
        del model.graph.input[:]
        model.graph.input.extend(kept)
        model.ir_version = max(model.ir_version, 4)
    seen: set[str] = set()
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        while name in seen:
            name = f"{name}_{i}"
        node.name = name
        seen.add(name)
    _set_input_dims(model, inputs)
    skeleton = _skeleton(model)
    inferred = _completed(_inferred(skeleton, source), skeleton)
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)
    if any(not i.fixed_batch for i in inputs.values()):  # the figures: shapes inferred again at batch 1
        at_batch = _skeleton(model)
        for value in at_batch.graph.input:
            if value.name in inputs and value.type.tensor_type.shape.dim:
                value.type.tensor_type.shape.dim[0].dim_value = inputs[value.name].dims[0]
        inferred = _completed(_inferred(at_batch, source), at_batch)
    shapes = _tensor_shapes(inferred)
    unsized = [o for n in model.graph.node for o in n.output if o and o not in shapes]
    if unsized:  # no inference could size them: one run of the model on a synthetic input reads them
        typed = {v.name for v in list(model.graph.value_info) + list(model.graph.output)}
        for name, (dims, elem_type) in _run_shapes(model, source, inputs, unsized).items():
            shapes[name] = dims
            if name not in typed:  # its type, for the sub-models cut at it (the shape stays per run)
                model.graph.value_info.append(onnx.helper.make_tensor_value_info(name, elem_type, None))
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return model, shapes


def _sized(value: onnx.ValueInfoProto) -> int:
    """How many dimensions of a value's shape are known (sizes or symbols); -1 without a shape."""
    tensor = value.type.tensor_type
    if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
        return -1
    return sum(1 for d in tensor.shape.dim if (d.HasField("dim_value") and d.dim_value > 0) or d.dim_param)


def _unknown(value: onnx.ValueInfoProto) -> bool:
    tensor = value.type.tensor_type
    return (not value.type.HasField("tensor_type") or not tensor.HasField("shape")
            or any(not (d.HasField("dim_value") and d.dim_value > 0) and not d.dim_param for d in tensor.shape.dim))


def _completed(inferred: onnx.ModelProto, skeleton: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's inferred model, with the shapes it lost (after a Reshape of a computed shape, a Transpose
    of one...) taken from ONNX Runtime's symbolic shape inference, which propagates shape arithmetic."""
    graph = inferred.graph
    known = {v.name: v for v in list(graph.input) + list(graph.value_info) + list(graph.output)}
    produced = [o for n in graph.node for o in n.output if o]
    if all(name in known and not _unknown(known[name]) for name in produced):
        return inferred
    try:
        with _quiet_logging():
            symbolic = _symbolic_shapes(skeleton)
    except Exception:  # it refuses ops it does not know (custom domains) and some graphs: keep ONNX's shapes
        return inferred
    better = {v.name: v for v in symbolic.graph.value_info
              if v.type.tensor_type.elem_type and _sized(v) >= 0}  # a partial pass leaves untyped ones
    merged = [better[name] if name in better and _sized(better[name]) > _sized(known.get(name, better[name]))
              or name not in known and name in better else known[name]
              for name in produced if name in known or name in better]
    outputs = {o.name for o in graph.output}
    del graph.value_info[:]
    graph.value_info.extend(v for v in merged if v.name not in outputs)
    for value in graph.output:  # a graph output sized by the symbolic inference only
        if value.name in better and _sized(better[value.name]) > _sized(value):
            value.type.CopyFrom(better[value.name].type)
    return inferred


def _symbolic_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with what ONNX Runtime's symbolic shape inference sizes. Driven as its infer_shapes does,
    but a partial result is kept (infer_shapes raises on one, after writing the model into the working
    directory)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(2**31 - 1, True, False, 0)  # int_max, auto_merge, guess_output_rank, verbose
    inference._preprocess(model)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


def _run_shapes(model: onnx.ModelProto, source: str, inputs: Mapping[str, InputShape],
                names: list[str]) -> dict[str, tuple[tuple[int, ...], int]]:
    """Shapes and ONNX element types of `names` read from one ONNX Runtime run of the model on a synthetic
    input of the resolved shape (standard normal floats, zero integers; seed 0); {} where ONNX Runtime
    cannot load the model (ops it lacks: they stay unsized). ExplorerError if it loads but does not run
    at that shape (sizes the model was not exported for)."""
    from explorer.sessions import SessionError, open_session, session_options  # ONNX Runtime: only when a shape is missing

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    graph_outputs = {o.name for o in probe.graph.output}
    probe.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in graph_outputs)
    dtypes = {v.name: v.type.tensor_type.elem_type for v in probe.graph.input}
    feeds = _synthetic_feeds({name: inputs[name] for name in dtypes if name in inputs}, dtypes)
    options = session_options()
    options.log_severity_level = 4  # its failure is reported below, in one line
    try:
        session = open_session(probe, options=options, strict=False, what="the shape probe")
    except SessionError:  # an op ONNX Runtime lacks (a custom domain): those tensors stay unsized
        return {}
    wanted = [o.name for o in session.get_outputs() if o.name in set(names)]
    try:
        values = session.run(wanted, feeds)
    except Exception as exc:
        shown = ", ".join(f"{name}={'x'.join(map(str, shape.dims))}" for name, shape in inputs.items())
        reason = error_line(exc)
        raise ExplorerError(f"{source}: the model does not run at its input shape {shown} (ONNX Runtime: {reason[:300]}): "
                            "give the sizes it was exported for with --input-shape or the data") from None
    return {name: (tuple(int(d) for d in np.shape(value)), onnx.helper.np_dtype_to_tensor_dtype(np.asarray(value).dtype))
            for name, value in zip(wanted, values) if isinstance(value, np.ndarray)}


def _synthetic_feeds(inputs: Mapping[str, InputShape], dtypes: Mapping[str, int], count: int | None = None,
                     seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal floats and zero integers at the resolved shapes, `count` samples (default dims[0])."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, resolved in inputs.items():
        dims = resolved.dims if count is None else (count, *resolved.dims[1:])
        dtype = onnx.helper.tensor_dtype_to_np_dtype(dtypes.get(name) or onnx.TensorProto.FLOAT)
        feeds[name] = rng.standard_normal(dims).astype(dtype) if np.issubdtype(dtype, np.floating) else np.zeros(dims, dtype)
    return feeds


@contextlib.contextmanager
def _quiet_logging():
    """Silence the symbolic shape inference's warnings (it logs through the root logger)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def _inferred(model: onnx.ModelProto, source: str) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model, data_prop=True)
    except Exception as exc:
        raise ExplorerError(f"{source}: ONNX shape inference failed ({str(exc).splitlines()[0] if str(exc) else exc}); "
                            "check the model with onnx.checker") from None


def _skeleton(model: onnx.ModelProto, keep_bytes: int = 4096) -> onnx.ModelProto:
    """A light copy for shape inference: large initializers become typed graph inputs (no data copied);
    its inputs are copies, safe to change."""
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
        if _tensor_bytes(tensor) <= keep_bytes:
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return skeleton


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an initializer's data, from its shape and type (ByteSize walks the whole message: seconds
    for a 500 MB model)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):  # an undefined type: measure the message
        return tensor.ByteSize()
    if tensor.data_type == onnx.TensorProto.STRING:
        return tensor.ByteSize()
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def _dims(type_proto: onnx.TypeProto) -> tuple[int, ...] | None:
    """Sizes of a tensor inferred from concrete inputs; None where a dimension is unknown (the synthetic
    run sizes it)."""
    if not type_proto.HasField("tensor_type") or not type_proto.tensor_type.HasField("shape"):
        return None
    dims = type_proto.tensor_type.shape.dim
    if not all(d.HasField("dim_value") and d.dim_value > 0 for d in dims):
        return None
    return tuple(d.dim_value for d in dims)


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


def _flops(op_type: str, weight_shape, input_shape, output_shape, groups: int, node, weight_on_left: bool = False) -> int:
    """2 x MACs of a decision node at the graph's batch."""
    if op_type == "Conv":
        out_positions = int(np.prod(output_shape[2:])) * output_shape[0] if len(output_shape) > 2 else 1
        return 2 * int(np.prod(weight_shape)) * out_positions
    if op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        k, n = (weight_shape[1], weight_shape[0]) if trans_b else weight_shape
        rows = output_shape[0] if output_shape else 1
        return 2 * rows * k * n
    # MatMul: every output element sums over the contracted axis (W's rows for x @ W, its columns for W @ x)
    k = weight_shape[-1] if weight_on_left else weight_shape[0] if len(weight_shape) == 1 else weight_shape[-2]
    return 2 * k * int(np.prod(output_shape)) if output_shape else 2 * int(np.prod(weight_shape))


def _matmul_flops(a_shape: tuple[int, ...], output_shape: tuple[int, ...]) -> int:
    """2 x MACs of a MatMul of two activations (0 where a shape is unknown)."""
    if not a_shape or not output_shape:
        return 0
    return 2 * a_shape[-1] * int(np.prod(output_shape))
