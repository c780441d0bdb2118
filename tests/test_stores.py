"""Stores that survive any interruption (explorer.stores) and caches that survive damage (explorer.cache)."""
from __future__ import annotations

import fcntl
import json
import logging
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from explorer import stores
from explorer.errors import ExplorerError
from explorer.stores import ensure_sqlite_store, first_value, sqlite_file

REPO = Path(__file__).resolve().parent.parent


# ---- the mechanism, on a toy schema (fast) --------------------------------------------------------
def _create(path: Path) -> None:
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE things (id INTEGER)")
        connection.execute("CREATE TABLE version (number INTEGER)")
        connection.execute("INSERT INTO version VALUES (1)")
    connection.close()


def _check(connection) -> str | None:
    return None if first_value(connection, "SELECT number FROM version") == 1 else "no version row"


def _has_data(connection) -> bool:
    return first_value(connection, "SELECT 1 FROM things") is not None


def _ensure(path: Path, create=_create) -> None:
    ensure_sqlite_store(path, "the toy store", create, _check, _has_data)


def test_sqlite_file_of_urls(tmp_path):
    assert sqlite_file(f"sqlite:///{tmp_path}/a.db") == tmp_path / "a.db"
    assert sqlite_file("sqlite+pysqlite:///rel/b.db?timeout=5") == (Path.cwd() / "rel/b.db").resolve()
    assert sqlite_file("sqlite:///:memory:") is None and sqlite_file("sqlite://") is None
    assert sqlite_file("postgresql://u@h/db") is None and sqlite_file("http://localhost:5000") is None


def test_an_absent_store_is_made_complete_and_nothing_is_left_over(tmp_path):
    path = tmp_path / "toy.db"
    _ensure(path)
    with sqlite3.connect(path) as connection:
        assert _check(connection) is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.db", "toy.db.lock"]


def test_an_interrupted_creation_leaves_no_store(tmp_path):
    path = tmp_path / "toy.db"

    def interrupted(file: Path) -> None:
        with sqlite3.connect(file) as connection:
            connection.execute("CREATE TABLE things (id INTEGER)")  # half made, then Ctrl-C
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _ensure(path, interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.db.lock"]  # no store, no temporary file
    _ensure(path)  # the lock was released: the next process makes it
    assert _check(sqlite3.connect(path)) is None


def test_a_killed_creation_s_temporary_file_is_removed(tmp_path):
    (tmp_path / ".toy.db.4242.tmp").write_bytes(b"half")  # what SIGKILL leaves
    (tmp_path / ".toy.db.4242.tmp-journal").write_bytes(b"half")
    _ensure(tmp_path / "toy.db")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["toy.db", "toy.db.lock"]


@pytest.mark.parametrize("content, reason", [
    (b"", "no version row"),  # SQLite reads an empty file as an empty database
    (b"this is not a database, it is text" * 100, "not a database"),
    (None, "no version row"),  # tables made, version row not yet
])
def test_a_half_made_store_is_moved_aside_and_made_again(tmp_path, caplog, content, reason):
    path = tmp_path / "toy.db"
    if content is None:
        with sqlite3.connect(path) as connection:
            connection.execute("CREATE TABLE things (id INTEGER)")
        connection.close()
    else:
        path.write_bytes(content)
    Path(f"{path}-journal").write_bytes(b"")  # a journal belongs to its database: it moves with it
    with caplog.at_level(logging.WARNING, logger="explorer.stores"):
        _ensure(path)
    assert _check(sqlite3.connect(path)) is None
    aside = list(tmp_path.glob("toy.db.broken-*"))
    assert len([p for p in aside if not p.name.endswith("-journal")]) == 1 and len(aside) == 2
    assert not Path(f"{path}-journal").exists()
    [message] = [r.getMessage() for r in caplog.records]
    assert f"the toy store {path} was incomplete ({reason})" in message and "moved it to toy.db.broken-" in message


def test_an_incomplete_store_that_holds_data_is_left_to_its_library(tmp_path):
    path = tmp_path / "toy.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE things (id INTEGER)")
        connection.execute("INSERT INTO things VALUES (7)")  # the user's data, under an older schema
    connection.close()
    _ensure(path)
    assert first_value(sqlite3.connect(path), "SELECT id FROM things") == 7 and not list(tmp_path.glob("*.broken-*"))


