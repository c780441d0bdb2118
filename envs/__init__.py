"""Gymnasium environments of explorer, registered under the "explorer/" namespace.

    import gymnasium, envs
    env = gymnasium.make("explorer/Deploy-v0", model="vgg", board="tegra-k1", latency_ms=250)
"""
import gymnasium

from envs.deploy import DeployEnv, make_problem

DEPLOY_ID = "explorer/Deploy-v0"

if DEPLOY_ID not in gymnasium.registry:
    gymnasium.register(id=DEPLOY_ID, entry_point="envs.deploy:DeployEnv")

__all__ = ["DEPLOY_ID", "DeployEnv", "make_problem"]
