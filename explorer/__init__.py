"""explorer: per-layer rank, processor and precision plans for a trained network on a multi-processor board.

The Python API (explorer/api.py, docs/api.md): `load_problem`, `search`, `export_plan` and the runtime's
`Bundle`. They are loaded on first use, because `explorer serve` runs on the server-only install (NumPy
and ONNX Runtime) and importing this package must not pull in the search stack.
"""
from importlib import import_module, metadata

try:
    __version__ = metadata.version("explorer")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"

# `export_plan`, not `export`: the submodule explorer.export would replace an attribute of that name once imported
_LAZY = {"load_problem": "explorer.api", "search": "explorer.api", "export_plan": "explorer.api",
         "Bundle": "explorer.runtime"}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    """The API's names, imported when first asked for (PEP 562)."""
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'explorer' has no attribute {name!r}")