def test_a_store_locked_by_a_writer_is_an_error_and_never_moved_aside(tmp_path, monkeypatch):
    monkeypatch.setattr(stores, "BUSY_TIMEOUT_S", 0.2)
    path = tmp_path / "toy.db"
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("CREATE TABLE things (id INTEGER)")
    writer.execute("BEGIN EXCLUSIVE")  # another process in the middle of a write
    try:
        with pytest.raises(ExplorerError, match="cannot read .*database is locked.*no process holds it locked"):
            _ensure(path)
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    assert not list(tmp_path.glob("*.broken-*"))


def test_a_lock_held_too_long_is_one_error_that_names_the_holder(tmp_path, monkeypatch):
    monkeypatch.setattr(stores, "LOCK_TIMEOUT_S", 0.3)
    with open(tmp_path / "toy.db.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("process 4242")
        handle.flush()
        with pytest.raises(ExplorerError, match=r"process 4242 has held the lock .*toy.db.lock for over 0 s"):
            _ensure(tmp_path / "toy.db")
    assert not (tmp_path / "toy.db").exists()


def test_a_folder_that_cannot_be_written_is_one_error(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        if (folder / "probe").exists() or _writable(folder):
            pytest.skip("running as a user that writes anywhere (root)")
        with pytest.raises(ExplorerError, match="cannot create the toy store"):
            _ensure(folder / "toy.db")
    finally:
        folder.chmod(0o700)


def _writable(folder: Path) -> bool:
    try:
        (folder / "probe").write_text("")
        (folder / "probe").unlink()
        return True
    except OSError:
        return False


# ---- the real stores ------------------------------------------------------------------------------
def test_a_half_migrated_mlflow_store_is_rebuilt_and_used(tmp_path, caplog):
    """What an interrupted first search used to leave: MLflow's migrations run up to one, then killed in
    the middle of the next (its first table made, the schema version not moved). MLflow alone then fails
    on every command with "table guardrails already exists"; here it is moved aside with one line and
    the store made again works."""
    from alembic import command
    from mlflow.store.db.utils import _get_alembic_config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase
    from sqlalchemy import create_engine, text

    from explorer.tracking import _mlflow_store_problem, tracking_client

    path = tmp_path / "mlflow.db"
    uri = f"sqlite:///{path}"
    engine = create_engine(uri)
    InitialBase.metadata.create_all(engine)
    config = _get_alembic_config(uri)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "a5b4c3d2e1f0")  # the revision before the one that adds the guardrails tables
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE guardrails (guardrail_id VARCHAR(36) PRIMARY KEY)"))
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="explorer.stores"):
        client = tracking_client(uri)
        assert [e.name for e in client.search_experiments()] == ["Default"]
    assert "the MLflow store" in caplog.text and "of its tables missing" in caplog.text
    assert _mlflow_store_problem(sqlite3.connect(path)) is None
    assert len(list(tmp_path.glob("mlflow.db.broken-*"))) == 1


def test_a_half_made_optuna_storage_is_rebuilt_and_used(tmp_path, caplog):
    import optuna
    from optuna.storages._rdb import models
    from sqlalchemy import create_engine

    from explorer.studies import open_storage

    path = tmp_path / "optuna.db"
    engine = create_engine(f"sqlite:///{path}")
    models.BaseModel.metadata.create_all(engine)  # Optuna's tables, killed before its version row
    engine.dispose()
    with caplog.at_level(logging.WARNING, logger="explorer.stores"):
        storage = open_storage(f"sqlite:///{path}")
    assert "the Optuna storage" in caplog.text and "no version row" in caplog.text
    study = optuna.create_study(storage=storage, study_name="s")
    assert study.study_name == "s" and len(list(tmp_path.glob("optuna.db.broken-*"))) == 1


