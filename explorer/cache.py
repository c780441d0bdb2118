"""Small on-disk JSON caches, and the one atomic file write (:func:`atomic_write`) that they and every other
file explorer replaces use: an interrupted write never leaves a broken file."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from explorer.errors import error_line

log = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    """Flush a file or a folder's entries (new files, renames) to disk, so a rename never exposes an
    empty file after a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def digest(*parts: str | bytes) -> str:
    """SHA-256 over several parts (a cache key)."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part.encode() if isinstance(part, str) else part)
        sha.update(b"\0")
    return sha.hexdigest()


def atomic_write(path: Path | str, write: Callable[[BinaryIO], object], *, durable: bool = False,
                 permissions: int | None = None, check: Callable[[Path], object] | None = None) -> Path:
    """Replace the file `path` in one step, the one way explorer does it: `write` fills a temporary file in the
    same folder, which is renamed over `path` (after `check` of the temporary file's path, when given, has not
    raised). Readers see the old file or the new one, never a torn one; an interrupted or failed write leaves the
    old file and no temporary one. `durable`: the data reaches the disk before the rename, so that a power cut
    cannot expose an empty file. `permissions`: the new file's mode (default: private, 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        if permissions is not None:
            os.chmod(tmp, permissions)
        if check is not None:
            check(Path(tmp))
        os.replace(tmp, path)  # atomic: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write bytes atomically (see :func:`atomic_write`)."""
    atomic_write(path, lambda handle: handle.write(data))


def atomic_write_json(path: Path, data) -> None:
    """Write JSON atomically (see atomic_write_bytes)."""
    atomic_write_bytes(path, json.dumps(data).encode())


def read_json(path: Path):
    """The cached JSON at `path`, or None if it is missing or unreadable (then it is recomputed; an
    unreadable one says so in one line)."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        unreadable(path, exc)
        return None


def unreadable(path: Path, error: BaseException) -> None:
    """One line for a cache file that cannot be read: it counts as a miss and is written again."""
    log.warning("cache file %s is unreadable (%s): ignored, recomputed", path, error_line(error))


class AppendOnlyCache:
    """A key -> JSON value cache in one append-only JSON-lines file.

    Each entry is one line written with a single O_APPEND write, so concurrent writers do not
    overwrite each other and an interrupted write can only leave a torn last line, which the reader
    skips. Much cheaper per entry than a file per entry (no temporary file, no rename).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._entries: dict[str, object] | None = None
        self._torn_tail = False  # the file ends without a newline (an interrupted write)

    def _load(self) -> dict[str, object]:
        if self._entries is None:
            self._entries = {}
            try:
                with open(self.path, encoding="utf-8", errors="replace") as handle:
                    line, skipped = "", 0
                    for line in handle:
                        try:
                            entry = json.loads(line)
                            self._entries[entry["key"]] = entry["value"]
                        except (json.JSONDecodeError, KeyError, TypeError):
                            skipped += line.endswith("\n")  # a torn last line is what an interrupt leaves: no news
                    self._torn_tail = bool(line) and not line.endswith("\n")
                if skipped:
                    unreadable(self.path, ValueError(f"{skipped} damaged line(s) skipped"))
            except FileNotFoundError:
                pass
            except OSError as exc:
                unreadable(self.path, exc)
        return self._entries

    def get(self, key: str):
        """The cached value, or None."""
        return self._load().get(key)

    def put(self, key: str, value) -> None:
        """Store a value (appended to the file at once)."""
        self._load()[key] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps({"key": key, "value": value}, separators=(",", ":")) + "\n").encode()
        if self._torn_tail:  # start on a fresh line after a torn one
            line, self._torn_tail = b"\n" + line, False
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
        finally:
            os.close(fd)
