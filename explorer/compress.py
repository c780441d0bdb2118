"""Runtime Layer Compression (RLC): low-rank factorisation of decision layers, and plan rewrites.

- Fully connected (Gemm, MatMul): W (out x in) ~ (U_r S_r) V_r^T, one layer becomes two.
- Convolution (Cout, Cin, kh, kw), two decompositions:
  - ``channel``: a kh x kw convolution Cin -> r, then a 1x1 convolution r -> Cout;
  - ``spatial``: a kh x 1 convolution Cin -> r, then a 1 x kw convolution r -> Cout.
Each layer has a *rank ladder*: rungs at fractions of the rank where the factorisation stops
saving, rounded to multiples of 8, offered only when they reduce FLOPs or parameters. Full rank
is always rung 0 and leaves the layer as it is.
"""
from __future__ import annotations

import collections
import math
import threading
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import scipy.linalg
from onnx import helper, numpy_helper
from threadpoolctl import threadpool_limits

from explorer.cache import atomic_write, unreadable
from explorer.errors import ExplorerError
from explorer.graph import Layer, LayerGraph
from explorer.paths import cache_dir
from explorer.plan import Decision, Plan
from explorer.precision import PRECISIONS, apply_precisions, int8_reduce_range, int8_scheme

RANK_MULTIPLE = 8
REWRITE_CACHE_BYTES = 256 * 2**20  # rewritten models kept by Compressor.rewrite_shared
RUNG_FRACTIONS = (0.125, 0.25, 0.5, 0.75)
GEMM_OPTIONAL_BIAS_OPSET = 11  # Gemm's third input (C) is optional from this opset on
_GRAM_THRESHOLD = 1024  # above this smaller dimension, factorise through the Gram matrix (much faster)
_SUBSET_FRACTION = 0.25  # up to this share of a Gram matrix's eigenvectors, compute only those (measured on 4096)


@dataclass(frozen=True)
class Rung:
    """One compression level of a layer: its method, rank and what it costs."""

    method: str  # full | svd | channel | spatial
    rank: int | None
    params: int
    flops: int
    rel_error: float  # relative Frobenius reconstruction error of the layer's weights

    def label(self) -> str:
        return "full" if self.method == "full" else f"{self.method}:{self.rank}"


@dataclass
class _Factors:
    """Truncated SVD of a layer's weight matrix (top singular triplets up to the largest rung)."""

    left: np.ndarray  # (rows, k)  U_k
    singular: np.ndarray  # (k,) the top k singular values
    right: np.ndarray  # (k, cols) V_k^T


