"""Run chosen compute nodes of an fp32 ONNX model at fp16 or int8; everything else stays fp32.

* fp16: the node's float initializers are stored as fp16, its activation inputs are Cast to fp16
  and its outputs Cast back to fp32 (consecutive fp16 nodes share the Casts).
* int8: static QDQ quantisation by ONNX Runtime's own quantizer (``quantize_static``): per-channel
  symmetric int8 weights, asymmetric uint8 activations from MinMax calibration ranges, int32 bias.
  The weight-free ops that follow an int8 node and that ORT runs on quantised tensors (Relu, Clip,
  pooling, Flatten, Reshape, ...) are quantised with it, as whole-model quantisation does, so that
  the chain stays in uint8 between integer kernels instead of dequantising after every layer.

ONNX Runtime runs the result with its integer kernels (its default QDQ fusion: DequantizeLinear ->
Conv/Gemm/MatMul -> QuantizeLinear becomes QLinearConv, MatMulInteger, ...), under plain default
session options, which is how the model is scored and deployed. Those kernels multiply u8 x s8;
on x86 CPUs without VNNI they sum pairs of products in int16 (VPMADDUBSW), which saturates unless
the weights are 7-bit: :func:`int8_reduce_range` says when to quantise so.

Calibration (one pass of the whole model over the calibration batch) dominates the int8 cost, so
callers that rewrite the same model many times compute :func:`calibration_ranges` once and pass
them to :func:`apply_precisions`. Evaluate rewritten models under :func:`explorer.sessions.session_options`.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    TensorData,
    TensorsData,
    create_calibrator,
    quantize_static,
    save_tensors_data,
)

from explorer import blockrun
from explorer.errors import ExplorerError

PRECISIONS = ("fp32", "fp16", "int8")
COMPUTE_OPS = ("Conv", "Gemm", "MatMul")

#: Weight-free ops that ORT's QDQ quantizer and its fusions run on uint8 tensors (Relu and Clip are
#: folded into the producer's output range; the others pass quantised values through unchanged).
INT8_FOLLOWER_OPS = ("Relu", "Clip", "MaxPool", "AveragePool", "Flatten", "Reshape", "Transpose", "Squeeze",
                     "Unsqueeze")
#: Per-channel QDQ (DequantizeLinear with ``axis``) needs opset 13.
_MIN_INT8_OPSET = 13
#: Calibration batch size when the model's batch dimension is dynamic (bounds calibration memory).
_CALIBRATION_CHUNK = 64
# input bytes per calibration batch at most (a symbolic batch): ORT holds a batch's activations, tens of
# times its input (16 VGG-16 224x224 images at once: over 1 GB); min and max merge exactly across batches
_CALIBRATION_BATCH_BYTES = 2**20

Ranges = Mapping[str, tuple[float, float]]


def apply_precisions(
    model: onnx.ModelProto,
    node_precisions: Mapping[str, str],
    calibration_inputs: np.ndarray | Mapping[str, np.ndarray] | None = None,
    ranges: Ranges | None = None,
    reduce_range: bool | None = None,
    in_place: bool = False,
) -> onnx.ModelProto:
    """Return a new model in which each named node runs at the given precision; other nodes stay fp32.

    ``node_precisions`` maps ONNX node names (Conv, Gemm or MatMul nodes) to one of PRECISIONS.
    int8 needs calibration: ``ranges`` from :func:`calibration_ranges` on this model if they cover
    the int8 nodes' activations, else ``calibration_inputs`` (a float32 batch for the first graph input, or
    input name -> batch for a model with several).
    ``reduce_range``: 7-bit weights (None: :func:`int8_reduce_range` for this machine).
    The graph's inputs and outputs stay float32; ``model`` is not modified unless ``in_place`` (a caller's
    private copy: one copy of the weights fewer while ORT calibrates and quantises).
    """
    chosen = _checked_request(model, node_precisions)
    int8 = [name for name, precision in chosen.items() if precision == "int8"]
    fp16 = {name for name, precision in chosen.items() if precision == "fp16"}
    if in_place:
        result = model
    else:
        result = onnx.ModelProto()
        result.CopyFrom(model)
    _unshare_initializers(result.graph, set(chosen))
    if int8:
        quantised = int8 + _int8_followers(result.graph, set(int8))
        needed = _int8_activation_ranges(result, quantised, calibration_inputs, ranges)
        result = _quantize_int8(result, quantised, needed,
                                int8_reduce_range() if reduce_range is None else reduce_range)
    if fp16:
        _run_in_fp16(result.graph, fp16)
    return result


def calibration_ranges(model: onnx.ModelProto,
                       calibration_inputs: np.ndarray | Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Min and max of every float activation of ``model`` over ``calibration_inputs`` (ORT's MinMax calibrator).

    Compute them once per model and pass them to every apply_precisions call on that model. A model
    whose tensors differ from ``model``'s under the same names (e.g. after a low-rank rewrite of an
    earlier layer) needs its own ranges: only missing names are noticed, changed values are not.
    """
    reader = _BatchReader(_calibration_batches(model, calibration_inputs))
    with _quiet_ort_logging(), tempfile.TemporaryDirectory(prefix="explorer-calib-") as tmp:
        path = Path(tmp, "model.onnx")
        onnx.save(model, path)
        calibrator = create_calibrator(
            path,
            augmented_model_path=str(Path(tmp, "augmented.onnx")),
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=True,  # weights written tensor by tensor: no second serialised copy
        )
        calibrator.collect_data(reader)
        data = calibrator.compute_data()
    return {name: (float(np.min(td.lowest)), float(np.max(td.highest))) for name, td in data.items()}


