"""DVC stage tokenize: vocabulary from the train split -> data/tokenizer/."""

from rnnflow.core.config import load_params
from rnnflow.data.vocab import fit_vocabulary
from rnnflow.runtime.stagecli import run_stage


def main() -> None:
    _, report = fit_vocabulary(load_params())
    print(f"tokenize: {report}")


if __name__ == "__main__":
    run_stage(main, "tokenize")
