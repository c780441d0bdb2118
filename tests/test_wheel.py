"""The wheel works anywhere: built from the checkout, installed into a fresh virtual environment and
run from another folder, it has one top-level package, finds its board profiles as package data, and
searches.

No download: the fresh environment sees the dependencies of the environment running the tests through a
.pth file naming its site-packages (a .pth file's own folder is added without running the .pth files in it,
so the source tree's editable install stays out; the test checks explorer comes from the wheel)."""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ("explorer", "agents", "envs", "targets", "pyproject.toml", "README.md")  # what the build reads
SHIPPED_BOARDS = ("snapdragon-400", "snapdragon-800", "tegra-k1", "tegra-k1-cloud")


class Installed:
    """The fresh environment with the wheel installed, and a folder outside the source tree to run in."""

    def __init__(self, root: Path, wheel: Path) -> None:
        self.wheel = wheel
        self.venv = root / "venv"
        self.elsewhere = root / "elsewhere"
        self.elsewhere.mkdir()
        self.env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        self.env["EXPLORER_RUNS"] = str(root / "runs")

    @property
    def site_packages(self) -> Path:
        return next(self.venv.glob("lib/python*/site-packages"))

    def run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a program of the fresh environment (bin/NAME) in the other folder."""
        done = subprocess.run([str(self.venv / "bin" / args[0]), *args[1:]], cwd=self.elsewhere, env=self.env,
                              capture_output=True, text=True, timeout=timeout)
        assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        return done


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Installed:
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy, so that the build's build/ and egg-info never touch (or come from) the checkout
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "host.toml"))
        else:
            shutil.copy2(ROOT / name, source / name)
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                            "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((root / "dist").glob("explorer-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root / "venv")], check=True, timeout=120)
    installed = Installed(root, wheel)
    deps = dict.fromkeys([sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    (installed.site_packages / "explorer_test_dependencies.pth").write_text("".join(f"{p}\n" for p in deps))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(installed.venv / "bin" / "python"), "install", "-q",
                           "--no-deps", "--no-index", str(wheel)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return installed


def test_the_wheel_has_one_top_level_package_and_ships_the_board_profiles(installed):
    names = zipfile.ZipFile(installed.wheel).namelist()
    assert {name.split("/")[0] for name in names} == {"explorer", installed.wheel.name.split("-py")[0] + ".dist-info"}
    for board in SHIPPED_BOARDS:
        assert f"explorer/targets/{board}.toml" in names
    assert "explorer/targets/host.toml" not in names  # this machine's profile is never shipped
    assert {"explorer/agents/ppo.py", "explorer/envs/deploy.py", "explorer/targets/README.md"} <= set(names)


def test_from_another_folder_explorer_comes_from_the_wheel_and_finds_its_boards(installed):
    assert installed.run("explorer", "--version").stdout.strip() == "explorer 0.1.0"
    code = ("import importlib.util, explorer, explorer.agents, explorer.envs, gymnasium; "
            "from explorer.boards import load_board, shipped_dir; "
            "from gymnasium.envs.registration import load_env_creator; "
            "print(explorer.__file__, explorer.agents.__file__, explorer.envs.__file__, shipped_dir(), "
            "load_board('tegra-k1').path, load_env_creator(gymnasium.spec('explorer/Deploy-v0').entry_point).__module__); "
            "print(*[importlib.util.find_spec(name) for name in ('agents', 'envs', 'benchmarks')])")
    places, collisions = installed.run("python", "-c", code).stdout.splitlines()
    *files, env_module = places.split()
    assert all(Path(f).is_relative_to(installed.site_packages / "explorer") for f in files), files
    assert env_module == "explorer.envs.deploy"
    assert collisions.split() == ["None"] * 3  # no top-level agents, envs or benchmarks
    listed = installed.run("explorer", "boards").stdout
    assert all(board in listed for board in SHIPPED_BOARDS)


@pytest.mark.slow  # about 45 s of CPU (the vgg sensitivity table, uncached in a fresh runs folder)
def test_a_search_from_another_folder_with_the_installed_wheel(installed):
    done = installed.run("explorer", "search", "--budget", "5", timeout=600)
    assert "MLflow run:" in done.stdout and "best plan (5 evaluations" in done.stdout
    assert (Path(installed.env["EXPLORER_RUNS"]) / "mlflow.db").is_file()
    assert not (installed.elsewhere / "runs").exists() and not (installed.elsewhere / "targets").exists()
