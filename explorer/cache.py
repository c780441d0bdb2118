"""Small on-disk JSON cache with atomic writes: an interrupted write never leaves a broken file."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path


def digest(*parts: str | bytes) -> str:
    """SHA-256 over several parts (a cache key)."""
    sha = hashlib.sha256()
    for part in parts:
        sha.update(part.encode() if isinstance(part, str) else part)
        sha.update(b"\0")
    return sha.hexdigest()


def atomic_write_json(path: Path, data) -> None:
    """Write JSON to a temporary file in the same folder, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle)
        os.replace(tmp, path)  # atomic: readers see the old file or the new one, never a torn one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path):
    """The cached JSON at `path`, or None if it is missing or unreadable (then it is recomputed)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None