class Compressor:
    """Rank ladders of a LayerGraph's layers and rewrites of the model for any Plan."""

    def __init__(self, graph: LayerGraph, fractions: tuple[float, ...] = RUNG_FRACTIONS,
                 multiple: int = RANK_MULTIPLE, reduce_range: bool | None = None):
        self.graph = graph
        # int8 with 7-bit weights where this machine's integer kernels could saturate (it scores every plan)
        self.reduce_range = int8_reduce_range() if reduce_range is None else reduce_range
        self.fractions = fractions
        self.multiple = multiple
        self._factors: dict[tuple[str, str], _Factors] = {}
        self._singular: dict[tuple[str, str], tuple[np.ndarray, float]] = {}
        self._ladders: dict[str, list[Rung]] = {}
        self._rewritten: collections.OrderedDict[tuple, tuple[onnx.ModelProto, int, object]] = collections.OrderedDict()
        self._rewriting: dict[tuple, threading.Event] = {}  # rewrites in progress, by key
        self._rewritten_lock = threading.Lock()

    # ---- ladders ------------------------------------------------------------------------------
    def candidate_ranks(self, layer: Layer, method: str) -> list[int]:
        """Ranks offered for one method: multiples of `multiple` below the break-even rank."""
        break_even = self._break_even_rank(layer, method)
        limit = min(self._matrix(layer, method, shape_only=True))
        ranks = []
        for fraction in self.fractions:
            rank = max(self.multiple, int(round(fraction * break_even / self.multiple)) * self.multiple)
            if rank < limit and self._saves(layer, method, rank) and rank not in ranks:
                ranks.append(rank)
        return ranks

    def methods(self, layer: Layer) -> list[str]:
        """Factorisation methods that apply to a layer."""
        if not layer.factorisable or not self._plain(layer):
            return []
        if layer.op_type == "Conv":
            kh, kw = layer.weight_shape[2:]
            return ["channel", "spatial"] if kh > 1 and kw > 1 else ["channel"]
        return ["svd"]

    def ladder(self, layer_name: str) -> list[Rung]:
        """All rungs of a layer, full rank first."""
        if layer_name not in self._ladders:
            layer = self.graph.layer_by_name[layer_name]
            rungs = [Rung("full", None, layer.params, layer.all_flops, 0.0)]
            for method in self.methods(layer):
                for rank in self.candidate_ranks(layer, method):
                    params, flops = self._cost(layer, method, rank)  # the attached MatMuls stay as they are
                    rungs.append(Rung(method, rank, params, flops + layer.attached_flops, math.nan))
            self._ladders[layer_name] = rungs
        return self._ladders[layer_name]

    def rung(self, layer_name: str, method: str, rank: int | None) -> Rung:
        """The rung of a layer with this method and rank (ExplorerError if it is not offered)."""
        for rung in self.ladder(layer_name):
            if rung.method == method and rung.rank == rank:
                return rung
        offered = ", ".join(r.label() for r in self.ladder(layer_name))
        raise ExplorerError(f"layer {layer_name}: rung {method}:{rank} is not offered (offered: {offered})")

    def rel_error(self, layer_name: str, method: str, rank: int | None) -> float:
        """Relative Frobenius reconstruction error of a layer's weights at a rung (0 at full rank)."""
        if method == "full":
            return 0.0
        rung = self.rung(layer_name, method, rank)
        top, total = self.spectrum(layer_name, method)
        return tail_error(top, total, _factor_rank(rung.rank))

    def spectrum(self, layer_name: str, method: str) -> tuple[np.ndarray, float]:
        """The top singular values of the matrix a method factorises, as many as its highest rung
        needs, and its squared Frobenius norm (cached on disk per model); enough for every rung's error."""
        key = (layer_name, method)
        if key not in self._singular:
            layer = self.graph.layer_by_name[layer_name]
            keep = max(self.candidate_ranks(layer, method), default=1)
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in layer_name)
            path = cache_dir("svd") / self.graph.fingerprint() / f"{safe}--{method}--top{keep}.npz"
            try:
                with np.load(path, allow_pickle=False) as stored:
                    top, total = stored["top"], float(stored["total"])
            except FileNotFoundError:
                top = None
            except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as exc:  # torn or damaged: a miss
                unreadable(path, exc)
                top = None
            if top is None:
                top, total = top_singular_values(self._matrix(layer, method), keep)
                _atomic_save(path, top=top, total=np.float64(total))
            self._singular[key] = (top, total)
        return self._singular[key]

    def ladder_with_errors(self, layer_name: str) -> list[Rung]:
        """The ladder with reconstruction errors filled in (computes the layer's SVD)."""
        return [Rung(r.method, r.rank, r.params, r.flops, self.rel_error(layer_name, r.method, r.rank))
                for r in self.ladder(layer_name)]

    # ---- rewriting ----------------------------------------------------------------------------
    def compute_nodes(self, plan: Plan) -> dict[str, list[str]]:
        """Names of the compute nodes each layer becomes in the rewritten model."""
        result = {}
        for name, decision in plan.decisions:
            result[name] = [name] if decision.method == "full" else [f"{name}.factor1", f"{name}.factor2"]
        return result

    def rewrite(self, plan: Plan, calibration_inputs: np.ndarray | Mapping[str, np.ndarray] | None = None,
                ranges: Mapping[str, tuple[float, float]] | None = None) -> onnx.ModelProto:
        """The model with every layer factorised and set to the precision its decision says.

        int8 layers need `calibration_inputs`, or `ranges` from precision.calibration_ranges of the
        factorised fp32 model.
        """
        self._check_plan(plan)
        model = onnx.ModelProto()
        model.CopyFrom(self.graph.model)
        graph = model.graph
        replaced_weights: set[str] = set()
        new_nodes, new_initializers = [], []
        decisions = plan.as_dict()
        for node in graph.node:
            decision = decisions.get(node.name)
            if decision is None or decision.method == "full":
                new_nodes.append(node)
                continue
            layer = self.graph.layer_by_name[node.name]
            nodes, initializers = self._factorised_nodes(layer, node, decision)
            new_nodes.extend(nodes)
            new_initializers.extend(initializers)
            replaced_weights.add(layer.weight_name)
        still_used = {name for node in new_nodes for name in node.input}
        del graph.node[:]
        graph.node.extend(new_nodes)
        # drop the replaced weights in place: re-adding the kept ones would copy every weight once more
        dropped = [i for i, t in enumerate(graph.initializer) if t.name in replaced_weights and t.name not in still_used]
        for i in reversed(dropped):
            del graph.initializer[i]
        graph.initializer.extend(new_initializers)
        del graph.value_info[:]
        precisions = {node: decisions[layer].precision
                      for layer, nodes in self.compute_nodes(plan).items() for node in nodes
                      if decisions[layer].precision != "fp32"}
        if precisions:
            model = apply_precisions(model, precisions, calibration_inputs, ranges, self.reduce_range, in_place=True)
            opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), self.graph.opset)
            if opset != self.graph.opset:  # int8's per-channel QDQ needs opset 13: the quantizer converted the model
                model.doc_string = (f"explorer: converted from ONNX opset {self.graph.opset} to {opset} by "
                                    "onnx.version_converter for int8 (per-channel QDQ needs opset 13)")
        return model

    @property
    def int8_scheme(self) -> str:
        """How int8 layers are quantised and run (part of every cache key that depends on it)."""
        return int8_scheme(self.reduce_range)

    def rewrite_shared(self, plan: Plan,
                       calibration_inputs: np.ndarray | Mapping[str, np.ndarray] | None = None) -> onnx.ModelProto:
        """`rewrite`, remembered for the plan's ranks and precisions (placement does not change the
        model), so scoring a plan's accuracy and measuring it rewrite once. The model is shared: read
        it, do not modify it. At most REWRITE_CACHE_BYTES of models are kept (least recent out first)."""
        key = (id(calibration_inputs),) + tuple((name, d.method, d.rank, d.precision) for name, d in plan.decisions)
        while True:
            with self._rewritten_lock:
                hit = self._rewritten.get(key)
                if hit is not None:
                    self._rewritten.move_to_end(key)
                    return hit[0]
                running = self._rewriting.get(key)
                if running is None:  # this thread rewrites; others asking meanwhile wait for it
                    running = self._rewriting[key] = threading.Event()
                    break
            running.wait()
        try:
            model = self.rewrite(plan, calibration_inputs)
            with self._rewritten_lock:
                self._rewritten[key] = (model, model.ByteSize(), calibration_inputs)  # the array kept alive: its id stays unique
                while sum(size for _, size, _ in self._rewritten.values()) > REWRITE_CACHE_BYTES and len(self._rewritten) > 1:
                    self._rewritten.popitem(last=False)
        finally:
            with self._rewritten_lock:
                del self._rewriting[key]
            running.set()
        return model

    def _check_plan(self, plan: Plan) -> None:
        names = [name for name, _ in plan.decisions]
        expected = [layer.name for layer in self.graph.layers]
        if sorted(names) != sorted(expected):
            missing = sorted(set(expected) - set(names))
            extra = sorted(set(names) - set(expected))
            raise ExplorerError(f"plan does not match the model's decision layers (missing: {missing[:5]}, "
                                f"unknown: {extra[:5]}): make the plan for this model")
        for name, decision in plan.decisions:
            if decision.precision not in PRECISIONS:
                raise ExplorerError(f"layer {name}: unknown precision {decision.precision!r} "
                                    f"(choose from {', '.join(PRECISIONS)})")
            self.rung(name, decision.method, decision.rank)

    def _factorised_nodes(self, layer: Layer, node: onnx.NodeProto, decision: Decision):
        rank = _factor_rank(decision.rank)
        factors = self._svd(layer, decision.method)
        sqrt_s = np.sqrt(factors.singular[:rank]).astype(np.float32)
        first = (factors.left[:, :rank] * sqrt_s).astype(np.float32)  # (rows, r)
        second = (sqrt_s[:, None] * factors.right[:rank]).astype(np.float32)  # (r, cols)
        name = layer.name
        hidden = f"{name}.lowrank"
        w1, w2 = f"{name}.factor1.weight", f"{name}.factor2.weight"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = list(node.input[2:3])
        if decision.method == "svd" and node.op_type == "Gemm":
            # W_out_in = first @ second: y = x @ second^T @ first^T
            initializers = [numpy_helper.from_array(second, w1), numpy_helper.from_array(first, w2)]
            inputs1 = [node.input[0], w1]
            if self.graph.opset < GEMM_OPTIONAL_BIAS_OPSET:  # Gemm's C is required before opset 11: a zero bias
                inputs1.append(f"{name}.factor1.bias")
                initializers.append(numpy_helper.from_array(np.zeros(rank, np.float32), inputs1[-1]))
            n1 = helper.make_node("Gemm", inputs1, [hidden], name=f"{name}.factor1", transB=1)
            extra = {k: v for k, v in attrs.items() if k in ("alpha", "beta")}
            n2 = helper.make_node("Gemm", [hidden, w2] + bias, list(node.output), name=f"{name}.factor2", transB=1, **extra)
            return [n1, n2], initializers
        if decision.method == "svd" and layer.weight_on_left:  # MatMul W (out, in) @ x (.., in, n); matrix is W
            n1 = helper.make_node("MatMul", [w1, node.input[1]], [hidden], name=f"{name}.factor1")
            n2 = helper.make_node("MatMul", [w2, hidden], list(node.output), name=f"{name}.factor2")
            return [n1, n2], [numpy_helper.from_array(np.ascontiguousarray(second), w1),
                              numpy_helper.from_array(np.ascontiguousarray(first), w2)]
        if decision.method == "svd":  # MatMul x (.., in) @ W (in, out); matrix is W^T (out x in)
            n1 = helper.make_node("MatMul", [node.input[0], w1], [hidden], name=f"{name}.factor1")
            n2 = helper.make_node("MatMul", [hidden, w2], list(node.output), name=f"{name}.factor2")
            return [n1, n2], [numpy_helper.from_array(np.ascontiguousarray(second.T), w1),
                              numpy_helper.from_array(np.ascontiguousarray(first.T), w2)]
        c_out, c_in, kh, kw = layer.weight_shape
        strides = attrs.get("strides", [1, 1])
        pads = attrs.get("pads", [0, 0, 0, 0])
        dilations = attrs.get("dilations", [1, 1])
        if decision.method == "channel":
            k1 = second.reshape(rank, c_in, kh, kw)
            k2 = first.reshape(c_out, rank, 1, 1)
            n1 = helper.make_node("Conv", [node.input[0], w1], [hidden], name=f"{name}.factor1",
                                  kernel_shape=[kh, kw], strides=strides, pads=pads, dilations=dilations)
            n2 = helper.make_node("Conv", [hidden, w2] + bias, list(node.output), name=f"{name}.factor2", kernel_shape=[1, 1])
        else:  # spatial: rows index (ci, y), columns index (co, x)
            k1 = first.reshape(c_in, kh, rank).transpose(2, 0, 1)[..., None]  # (r, Cin, kh, 1)
            k2 = second.reshape(rank, c_out, kw).transpose(1, 0, 2)[:, :, None, :]  # (Cout, r, 1, kw)
            n1 = helper.make_node("Conv", [node.input[0], w1], [hidden], name=f"{name}.factor1", kernel_shape=[kh, 1],
                                  strides=[strides[0], 1], pads=[pads[0], 0, pads[2], 0], dilations=[dilations[0], 1])
            n2 = helper.make_node("Conv", [hidden, w2] + bias, list(node.output), name=f"{name}.factor2", kernel_shape=[1, kw],
                                  strides=[1, strides[1]], pads=[0, pads[1], 0, pads[3]], dilations=[1, dilations[1]])
        return [n1, n2], [numpy_helper.from_array(np.ascontiguousarray(k1), w1),
                          numpy_helper.from_array(np.ascontiguousarray(k2), w2)]

    # ---- matrices, costs, SVD -----------------------------------------------------------------
    def _plain(self, layer: Layer) -> bool:
        """Whether the node's attributes are ones the rewrite reproduces exactly."""
        node = self.graph.node_by_name[layer.name]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if layer.op_type == "Gemm":
            return not attrs.get("transA", 0)
        if layer.op_type == "Conv":
            auto_pad = attrs.get("auto_pad", b"NOTSET")
            return auto_pad in (b"NOTSET", "NOTSET", b"VALID", "VALID")
        return bool(layer.output_shape)  # any MatMul with a constant 2-D weight, once its shapes are known

    def _matrix(self, layer: Layer, method: str, shape_only: bool = False):
        """The 2-D matrix the method factorises (or just its shape)."""
        shape = layer.weight_shape
        dims: tuple[int, ...]
        if layer.op_type == "Conv":
            c_out, c_in, kh, kw = shape
            dims = (c_out, c_in * kh * kw) if method == "channel" else (c_in * kh, c_out * kw)
        elif layer.op_type == "Gemm":
            trans_b = next((a.i for a in self.graph.node_by_name[layer.name].attribute if a.name == "transB"), 0)
            dims = shape if trans_b else shape[::-1]
        else:
            dims = shape if layer.weight_on_left else shape[::-1]
        if shape_only:
            return dims
        weight = np.asarray(self.graph.constant_array(layer.weight_name), dtype=np.float32)  # no copy of float32
        if layer.op_type == "Conv":
            return weight.reshape(dims) if method == "channel" else weight.transpose(1, 2, 0, 3).reshape(dims)
        if layer.op_type == "Gemm":
            return weight if trans_b else weight.T
        return weight if layer.weight_on_left else weight.T

    def _cost(self, layer: Layer, method: str, rank: int) -> tuple[int, int]:
        """(params, FLOPs at the graph's batch) of a layer factorised at a rank, bias included."""
        bias = layer.params - int(np.prod(layer.weight_shape))
        if layer.op_type != "Conv":
            rows, cols = self._matrix(layer, method, shape_only=True)
            positions = layer.flops // (2 * rows * cols)
            return rank * (rows + cols) + bias, 2 * positions * rank * (rows + cols)
        c_out, c_in, kh, kw = layer.weight_shape
        batch = layer.output_shape[0]  # as in the layer's FLOPs: the graph's batch (1, or a fixed one)
        out_positions = batch * int(np.prod(layer.output_shape[2:]))
        if method == "channel":
            return rank * (c_in * kh * kw + c_out) + bias, 2 * out_positions * rank * (c_in * kh * kw + c_out)
        # the kh x 1 convolution keeps every input column; the 1 x kw one produces the output columns
        vertical_positions = batch * layer.output_shape[2] * layer.input_shape[3]
        flops = 2 * rank * (c_in * kh * vertical_positions + c_out * kw * out_positions)
        return rank * (c_in * kh + c_out * kw) + bias, flops

    def _saves(self, layer: Layer, method: str, rank: int) -> bool:
        params, flops = self._cost(layer, method, rank)
        return params < layer.params or flops < layer.flops

    def _break_even_rank(self, layer: Layer, method: str) -> float:
        """The rank at which the factorised layer costs as many parameters as the original."""
        per_rank_params = self._cost(layer, method, 1)[0] - (layer.params - int(np.prod(layer.weight_shape)))
        return int(np.prod(layer.weight_shape)) / per_rank_params

    def _svd(self, layer: Layer, method: str) -> _Factors:
        key = (layer.name, method)
        if key not in self._factors:
            matrix = self._matrix(layer, method)
            keep = max(self.candidate_ranks(layer, method), default=1)
            self._factors[key] = truncated_svd(matrix, keep)
        return self._factors[key]


