"""Gymnasium environments of explorer, registered under the "explorer/" namespace.

Gymnasium 1.x has no plugin entry points (its v1.0 removed them), so an id is registered by importing
the package that registers it. Either name the package in the id, which makes Gymnasium import it:

    env = gymnasium.make("explorer.envs:explorer/Deploy-v0", model="vgg", board="tegra-k1", latency_ms=250)

or import it first (`import explorer.envs`, then `gymnasium.make("explorer/Deploy-v0", ...)`).
"""
import gymnasium

from explorer.envs.deploy import DeployEnv, make_problem

DEPLOY_ID = "explorer/Deploy-v0"


def register() -> None:
    """Register explorer's environments with Gymnasium (idempotent: importing envs calls it)."""
    if DEPLOY_ID not in gymnasium.registry:
        gymnasium.register(id=DEPLOY_ID, entry_point="explorer.envs.deploy:DeployEnv")


register()

__all__ = ["DEPLOY_ID", "DeployEnv", "make_problem", "register"]
