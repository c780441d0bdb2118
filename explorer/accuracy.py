"""Accuracy measured for real: ONNX Runtime runs a (rewritten) model on validation data.

- labels present: top-1 accuracy;
- no labels, classifier output (N, C): agreement with the uncompressed model's top-1;
- no labels, other outputs: similarity with the uncompressed model's outputs, 1 - relative error
  (the mean cosine is reported beside it).
Without labels the figure is agreement with the original model, never called accuracy; on synthetic
inputs (no data given, explorer.synthetic) it is "estimated on synthetic inputs, not measured".
Models run on :func:`explorer.sessions.scoring_session`: the options every bundle runs with.

The *sensitivity table* holds the accuracy drop of compressing one layer alone at one rung and
precision, all else untouched; it is the additive accuracy estimate of the solver (DeepX's RLC
estimator). It is measured once per model + data + ladder and cached under runs/.
Without any scoring data (an AccuracyScorer given none) nothing is scored: ranks are limited by a
reconstruction-error bound instead, and every output says so; the CLI always scores, on synthetic
inputs where there is no data.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from explorer.cache import AppendOnlyCache, atomic_write_json, digest, read_json, unreadable
from explorer.compress import Compressor, Rung, decision_for, full_rank_plan
from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph
from explorer.paths import cache_dir
from explorer.precision import PRECISIONS, calibration_ranges
from explorer.sessions import SCORING_BATCH, run_batched, run_model, scoring_session

NOT_MEASURED = ("accuracy not measured (no validation data): ranks limited by a reconstruction-error bound, "
                "precisions not limited")
SYNTHETIC_LABEL = "estimated on synthetic inputs, not measured"
UNLABELLED_LABEL = "agreement with the original model (no labels), not accuracy"
SIMILARITY_DEFINITION = "similarity = 1 - relative error, v2"  # in cache keys: the score's meaning changed once
DEFAULT_ERROR_BOUND = 0.35  # relative Frobenius error allowed per layer when there is no data
CALIBRATION_SAMPLES = 128
SYNTHETIC_CALIBRATION_SAMPLES = 16  # without data (rounded up to whole batches of a fixed batch)
SENSITIVITY_VERSION = 2  # bump when the table's meaning changes, to invalidate caches
# samples per scoring call: SCORING_BATCH at most, and fewer where a batch's intermediate tensors would pass this
SCORING_ACTIVATION_BYTES = 256 << 20
SIMILARITY_CHUNK_BYTES = 64 << 20  # outputs compared in float64 this many bytes of rows at a time


def scoring_batch(model: onnx.ModelProto) -> int:
    """Samples per ONNX Runtime call for scoring: SCORING_BATCH, fewer where one batch's intermediate
    tensors (every one with a known shape, summed per sample: an upper bound, as ONNX Runtime reuses
    buffers) would pass SCORING_ACTIVATION_BYTES, so that scoring memory stays near the model's size."""
    per_sample = 0
    for info in model.graph.value_info:
        tensor = info.type.tensor_type
        dims = [d.dim_value for d in tensor.shape.dim]
        if len(dims) > 1 and all(d > 0 for d in dims[1:]) and tensor.elem_type:
            itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type)).itemsize
            per_sample += int(np.prod(dims[1:], dtype=np.int64)) * itemsize
    return int(np.clip(SCORING_ACTIVATION_BYTES // max(per_sample, 1), 1, SCORING_BATCH))


@dataclass(frozen=True)
class AccuracyResult:
    """An accuracy value, how it was measured, and on how many samples."""

    value: float | None
    metric: str  # top1 | agreement | similarity | not measured
    samples: int = 0
    basis: str = ""  # "" for top-1 on labels, else UNLABELLED_LABEL or SYNTHETIC_LABEL
    detail: str = ""  # similarity: the mean cosine and relative error

    @property
    def measured(self) -> bool:
        """A value exists (on validation data, or estimated on synthetic inputs: see `basis`)."""
        return self.value is not None

    def describe(self) -> str:
        if self.value is None:
            return NOT_MEASURED
        return (f"{self.metric} {100 * self.value:.2f}% on {self.samples} samples" + (f" ({self.detail})" if self.detail else "")
                + (f", {self.basis}" if self.basis else ""))


def drop_text(drop: float | None, basis: str = "", samples: int = 0) -> str:
    """An accuracy drop (a fraction) for people: 'drop +1.23 points' and what it is; never a bare 0.00 for an
    estimate on synthetic inputs ('no change seen on N synthetic inputs' instead)."""
    if drop is None:
        return "accuracy not measured"
    if basis == SYNTHETIC_LABEL:
        if abs(drop) < 5e-5:  # would show as 0.00: say what was seen instead
            return f"no change seen on {samples} synthetic inputs, {basis}"
        return f"drop {100 * drop:+.2f} points, {basis}"
    return f"drop {100 * drop:+.2f} points" + (f" ({basis})" if basis else "")


class AccuracyScorer:
    """Scores rewritten models against the reference model on one dataset."""

    def __init__(self, reference: onnx.ModelProto, dataset: Dataset | None):
        self.dataset = dataset
        self.batch = SCORING_BATCH
        self.reference_outputs: np.ndarray | None = None
        if dataset is None:
            self.metric, self.basis = "not measured", ""
            self.baseline = AccuracyResult(None, self.metric)
            return
        self.batch = scoring_batch(reference)
        self.reference_outputs = run_model(reference, dataset.x, self.batch, extra=dataset.extra)
        classifier = self.reference_outputs.ndim == 2 and self.reference_outputs.shape[1] > 1
        if dataset.y is not None and not classifier:
            raise ExplorerError("the data has labels but the model's output is not (N, classes): drop `y` from the npz")
        if dataset.y is not None and (dataset.y.min() < 0 or dataset.y.max() >= self.reference_outputs.shape[1]):
            outside = int(np.sum((dataset.y < 0) | (dataset.y >= self.reference_outputs.shape[1])))
            raise ExplorerError(f"{dataset.source}: {outside} label(s) in y lie outside the model's "
                                f"{self.reference_outputs.shape[1]} classes (0..{self.reference_outputs.shape[1] - 1}, "
                                f"found {int(dataset.y.min())}..{int(dataset.y.max())}): give the labels this model predicts")
        if not np.all(np.isfinite(self.reference_outputs)):
            raise ExplorerError(f"the uncompressed model's outputs on {dataset.source} are not all finite (NaN or "
                                "infinity): accuracy cannot be scored on them; check the inputs' scaling and the model")
        self.metric = "top1" if dataset.y is not None else ("agreement" if classifier else "similarity")
        self.basis = SYNTHETIC_LABEL if dataset.synthetic else (UNLABELLED_LABEL if dataset.y is None else "")
        self.baseline = self.score_outputs(self.reference_outputs)

    @property
    def measured(self) -> bool:
        """Plans get an accuracy figure: on validation data, or estimated on synthetic inputs (`synthetic`)."""
        return self.dataset is not None

    @property
    def synthetic(self) -> bool:
        """The figures are estimates on synthetic inputs, not measurements."""
        return self.dataset is not None and self.dataset.synthetic

    def reference(self) -> np.ndarray:
        """The uncompressed model's outputs on the dataset, what every figure compares with."""
        if self.reference_outputs is None:
            raise ExplorerError("nothing is scored without validation data: pass --data val.npz (x and optional y)")
        return self.reference_outputs

    @property
    def label(self) -> str:
        """What this scorer's figures are, for every surface that shows them."""
        if self.dataset is None:
            return NOT_MEASURED
        if self.synthetic:
            spread = ""
            if self.metric == "agreement":  # noise often lands in few classes: then agreement is a weak check
                spread = f", which it puts in {len(np.unique(self.reference().argmax(1)))} classes"
            return f"{SYNTHETIC_LABEL} ({self.metric} with the original model on {self.dataset.source}{spread})"
        return self.basis or f"top-1 on {self.dataset.source}"

    def data_digest(self) -> str:
        """Identifies the dataset (and, for similarity and synthetic inputs, how it is scored) in cache keys."""
        if self.dataset is None:
            return "no-data"
        y = self.dataset.y.tobytes() if self.dataset.y is not None else b""
        others = [part for name, value in sorted(self.dataset.extra.items()) for part in (name.encode(), value.tobytes())]
        markers = ([b"synthetic"] if self.dataset.synthetic else []) + \
            ([SIMILARITY_DEFINITION.encode()] if self.metric == "similarity" else [])
        return digest(self.dataset.x.tobytes(), y, *others, *markers)

    def score(self, model: onnx.ModelProto) -> AccuracyResult:
        """Accuracy of a model on the dataset (unmeasured result without data)."""
        if self.dataset is None:
            return self.baseline
        return self.score_outputs(run_model(model, self.dataset.x, self.batch, extra=self.dataset.extra))

    def drop(self, result: AccuracyResult) -> float | None:
        """Accuracy lost against the reference model, as a fraction (0.01 = one point)."""
        if result.value is None or self.baseline.value is None:
            return None
        return self.baseline.value - result.value

    def score_outputs(self, outputs: np.ndarray) -> AccuracyResult:
        """Accuracy of model outputs on the dataset, in this scorer's metric."""
        n, reference = len(outputs), self.reference()
        labels = self.dataset.y if self.dataset is not None else None
        if self.metric == "top1" and labels is not None:  # top-1 is the metric where there are labels
            return AccuracyResult(float(np.mean(outputs.argmax(1) == labels)), "top1", n, self.basis)
        if self.metric == "agreement":
            agreement = float(np.mean(outputs.argmax(1) == reference.argmax(1)))
            return AccuracyResult(agreement, "agreement", n, self.basis)
        cosine, relative_error = output_similarity(outputs, reference)
        # 1 - relative error is the score (it also sees a wrong scale, which cosine does not); at most the cosine
        return AccuracyResult(float(np.mean(np.clip(1.0 - relative_error, 0.0, 1.0))), "similarity", n, self.basis,
                              f"cosine {np.mean(cosine):.3f}, relative error {np.mean(relative_error):.3f}")


def output_similarity(outputs: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: cosine similarity and relative error ||a - b|| / ||b|| of outputs a against reference b
    (a reference output near 0 is measured against the mean reference norm instead)."""
    n = len(outputs)
    a, b = outputs.reshape(n, -1), reference.reshape(n, -1)
    dot, norm_a, norm_b, distance = (np.empty(n) for _ in range(4))
    step = max(1, SIMILARITY_CHUNK_BYTES // max(8 * a.shape[1], 1))  # float64 rows in chunks: outputs can be large
    for start in range(0, n, step):
        rows = slice(start, start + step)
        x, y = a[rows].astype(np.float64), b[rows].astype(np.float64)
        dot[rows], norm_a[rows], norm_b[rows] = np.sum(x * y, 1), np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        distance[rows] = np.linalg.norm(x - y, axis=1)
    cosine = dot / np.maximum(norm_a * norm_b, 1e-12)
    floor = max(1e-6 * float(np.mean(norm_b)), 1e-12)
    return cosine, distance / np.maximum(norm_b, floor)


def calibration_inputs(graph: LayerGraph, dataset: Dataset | None,
                       seed: int = 0) -> tuple[np.ndarray | dict[str, np.ndarray], str]:
    """Inputs for int8 calibration and where they come from (synthetic when there is no data); with a
    fixed batch, a whole number of batches. A batch for the first input, or for a model with several
    inputs, input name -> batch."""
    batch = graph.fixed_batch or 1
    several = len(graph.input_names) > 1
    if dataset is not None and dataset.synthetic:  # a few of the scoring inputs, as without any data
        count = min(-(-SYNTHETIC_CALIBRATION_SAMPLES // batch) * batch, len(dataset.x))
        first = dataset.first(count)
        return (first.feeds(graph.input_names[0]) if several else first.x,
                f"{count} of the {dataset.source} (int8 ranges are a guess)")
    if dataset is not None:
        if len(dataset.x) < batch:
            raise ExplorerError(f"the data has {len(dataset.x)} samples, fewer than the model's fixed batch of {batch}: "
                                f"give at least {batch} samples")
        rng = np.random.default_rng(seed)
        size = max(batch, min(CALIBRATION_SAMPLES, len(dataset.x)) // batch * batch)
        index = np.sort(rng.choice(len(dataset.x), size=size, replace=False))
        if several:
            return ({name: value[index] for name, value in dataset.feeds(graph.input_names[0]).items()},
                    f"{len(index)} validation samples")
        return dataset.x[index], f"{len(index)} validation samples"
    count = -(-SYNTHETIC_CALIBRATION_SAMPLES // batch) * batch
    feeds = graph.synthetic_feeds(count, seed)
    return (feeds if several else feeds[graph.input_names[0]],
            f"{count} synthetic standard-normal inputs (no data given: int8 ranges are a guess)")


@dataclass
class SensitivityTable:
    """Accuracy drop of each (layer, rung, precision) applied alone; fractions (0.01 = one point).

    For classifiers it also holds the *flip rate*: the share of samples whose top-1 class changes.
    A layer's accuracy drop can never exceed its flip rate, and flip rates add up (to first order)
    when layers are combined, while measured drops do not (they can even be negative on a finite
    sample), so the flip rate is the solver's conservative additive estimate.
    """

    metric: str
    baseline: float | None
    drops: dict[str, float] = field(default_factory=dict)  # key: "layer|method|rank|precision"
    flips: dict[str, float] = field(default_factory=dict)  # same keys; empty for non-classifiers
    from_cache: bool = False

    @staticmethod
    def key(layer: str, method: str, rank: int | None, precision: str) -> str:
        return f"{layer}|{method}|{rank}|{precision}"

    def drop(self, layer: str, method: str, rank: int | None, precision: str) -> float:
        """Measured drop of one layer's choice (0 for the uncompressed fp32 layer)."""
        if method == "full" and precision == "fp32":
            return 0.0
        return self.drops[self.key(layer, method, rank, precision)]

    def estimate(self, layer: str, method: str, rank: int | None, precision: str) -> float:
        """Additive accuracy-loss estimate of one layer's choice: its flip rate for classifiers,
        else its measured drop clipped at 0."""
        if method == "full" and precision == "fp32":
            return 0.0
        key = self.key(layer, method, rank, precision)
        return self.flips[key] if self.flips else max(0.0, self.drops[key])

    def to_json(self) -> dict:
        return {"version": SENSITIVITY_VERSION, "metric": self.metric, "baseline": self.baseline,
                "drops": self.drops, "flips": self.flips}


def sensitivity_table(graph: LayerGraph, compressor: Compressor, scorer: AccuracyScorer,
                      precisions: tuple[str, ...] = PRECISIONS,
                      progress: Callable[[int, int], None] | None = None) -> SensitivityTable:
    """Measure (or load from cache) the drop of every layer x rung x precision applied alone (on synthetic
    inputs, of the rungs within DEFAULT_ERROR_BOUND: the only ones a Problem offers there).

    Each entry is kept on disk as soon as it is measured (an append-only partial file), so a run that
    is interrupted (Ctrl-C) resumes where it stopped: the next call measures only the rest.
    `progress(done, total)` is called once before the first new entry (done = entries resumed) and
    after each one.
    """
    dataset = scorer.dataset
    if dataset is None:
        raise ExplorerError("the sensitivity table needs validation data: pass --data val.npz (x and optional y)")
    spec = (compressor.fractions, compressor.multiple, precisions, SENSITIVITY_VERSION, compressor.int8_scheme)
    ladder_spec = repr(spec + ((DEFAULT_ERROR_BOUND,) if scorer.synthetic else ()))
    key = digest(graph.fingerprint(), scorer.data_digest(), ladder_spec)
    path = cache_dir("sensitivity") / f"{key}.json"
    cached = read_json(path)
    if isinstance(cached, dict) and cached.get("version") == SENSITIVITY_VERSION:
        try:
            return SensitivityTable(cached["metric"], cached["baseline"], cached["drops"], cached["flips"], from_cache=True)
        except KeyError as exc:  # valid JSON of another shape: a miss
            unreadable(path, ValueError(f"no {exc} in it"))
    table = SensitivityTable(scorer.metric, scorer.baseline.value)
    ladder = (lambda name: rungs_within_bound(compressor, name)) if scorer.synthetic else compressor.ladder
    jobs = [(layer, rung, precision) for layer in graph.layers for rung in ladder(layer.name)
            for precision in precisions if not (rung.method == "full" and precision == "fp32")]
    partial = AppendOnlyCache(path.with_suffix(".partial.jsonl"))  # entries so far: what a resumed run skips
    todo = []
    for layer, rung, precision in jobs:
        entry_key = table.key(layer.name, rung.method, rung.rank, precision)
        entry = partial.get(entry_key)
        if isinstance(entry, dict) and "drop" in entry:
            table.drops[entry_key] = entry["drop"]
            if entry.get("flip") is not None:
                table.flips[entry_key] = entry["flip"]
        else:
            todo.append((entry_key, layer, rung, precision))
    if progress:
        progress(len(jobs) - len(todo), len(jobs))
    if todo:
        x_calibration, _ = calibration_inputs(graph, dataset)
        base_plan = full_rank_plan(graph)
        suffixes = _SuffixRunner(graph, dataset.feeds(graph.input_names[0]))
        ranges_by_rung: dict[tuple, dict] = {}
        for done, (entry_key, layer, rung, precision) in enumerate(todo, start=len(jobs) - len(todo) + 1):
            plan = base_plan.with_decision(layer.name, decision_for(rung, precision))
            model = compressor.rewrite(plan, x_calibration, ranges=_ranges(compressor, ranges_by_rung, base_plan,
                                                                           layer.name, rung, x_calibration, precision))
            outputs = suffixes.run(model, layer.index)
            drop = scorer.drop(scorer.score_outputs(outputs))
            if drop is None:
                raise ExplorerError("the sensitivity table needs validation data: pass --data val.npz (x and optional y)")
            table.drops[entry_key] = drop
            if scorer.metric in ("top1", "agreement"):
                table.flips[entry_key] = float(np.mean(outputs.argmax(1) != scorer.reference().argmax(1)))
            partial.put(entry_key, {"drop": table.drops[entry_key], "flip": table.flips.get(entry_key)})
            if progress:
                progress(done, len(jobs))
    table.drops = {k: table.drops[k] for k in (table.key(layer.name, r.method, r.rank, p) for layer, r, p in jobs)}
    table.flips = {k: table.flips[k] for k in table.drops if k in table.flips}  # in job order, however resumed
    atomic_write_json(path, table.to_json())
    partial.path.unlink(missing_ok=True)
    return table


class _SuffixRunner:
    """Runs only the layers from a given one on: the earlier layers are the reference model's, so
    their outputs are computed once (one pass with every layer boundary as an extra output)."""

    def __init__(self, graph: LayerGraph, feeds: dict[str, np.ndarray]):
        from explorer.partition import run_inputs

        self.graph = graph
        self.inputs = [run_inputs(graph, i, len(graph.layers)) for i in range(len(graph.layers))]
        needed = list(dict.fromkeys(t for names in self.inputs for t in names if t not in graph.input_names))
        model = onnx.ModelProto()
        model.CopyFrom(graph.model)
        known = {v.name: v for v in list(model.graph.value_info) + list(model.graph.output)}
        model.graph.output.extend(known.get(t) or onnx.ValueInfoProto(name=t) for t in needed if t not in graph.output_names)
        session = scoring_session(model)
        names = [o.name for o in session.get_outputs()]
        self.batch = scoring_batch(graph.model)
        self.activations = dict(zip(names, run_batched(session, feeds, names, self.batch)))
        self.activations.update(feeds)

    def run(self, model: onnx.ModelProto, start: int) -> np.ndarray:
        """The model's first output, computing only layers start.. from the reference activations."""
        from explorer.partition import extract_submodel

        inputs = list(self.inputs[start])
        suffix = extract_submodel(model, inputs, self.graph.output_names[:1], self.graph, f"from_layer{start}")
        session = scoring_session(suffix)
        return run_batched(session, {name: self.activations[name] for name in inputs},
                           [session.get_outputs()[0].name], self.batch)[0]


def _ranges(compressor: Compressor, cache: dict, base_plan, layer_name: str, rung: Rung,
            x_calibration: np.ndarray | dict[str, np.ndarray], precision: str) -> dict | None:
    """int8 calibration ranges of the fp32 model factorised at this rung (computed once per rung)."""
    if precision != "int8":
        return None
    key = ("*", "full", None) if rung.method == "full" else (layer_name, rung.method, rung.rank)
    if key not in cache:
        fp32 = compressor.rewrite(base_plan.with_decision(layer_name, decision_for(rung)))
        cache[key] = calibration_ranges(fp32, x_calibration)
    return cache[key]


def rungs_within_bound(compressor: Compressor, layer_name: str, bound: float = DEFAULT_ERROR_BOUND) -> list[Rung]:
    """Without data: the rungs whose relative reconstruction error is at most `bound`."""
    return [r for r in compressor.ladder_with_errors(layer_name) if r.rel_error <= bound]
