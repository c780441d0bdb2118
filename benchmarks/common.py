"""Shared pieces of the benchmark scripts: building problems, summarising prediction errors, printing Markdown tables."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from explorer.api import load_problem
from explorer.problem import Problem


def zoo_problem(model: str, board: str, measure: str = "sim", objective: str = "energy",
                latency_ms: float | None = 5000.0, max_accuracy_drop_points: float | None = 5.0, seed: int = 0) -> Problem:
    """A Problem for a zoo model (its shipped validation data, if any) on a board (explorer.load_problem)."""
    return load_problem(model, board, measure=measure, objective=objective, latency_ms=latency_ms,
                        max_accuracy_drop_points=max_accuracy_drop_points, seed=seed)


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (numbers already formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")


def error_shares(errors: list[float]) -> dict[str, float]:
    """Relative errors (predicted / measured - 1) summarised: how many, the share within +/-10 % and +/-25 %, the
    median of predicted / measured (nan where there are none)."""
    e = np.abs(np.asarray(errors, dtype=float))
    return {"n": int(len(e)), "within_10": float(np.mean(e <= 0.10)) if len(e) else float("nan"),
            "within_25": float(np.mean(e <= 0.25)) if len(e) else float("nan"),
            "median_ratio": float(np.median(np.asarray(errors) + 1.0)) if len(e) else float("nan")}
