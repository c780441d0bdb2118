"""The user's flow end to end through the CLI: search (interrupted, then resumed), MLflow, export, run."""
import os
import signal

import numpy as np
import pytest

from explorer import searching
from explorer.cli import main
from explorer.runtime import Bundle
from explorer.tracking import default_tracking_uri, read_search
from explorer.zoo import zoo_validation_data


def _press_ctrl_c() -> None:
    raise KeyboardInterrupt


class _InterruptedAgent:
    """The random agent, interrupted after a few trials (by default Ctrl-C)."""

    name = "random"

    def __init__(self, inner, after: int, interrupt=_press_ctrl_c):
        self.inner = inner
        self.after = after
        self.interrupt = interrupt

    def search(self, problem, budget, seed, callback=None):
        def interrupted(trial, result):
            callback(trial, result)
            if len(result.trials) == self.after:
                self.interrupt()

        return self.inner.search(problem, budget, seed, interrupted)


def _run_id(out: str) -> str:
    return next(line.split()[2] for line in out.splitlines() if line.startswith("MLflow run:"))


def test_interrupt_resume_export_run(capsys, monkeypatch, tmp_path):
    argv = ["search", "--board", "tegra-k1", "--model", "vgg", "--agent", "random", "--budget", "11", "--seed", "3",
            "--max-accuracy-drop", "100"]  # every random plan is feasible, so there is a best to export
    real_make_agent = searching.make_agent
    monkeypatch.setattr(searching, "make_agent", lambda name, **options: _InterruptedAgent(real_make_agent(name), after=5))
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert "interrupted after 5 evaluations" in err and "KILLED" in err
    run_id = err.split("--resume ")[1].split()[0]
    killed = read_search(default_tracking_uri(), run_id)
    assert killed.parent.info.status == "KILLED" and len(killed.trials) == 5

    monkeypatch.setattr(searching, "make_agent", real_make_agent)
    assert main(argv + ["--resume", run_id]) == 0
    out = capsys.readouterr().out
    assert _run_id(out) == run_id
    # the reference plans (8 on tegra-k1) were the first trials, and the summary shows them and the confirmation
    assert "whole-model int8 (static QDQ, per-channel) on cpu" in out and "fp32 on cpu (baseline)" in out
    assert "confirmed: " in out and "simulated" in out
    search = read_search(default_tracking_uri(), run_id)
    assert search.parent.info.status == "FINISHED" and len(search.trials) == 11
    assert sorted(t.data.tags["source"] for t in search.trials) == ["random"] * 3 + ["reference"] * 8
    digests = [t.data.tags["plan_digest"] for t in search.trials]
    assert len(set(digests)) == 11  # the replayed trials were not logged twice
    metrics = search.parent.data.metrics

    bundle_dir = tmp_path / "bundle"
    assert main(["export", "--run", run_id, "--out", str(bundle_dir)]) == 0
    data = zoo_validation_data("vgg")
    bundle = Bundle.load(bundle_dir)
    top1 = float(np.mean(bundle.run(data.x).argmax(1) == data.y))
    # the bundle reproduces what MLflow logged
    assert 100 * top1 == pytest.approx(metrics["confirmed_accuracy_percent"], abs=1e-9)
    confirmed = bundle.manifest["confirmed"]
    assert confirmed["plan"]["plan_digest"] == bundle.manifest["plan"]["digest"] and confirmed["simulated"]
    assert confirmed["plan"]["ratio"] == metrics["confirmed_ratio_to_baseline"] and confirmed["baseline"]["baseline"]

    set_dir = tmp_path / "plan-set"  # the search's front as a plan set, read back from its trials in MLflow
    assert main(["export", "--run", run_id, "--out", str(set_dir), "--plans", "3"]) == 0
    plans = Bundle.load(set_dir).plans
    assert 1 <= len(plans) <= 3 and plans[0]["digest"] == bundle.manifest["plan"]["digest"]
    assert "best" in plans[0]["roles"] and plans[0]["figures"]["source"] == "confirmed"
    assert {p["digest"] for p in plans} <= set(digests) | {plans[0]["digest"]}


