"""`make search`: an Optuna study over the model and training options of one variant.

Each trial trains the variant with the pipeline's own loop (rnnflow.training.train) on the
packed data of the workspace, with options sampled by TPE from SPACE, and reports its
validation loss after every epoch; the median pruner stops trials that are worse than the
median of earlier trials at the same epoch (from epoch 2, or a third of a trial's epochs).
The objective is the best validation loss (the quantity training early-stops on); the
validation accuracy rides along.

Storage: `--storage URL`, else the team server's PostgreSQL (database `optuna`) when `make
server` runs, so that several machines can work one study (Optuna's RDB storage is the
distributed engine: start the same command on each), else `.rnnflow/search/optuna.db`.

Tracking: one MLflow run per invocation (`search STUDY`), each trial a run nested under it
with its options as params, its per-epoch curve as metrics and its state (COMPLETE or
PRUNED) as the tag `optuna.state`.

Then the best options run as a DVC experiment (`dvc exp run --temp --name search-STUDY -S ...`), so
the pipeline's record stays the source of truth; `dvc exp apply search-STUDY` is the
explicit command that writes them to params.yaml. Report: reports/search.{json,md}.
"""

import json
import math
import subprocess
import time
from pathlib import Path

from rnnflow.core.atomic import write_json, write_text
from rnnflow.core.cliargs import CliParser, non_empty, positive_float, up_to
from rnnflow.core.config import Params, load_params
from rnnflow.core.errors import RnnflowError, run_cli
from rnnflow.core.paths import PACKED, PARAMS, REPORTS
from rnnflow.tracking import runs
from rnnflow.tracking.server import SERVER_DIR, TeamServer

SEARCH_DIR = Path(".rnnflow/search")
# What a trial may choose: params.yaml key -> ("categorical", choices) or
# ("float"/"log", low, high). Model options apply to model.defaults (every variant).
SPACE: dict[str, tuple] = {
    # 256 is left out: it lost accuracy per minute on three corpora
    "model.defaults.hidden_size": ("categorical", [64, 128]),
    "model.defaults.embedding_dim": ("categorical", [32, 64, 128]),
    "model.defaults.pool": ("categorical", ["last", "mean", "max", "attention", "concat"]),
    "model.defaults.conv_width": ("categorical", [0, 3, 5]),  # 0: no n-gram convolution
    "model.defaults.conv_channels": ("categorical", [64, 128, 256]),  # read when conv_width > 0
    "model.defaults.bidirectional": ("categorical", [False, True]),
    "model.defaults.dropout": ("float", 0.0, 0.5),
    "model.defaults.embedding_dropout": ("float", 0.0, 0.3),
    "model.defaults.ngram_dropout": ("float", 0.0, 0.4),  # read where the n-gram bag is on
    "model.defaults.ngram_dim": ("categorical", [32, 64, 128]),  # the same
    "train.lr": ("log", 5e-4, 1e-2),
    "train.schedule": ("categorical", ["constant", "cosine"]),
    "train.label_smoothing": ("float", 0.0, 0.2),
}


def distribution(key: str):
    """The Optuna distribution SPACE gives `key` (the one reader of SPACE's tuples)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    kind, *spec = SPACE[key]
    if kind == "categorical":
        return CategoricalDistribution(spec[0])
    return FloatDistribution(spec[0], spec[1], log=kind == "log")


def sample(trial) -> dict[str, object]:
    """One point of SPACE, chosen by the trial's sampler."""
    chosen = {}
    for key in SPACE:
        space = distribution(key)
        if hasattr(space, "choices"):
            chosen[key] = trial.suggest_categorical(key, space.choices)
        else:
            chosen[key] = trial.suggest_float(key, space.low, space.high, log=space.log)
    return chosen


def check_space(study, where: str) -> None:
    """A continued study must sample what its earlier trials sampled: Optuna cannot mix two
    ranges or choice lists of one option (it fails mid-run with "dynamic value space").
    Options added to or dropped from SPACE are fine."""
    now = {key: distribution(key) for key in SPACE}
    for trial in study.get_trials(deepcopy=False):
        for key, old in trial.distributions.items():
            if key in now and old != now[key]:
                raise RnnflowError(
                    f"study '{study.study_name}' ({where}): its trial {trial.number} sampled "
                    f"{key} from {old}, the search space now gives {now[key]}; "
                    f"start a new study (--study NAME) or delete the old one"
                )


def with_options(raw: dict, options: dict[str, object]) -> dict:
    """params.yaml content with dotted keys set (a copy)."""
    raw = json.loads(json.dumps(raw))
    for key, value in options.items():
        *path, last = key.split(".")
        node = raw
        for part in path:
            node = node[part]
        node[last] = value
    return raw


