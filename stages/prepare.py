"""DVC stage prepare: raw labelled text -> data/prepared/{train,val,test}.jsonl + report."""

from rnnflow.core.config import load_params
from rnnflow.data.prepare import prepare
from rnnflow.runtime.stagecli import run_stage


def main() -> None:
    report = prepare(load_params())
    print(
        f"prepare: {report['rows_kept']} rows, {report['classes']} classes, "
        f"splits {report['split_sizes']}, dropped {report['dropped']}"
    )


if __name__ == "__main__":
    run_stage(main, "prepare")
