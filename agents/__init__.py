"""Search agents, one module each, behind explorer.searching's Agent protocol; made by name with `make_agent`.

The names and their classes are registered in explorer.searching (AGENT_REGISTRY): agents are imported
lazily, so asking for "random" does not load torch or stable-baselines3.
"""
from explorer.searching import AGENT_REGISTRY, make_agent

AGENTS = AGENT_REGISTRY.names()  # every agent's name, e.g. for a command line's choices

__all__ = ["AGENTS", "make_agent"]
