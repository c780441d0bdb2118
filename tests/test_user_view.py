"""What a user sees at the edges of the command line: the version, the next command printed, where a
calibrated profile is used from, the exit status of an infeasible measurement."""
import re
import tomllib
from pathlib import Path

from explorer import __version__
from explorer.cli import main
from explorer.entry import main as entry_main

ROOT = Path(__file__).resolve().parent.parent


def test_version_is_the_package_version(capsys):
    assert entry_main(["--version"]) == 0
    out = capsys.readouterr().out
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert out.strip() == f"explorer {declared}" == f"explorer {__version__}"
    assert main(["--version"]) == 0 and capsys.readouterr().out.strip() == out.strip()


def test_calibrate_to_another_path_says_to_use_that_path(capsys, monkeypatch, tmp_path):
    import explorer.calibrate

    out_path = tmp_path / "mine.toml"
    monkeypatch.setattr(explorer.calibrate, "calibrate_host", lambda path, quick, progress: path)
    assert main(["calibrate", "--quick", "--out", str(out_path)]) == 0
    assert f"use it with --board {out_path}" in capsys.readouterr().out


def test_an_infeasible_measurement_exits_1_and_names_the_limit(capsys):
    code = main(["measure", "--board", "tegra-k1", "--model", "vgg", "--latency-ms", "0.001"])
    out = capsys.readouterr().out
    assert code == 1
    last = out.strip().splitlines()[-1]
    assert last.startswith("infeasible:") and re.search(r"latency .* > .*0\.001", last), last


def test_the_printed_export_command_uses_the_runs_folder(capsys, monkeypatch, tmp_path):
    import onnx
    from netbuild import small_cnn

    model = tmp_path / "small.onnx"
    onnx.save(small_cnn(), model)
    runs = tmp_path / "elsewhere"
    monkeypatch.setenv("EXPLORER_RUNS", str(runs))
    assert main(["search", "--board", "tegra-k1", "--model", str(model), "--agent", "random", "--budget", "3"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("export the best plan:"))
    assert f"--out {runs / 'bundles'}" in line