def singular_values(matrix: np.ndarray) -> np.ndarray:
    """All singular values, largest first (through the smaller Gram matrix: no singular vectors)."""
    return top_singular_values(matrix, min(matrix.shape))[0]


def top_singular_values(matrix: np.ndarray, keep: int) -> tuple[np.ndarray, float]:
    """The `keep` largest singular values (float64, largest first) and the squared Frobenius norm.

    Eigenvalues only, of the smaller Gram matrix (float32 above _GRAM_THRESHOLD, where it is the
    well-conditioned top of the spectrum that is kept): no singular vectors, several times faster than
    a full SVD. A rung's tail energy is then exact: ||A||_F^2 - sum of its top sigma^2 (`tail_error`).
    """
    small = min(matrix.shape) < _GRAM_THRESHOLD
    work = matrix.astype(np.float64) if small else np.asarray(matrix, dtype=np.float32)
    gram = (work @ work.T) if work.shape[0] <= work.shape[1] else (work.T @ work)  # BLAS syrk
    with _one_lapack_thread():
        eigenvalues = scipy.linalg.eigh(gram, eigvals_only=True, driver="evd", overwrite_a=True, check_finite=False)
    top = np.sqrt(np.clip(eigenvalues[::-1][:keep].astype(np.float64), 0.0, None))
    total = float(np.einsum("ij,ij->", matrix, matrix, dtype=np.float64))
    return top, total


