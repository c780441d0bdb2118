"""Behaviour cloning of solver plans into a MaskablePPO policy: what to imitate, and the fit.

Trajectories are replayed through the environment without measuring them: each plan is imitated with
itself as the observation's suggestion (so the policy learns to follow the suggestion), trajectories
that strayed from the suggestion at a few random layers are labelled with the suggestion (so it finds
its way back), and with a small weight the alternatives are imitated under the suggestion (so its
deviations go where the solver's trade-offs are). The fit is a weighted cross-entropy of the policy's
masked action distribution, with label smoothing, full batch, Adam.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import cast

import numpy as np
import torch
from gymnasium import spaces
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.distributions import MaskableMultiCategoricalDistribution

from explorer.envs.deploy import DeployEnv
from explorer.plan import Plan


@dataclass(frozen=True)
class Demonstration:
    """A trajectory to imitate: `plan` is played with `suggestion` in the observations, and each
    step is labelled with the decision of `labels`, weighted by `weight`."""

    plan: Plan
    suggestion: Plan
    labels: Plan
    weight: float


def demonstrations(env: DeployEnv, suggestion: Plan, alternatives: list[Plan], rng: np.random.Generator,
                   strays: int, alternative_weight: float) -> list[Demonstration]:
    """Follow the suggestion (each plan as its own suggestion; `strays` strayed trajectories per plan
    labelled with the suggestion) and, with `alternative_weight`, deviate towards the alternatives."""
    plans = [suggestion] + [plan for plan in alternatives if plan != suggestion]
    demos = [Demonstration(plan, plan, plan, 1.0) for plan in plans]
    demos += [Demonstration(_stray(env, suggestion, rng), suggestion, suggestion, 1.0) for _ in range(strays * len(plans))]
    demos += [Demonstration(plan, suggestion, plan, alternative_weight) for plan in plans[1:]]
    return demos


def behaviour_clone(model: MaskablePPO, env: DeployEnv, demonstrations: list[Demonstration], steps: int,
                    learning_rate: float, smoothing: float) -> float:
    """Fit the policy's masked action distribution to the demonstrations: weighted cross-entropy
    with label smoothing (each sub-action's target puts `smoothing` uniformly on its unmasked
    values, so however long it trains the policy keeps that much exploration), full batch, Adam.
    Returns the final loss."""
    observations, masks, actions, weights = [], [], [], []
    for demo in demonstrations:
        for observation, mask, action in env.demonstration(demo.plan, demo.suggestion, demo.labels):
            observations.append(observation)
            masks.append(mask)
            actions.append(action)
            weights.append(demo.weight)
    observations_t = torch.as_tensor(np.array(observations))
    actions_t = torch.as_tensor(np.array(actions), dtype=torch.long)
    weights_t = torch.as_tensor(np.array(weights, dtype=np.float32))
    masks_np = np.array(masks)
    sizes = list(cast(spaces.MultiDiscrete, env.action_space).nvec)
    masks_t = torch.split(torch.as_tensor(masks_np, dtype=torch.float32), sizes, dim=1)
    policy = model.policy
    policy.set_training_mode(True)
    optimizer = torch.optim.Adam(policy.parameters(), lr=learning_rate)
    loss = torch.zeros(())
    with fast_torch():
        for _ in range(steps):
            distribution = policy.get_distribution(observations_t, action_masks=masks_np)
            assert isinstance(distribution, MaskableMultiCategoricalDistribution)  # a MultiDiscrete action
            per_sample = torch.zeros(len(weights_t))
            for dim, (categorical, valid) in enumerate(zip(distribution.distributions, masks_t)):
                log_probs = categorical.logits  # normalised; masked values are very negative
                chosen = log_probs.gather(1, actions_t[:, dim:dim + 1]).squeeze(1)
                uniform = (log_probs * valid).sum(1) / valid.sum(1)
                per_sample = per_sample - (1 - smoothing) * chosen - smoothing * uniform
            loss = (weights_t * per_sample).sum() / weights_t.sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    policy.set_training_mode(False)
    return float(loss.detach())


def _stray(env: DeployEnv, plan: Plan, rng: np.random.Generator, layers: int = 2) -> Plan:
    """`plan` with a few layers changed to random valid decisions."""
    for index in rng.choice(len(env.layers), size=min(layers, len(env.layers)), replace=False):
        layer = env.layers[int(index)]
        options = env.problem.choices(layer)
        plan = plan.with_decision(layer.name, options[int(rng.integers(len(options)))])
    return plan


@contextmanager
def fast_torch() -> Iterator[None]:
    """Small networks train fastest, and reproducibly, on one thread; the masked distributions'
    argument validation costs more than the network itself."""
    threads, validate = torch.get_num_threads(), torch.distributions.Distribution._validate_args
    torch.set_num_threads(1)
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.distributions.Distribution.set_default_validate_args(validate)
