"""The command lines of the DVC stages: `python3 -m stages.X [VARIANT]`."""

from collections.abc import Callable

from rnnflow.core.cliargs import CliParser
from rnnflow.core.config import Params, load_params
from rnnflow.core.errors import run_cli
from rnnflow.runtime import timeline


def stage_parser(name: str, description: str = "") -> CliParser:
    """A stage's command line: --debug, and what the stage adds; anything else is refused."""
    parser = CliParser(prog=f"stages.{name}", description=description or None)
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    return parser


def run_stage(main: Callable[[], None], name: str, own_parser: bool = False) -> None:
    """A stage's entry point: run_cli (one clear line and exit 2 on an expected error), as
    one entry of the pipeline's timeline (rnnflow.runtime.timeline) when one is recorded.
    A stage that does not parse its own command line (own_parser) takes only --debug."""
    if not own_parser:
        stage_parser(name).parse_args()
    timeline.begin(name)
    try:
        run_cli(main, name)
    finally:
        timeline.end()


def variant_stage(name: str, run: Callable[[Params, str], dict], description: str) -> None:
    """Parse VARIANT, validate params.yaml, run the stage, print a one-line summary."""

    def main() -> None:
        parser = stage_parser(name, description)
        parser.add_argument("variant", help="a name listed under model.variants in params.yaml")
        args = parser.parse_args()
        timeline.rename(f"{name}@{args.variant}")
        params = load_params()
        params.variant(args.variant)  # an unknown variant fails here, before any work
        result = run(params, args.variant)
        flat = ", ".join(f"{k}={v}" for k, v in result.items() if not isinstance(v, dict | list))
        print(f"{name}@{args.variant}: {flat}")

    run_stage(main, name, own_parser=True)
