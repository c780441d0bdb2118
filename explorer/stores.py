"""Local SQLite stores (the MLflow tracking store, the Optuna storage) that survive any interruption.

Both libraries create and migrate their schema in place, a statement at a time (SQLite commits each
DDL statement on its own), so a kill while a store is made, or two processes making it together,
used to leave a half-migrated file that every later command failed on. Here a store is made in a
temporary file next to it, under an exclusive lock on `NAME.lock`, and renamed into place only when
complete: a kill at any instant leaves no store or a complete one, and processes starting together
wait for the first one. A store found incomplete (left by an older explorer or another tool) that holds
no data is moved aside to `NAME.broken-<UTC time>` (never deleted) and made again, with one line that
says so; one that holds data is left to its library, whose message says how to upgrade it.

Standard library only: the libraries are imported by the callers that bring `create` and `check`.
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from explorer.cache import fsync_path
from explorer.errors import ExplorerError

log = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 300.0  # making a store takes seconds; a holder this long is stuck
_POLL_S = 0.05
BUSY_TIMEOUT_S = 60.0  # how long a check waits for a writer's lock on the database (SQLite's busy timeout)
_DAMAGED = re.compile(r"not a database|malformed|disk image|file is encrypted")  # SQLite's words for a broken file
_SIDE_FILES = ("-journal", "-wal", "-shm")  # SQLite's companions of a database file
_checked: set[tuple[str, int]] = set()  # (path, inode) of stores this process found complete


def sqlite_file(url: str) -> Path | None:
    """The database file of a SQLite URL (sqlite:///path, any driver), or None for other URLs and memory."""
    scheme, _, rest = url.partition(":///")
    if not rest or scheme.split("+", 1)[0].lower() != "sqlite" or rest.startswith(":memory:") or "mode=memory" in rest:
        return None
    return Path(rest.split("?", 1)[0]).resolve()


@contextmanager
def exclusive_lock(path: Path, what: str, timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on `path` (flock: released by the kernel when the holder dies, however it
    dies), waiting at most `timeout_s` (default LOCK_TIMEOUT_S) for another holder."""
    timeout_s = LOCK_TIMEOUT_S if timeout_s is None else timeout_s
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "another process"
                    raise ExplorerError(f"{what}: {holder} has held the lock {path} for over {timeout_s:.0f} s; "
                                        "wait for it to finish or stop it, then run this again") from None
                time.sleep(_POLL_S)
        try:
            handle.truncate(0)
            handle.write(f"process {os.getpid()}")
            handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_sqlite_store(path: Path, what: str, create: Callable[[Path], None],
                        check: Callable[[sqlite3.Connection], str | None],
                        has_data: Callable[[sqlite3.Connection], bool]) -> None:
    """Make sure the SQLite store at `path` is complete before its library opens it.

    `create(file)` makes a complete store in `file` (and closes it); `check(connection)` says what is
    missing from an existing store (None: complete); `has_data(connection)` whether it holds anything a
    user made. Absent: made atomically under the lock. Incomplete and empty (or not a database):
    moved aside and made again, with one line. Incomplete with data: left as it is.
    """
    path = Path(path).resolve()
    if _complete(path, check) is None:
        return
    try:
        _make_complete(path, what, create, check, has_data)
    except OSError as exc:  # a folder that cannot be written, a full disk
        raise ExplorerError(f"cannot create {what} {path} ({exc.strerror or exc}): give a folder you can write to "
                            "(EXPLORER_RUNS, --tracking-uri, --storage)") from None


def _make_complete(path: Path, what: str, create: Callable[[Path], None],
                   check: Callable[[sqlite3.Connection], str | None], has_data: Callable[[sqlite3.Connection], bool]) -> None:
    with exclusive_lock(path.with_name(path.name + ".lock"), f"creating {what} {path}"):
        _remove_stale_temporaries(path)
        problem = _complete(path, check)
        if problem is None:  # another process made it while this one waited
            return
        if path.exists():
            if problem != "not a database" and _has_data(path, has_data):
                return  # an older schema with the user's runs: the library says how to upgrade it
            aside = _move_aside(path)
            log.warning("%s %s was incomplete (%s), left by an interrupted creation: moved it to %s and made a new one",
                        what, path, problem, aside.name)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            create(temporary)
            fsync_path(temporary)
            os.replace(temporary, path)  # atomic: other processes see no store or the complete one
            fsync_path(path.parent)
        finally:
            for name in (temporary, *(Path(f"{temporary}{side}") for side in _SIDE_FILES)):
                name.unlink(missing_ok=True)


def _complete(path: Path, check: Callable[[sqlite3.Connection], str | None]) -> str | None:
    """None if the store at `path` is complete, else what is wrong ("absent", "not a database", or `check`'s
    reason). A store found complete once is not opened again by this process while it is the same file."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return "absent"
    key = (str(path), stat.st_ino)
    if key in _checked:
        return None
    try:
        # mode=rw: never creates the file; a hot journal left by a killed writer is rolled back as usual
        with _connect(path) as connection:
            problem = check(connection)
    except sqlite3.DatabaseError as exc:
        if not _DAMAGED.search(str(exc)):  # locked past the timeout, unreadable: nothing to repair, say so
            raise ExplorerError(f"cannot read {path} ({exc}): check that it is readable and that no process "
                                "holds it locked, then run this again") from None
        return "not a database"
    if problem is None:
        _checked.add(key)
    return problem


@contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    connection = sqlite3.connect(f"file:{path}?mode=rw", uri=True, timeout=BUSY_TIMEOUT_S)
    try:
        yield connection
    finally:
        connection.close()


def _has_data(path: Path, has_data: Callable[[sqlite3.Connection], bool]) -> bool:
    try:
        with _connect(path) as connection:
            return has_data(connection)
    except sqlite3.DatabaseError as exc:
        if not _DAMAGED.search(str(exc)):
            raise ExplorerError(f"cannot read {path} ({exc}): check that it is readable and that no process "
                                "holds it locked, then run this again") from None
        return False  # what cannot be read holds nothing readable; it is kept aside all the same


def table_names(connection: sqlite3.Connection) -> set[str]:
    """The tables of a SQLite database."""
    return {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def first_value(connection: sqlite3.Connection, query: str):
    """The first column of the first row of `query`, or None (no row, or no such table)."""
    try:
        row = connection.execute(query).fetchone()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc) or "no such column" in str(exc):
            return None
        raise  # locked, unreadable: not an answer about the schema
    return row[0] if row else None


def _move_aside(path: Path) -> Path:
    """Rename a broken store (and SQLite's journal files, which belong to it) to NAME.broken-<UTC time>."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = path.with_name(f"{path.name}.broken-{stamp}")
    counter = 1
    while aside.exists():
        counter += 1
        aside = path.with_name(f"{path.name}.broken-{stamp}-{counter}")
    for side in _SIDE_FILES:  # a hot journal left next to the new file would be played back into it
        companion = Path(f"{path}{side}")
        if companion.exists():
            os.replace(companion, Path(f"{aside}{side}"))
    os.replace(path, aside)
    return aside


def _remove_stale_temporaries(path: Path) -> None:
    """Temporary stores of killed processes (only the lock holder makes them, so with the lock held they are stale)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp*"):
        stale.unlink(missing_ok=True)


