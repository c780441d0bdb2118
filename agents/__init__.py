"""Search agents behind one protocol (agents/base.py), made by name with `make_agent`.

Agents are imported lazily: asking for "random" does not load torch or stable-baselines3.
"""
from __future__ import annotations

import difflib
import importlib
import inspect

from explorer.errors import ExplorerError

AGENTS = ("ppo", "optuna-tpe", "optuna-nsga2", "random", "solver")

_CLASSES = {  # name -> (module, class)
    "ppo": ("agents.ppo", "PPOAgent"),
    "optuna-tpe": ("agents.optuna_agents", "OptunaTPEAgent"),
    "optuna-nsga2": ("agents.optuna_agents", "OptunaNSGA2Agent"),
    "random": ("agents.random_search", "RandomAgent"),
    "solver": ("agents.solver_agent", "SolverAgent"),
}


def make_agent(name: str, **options):
    """The agent called `name`, built with its keyword options (ExplorerError for unknown ones)."""
    if name not in _CLASSES:
        close = difflib.get_close_matches(name, AGENTS, n=1, cutoff=0.4)
        hint = f"did you mean {close[0]!r}? " if close else ""
        raise ExplorerError(f"unknown agent {name!r}: {hint}choose one of {', '.join(AGENTS)}")
    module, class_name = _CLASSES[name]
    cls = getattr(importlib.import_module(module), class_name)
    try:
        inspect.signature(cls).bind(**options)
    except TypeError as error:
        accepted = [p for p in inspect.signature(cls).parameters if p not in ("self", "args", "kwargs")]
        raise ExplorerError(f"agent {name!r} does not take these options ({error}): it accepts "
                            f"{', '.join(accepted) or 'none'}") from None
    return cls(**options)
