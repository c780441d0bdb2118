"""Predicting kernel-table terms that were not measured (other models, shapes, ranks) from those that were.

Each term has features (:meth:`explorer.kernels.Terms.info`: op type, shapes, FLOPs, parameters, rank,
precision, processor threads and provider). Per kind of term:

* layer terms (always positive, from a microsecond to seconds): first a least-squares line through the
  measured ones per (precision, op type, provider, threads), seconds = a + b FLOPs + c parameters + d activations
  (non-negative: the device's throughput, so a layer larger than any measured one extrapolates sensibly),
  then gradient-boosted trees (scikit-learn's HistGradientBoostingRegressor) fitted to log(measured / line):
  the device's efficiency at each shape, which trees capture well and never extrapolate wildly;
* merge, pair and edge terms (small corrections of either sign): the trees on the seconds themselves.

How sure a prediction is: the spread of an ensemble of trees fitted on bootstrap resamples (for layer terms,
the standard deviation of log seconds: 0.1 is about +/-10 %). Adaptive sampling measures next where it is
largest (:func:`explorer.kernels.profile` with a plan budget).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.optimize import nnls
from sklearn.ensemble import HistGradientBoostingRegressor

from explorer.kernels import TermInfo

CATEGORICAL = ("precision", "provider", "op", "method", "next_precision", "next_op")
NUMERIC = ("threads", "out_elements", "flops", "params", "rank", "in_elements", "kernel", "nodes", "first")
MEMBERS = 5  # bootstrap ensemble size (the spread)
MIN_SAMPLES = 8  # fewer measured terms of a kind: no trees for it (the line, or nothing)


def _line_features(features: dict) -> np.ndarray:
    return np.array([1.0, float(features.get("flops", 0.0)), float(features.get("params", 0.0)),
                     float(features.get("in_elements", 0.0)) + float(features.get("out_elements", 0.0))])


def _group(features: dict) -> tuple:
    return (features.get("precision"), features.get("op"), features.get("provider"), features.get("threads"))


class KernelPredictor:
    """Fitted on measured terms of one device (any models); predicts a term's seconds and how sure it is."""

    def __init__(self, samples: Sequence[tuple[TermInfo, float]], seed: int = 0):
        self.seed = seed
        self.categories: dict[str, dict[str, int]] = {name: {} for name in CATEGORICAL}
        by_kind: dict[str, list[tuple[dict, float]]] = {}
        for info, seconds in samples:
            by_kind.setdefault(info.kind, []).append((info.features, float(seconds)))
            for name in CATEGORICAL:
                value = str(info.features.get(name, ""))
                self.categories[name].setdefault(value, len(self.categories[name]))
        self.samples = {kind: len(rows) for kind, rows in by_kind.items()}
        self.lines: dict[tuple | None, np.ndarray] = {}
        self.members: dict[str, list[HistGradientBoostingRegressor]] = {}
        layer_rows = [(f, s) for f, s in by_kind.get("layer", []) if s > 0]
        if layer_rows:
            self._fit_lines(layer_rows)
            targets = [math.log(s / self._line(f)) for f, s in layer_rows]
            self._fit_trees("layer", [f for f, _ in layer_rows], targets)
        for kind, rows in by_kind.items():
            if kind != "layer":
                self._fit_trees(kind, [f for f, _ in rows], [s * 1e6 for _, s in rows])

    # ---- the line (layer terms): throughput of the device -----------------------------------------
    def _fit_lines(self, rows: list[tuple[dict, float]]) -> None:
        groups: dict[tuple | None, list[tuple[dict, float]]] = {None: rows}
        for features, seconds in rows:
            groups.setdefault(_group(features), []).append((features, seconds))
        for key, members in groups.items():
            if len(members) < 4 and key is not None:  # a group's own line needs a few samples; the common one any
                continue
            x = np.array([_line_features(f) for f, _ in members])
            y = np.array([s for _, s in members])
            scale = np.maximum(np.abs(x).max(axis=0), 1e-12)
            weight = 1.0 / y  # relative errors
            coefficients, _ = nnls(x / scale * weight[:, None], y * weight)
            self.lines[key] = coefficients / scale

    def _line(self, features: dict) -> float:
        coefficients = self.lines.get(_group(features), self.lines[None])
        return max(float(_line_features(features) @ coefficients), 1e-7)

    # ---- the trees ---------------------------------------------------------------------------------
    def _row(self, features: dict) -> list[float]:
        row = [float(self.categories[name].get(str(features.get(name, "")), -1)) for name in CATEGORICAL]
        row += [float(features.get(name, 0.0)) for name in NUMERIC]
        row += [math.log1p(float(features.get(name, 0.0))) for name in ("flops", "params", "out_elements")]
        return row

    def _fit_trees(self, kind: str, features: list[dict], targets: list[float]) -> None:
        if len(targets) < MIN_SAMPLES:
            return
        x = np.array([self._row(f) for f in features])
        y = np.array(targets)
        rng = np.random.default_rng(self.seed)
        categorical = [i < len(CATEGORICAL) for i in range(x.shape[1])]
        members = []
        for m in range(MEMBERS):
            pick = rng.integers(0, len(y), len(y)) if m else np.arange(len(y))  # the first on all samples
            model = HistGradientBoostingRegressor(max_iter=120, learning_rate=0.08, min_samples_leaf=3,
                                                  categorical_features=categorical, random_state=self.seed + m)
            model.fit(x[pick], y[pick])
            members.append(model)
        self.members[kind] = members

    @classmethod
    def from_table(cls, table, seed: int = 0) -> KernelPredictor:
        """Fitted to every term of a kernel table (explorer.kernels.KernelTable) whose features it holds."""
        return cls([(table.infos[key], seconds) for key, seconds in table.seconds.items() if key in table.infos], seed)

    def knows(self, kind: str) -> bool:
        """Whether it can predict terms of this kind (enough measured samples)."""
        return kind in self.members or (kind == "layer" and self.samples.get("layer", 0) >= MIN_SAMPLES)

    def predict(self, info: TermInfo) -> tuple[float, float]:
        """(seconds, spread) of a term: for layer terms the spread is in log seconds (0.1: about +/-10 %), for the
        others in seconds. A kind it has too few samples of: (0, inf) for corrections, the line for layers."""
        return self.predict_many([info])[0]

    def predict_many(self, infos: Sequence[TermInfo]) -> list[tuple[float, float]]:
        """`predict` of many terms at once (one call of each tree ensemble per kind: much faster)."""
        out: list[tuple[float, float]] = [(0.0, math.inf)] * len(infos)
        by_kind: dict[str, list[int]] = {}
        for i, info in enumerate(infos):
            by_kind.setdefault(info.kind, []).append(i)
        for kind, positions in by_kind.items():
            members = self.members.get(kind)
            rows = self._nan(np.array([self._row(infos[i].features) for i in positions]))
            values = np.array([m.predict(rows) for m in members]) if members else None  # (members, rows)
            for j, i in enumerate(positions):
                if kind == "layer":
                    if not self.lines:
                        continue
                    base = self._line(infos[i].features)
                    out[i] = (base, math.inf) if values is None else (base * math.exp(float(values[0, j])),
                                                                       float(values[:, j].std()))
                elif values is not None:
                    out[i] = float(values[0, j]) / 1e6, float(values[:, j].std()) / 1e6
        return out

    @staticmethod
    def _nan(row: np.ndarray) -> np.ndarray:
        """Categories never seen in training are missing values to the trees."""
        out = row.copy()
        out[:, :len(CATEGORICAL)][out[:, :len(CATEGORICAL)] < 0] = np.nan
        return out

    def describe(self) -> str:
        return ("gradient-boosted trees (scikit-learn) on " +
                ", ".join(f"{n} measured {kind} terms" for kind, n in sorted(self.samples.items())))
