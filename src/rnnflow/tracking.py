"""MLflow: one experiment, one run per variant per trained model, shared by its later stages.

train@V opens the run and stores its id in the checkpoint; evaluate@V, export@V and
validate@V reopen that run to add their metrics and artifacts. A stage that raises marks the
run FAILED. A run left RUNNING by a killed process is marked FAILED when the variant trains
again, and the new run is tagged with the id it replaces.
"""

import functools
import os
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from rnnflow.errors import RnnflowError

EXPERIMENT = "rnnflow"
DEFAULT_URI = "sqlite:///mlflow.db"
ARTIFACTS = Path("mlartifacts")


@functools.cache
def configure() -> str:
    """Point MLflow at MLFLOW_TRACKING_URI (default: ./mlflow.db) and the project experiment.

    An unreachable server is an error within seconds, not a silent fallback: runs would
    otherwise land somewhere the team does not look.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    import mlflow

    uri = os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_URI)
    mlflow.set_tracking_uri(uri)
    try:
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            location = None if uri.startswith("http") else ARTIFACTS.resolve().as_uri()
            mlflow.create_experiment(EXPERIMENT, artifact_location=location)
        mlflow.set_experiment(EXPERIMENT)
    except Exception as err:  # MlflowException, requests errors, sqlalchemy errors
        raise RnnflowError(
            f"MLFLOW_TRACKING_URI={uri}: tracking store unreachable ({type(err).__name__}: "
            f"{str(err).splitlines()[0][:200]})"
        ) from err
    return uri


def git_commit() -> str:
    """The current commit (with +dirty when the tree has changes), or 'unknown'."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True)
        return sha + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}, for mlflow.log_params."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat |= flatten(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def fail_stale_runs(variant: str) -> list[str]:
    """Mark this variant's runs still RUNNING (their process died) as FAILED; return their ids."""
    import mlflow

    stale = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.`rnnflow.variant` = '{variant}' and attributes.status = 'RUNNING'",
        output_format="list",
    )
    client = mlflow.MlflowClient()
    for run in stale:
        client.set_tag(run.info.run_id, "rnnflow.failure", "process died (stale RUNNING run)")
        client.set_terminated(run.info.run_id, status="FAILED")
    return [run.info.run_id for run in stale]


@contextmanager
def stage_run(stage: str, run_id: str | None = None, **start: Any) -> Iterator[Any]:
    """Open (run_id given) or start a run for one stage; FAILED if the block raises."""
    import mlflow

    configure()
    run = mlflow.start_run(run_id=run_id, **start)
    mlflow.set_tag(f"rnnflow.stage.{stage}", "started")
    try:
        yield run
    except BaseException as err:
        mlflow.set_tag("rnnflow.failure", f"{stage}: {type(err).__name__}: {str(err)[:400]}")
        mlflow.end_run(status="FAILED")
        raise
    mlflow.set_tag(f"rnnflow.stage.{stage}", "done")
    mlflow.end_run(status="FINISHED")


def run_exists(run_id: str | None) -> bool:
    """Whether the tracking store knows this run (a checkpoint may come from another store)."""
    import mlflow

    if not run_id:
        return False
    try:
        mlflow.MlflowClient().get_run(run_id)
        return True
    except Exception:
        return False


def variant_run(stage: str, variant: str, run_id: str | None):
    """Reopen the variant's training run for a later stage; if this tracking store does not
    know it (e.g. the checkpoint came from another store), start a new run for the variant."""
    configure()
    if run_exists(run_id):
        return stage_run(stage, run_id=run_id)
    return stage_run(stage, run_name=variant, tags={"rnnflow.variant": variant})
