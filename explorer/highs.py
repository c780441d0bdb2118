"""One call to HiGHS (SciPy's `milp`): quiet, and answered from a cache when the same program was solved before.

`explorer.milp` builds the programs; this module only hands one to HiGHS. The answers are kept in
runs/cache/solves/ by a digest of everything HiGHS is given, and what HiGHS prints on C's stdout is
discarded while it runs.
"""
from __future__ import annotations

import ctypes
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_matrix

from explorer.cache import AppendOnlyCache, digest
from explorer.paths import cache_dir


@dataclass(frozen=True)
class HighsResult:
    """What HiGHS answered: SciPy's status (0 optimal, 1 time or iteration limit, 2 infeasible...), the
    variables (None when it has no solution), the objective at them and its message."""

    status: int
    x: np.ndarray | None
    fun: float | None
    message: str


def run_milp(objective: np.ndarray, constraints: list[LinearConstraint], integrality: np.ndarray, upper: np.ndarray,
             time_limit_s: float, options: Mapping[str, float | bool]) -> HighsResult:
    """Minimise `objective` over 0 <= x <= `upper` under `constraints` (HiGHS `options` passed on verbatim);
    recalled from the solve cache when the same program was solved before (see `_solve_key`)."""
    key = _solve_key(objective, constraints, integrality, upper, time_limit_s, options)
    cached = None if _CACHE_BYPASSED else _solve_cache().get(key)
    if cached is not None:
        x = None
        if cached["x"] is not None:
            x = np.zeros(len(objective))
            x[cached["x"][0]] = cached["x"][1]
        return HighsResult(cached["status"], x, cached["fun"], cached["message"])
    with _highs_debug_prints_hidden(), warnings.catch_warnings():
        # SciPy documents only mip_rel_gap; it passes the other HiGHS options on verbatim, with a warning
        warnings.filterwarnings("ignore", message="Unrecognized options detected", category=RuntimeWarning)
        result = milp(objective, constraints=constraints, integrality=integrality, bounds=Bounds(np.zeros(len(objective)), upper),
                      options={"time_limit": time_limit_s, **options})
    answer = HighsResult(int(result.status), None if result.x is None else np.asarray(result.x),
                         None if result.fun is None else float(result.fun), str(result.message))
    if not _CACHE_BYPASSED:
        sparse = None
        if answer.x is not None:
            nonzero = np.flatnonzero(np.abs(answer.x) > 1e-12)
            sparse = [nonzero.tolist(), answer.x[nonzero].tolist()]
        _solve_cache().put(key, {"status": answer.status, "message": answer.message, "fun": answer.fun, "x": sparse})
    return answer


_SOLVE_CACHES: dict[Path, AppendOnlyCache] = {}
_CACHE_BYPASSED = False


def _solve_cache() -> AppendOnlyCache:
    """HiGHS results by program, in runs/cache/solves/ (one per runs folder). A search replayed from the
    evaluation cache (a benchmark run again after an interruption) makes the same solves: recalled, they
    cost nothing, and a solve that reached its time limit gives the same answer again."""
    path = cache_dir("solves") / "highs.jsonl"
    if path not in _SOLVE_CACHES:
        _SOLVE_CACHES[path] = AppendOnlyCache(path)
    return _SOLVE_CACHES[path]


@contextmanager
def solve_cache_bypassed() -> Iterator[None]:
    """Meanwhile every program goes to HiGHS, neither recalled from nor stored in the solve cache (to time
    HiGHS itself)."""
    global _CACHE_BYPASSED
    saved, _CACHE_BYPASSED = _CACHE_BYPASSED, True
    try:
        yield
    finally:
        _CACHE_BYPASSED = saved


def _solve_key(objective: np.ndarray, constraints: list[LinearConstraint], integrality: np.ndarray,
               upper: np.ndarray, time_limit_s: float, options: Mapping[str, float | bool]) -> str:
    """A digest of everything HiGHS is given (its options, and SciPy's version, which fixes the HiGHS inside)."""
    parts: list[bytes] = [scipy.__version__.encode(), repr(sorted(options.items())).encode(),
                          repr(float(time_limit_s)).encode(),
                          np.ascontiguousarray(objective, dtype=float).tobytes(),
                          np.ascontiguousarray(integrality, dtype=float).tobytes(),
                          np.ascontiguousarray(upper, dtype=float).tobytes()]
    for constraint in constraints:
        matrix = csr_matrix(constraint.A)
        parts += [repr(matrix.shape).encode(), matrix.indptr.tobytes(), matrix.indices.tobytes(),
                  np.ascontiguousarray(matrix.data, dtype=float).tobytes(),
                  np.ascontiguousarray(constraint.lb, dtype=float).tobytes(),
                  np.ascontiguousarray(constraint.ub, dtype=float).tobytes()]
    return digest(*parts)


_libc = ctypes.CDLL(None)


@contextmanager
def _highs_debug_prints_hidden() -> Iterator[None]:
    """Discard what C code writes to stdout meanwhile: the HiGHS inside SciPy 1.17 prints a debugging line
    ("HighsMipSolverData::transformNewIntegerFeasibleSolution tmpSolver.run();") with printf even when
    its output is off (ERGO-Code/HiGHS#2783), which would land in the middle of a search's output."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no stdout to protect
        yield
        return
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 1)
        yield
    finally:
        _libc.fflush(None)  # C's buffered stdout goes to /dev/null too, not out after the restore
        os.dup2(saved, 1)
        os.close(saved)