_OPEN_BOTH = """
import sys
from explorer.studies import open_storage
from explorer.tracking import tracking_client
folder = sys.argv[1]
print(len(tracking_client(f"sqlite:///{folder}/mlflow.db").search_experiments()),
      len(open_storage(f"sqlite:///{folder}/optuna.db").get_all_studies()))
"""


def test_processes_starting_together_on_an_empty_folder_all_open_complete_stores(tmp_path):
    """Two processes make the same two stores at once: one makes each, the other waits; neither fails."""
    processes = [subprocess.Popen([sys.executable, "-c", _OPEN_BOTH, str(tmp_path)], cwd=REPO, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for process in processes:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0 and out.split() == ["1", "0"], err
        assert "incomplete" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlflow.db.lock", "optuna.db", "optuna.db.lock"]


# ---- caches ---------------------------------------------------------------------------------------
def test_a_damaged_json_cache_file_is_a_miss_with_one_line(tmp_path, caplog):
    from explorer.cache import atomic_write_json, read_json

    path = tmp_path / "entry.json"
    assert read_json(path) is None and not caplog.records  # absent: a plain miss, nothing said
    atomic_write_json(path, {"a": 1})
    assert read_json(path) == {"a": 1}
    path.write_bytes(b'{"a": ')  # torn by something outside explorer
    with caplog.at_level(logging.WARNING, logger="explorer.cache"):
        assert read_json(path) is None
    [record] = caplog.records
    assert f"cache file {path} is unreadable" in record.getMessage() and "recomputed" in record.getMessage()


def test_append_only_cache_skips_damaged_lines_and_says_so_but_not_for_a_torn_tail(tmp_path, caplog):
    from explorer.cache import AppendOnlyCache

    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"key": "a", "value": 1}) + '\n{"key": "b", "val\n' + '{"key": "c", "value": 3}\n{"key"')
    with caplog.at_level(logging.WARNING, logger="explorer.cache"):
        cache = AppendOnlyCache(path)
        assert cache.get("a") == 1 and cache.get("b") is None and cache.get("c") == 3
    [record] = caplog.records
    assert "1 damaged line(s) skipped" in record.getMessage()
    cache.put("d", 4)  # after the torn tail, on a line of its own
    assert AppendOnlyCache(path).get("d") == 4
    caplog.clear()
    path.write_text(json.dumps({"key": "a", "value": 1}) + '\n{"key": "b"')  # only a torn tail: what a kill leaves
    with caplog.at_level(logging.WARNING, logger="explorer.cache"):
        assert AppendOnlyCache(path).get("a") == 1
    assert not caplog.records


def test_a_truncated_svd_cache_file_is_recomputed(caplog):
    from netbuild import mlp

    from explorer.compress import Compressor
    from explorer.graph import LayerGraph
    from explorer.paths import cache_dir

    graph = LayerGraph(mlp(seed=5), "mlp-seed5")
    layer = graph.layers[0].name
    first, total = Compressor(graph).spectrum(layer, "svd")
    [path] = (cache_dir("svd") / graph.fingerprint()).glob("*--svd--top*.npz")
    path.write_bytes(path.read_bytes()[:70])  # torn
    with caplog.at_level(logging.WARNING, logger="explorer.cache"):
        again, again_total = Compressor(graph).spectrum(layer, "svd")
    np.testing.assert_allclose(again, first)
    assert again_total == total
    assert "is unreadable" in caplog.text
    with np.load(path) as stored:  # written again, whole
        assert stored["top"].shape == first.shape
