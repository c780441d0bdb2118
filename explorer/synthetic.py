"""Synthetic inputs: what accuracy is estimated on when the user gives no data.

Without validation data nothing can be *measured*, but a plan that breaks the model must still be
refused. So explorer draws seeded inputs of the model's declared input type and resolved shape
(standard normal by default, which suits normalised inputs; `--synthetic-inputs` gives another
distribution) and scores a plan by its agreement with the uncompressed model on them (top-1
agreement for class scores, 1 - relative error otherwise; `explorer.accuracy`). Every figure made
so says "estimated on synthetic inputs, not measured" (accuracy.SYNTHETIC_LABEL). The inputs are
drawn with a fixed seed, so every search of one model shares one sensitivity table in the cache.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from explorer.data import Dataset
from explorer.errors import ExplorerError
from explorer.graph import LayerGraph

SYNTHETIC_SEED = 0  # fixed, not --seed: one set of inputs (and one cached sensitivity table) per model
SYNTHETIC_SAMPLES = 256  # top-1 agreement in steps of 0.39 points
SYNTHETIC_MIN_SAMPLES = 32  # the fewest, however large the model (steps of 3.1 points)
SYNTHETIC_MEMORY_BYTES = 256 << 20  # the sensitivity table keeps every layer's input for every sample
_FORMS = "normal (the default: mean 0, std 1), normal:MEAN,STD or uniform:LO,HI"


@dataclass(frozen=True)
class SyntheticInputs:
    """The distribution synthetic inputs are drawn from: normal (a = mean, b = std) or uniform [a, b]."""

    kind: str = "normal"
    a: float = 0.0
    b: float = 1.0

    @classmethod
    def parse(cls, text: str | None) -> SyntheticInputs:
        """'normal', 'normal:MEAN,STD' or 'uniform:LO,HI' (None: standard normal)."""
        if text is None or text.strip() == "normal":
            return cls()
        kind, _, numbers = text.strip().partition(":")
        try:
            a, b = (float(v) for v in numbers.split(","))
        except ValueError:
            kind = ""
        if kind not in ("normal", "uniform") or not (np.isfinite(a) and np.isfinite(b)):
            raise ExplorerError(f"--synthetic-inputs {text!r} is not a distribution: use {_FORMS}, in the units of the "
                                "model's input (after any normalisation the model expects)")
        if kind == "normal" and b <= 0:
            raise ExplorerError(f"--synthetic-inputs {text!r}: the standard deviation must be above 0")
        if kind == "uniform" and b <= a:
            raise ExplorerError(f"--synthetic-inputs {text!r}: LO must be below HI (uniform:LO,HI)")
        return cls(kind, a, b)

    def describe(self) -> str:
        if self.kind == "normal":
            return "standard normal" if (self.a, self.b) == (0.0, 1.0) else f"normal (mean {self.a:g}, std {self.b:g})"
        return f"uniform in [{self.a:g}, {self.b:g}]"

    def spec(self) -> str:
        """The option's text that gives this distribution back."""
        return f"{self.kind}:{self.a:g},{self.b:g}"

    def draw(self, shape: tuple[int, ...], dtype: np.dtype, rng: np.random.Generator) -> np.ndarray:
        """Samples of `shape` in `dtype`; integer inputs take whole numbers in [LO, HI]."""
        if np.issubdtype(dtype, np.floating):
            if self.kind == "normal":
                return rng.normal(self.a, self.b, shape).astype(dtype)
            return rng.uniform(self.a, self.b, shape).astype(dtype)
        if dtype == np.bool_:
            return rng.integers(0, 2, shape).astype(dtype)
        if self.kind != "uniform":
            raise ExplorerError(f"the model's input is {dtype.name}, so synthetic inputs need a range: give "
                                "--synthetic-inputs uniform:LO,HI (e.g. uniform:0,255 for images, 0,VOCAB-1 for tokens)")
        info = np.iinfo(dtype)
        low, high = max(int(np.ceil(self.a)), info.min), min(int(np.floor(self.b)), info.max)
        if high < low:
            raise ExplorerError(f"--synthetic-inputs {self.spec()} holds no whole number for the {dtype.name} input")
        return rng.integers(low, high, shape, endpoint=True).astype(dtype)


def synthetic_sample_count(graph: LayerGraph) -> int:
    """How many synthetic samples: SYNTHETIC_SAMPLES, fewer where the layers' inputs of that many samples
    would not fit SYNTHETIC_MEMORY_BYTES (never below SYNTHETIC_MIN_SAMPLES); whole batches of a fixed batch."""
    batch = graph.fixed_batch or 1
    per_sample = sum(int(np.prod(layer.input_shape, dtype=np.int64)) for layer in graph.layers) * 4 // batch
    count = int(np.clip(SYNTHETIC_MEMORY_BYTES // max(per_sample, 1), SYNTHETIC_MIN_SAMPLES, SYNTHETIC_SAMPLES))
    return -(-count // batch) * batch


def synthetic_dataset(graph: LayerGraph, inputs: SyntheticInputs | None = None, seed: int = SYNTHETIC_SEED,
                      samples: int | None = None) -> Dataset:
    """Seeded inputs for every model input (x for the first, the others by name): each input's declared
    type and resolved shape, no labels."""
    inputs = inputs or SyntheticInputs()
    count = samples or synthetic_sample_count(graph)
    rng = np.random.default_rng(seed)
    drawn = {}
    for name in graph.input_names:
        elem_type = graph.dtypes.get(name, onnx.TensorProto.FLOAT)
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type))
        drawn[name] = inputs.draw((count, *graph.inputs[name].dims[1:]), dtype, rng)
    first = graph.input_names[0]
    source = f"{count} synthetic {inputs.describe()} inputs (seed {seed}; no data given)"
    return Dataset(x=drawn.pop(first), y=None, source=source, extra=drawn, synthetic=True)


def check_one_source(data: object, synthetic_inputs: str | None) -> None:
    """Synthetic inputs replace the data: refuse both at once (before anything is loaded)."""
    if synthetic_inputs is not None and data:
        raise ExplorerError("--synthetic-inputs replaces the data: give --data or --synthetic-inputs, not both")


def scoring_data(graph: LayerGraph, dataset: Dataset | None, synthetic_inputs: str | None = None) -> Dataset | None:
    """The data accuracy is scored on: the validation data, else synthetic inputs. `synthetic_inputs`
    (--synthetic-inputs) asks for synthetic inputs even where a zoo model ships data, never with --data.

    None (accuracy not measured) for a zoo model whose weights are untrained by design, unless synthetic
    inputs are asked for: agreement of random weights with themselves says nothing about a trained model,
    and scoring a full-size network on synthetic inputs would cost minutes for a figure without meaning."""
    if synthetic_inputs is None and dataset is not None:
        return dataset
    if synthetic_inputs is None and _untrained_zoo_model(graph):
        return None
    return synthetic_dataset(graph, SyntheticInputs.parse(synthetic_inputs))


def _untrained_zoo_model(graph: LayerGraph) -> bool:
    from explorer.zoo import ZOO

    entry = ZOO.get(str(graph.source))
    return entry is not None and not entry.trained