def storage_url(explicit: str | None, server_dir: Path = SERVER_DIR) -> tuple[str, str]:
    """(SQLAlchemy URL, where in words): --storage, the team server's PostgreSQL, or sqlite."""
    if explicit:
        return explicit, "--storage"
    server, _ = TeamServer.from_state(server_dir)
    if server.postgres.running():
        server.postgres.ensure_database("optuna")
        url = server.postgres.database_uri("optuna", driver="postgresql+psycopg")
        return url, f"the team server's PostgreSQL (127.0.0.1:{server.pg_port})"
    SEARCH_DIR.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{SEARCH_DIR.resolve()}/optuna.db", str(SEARCH_DIR / "optuna.db")


def rdb_storage(url: str, attempts: int = 5):
    """Optuna's RDB storage at `url`. Machines that start one study at the same moment race
    to create its tables in a fresh database (PostgreSQL: "type ... already exists"); the
    loser retries and finds them made."""
    import optuna
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except SQLAlchemyError:
            if attempt == attempts - 1:
                raise
            time.sleep(1 + attempt)


def median_pruner(epochs: int):
    """Stop a trial whose validation loss is worse than the median of earlier trials at the
    same epoch, from epoch 2 or a third of the trial's epochs, whichever is later: a warm-up
    schedule's first epoch says little, and over 15 epochs a cosine schedule has barely
    started at epoch 2 (a constant rate leads there and falls behind later)."""
    import optuna

    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(2, epochs // 3))


def objective(base: dict, variant: str, epochs: int):
    """The study's objective: train with a trial's options, log it, return its best
    validation loss; report each epoch's validation loss and prune on it."""
    import mlflow
    import optuna

    from rnnflow.training.train import train_in_memory

    def run(trial) -> float:
        options = sample(trial)
        raw = with_options(base, options)
        raw["train"]["epochs"] = min(raw["train"]["epochs"], epochs)
        params = Params(**raw)
        tags = {"rnnflow.kind": "search-trial", "optuna.trial": str(trial.number)}
        with mlflow.start_run(run_name=f"trial {trial.number}", nested=True, tags=tags):
            mlflow.log_params(options | {"variant": variant, "epochs": raw["train"]["epochs"]})

            def report(state, _train) -> None:
                row = state.history[-1]
                mlflow.log_metrics(
                    {k: row[k] for k in ("train_loss", "val_loss", "val_acc")}, step=row["epoch"]
                )
                trial.report(row["val_loss"], row["epoch"])
                if trial.should_prune():
                    mlflow.set_tag("optuna.state", "PRUNED")
                    raise optuna.TrialPruned(f"epoch {row['epoch']}: val loss {row['val_loss']}")

            state = train_in_memory(params, variant, report)
            trial.set_user_attr("val_acc", state.best.val_acc)
            trial.set_user_attr("epochs", state.epoch)
            mlflow.set_tag("optuna.state", "COMPLETE")
            mlflow.log_metrics(
                {"best_val_loss": state.best.val_loss, "best_val_acc": state.best.val_acc}
            )
            return state.best.val_loss

    return run


def search(
    variant: str,
    trials: int,
    timeout: float,
    epochs: int,
    storage: str | None = None,
    study_name: str | None = None,
) -> dict:
    """Run (or continue) the study; return its report (also in reports/search.{json,md})."""
    import mlflow
    import optuna

    params = load_params()
    params.variant(variant)  # an unknown variant fails here
    if not (PACKED / "train.npz").is_file():
        raise RnnflowError(f"{PACKED}/train.npz: missing; `dvc repro pack` writes it")
    base = json.loads(params.model_dump_json())
    name = study_name or f"{variant}-{params.data.source}"
    url, where = storage_url(storage)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        study_name=name,
        storage=rdb_storage(url),
        direction="minimize",
        sampler=optuna.samplers.TPESampler(seed=params.seed),
        pruner=median_pruner(min(params.train.epochs, epochs)),  # what a trial trains
        load_if_exists=True,
    )
    check_space(study, where)
    runs.configure()
    started = time.perf_counter()
    tags = {"rnnflow.kind": "search", "optuna.study": name, "optuna.storage": where}
    with mlflow.start_run(run_name=f"search {name}", tags=tags) as parent:
        study.optimize(objective(base, variant, epochs), n_trials=trials, timeout=timeout)
        report = study_report(study, variant, where, time.perf_counter() - started)
        mlflow.log_metrics(
            {"best_val_loss": report["best"]["val_loss"], "trials": len(report["trials"])}
        )
        mlflow.log_params({f"best.{k}": v for k, v in report["best"]["options"].items()})
        report["mlflow_run_id"] = parent.info.run_id
    write_json(REPORTS / "search.json", report)
    write_text(REPORTS / "search.md", to_markdown(report))
    return report


