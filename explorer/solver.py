"""The analytic DAD/RLC solver of a Problem: its integer program built from the design space, the cost model
and the sensitivity table, and solved.

The integer program itself, and what "optimal" means, is `explorer.milp`; correcting its cost model by
measurement and re-solving is `explorer.measured_solver`.
"""
from __future__ import annotations

from collections.abc import Callable

from explorer.accuracy import SensitivityTable, sensitivity_table
from explorer.cost import CostModel
from explorer.errors import ExplorerError
from explorer.kernels import PRESSURE_SETTLED, SETTLE_SOLVES, KernelCostModel
from explorer.milp import Choice, Instance, Solution, objective_of, picks_for, predicted, solve
from explorer.plan import Decision, Plan
from explorer.problem import Evaluation, Problem

Observation = tuple[str, str, str, float, float]  # processor, op kind, precision, predicted s, measured s


def instance_for(problem: Problem, cost_model: CostModel | None = None,
                 sensitivity: SensitivityTable | None = None) -> Instance:
    """The integer program of a Problem: its design space priced by the (calibrated) cost model,
    accuracy loss estimated additively from the sensitivity table (SensitivityTable.estimate)."""
    cost_model = cost_model or problem.cost_model
    graph, board = problem.graph, problem.board
    if sensitivity is None and problem.scorer.measured:
        sensitivity = sensitivity_table(graph, problem.compressor, problem.scorer)
    state = (lambda d: f"{d.placed_processor}/{d.precision}") if cost_model.by_precision else (lambda d: d.placed_processor)
    choices = []
    for layer in graph.layers:
        options = []
        for decision in problem.choices(layer):
            rung = problem.compressor.rung(layer.name, decision.method, decision.rank)
            cost = cost_model.layer_cost(layer, rung, decision.precision, decision.placed_processor)
            drop = sensitivity.estimate(layer.name, rung.method, rung.rank, decision.precision) if sensitivity else 0.0
            options.append(Choice(decision, cost.latency_s, cost.energy_j, cost.weight_bytes, drop, state(decision)))
        choices.append(options)
    processors = list(board.processor_ids)
    # what the costs between neighbours depend on: a representative decision per state
    states = {c.state: Decision(precision=c.decision.precision, processor=c.decision.placed_processor)
              for options in choices for c in options}
    transfer = [{(a, b): cost_model.boundary(index, first, second) for a, first in states.items()
                 for b, second in states.items() if cost_model.by_precision or a != b}
                for index in range(len(graph.layers) - 1)]
    entry = {s: cost_model.input_transfer(d.placed_processor) for s, d in states.items()}
    exit_ = {s: cost_model.output_transfer(d.placed_processor) for s, d in states.items()}
    c = problem.constraints
    instance = Instance(
        layer_names=[layer.name for layer in graph.layers], choices=choices, processors=processors,
        transfer=transfer, entry=entry, exit=exit_,
        capacity_bytes={p: proc.memory_mb * 2**20 for p, proc in board.processors.items()},
        local={p for p, proc in board.processors.items() if not proc.is_remote},
        local_capacity_bytes=board.memory.available_mb * 2**20,
        latency_budget_s=c.latency_ms / 1e3 if c.latency_ms is not None else None,
        accuracy_limit=c.max_accuracy_drop if sensitivity is not None else None,
        memory_limit_bytes=c.memory_mb * 2**20 if c.memory_mb is not None else None,
        states=list(states) if cost_model.by_precision else [],
    )
    weights = dict(problem.objective.weights)
    if len(weights) > 1:  # relative to the baseline plan's predicted metrics
        baseline_picks = picks_for(instance, problem.baseline_plan())
        assert baseline_picks is not None, "the baseline plan is in every design space"
        base = predicted(instance, baseline_picks)
        weights = {m: w / max(base[m], 1e-30) for m, w in weights.items()}
    instance.weights = weights
    return instance


def solve_problem(problem: Problem, incumbent: Plan | None = None, cost_model: CostModel | None = None,
                  time_limit_s: float = 60.0) -> Solution:
    """Solve a Problem on its (calibrated) cost model; an incumbent plan bounds the objective.

    Raises ExplorerError with the diagnosis when no plan satisfies the constraints.
    """
    def solve_on(model: CostModel) -> Solution:
        instance = instance_for(problem, model)
        return solve(instance, objective_of(instance, incumbent) if incumbent is not None else None, time_limit_s)

    solution = at_plan_working_set(cost_model or problem.cost_model, solve_on)
    if solution.status == "infeasible":
        raise ExplorerError(f"no plan meets the constraints: {solution.message}")
    return solution


def at_plan_working_set(cost_model: CostModel, solve_on: Callable[[CostModel], Solution]) -> Solution:
    """`solve_on(cost_model)`; on a kernel table with cache pressure, solved again with the terms priced at the working
    set of the plan found until its factor moves less than PRESSURE_SETTLED (at most SETTLE_SOLVES more): the
    program's terms are additive and cannot see the whole plan's working set."""
    solution = solve_on(cost_model)
    if not isinstance(cost_model, KernelCostModel) or cost_model.table.pressure <= 0:
        return solution
    for _ in range(SETTLE_SOLVES):
        if solution.plan is None:
            break
        working_set = cost_model.terms.working_set_mb(solution.plan)
        if abs(cost_model.table.pressure_factor(working_set) / cost_model.scale - 1) <= PRESSURE_SETTLED:
            break
        cost_model = cost_model.at_working_set(working_set)
        solution = solve_on(cost_model)
    return solution


def block_observations(problem: Problem, cost_model: CostModel, plan: Plan, evaluation: Evaluation) -> list[Observation]:
    """(processor, op kind, precision, predicted s, measured s) per layer, from measured blocks
    (a block's measured/predicted ratio is shared by its layers): what `CostModel.calibrated` takes."""
    observations = []
    layers = problem.graph.layer_by_name
    for block in evaluation.blocks:
        costs = []
        for name in block.layers:
            decision = plan[name]
            rung = problem.compressor.rung(name, decision.method, decision.rank)
            cost = cost_model.layer_cost(layers[name], rung, decision.precision, decision.placed_processor)
            costs.append((layers[name], decision, cost.latency_s))
        predicted_s = sum(c for _, _, c in costs)
        ratio = (block.latency_ms / 1e3) / max(predicted_s, 1e-12)
        observations += [(d.placed_processor, layer.kind, d.precision, c, c * ratio) for layer, d, c in costs]
    return observations
