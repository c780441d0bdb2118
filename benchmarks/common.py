"""Shared pieces of the benchmark scripts: building problems and printing Markdown tables."""
from __future__ import annotations

import json
from pathlib import Path

from explorer.accuracy import AccuracyScorer
from explorer.boards import load_board
from explorer.graph import load_graph
from explorer.measure import make_measurer
from explorer.problem import Constraints, Objective, Problem
from explorer.zoo import zoo_validation_data


def zoo_problem(model: str, board: str, measure: str = "sim", objective: str = "energy",
                latency_ms: float | None = 5000.0, max_accuracy_drop: float | None = 0.05, seed: int = 0) -> Problem:
    """A Problem for a zoo model (its shipped validation data, if any) on a board."""
    graph = load_graph(model)
    return Problem(graph, load_board(board), make_measurer(measure, seed), AccuracyScorer(graph.model, zoo_validation_data(model)),
                   Constraints(latency_ms=latency_ms, max_accuracy_drop=max_accuracy_drop), Objective.parse(objective))


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (numbers already formatted by the caller)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | None, data) -> None:
    if path:
        Path(path).write_text(json.dumps(data, indent=2) + "\n")
