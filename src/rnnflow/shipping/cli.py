"""The `rnnflow` command: `rnnflow predict --model models/gru "Nakamura" "O'Brien"`.

Imports neither torch nor mlflow, so it runs wherever onnxruntime and tokenizers do.
"""

import argparse
import json
import sys

from rnnflow.core.cliargs import CliParser, non_empty, non_negative_int, positive_int
from rnnflow.core.errors import RnnflowError, run_cli


def _read_inputs(args: argparse.Namespace) -> list[str]:
    if args.texts and args.input is not None:
        raise RnnflowError("give texts as arguments or --input, not both")
    if args.texts:
        return list(args.texts)
    if args.input == "-" or args.input is None:
        if args.input is None and sys.stdin.isatty():
            raise RnnflowError("give texts as arguments, or JSON lines with --input FILE or -")
        lines, source = sys.stdin.read().splitlines(), "stdin"
    else:
        try:
            with open(args.input, encoding="utf-8") as fh:
                lines, source = fh.read().splitlines(), args.input
        except (OSError, UnicodeDecodeError) as err:
            raise RnnflowError(f"{args.input}: cannot read ({err})") from err
    texts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise RnnflowError(f"{source}:{number}: not valid JSON ({err.msg})") from err
        text = obj.get(args.field) if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise RnnflowError(
                f"{source}:{number}: expected a string or an object with '{args.field}'"
            )
        texts.append(text)
    if not texts:
        raise RnnflowError(f"{source}: no texts to classify")
    return texts


def _predict(args: argparse.Namespace) -> None:
    from rnnflow.shipping.predict import Predictor

    predictor = Predictor(args.model, int8=args.int8)
    for result in predictor.predict(_read_inputs(args), batch_size=args.batch_size):
        if args.top_k:
            top = sorted(result["probabilities"].items(), key=lambda kv: -kv[1])[: args.top_k]
            result["probabilities"] = dict(top)
        print(json.dumps(result, ensure_ascii=False))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `rnnflow` command."""
    parser = CliParser(prog="rnnflow", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("predict", help="classify raw text with an exported bundle")
    p.add_argument("--model", required=True, type=non_empty, help="bundle, e.g. models/gru")
    p.add_argument("texts", nargs="*", help="texts to classify")
    p.add_argument(
        "--input", type=non_empty, help="JSON lines file (strings or objects), or - for stdin"
    )
    p.add_argument("--field", type=non_empty, default="text", help="text field of JSON objects")
    p.add_argument("--batch-size", type=positive_int, default=256, help="texts per model call")
    p.add_argument(
        "--top-k", type=non_negative_int, default=0, help="only the k most likely classes (0: all)"
    )
    p.add_argument("--int8", action="store_true", help="the bundle's int8 model (model.int8.onnx)")
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    run_cli(lambda: _predict(args), "rnnflow")


if __name__ == "__main__":
    main()
