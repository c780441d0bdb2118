"""Shared pieces of the benchmark scripts: building problems and printing Markdown tables."""
from __future__ import annotations

import json
from pathlib import Path

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
