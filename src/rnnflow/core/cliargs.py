"""Command-line parsing shared by every rnnflow command: a bad option gives one line,
`PROG: error: MESSAGE`, and exit code 2 (argparse's own code), and numeric options check
their range where they are read, so that no value is silently accepted and then ignored."""

import argparse
import sys
from collections.abc import Callable


class CliParser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): `PROG: error: MESSAGE`, exit 2."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _bounded(kind: type, low: float | None, high: float | None, what: str) -> Callable:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if kind is float and value != value:  # NaN passes every comparison
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _bounded(int, 1, None, "a whole number >= 1")
non_negative_int = _bounded(int, 0, None, "a whole number >= 0")
port_number = _bounded(int, 0, 65535, "a port number 0-65535 (0: any free port)")
fixed_port = _bounded(int, 1, 65535, "a port number 1-65535")
positive_float = _bounded(float, 1e-300, 1e300, "a number > 0")


def up_to(high: int) -> Callable:
    """A whole number from 1 to `high` (a count whose huge values would never finish)."""
    return _bounded(int, 1, high, f"a whole number 1-{high}")


def non_empty(text: str) -> str:
    """A string option that must say something."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty value")
    return text
