"""The registries (agents, measurers, zoo: one mechanism, names -> "module:Attr"), the Agent protocol, and the
core's independence from agents/ and envs/."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

from explorer.agents import AGENTS
from explorer.errors import ExplorerError
from explorer.measure import MEASURER_REGISTRY, SimMeasurer, make_measurer
from explorer.registry import Registry, load_entry_point
from explorer.searching import AGENT_REGISTRY, Agent, StudyAgent, make_agent
from explorer.zoo import ZOO, ZooEntry

ROOT = Path(__file__).resolve().parents[1]


def test_a_registry_imports_an_entry_point_when_first_asked_and_suggests_the_closest_name():
    registry: Registry = Registry("widget", {"json-dumps": "json:dumps"}, hint="`widgets` lists them")
    assert "json-dumps" in registry and list(registry) == ["json-dumps"] and len(registry) == 1
    import json

    assert registry["json-dumps"] is json.dumps and registry.lookup("json-dumps") is json.dumps
    with pytest.raises(ExplorerError, match=r"unknown widget 'json-dump': did you mean 'json-dumps'\? `widgets` lists them"):
        registry.lookup("json-dump")
    with pytest.raises(KeyError):
        registry["nothing"]
    with pytest.raises(ValueError, match="registered already"):
        registry.register("json-dumps", "json:loads")
    registry.register("answer", 42)  # an object itself
    assert registry["answer"] == 42 and registry.entry_point("answer") is None
    assert load_entry_point("os.path:join.__name__") == "join"
    with pytest.raises(ValueError, match="module:Attr"):
        load_entry_point("json.dumps")


def test_every_agent_keeps_the_protocol_and_the_optuna_ones_the_study_protocol():
    assert AGENTS == AGENT_REGISTRY.names() == ("ppo", "optuna-tpe", "optuna-nsga2", "random", "solver")
    for name in AGENTS:
        agent = make_agent(name)
        assert isinstance(agent, Agent) and agent.name == name and isinstance(agent.anytime, bool)
        assert isinstance(agent, StudyAgent) == name.startswith("optuna")
    assert not make_agent("ppo").anytime and make_agent("random").anytime
    with pytest.raises(ExplorerError, match="agent 'random' does not take these options"):
        make_agent("random", storage="memory")


def test_measurers_and_zoo_models_are_made_by_name_with_one_line_errors():
    assert isinstance(make_measurer("sim", seed=3), SimMeasurer) and make_measurer("sim", seed=3).seed == 3
    assert MEASURER_REGISTRY.entry_point("remote") == "explorer.remote:RemoteMeasurer"
    with pytest.raises(ExplorerError, match="unknown measurer 'hots': did you mean 'host'"):
        make_measurer("hots")
    with pytest.raises(ExplorerError, match="not a remote measurer"):
        make_measurer("remote")  # the name alone: remote needs addresses
    for spec in ("host://10.0.0.5:9190", "sim://x"):  # a typo of remote:// never measures here silently
        with pytest.raises(ExplorerError, match="takes no address"):
            make_measurer(spec)
    assert isinstance(ZOO["vgg"], ZooEntry) and ZOO["vgg16-imagenet"].build == "explorer.zoo:build_vgg16_imagenet"
    with pytest.raises(ExplorerError, match="unknown zoo model 'vgg-16': did you mean 'vgg'"):
        ZOO.lookup("vgg-16")


def test_measure_resolves_remote_by_name_without_importing_it():
    code = ("import sys, explorer.measure, explorer.zoo, explorer.searching; "
            "print(sorted(m for m in sys.modules if m.startswith(('explorer.agents', 'explorer.envs')) or m == 'explorer.remote'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}).stdout
    assert out.strip() == "[]"


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at module level or inside a function (TYPE_CHECKING blocks included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}  # `from explorer import agents`
    return names


def _agents_or_envs(module: str) -> bool:
    return any(module == package or module.startswith(package + ".") for package in ("explorer.agents", "explorer.envs"))


def test_the_core_never_imports_agents_or_envs():
    offending = {str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path) if _agents_or_envs(m))
                 for path in sorted((ROOT / "explorer").glob("*.py"))}
    assert _agents_or_envs("explorer.agents.ppo") and not _agents_or_envs("explorer.agentsx")
    assert {path: modules for path, modules in offending.items() if modules} == {}
