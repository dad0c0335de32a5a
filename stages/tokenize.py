"""DVC stage tokenize: vocabulary from the train split -> data/tokenizer/."""

from rnnflow.config import load_params
from rnnflow.errors import run_cli
from rnnflow.vocab import fit_vocabulary


def main() -> None:
    _, report = fit_vocabulary(load_params())
    print(f"tokenize: {report}")


if __name__ == "__main__":
    run_cli(main, "tokenize")
