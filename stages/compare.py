"""DVC stage compare: all variants' metrics -> reports/leaderboard.{md,json,png}."""

from rnnflow.compare import compare, to_markdown
from rnnflow.config import load_params
from rnnflow.errors import run_cli


def main() -> None:
    print(to_markdown(compare(load_params())))


if __name__ == "__main__":
    run_cli(main, "compare")