def test_an_interrupted_search_prints_what_it_found_as_json_with_the_resume_command(capsys, monkeypatch):
    """`--json` on an interrupted search: its JSON so far, `"interrupted": true` and the command that resumes it."""
    import json

    argv = ["search", "--board", "tegra-k1", "--model", "vgg", "--agent", "random", "--budget", "9", "--seed", "6",
            "--max-accuracy-drop", "100", "--json"]
    real_make_agent = searching.make_agent
    monkeypatch.setattr(searching, "make_agent", lambda name, **options: _InterruptedAgent(real_make_agent(name), after=4))
    assert main(argv) == 130
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["interrupted"] is True and data["command"] == "search" and data["evaluations"] == 4
    assert data["best"]["feasible"] and data["best_plan"] and data["confirmed"] is None
    assert [row["name"] for row in data["rows"]][-1] == "best found by random"
    assert data["resume_command"].startswith("explorer search ") and f"--resume {data['run_id']}" in data["resume_command"]
    assert " ".join(err.split()).split("resume with: ")[1].startswith(data["resume_command"])
    killed = read_search(default_tracking_uri(), data["run_id"])
    assert killed.parent.info.status == "KILLED" and len(killed.trials) == 4


def test_a_search_interrupted_before_it_started_prints_json_too(capsys, monkeypatch):
    """Ctrl-C while the baseline is measured: nothing found, no MLflow run; the same command starts it again."""
    import json

    import explorer.searchrun

    monkeypatch.setattr(explorer.searchrun, "prepare", lambda problem: _press_ctrl_c())
    argv = ["search", "--board", "tegra-k1", "--model", "vgg", "--agent", "random", "--budget", "3", "--json"]
    assert main(argv) == 130
    out, err = capsys.readouterr()
    data = json.loads(out)
    assert data["interrupted"] is True and data["evaluations"] == 0 and data["run_id"] is None
    assert data["resume_command"].startswith("explorer search ") and "--resume" not in data["resume_command"]
    assert "explorer: interrupted" in err


def test_sigterm_stops_a_search_as_ctrl_c_does(capsys, monkeypatch):
    """`kill` or a scheduler's SIGTERM: the search stops cleanly (run KILLED, resumable), not mid-write."""
    unhandled = []  # what the test's own handler sees: a SIGTERM that main() did not take over
    outer_handler = lambda signum, frame: unhandled.append(signum)  # noqa: E731
    previous = signal.signal(signal.SIGTERM, outer_handler)
    try:
        real_make_agent = searching.make_agent
        send_sigterm = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
        monkeypatch.setattr(searching, "make_agent",
                            lambda name, **options: _InterruptedAgent(real_make_agent(name), 3, send_sigterm))
        assert main(["search", "--board", "tegra-k1", "--model", "vgg", "--agent", "random", "--budget", "6",
                     "--seed", "4", "--max-accuracy-drop", "100"]) == 130
        assert signal.getsignal(signal.SIGTERM) is outer_handler  # put back when the command ends
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert unhandled == []
    err = capsys.readouterr().err
    assert "interrupted after 3 evaluations" in err and "KILLED" in err
    killed = read_search(default_tracking_uri(), err.split("--resume ")[1].split()[0])
    assert killed.parent.info.status == "KILLED" and len(killed.trials) == 3


def test_a_search_leaves_no_temporary_folders(capsys, monkeypatch, tmp_path):
    """The plots are drawn in a folder that is removed, and PPO's logger writes nowhere (SB3's default
    logger makes an empty SB3-<time> folder in the temporary directory on every learn()). Torch's
    per-user compile cache (torchinductor_<user>) is shared by every process, not left by a search."""
    import tempfile

    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    assert main(["search", "--board", "tegra-k1", "--model", "vgg", "--agent", "ppo", "--budget", "6", "--seed", "1"]) == 0
    assert "MLflow run:" in capsys.readouterr().out
    assert [p.name for p in temporary.iterdir() if not p.name.startswith("torchinductor_")] == []


def test_the_resume_command_keeps_wait_for_servers(capsys, monkeypatch, tmp_path):
    """The printed go-on command (and the --workers children, from the same arguments) keep --wait-for-servers."""
    from netbuild import mlp

    from explorer.cli import _search_args, build_parser

    model = tmp_path / "mlp.onnx"
    model.write_bytes(mlp().SerializeToString())
    argv = ["search", "--board", "tegra-k1", "--model", str(model), "--agent", "random", "--budget", "4",
            "--wait-for-servers", "30"]
    real_make_agent = searching.make_agent
    monkeypatch.setattr(searching, "make_agent", lambda name, **options: _InterruptedAgent(real_make_agent(name), after=1))
    assert main(argv) == 130
    resume = " ".join(capsys.readouterr().err.split()).split("resume with: explorer search ")[1].split()
    assert resume[resume.index("--wait-for-servers") + 1] == "30" and "--resume" in resume
    worker = _search_args(build_parser().parse_args(argv + ["--workers", "2"]), workers=None, study="s")
    assert worker[worker.index("--wait-for-servers") + 1] == "30"
    assert "--wait-for-servers" not in _search_args(build_parser().parse_args(argv[:-2]))  # the default is left out
