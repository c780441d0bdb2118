"""What optuna-dashboard shows of an explorer study, read through Optuna's own API as the dashboard
reads it (optuna-dashboard is not installed here): metric names with units, decision labels as
parameters, the "constraints" list, a feasible best trial, the study's settings and MLflow run; and
a study made before the labels resumed with its indices."""
import math

import onnx
import optuna
import pytest
from test_agents import _problem

from explorer.agents.optuna_agents import CONSTRAINTS_ATTR, constraint_values
from explorer.boards import load_board
from explorer.cli import main
from explorer.errors import ExplorerError
from explorer.plan import Decision
from explorer.searching import PARETO_METRIC_NAMES, make_agent
from explorer.studies import DesignSpace, dashboard_command, default_storage_url


def _dashboard_feasible(frozen: optuna.trial.FrozenTrial) -> bool:
    """optuna-dashboard's test for a feasible trial (its _pareto_front._get_feasible_trials, and the grey
    'infeasible' dots of its plots): every value of the system attribute "constraints" <= 0."""
    return all(value <= 0 for value in frozen.system_attrs.get("constraints", []))


def _dashboard_best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial:
    """The trial on optuna-dashboard's 'Best Trial' card of a single-objective study: the storage's best
    trial, which ignores constraints (optuna-dashboard's _app.get_study_detail)."""
    return study._storage.get_best_trial(study._study_id)


@pytest.fixture(scope="module")
def problem():
    return _problem()


def test_optuna_metric_names_and_labels(tmp_path):
    # the least weight memory under a 0.5-point accuracy limit: the smallest plans break the limit
    problem = _problem(latency_ms=None, max_accuracy_drop=0.005, objective="memory")
    agent = make_agent("optuna-tpe", storage=f"sqlite:///{tmp_path / 'optuna.db'}")  # an RDB, as the dashboard reads
    agent.link_run("0123abcd", "sqlite:////tmp/mlflow.db")
    result = agent.search(problem, 20, seed=1)
    study = agent.study
    assert study.metric_names == ["memory (MB)"]  # the dashboard's axis and column title
    assert {"model": problem.graph.source, "board": "tegra-k1", "objective": "memory (MB)", "latency_limit_ms": "none",
            "max_accuracy_drop_points": 0.5, "memory_limit_mb": "none", "mlflow_run_id": "0123abcd",
            "mlflow_tracking_uri": "sqlite:////tmp/mlflow.db", "accuracy_basis": problem.scorer.label,
            "measured_by": problem.measurer.label(problem.board)}.items() <= study.user_attrs.items()

    told = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs["duplicate"]]
    assert len(told) == len(result.trials) == 20
    layers = [layer.name for layer in problem.graph.layers]
    for frozen, trial in zip(told, result.trials):
        # the parameters are the layers' decision labels, from a list of labels (what importance ranks)
        assert set(frozen.params) == set(layers)
        assert all(Decision.from_label(frozen.params[name]) == trial.plan[name] for name in layers)
        assert all(frozen.distributions[name].choices == tuple(d.label() for d in problem.choices(layer))
                   for name, layer in zip(layers, problem.graph.layers))
        assert _dashboard_feasible(frozen) == trial.evaluation.feasible
        assert frozen.system_attrs[CONSTRAINTS_ATTR] == constraint_values(trial.evaluation)
        assert frozen.user_attrs["objective"] == trial.evaluation.objective
        if trial.evaluation.feasible:
            assert frozen.value == trial.evaluation.objective and "violations" not in frozen.user_attrs
        else:
            assert frozen.value == math.inf and frozen.user_attrs["violations"] == "; ".join(trial.evaluation.violations)
    infeasible_objectives = [t.evaluation.objective for t in result.trials if not t.evaluation.feasible]
    assert infeasible_objectives and min(infeasible_objectives) < result.best.objective  # else the test shows nothing
    best = _dashboard_best_trial(study)  # without the +inf, an infeasible plan would take the card
    assert _dashboard_feasible(best) and best.user_attrs["plan_digest"] == result.best_plan.digest()
    assert best.value == result.best.objective


