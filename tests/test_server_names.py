"""The measurement server is called a server (issue 25, item 9); the names from before it was (the class, the
extra, the token variable) still work for one release, each with a deprecation note."""
import http.client
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_serve import SERVER_ONLY, TOKEN, _without_token

import explorer.http_api
from explorer.http_api import DEPRECATED_TOKEN_ENV, TOKEN_ENV, auth_headers, token_from_environment

ROOT = Path(__file__).parent.parent


@pytest.fixture
def fresh_warning(monkeypatch):
    """Each test sees the once-per-process warning about the old variable afresh."""
    monkeypatch.setattr(explorer.http_api, "_warned_deprecated_token", False)
    for name in (TOKEN_ENV, DEPRECATED_TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)


def test_the_token_comes_from_the_new_variable_before_the_old_one_without_a_warning(fresh_warning, monkeypatch, capsys):
    assert token_from_environment() is None
    monkeypatch.setenv(TOKEN_ENV, "new")
    monkeypatch.setenv(DEPRECATED_TOKEN_ENV, "old")
    assert token_from_environment() == "new"
    assert capsys.readouterr().err == ""


def test_the_old_token_variable_still_works_with_one_line_on_stderr_once(fresh_warning, monkeypatch, capsys):
    from explorer.remote import RemoteMeasurer

    monkeypatch.setenv(DEPRECATED_TOKEN_ENV, TOKEN)
    assert RemoteMeasurer("remote://127.0.0.1:9").token == TOKEN  # the client reads it (nothing is connected yet)
    assert token_from_environment() == TOKEN
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"${DEPRECATED_TOKEN_ENV} is deprecated" in err and f"set ${TOKEN_ENV}" in err


def test_a_server_started_with_the_old_token_variable_uses_it_and_says_it_is_deprecated():
    env = _without_token() | {DEPRECATED_TOKEN_ENV: TOKEN}
    process = subprocess.Popen([sys.executable, str(SERVER_ONLY), "serve", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        line = process.stdout.readline()
        assert "measurement server listening on" in line, line  # no "no token given": it read the old variable
        port = int(line.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/info", headers=auth_headers(TOKEN))
        assert connection.getresponse().status == 200
        connection.close()
    finally:
        process.kill()
        _, err = process.communicate()
    assert f"${DEPRECATED_TOKEN_ENV} is deprecated and goes in the next release: set ${TOKEN_ENV} instead" in err


@pytest.mark.parametrize("module, old, new", [("explorer.serve", "Agent", "MeasurementServer"),
                                              ("explorer.serve", "AgentServer", "BoundedHTTPServer"),
                                              ("explorer.remote", "AgentError", "ServerError"),
                                              ("explorer.remote", "AgentEndpoint", "ServerEndpoint")])
def test_the_old_class_names_are_importable_with_a_deprecation_warning(module, old, new):
    imported = __import__(module, fromlist=[new])
    with pytest.warns(DeprecationWarning, match=f"{module}.{old} is deprecated and goes in the next release: use {module}.{new}"):
        assert getattr(imported, old) is getattr(imported, new)
    with pytest.raises(AttributeError):
        imported.NoSuchName  # noqa: B018


def test_the_old_exception_name_is_the_new_exception():
    """measure.AgentsUnreachable is a plain alias of ServersUnreachable, without a warning: an `except` clause
    names the class, so a warning on access would fire in a user's handler whether or not it is raised."""
    from explorer.measure import AgentsUnreachable, ServersUnreachable

    assert AgentsUnreachable is ServersUnreachable


def test_the_server_extra_and_its_deprecated_alias():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["server"] == [] and extras["agent"] == extras["server"]  # both the base install: the server's
    assert "deprecated" in next(line for line in (ROOT / "pyproject.toml").read_text().splitlines()
                                if line.startswith("agent ="))


def test_the_server_says_server_in_its_help():
    from explorer.serve import build_parser

    text = build_parser().format_help()
    assert "Measurement server" in text and "agent" not in text.replace(DEPRECATED_TOKEN_ENV, "")
