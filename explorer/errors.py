"""How failures and interruptions reach the user: the one exception type whose message is shown as a
single line (no traceback), and SIGTERM handled like Ctrl-C."""
from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class ExplorerError(Exception):
    """Bad input or an unmet precondition: the message says what is wrong and how to fix it."""


def error_line(error: BaseException, limit: int | None = None) -> str:
    """The first line of a library's error, at most `limit` characters; its type's name when it says nothing.
    Messages of ONNX Runtime, ONNX and SQLite run over many lines (stack frames, node dumps): the first says
    what is wrong."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if limit is None else line[:limit]


@contextmanager
def termination_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (`kill`, `timeout`, a scheduler stopping a job) raises KeyboardInterrupt
    as Ctrl-C does, so a search stops the same clean way: what was measured is kept, runs are marked
    and resumable, temporary folders are removed. Outside the main thread (no signal handlers there)
    nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