def test_nsga2_names_its_four_objectives_and_tells_the_accuracy_drop_in_points(problem):
    agent = make_agent("optuna-nsga2", storage="memory")
    result = agent.search(problem, 12, seed=0)
    assert agent.study.metric_names == list(PARETO_METRIC_NAMES)
    assert PARETO_METRIC_NAMES[3] == "accuracy drop (points)"
    told = [t for t in agent.study.trials if t.state == optuna.trial.TrialState.COMPLETE and not t.user_attrs["duplicate"]]
    drops = [t.evaluation.accuracy_drop for t in result.trials]
    assert any(drops)
    for frozen, trial in zip(told, result.trials):
        e = trial.evaluation
        assert frozen.values == [e.latency_ms, e.energy_mj, e.memory_mb, 100 * e.accuracy_drop]
        assert _dashboard_feasible(frozen) == e.feasible  # the dashboard's Pareto front takes the feasible ones


def test_a_study_made_with_index_choices_is_resumed_with_indices(tmp_path, monkeypatch):
    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path))
    legacy = DesignSpace.for_study
    # the explorer before labels: its parameters were indices into Problem.choices
    monkeypatch.setattr(DesignSpace, "for_study", classmethod(lambda cls, problem, study: cls(problem, labelled=False)))
    first = make_agent("optuna-tpe").search(_problem(), 5, seed=0)
    monkeypatch.setattr(DesignSpace, "for_study", legacy)
    agent = make_agent("optuna-tpe")
    resumed = agent.search(_problem(), 8, seed=0)
    assert [t.plan for t in resumed.trials[:5]] == [t.plan for t in first.trials] and len(resumed.trials) == 8
    assert not agent.space.labelled
    assert all(isinstance(value, int) for t in agent.study.trials for value in t.params.values())
    assert agent.study.metric_names == ["energy (mJ)"]  # named on resuming
    # a study made for another design space (another board: other processors) is refused in one line
    other = _problem(board=load_board("snapdragon-800"))
    with pytest.raises(ExplorerError, match="was made for another model or design space") as error:
        make_agent("optuna-tpe", study_name=agent.study.study_name).search(other, 8, seed=0)
    assert "\n" not in str(error.value)


def test_a_queued_trial_tells_labels_from_indices(problem):
    """A study with only its start plans queued (no trial asked yet) stores values alone: their type decides."""
    for labelled in (True, False):
        study = optuna.create_study()
        plan = problem.reference_plans()[0][1]
        study.enqueue_trial(DesignSpace(problem, labelled=labelled).params(plan))
        space = DesignSpace.for_study(problem, study)
        assert space.labelled == labelled and space.plan(study.trials[0].system_attrs["fixed_params"], "s") == plan


def test_the_search_prints_the_dashboard_command_beside_the_mlflow_one(capsys, monkeypatch, tmp_path):
    from netbuild import mlp

    monkeypatch.setenv("EXPLORER_RUNS", str(tmp_path))
    model = tmp_path / "mlp.onnx"
    onnx.save(mlp(), model)
    assert main(["search", "--model", str(model), "--agent", "optuna-tpe", "--budget", "3"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    mlflow = next(i for i, line in enumerate(lines) if line.startswith("open the MLflow UI:"))
    dashboard = next(i for i, line in enumerate(lines) if line.startswith("open the Optuna dashboard:"))
    assert mlflow < dashboard <= mlflow + 2  # the MLflow line may wrap
    assert lines[dashboard].startswith(f"open the Optuna dashboard: optuna-dashboard {default_storage_url()}")
    run_id = next(line.split()[2] for line in lines if line.startswith("MLflow run:"))
    studies = optuna.get_all_study_summaries(default_storage_url())
    assert [s.user_attrs["mlflow_run_id"] for s in studies] == [run_id]  # the study names its MLflow run
    assert dashboard_command("memory") is None


def test_the_dashboard_command_quotes_the_storage_url():
    command = dashboard_command("sqlite:////tmp/a b/optuna.db")
    assert command.startswith("optuna-dashboard 'sqlite:////tmp/a b/optuna.db'")
