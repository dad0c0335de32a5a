"""Fail the install if the environment holds anything but the pinned CPU-capable torch."""

import sys
from importlib import metadata

PINNED_TORCH = "2.13.0"


def main() -> int:
    """Check that exactly one torch distribution is installed and that it is the pinned one."""
    torches = [d for d in metadata.distributions() if d.metadata["Name"].lower() == "torch"]
    versions = sorted(d.version for d in torches)
    if len(versions) != 1 or versions[0].split("+")[0] != PINNED_TORCH:
        print(f"envcheck: expected one torch=={PINNED_TORCH}, found {versions}", file=sys.stderr)
        return 1
    print(f"envcheck: torch {versions[0]} (one distribution) - ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
