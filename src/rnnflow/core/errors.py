"""One error type for expected failures, and the CLI wrapper that reports them cleanly."""

import os
import sys
from collections.abc import Callable


class RnnflowError(Exception):
    """An expected failure (bad input, bad params, failed gate) with a message for the user."""


def debug_enabled(argv: list[str] | None = None) -> bool:
    """True when tracebacks were asked for with --debug or RNNFLOW_DEBUG=1."""
    argv = sys.argv if argv is None else argv
    return "--debug" in argv or os.environ.get("RNNFLOW_DEBUG", "") not in ("", "0")


def run_cli(main: Callable[[], None], name: str) -> None:
    """Run a CLI entry point: an RnnflowError becomes one line on stderr and exit code 2."""
    try:
        main()
    except RnnflowError as err:
        if debug_enabled():
            raise
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        sys.exit(130)