def int8_reduce_range(cpu_flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether int8 weights must be 7-bit so that ORT's u8 x s8 kernels cannot saturate on this CPU (or on
    the one ``cpu_flags`` and ``machine`` describe): see :func:`explorer.blockrun.int8_exact`."""
    return not blockrun.int8_exact(cpu_flags, machine)


def int8_scheme(reduce_range: bool) -> str:
    """Names how int8 is quantised and run, for cache keys: results of another scheme are not reused."""
    return f"int8-qdq-v2:integer-kernels:followers:{'7-bit' if reduce_range else '8-bit'}-weights"


def _int8_followers(graph: onnx.GraphProto, int8: set[str]) -> list[str]:
    """Names of the weight-free nodes (INT8_FOLLOWER_OPS) whose input comes from an int8 node through
    such nodes only: they are quantised with it. Nodes are visited in the graph's (topological) order."""
    producer = {tensor: node.name for node in graph.node for tensor in node.output}
    quantised, followers = set(int8), []
    for node in graph.node:
        if (node.op_type in INT8_FOLLOWER_OPS and node.name and node.name not in quantised and node.input
                and producer.get(node.input[0]) in quantised):
            quantised.add(node.name)
            followers.append(node.name)
    return followers


def _checked_request(model: onnx.ModelProto, node_precisions: Mapping[str, str]) -> dict[str, str]:
    """The requested non-fp32 precisions, after checking every name and precision."""
    counts = Counter(node.name for node in model.graph.node if node.name)
    op_types = {node.name: node.op_type for node in model.graph.node if node.name}
    chosen = {}
    for name, precision in node_precisions.items():
        if precision not in PRECISIONS:
            raise ExplorerError(
                f"unknown precision {precision!r} for node {name!r}: choose one of {', '.join(PRECISIONS)}"
            )
        if name not in op_types:
            compute = [n for n, op in op_types.items() if op in COMPUTE_OPS]
            shown = ", ".join(compute[:8]) + (", ..." if len(compute) > 8 else "")
            raise ExplorerError(f"no node named {name!r} in the model (compute nodes: {shown or 'none'})")
        if op_types[name] not in COMPUTE_OPS:
            raise ExplorerError(
                f"node {name!r} is a {op_types[name]}: precision applies only to {', '.join(COMPUTE_OPS)} nodes"
            )
        if counts[name] > 1:
            raise ExplorerError(f"{counts[name]} nodes are named {name!r}: node names must be unique")
        if precision != "fp32":
            chosen[name] = precision
    return chosen


def _unshare_initializers(graph: onnx.GraphProto, names: set[str]) -> None:
    """Give the named nodes private copies of initializers that anything else also uses."""
    uses = Counter(t for node in graph.node for t in node.input)
    uses.update(v.name for v in (*graph.input, *graph.output))
    initializers = {init.name: init for init in graph.initializer}
    taken = _all_names(graph)
    for node in graph.node:
        if node.name not in names:
            continue
        for i, tensor in enumerate(node.input):
            if tensor in initializers and uses[tensor] > 1:
                copy = graph.initializer.add()
                copy.CopyFrom(initializers[tensor])
                copy.name = _fresh(f"{tensor}_{node.name}", taken)
                node.input[i] = copy.name
                uses[tensor] -= 1


