"""Run `explorer` as on the server-only install (`explorer[server]`: NumPy and ONNX Runtime): the search
and training stack cannot be imported here, so a test that starts the server through this script
shows that `explorer serve` needs none of it.

    python tests/server_only.py serve --port 0
"""
import importlib.abc
import sys

FULL_INSTALL_ONLY = ("torch", "onnx", "scipy", "optuna", "mlflow", "gymnasium", "stable_baselines3", "sb3_contrib",
                     "matplotlib", "rich", "sqlalchemy", "psycopg")


class BlockFullInstall(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in FULL_INSTALL_ONLY:
            raise ModuleNotFoundError(f"No module named {name!r} (server-only install)", name=name)
        return None


if __name__ == "__main__":
    sys.meta_path.insert(0, BlockFullInstall())
    from explorer.entry import main

    sys.exit(main(sys.argv[1:]))