def tail_error(top: np.ndarray, total: float, rank: int) -> float:
    """Relative Frobenius error of the best rank-`rank` approximation, from the top singular values
    (at least `rank` of them) and the squared Frobenius norm."""
    if rank > len(top):
        raise ValueError(f"rank {rank} needs {rank} singular values, {len(top)} given")
    return float(math.sqrt(max(total - float(np.sum(top[:rank] ** 2)), 0.0) / total)) if total > 0 else 0.0


def _one_lapack_thread():
    """BLAS limited to one thread for a LAPACK decomposition. Its tridiagonalisation is a long series of
    small, synchronised BLAS-2 calls: on shared cores two OpenBLAS threads took 5x the CPU time and wall
    time of one (eigenvalues of a 4096 Gram matrix, 2 cores under load); matrix products keep all threads."""
    return threadpool_limits(1, user_api="blas")


def _atomic_save(path: Path, **arrays: np.ndarray | np.generic) -> None:
    named: dict[str, Any] = dict(arrays)  # savez's keywords are array names (typed, the flag allow_pickle too)
    atomic_write(path, lambda handle: np.savez(handle, **named))


def _factor_rank(rank: int | None) -> int:
    """The rank of a factorised rung (every rung but full rank has one)."""
    if rank is None:
        raise ExplorerError("a factorised layer needs a rank: only the full-rank rung has none")
    return rank


