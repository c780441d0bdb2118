"""explorer: per-layer rank, processor and precision plans for a trained network on a multi-processor board."""
from importlib import metadata

try:
    __version__ = metadata.version("explorer")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    __version__ = "0+unknown"
