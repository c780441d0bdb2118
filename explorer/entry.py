"""The `explorer` console script: `explorer serve` runs on the server-only install (NumPy and ONNX
Runtime); every other command needs the full install and is handed to explorer.cli."""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Dispatch `serve` without importing the search stack; everything else to explorer.cli."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--version"]:  # answered before the search stack is imported
        from explorer import __version__

        print(f"explorer {__version__}")
        return 0
    if argv[:1] == ["serve"]:
        from explorer.serve import main as serve_main

        return serve_main(argv[1:])
    import signal

    signals: list[int] = []

    def interrupt(signum, frame):  # SIGTERM (and Ctrl-C) while the search stack loads: noted, then as Ctrl-C
        signals.append(signum)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    ctrl_c = signal.getsignal(signal.SIGINT)
    if ctrl_c is signal.default_int_handler:  # not where it is ignored (a shell's background job)
        signal.signal(signal.SIGINT, interrupt)
    try:
        from explorer.cli import main as cli_main
    except KeyboardInterrupt:  # Ctrl-C while the search stack loads: nothing started, nothing to keep
        print("explorer: interrupted", file=sys.stderr)
        return 130
    except ImportError as error:
        if signals:  # an interrupt inside a module's import can surface as an ImportError (a half-imported module)
            print("explorer: interrupted", file=sys.stderr)
            return 130
        command = f"`explorer {argv[0]}`" if argv else "explorer"
        print(f"explorer: error: {command} needs the full install (missing {error.name}): pip install 'explorer[full]'; "
              "this install (explorer[server]) runs only `explorer serve`", file=sys.stderr)
        return 2
    finally:
        if ctrl_c is signal.default_int_handler:
            signal.signal(signal.SIGINT, ctrl_c)
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main())