def truncated_svd(matrix: np.ndarray, keep: int) -> _Factors:
    """The top-`keep` singular triplets of a matrix (`singular` holds those `keep` values).

    Large matrices go through the smaller Gram matrix, of which only the top `keep` eigenpairs
    are computed (in float32: the kept part is the well-conditioned top of the spectrum): several
    times faster than a full SVD on 2 cores.
    """
    rows, cols = matrix.shape
    if min(rows, cols) < _GRAM_THRESHOLD:
        with _one_lapack_thread():
            left, singular, right = scipy.linalg.svd(matrix, full_matrices=False, check_finite=False)
        return _Factors(left[:, :keep].copy(), singular[:keep].copy(), right[:keep].copy())
    wide = rows <= cols
    gram = (matrix @ matrix.T) if wide else (matrix.T @ matrix)
    size = gram.shape[0]
    with _one_lapack_thread():
        if keep <= size * _SUBSET_FRACTION:  # a few eigenvectors: only those (bisection + inverse iteration)
            eigenvalues, vectors = scipy.linalg.eigh(gram, subset_by_index=[size - keep, size - 1], driver="evx",
                                                     overwrite_a=True, check_finite=False)
        else:  # many: divide and conquer on all of them is faster than computing a subset
            eigenvalues, vectors = scipy.linalg.eigh(gram, driver="evd", overwrite_a=True, check_finite=False)
            eigenvalues, vectors = eigenvalues[size - keep:], vectors[:, size - keep:]
    order = np.argsort(eigenvalues)[::-1]
    singular = np.sqrt(np.clip(eigenvalues[order], 0.0, None))
    top = vectors[:, order].astype(np.float32)
    scale = np.where(singular > 0, 1.0 / np.maximum(singular, 1e-30), 0.0).astype(np.float32)
    if wide:  # matrix = U S V^T with U = top
        return _Factors(top, singular.astype(np.float32), (scale[:, None] * (top.T @ matrix)).astype(np.float32))
    return _Factors(((matrix @ top) * scale).astype(np.float32), singular.astype(np.float32), top.T.copy())

def full_rank_plan(graph: LayerGraph) -> Plan:
    """The uncompressed fp32 plan of a model."""
    return Plan.uniform([layer.name for layer in graph.layers])


def decision_for(rung: Rung, precision: str = "fp32", processor: str | None = None) -> Decision:
    """A Decision that takes a rung at a precision."""
    return Decision(rung.method, rung.rank, precision, processor)