def _int8_activation_ranges(
    model: onnx.ModelProto, int8: list[str], calibration_inputs: np.ndarray | Mapping[str, np.ndarray] | None,
    ranges: Ranges | None
) -> dict[str, tuple[float, float]]:
    """Ranges of the activations (inputs and outputs) of the int8 nodes, calibrating if ``ranges`` lack any."""
    initializers = {init.name for init in model.graph.initializer}
    needed = {
        tensor
        for node in model.graph.node
        if node.name in int8
        for tensor in (*node.input, *node.output)
        if tensor and tensor not in initializers
    }
    if ranges is None or not needed <= ranges.keys():
        if calibration_inputs is None:
            raise ExplorerError("int8 needs calibration inputs: pass --data ...")
        ranges = calibration_ranges(model, calibration_inputs)
    return {tensor: ranges[tensor] for tensor in needed if tensor in ranges}


def _quantize_int8(model: onnx.ModelProto, int8: list[str], ranges: Ranges, reduce_range: bool) -> onnx.ModelProto:
    """QDQ-quantise exactly the ``int8`` nodes with ORT's quantizer, using the given activation ranges."""
    ir_version = model.ir_version
    if _opset(model) < _MIN_INT8_OPSET:
        model = onnx.version_converter.convert_version(model, _MIN_INT8_OPSET)
    op_types = sorted({node.op_type for node in model.graph.node if node.name in int8})
    tensors = TensorsData(
        CalibrationMethod.MinMax,
        {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in ranges.items()},
    )
    # quantize_static gets file paths: given a ModelProto, it rewrites that proto's initializers
    # into external-data references to a temporary directory it then deletes.
    with _quiet_ort_logging(), tempfile.TemporaryDirectory(prefix="explorer-int8-") as tmp:
        source, target, cache = Path(tmp, "model.onnx"), Path(tmp, "int8.onnx"), Path(tmp, "ranges.json")
        onnx.save(model, source)
        save_tensors_data(tensors, cache)
        quantize_static(
            str(source),
            str(target),
            calibration_data_reader=None,
            calibration_cache_path=cache,  # precomputed ranges: no calibration run here
            calibrate_method=CalibrationMethod.MinMax,
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=op_types,
            nodes_to_quantize=int8,
            per_channel=True,
            reduce_range=reduce_range,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        quantized = onnx.load(target)
    quantized.ir_version = ir_version
    _unquantize_fp32_inputs(quantized.graph, set(int8))
    return quantized


def _unquantize_fp32_inputs(graph: onnx.GraphProto, int8: set[str]) -> None:
    """Rewire other consumers of an int8 node's input to the unquantised tensor.

    ORT points every consumer of a quantised activation at its DequantizeLinear output; that is right
    for an int8 node's output (it is int8), but an input the int8 node merely shares with an fp32
    node (a skip connection) must reach that node unquantised.
    """
    producer = {tensor: node for node in graph.node for tensor in node.output}
    dequantized = {
        node.output[0]: producer[node.input[0]].input[0]
        for node in graph.node
        if node.op_type == "DequantizeLinear"
        and node.input[0] in producer
        and producer[node.input[0]].op_type == "QuantizeLinear"
    }
    for node in graph.node:
        if node.name in int8 or node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        for i, tensor in enumerate(node.input):
            source = dequantized.get(tensor)
            if source is not None and (source not in producer or producer[source].name not in int8):
                node.input[i] = source


def _run_in_fp16(graph: onnx.GraphProto, fp16: set[str]) -> None:
    """Store the named nodes' float initializers as fp16 and wrap their activations in Casts."""
    initializers = {init.name: init for init in graph.initializer}
    taken = _all_names(graph)
    half_of: dict[str, str] = {}  # fp32 tensor -> the same values as fp16
    nodes: list[onnx.NodeProto] = []
    casts_back: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.name not in fp16:
            nodes.append(node)
            continue
        for i, tensor in enumerate(node.input):
            if tensor in initializers:
                init = initializers[tensor]
                if init.data_type == TensorProto.FLOAT:
                    init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), tensor))
            elif tensor:
                if tensor not in half_of:
                    half_of[tensor] = _fresh(f"{tensor}_fp16", taken)
                    nodes.append(_cast(tensor, half_of[tensor], TensorProto.FLOAT16, taken))
                node.input[i] = half_of[tensor]
        nodes.append(node)
        for i, tensor in enumerate(node.output):
            half = _fresh(f"{tensor}_fp16", taken)
            node.output[i] = half_of[tensor] = half
            casts_back.append(_cast(half, tensor, TensorProto.FLOAT, taken))
            nodes.append(casts_back[-1])
    consumed = {t for node in nodes for t in node.input} | {v.name for v in graph.output}
    unused = {id(cast): cast.output[0] for cast in casts_back if cast.output[0] not in consumed}
    del graph.node[:]
    graph.node.extend(node for node in nodes if id(node) not in unused)
    value_info = [v for v in graph.value_info if v.name not in unused.values()]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