def study_report(study, variant: str, where: str, seconds: float) -> dict:
    """Every trial of the study (this and earlier invocations) and the best one."""
    import optuna

    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise RnnflowError(f"study {study.study_name}: no trial completed (more --trials or time)")
    rows = [
        {
            "number": t.number,
            "state": t.state.name,
            "val_loss": t.value if t.value is not None else _last(t),
            "val_acc": t.user_attrs.get("val_acc"),
            "epochs": t.user_attrs.get("epochs", max(t.intermediate_values, default=0)),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete
            else None,
            "options": t.params,
        }
        for t in study.trials
    ]
    best = study.best_trial
    return {
        "study": study.study_name,
        "variant": variant,
        "storage": where,
        "seconds": seconds,
        "trials": rows,
        "counts": {s: sum(r["state"] == s for r in rows) for s in ("COMPLETE", "PRUNED", "FAIL")},
        "best": {
            "number": best.number,
            "val_loss": best.value,
            "val_acc": best.user_attrs.get("val_acc"),
            "options": best.params,
        },
    }


def _last(trial) -> float:
    values = trial.intermediate_values
    return values[max(values)] if values else math.nan


def experiment_command(report: dict) -> list[str]:
    """`dvc exp run --temp` of the best options, named after the study: in a temporary copy,
    so the workspace (params.yaml included) stays as it is until `dvc exp apply`."""
    sets = [f"{k}={_fmt(v, 4)}" for k, v in report["best"]["options"].items()]
    return ["dvc", "exp", "run", "--temp", "--name", f"search-{report['study']}"] + [
        arg for s in sets for arg in ("-S", s)
    ]


def to_markdown(report: dict) -> str:
    keys = list(SPACE)
    short = [k.rsplit(".", 1)[-1] for k in keys]
    lines = [
        f"Study `{report['study']}` ({report['variant']}, {report['storage']}): "
        f"{report['counts']['COMPLETE']} complete, {report['counts']['PRUNED']} pruned, "
        f"{report['seconds']:.0f} s this run",
        "",
        "| trial | state | val loss | val acc | epochs | " + " | ".join(short) + " |",
        "|---" * (5 + len(keys)) + "|",
    ]
    for r in sorted(report["trials"], key=lambda r: (r["state"] != "COMPLETE", r["val_loss"])):
        acc = f"{r['val_acc']:.4f}" if r["val_acc"] is not None else "-"
        values = [_fmt(r["options"].get(k)) for k in keys]
        lines.append(
            f"| {r['number']} | {r['state'].lower()} | {r['val_loss']:.4f} | {acc} | "
            f"{r['epochs']} | " + " | ".join(values) + " |"
        )
    best = report["best"]
    lines += [
        "",
        f"Best: trial {best['number']}, val loss {best['val_loss']:.4f}, "
        f"val acc {best['val_acc']:.4f}.",
    ]
    return "\n".join(lines) + "\n"


def _fmt(value, digits: int = 3) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # YAML's spelling, for `-S` and the report alike
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m rnnflow.tools.search", description=__doc__.splitlines()[0])
    parser.add_argument("--variant", type=non_empty, default="gru", help="the variant to tune")
    parser.add_argument("--trials", type=up_to(10_000), default=16, help="trials this run")
    parser.add_argument("--timeout", type=positive_float, default=600, help="seconds this run")
    parser.add_argument("--epochs", type=up_to(1000), default=6, help="at most, per trial")
    parser.add_argument("--storage", type=non_empty, help="an Optuna storage URL")
    parser.add_argument("--study", type=non_empty, help="default: VARIANT-DATA_SOURCE")
    parser.add_argument("--no-experiment", action="store_true", help="skip the dvc exp run")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)

    def run() -> None:
        report = search(
            args.variant, args.trials, args.timeout, args.epochs, args.storage, args.study
        )
        print(to_markdown(report))
        command = experiment_command(report)
        print(" ".join(command))
        if not args.no_experiment:
            if subprocess.run(command).returncode != 0:
                raise RnnflowError(f"{' '.join(command[:5])} ...: the experiment failed (above)")
            print(f"search: `dvc exp apply search-{report['study']}` writes them to {PARAMS}")

    run_cli(run, "search")


if __name__ == "__main__":
    main()
