"""DVC stage train@VARIANT: packed data -> models/VARIANT/checkpoint.pt + metrics."""

import argparse

from rnnflow.config import load_params
from rnnflow.errors import run_cli
from rnnflow.train import train_variant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("variant")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args()
    params = load_params()
    params.variant(args.variant)  # unknown variant -> clear error before any work
    result = train_variant(params, args.variant)
    print(f"train@{args.variant}: {result}")


if __name__ == "__main__":
    run_cli(main, "train")
