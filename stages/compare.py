"""DVC stage compare: all variants' metrics -> reports/leaderboard.{md,json,png}."""

from rnnflow.analysis.compare import compare, to_markdown, ui_links
from rnnflow.core.config import load_params
from rnnflow.runtime.stagecli import run_stage


def main() -> None:
    params = load_params()
    print(to_markdown(compare(params)))
    print("\n".join(ui_links(params)))


if __name__ == "__main__":
    run_stage(main, "compare")