def _cast(source: str, target: str, to: int, taken: set[str]) -> onnx.NodeProto:
    return helper.make_node("Cast", [source], [target], name=_fresh(f"{target}_Cast", taken), to=to)


def _fresh(base: str, taken: set[str]) -> str:
    """``base``, or ``base`` with the smallest numeric suffix that is not taken; marks it taken."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def _all_names(graph: onnx.GraphProto) -> set[str]:
    names = {init.name for init in graph.initializer} | {v.name for v in (*graph.input, *graph.output)}
    for node in graph.node:
        names.update((node.name, *node.input, *node.output))
    return names


def _opset(model: onnx.ModelProto) -> int:
    return next(op.version for op in model.opset_import if op.domain in ("", "ai.onnx"))


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    initializers = {init.name for init in model.graph.initializer}
    return next(v for v in model.graph.input if v.name not in initializers)


def _calibration_batches(model: onnx.ModelProto,
                         inputs: np.ndarray | Mapping[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    """Split ``inputs`` (a batch for the first graph input, or input name -> batch) into feeds of batches
    the model accepts, after checking they fit its inputs."""
    initializers = {init.name for init in model.graph.initializer}
    declared = {v.name: v for v in model.graph.input if v.name not in initializers}
    if not isinstance(inputs, Mapping):
        inputs = {_graph_input(model).name: inputs}
    missing = sorted(set(declared) - set(inputs))
    if missing:
        raise ExplorerError(f"calibration inputs lack the model input(s) {', '.join(map(repr, missing))}: give every input")
    arrays = {}
    steps = set()
    for name, value in declared.items():
        dims = [d.dim_value if d.HasField("dim_value") else None for d in value.type.tensor_type.shape.dim]
        array = np.asarray(inputs[name], dtype=np.float32)
        fits = array.ndim == len(dims) and all(d is None or d == n for d, n in zip(dims[1:], array.shape[1:]))
        batch = dims[0] if dims else None
        if not fits or len(array) == 0 or (batch is not None and len(array) % batch):
            expected = "x".join("?" if d is None else str(d) for d in dims)
            raise ExplorerError(
                f"calibration inputs of shape {'x'.join(map(str, array.shape))} do not fit model input "
                f"{name!r} of shape {expected}"
            )
        arrays[name] = array
        steps.add(batch)
    sample_bytes = max(1, sum(int(np.prod(a.shape[1:])) * a.itemsize for a in arrays.values()))
    chunk = max(1, min(_CALIBRATION_CHUNK, _CALIBRATION_BATCH_BYTES // sample_bytes))
    step = min(batch or chunk for batch in steps)
    count = len(next(iter(arrays.values())))
    return [{name: array[i : i + step] for name, array in arrays.items()} for i in range(0, count, step)]


class _BatchReader(CalibrationDataReader):
    """Feeds calibration batches to ORT's calibrator."""

    def __init__(self, batches: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


class _NoPreprocessHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_ort_logging() -> Iterator[None]:
    """Drop ORT's "consider pre-processing" warning and keep ORT from configuring the root logger.

    ORT's pre-processing (onnxruntime.quantization.quant_pre_process) is skipped on purpose: its graph
    optimisation renames and fuses nodes, which would break the node names that precisions refer to.
    ORT logs through the root logger's module functions, whose first call on a handler-less root logger
    runs logging.basicConfig() for the whole application; a temporary NullHandler prevents that.
    """
    root, hint_filter, handler = logging.getLogger(), _NoPreprocessHint(), logging.NullHandler()
    root.addFilter(hint_filter)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.removeFilter(hint_filter)
