"""MLflow: one experiment, one run per variant per trained model, shared by its later stages.

train@V opens the run and stores its id in the checkpoint; evaluate@V, export@V and
validate@V reopen that run to add their metrics and artifacts. A stage that raises marks the
run FAILED.

Where the records go: MLFLOW_TRACKING_URI, else `sqlite:///<project root>/mlflow.db`. The
project root is DVC_ROOT, which DVC sets to the real project even when a queued or --temp
experiment runs in a temporary copy (.dvc/tmp/exps/...) that is deleted afterwards; a relative
sqlite path is resolved against that root too. So `dvc repro`, `dvc exp run`, `--temp` and a
parallel `dvc queue start -j 2` all land in one store.

Every run carries its origin (the DVC experiment, the baseline commit, a hash of params.yaml)
and its owner (host, pid and the pid's start time). A run left RUNNING is marked FAILED only
when its owner is gone: a process on this host that no longer lives. Live runs of other
experiments, and runs owned by other hosts, are never touched.
"""

import fcntl
import functools
import hashlib
import json
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rnnflow.core.errors import RnnflowError
from rnnflow.core.paths import PARAMS
from rnnflow.runtime import timeline

EXPERIMENT = "rnnflow"
WORKSPACE = "workspace"  # rnnflow.dvc_exp of a plain `dvc repro` (not a DVC experiment)
REGISTERED_MODEL = "rnnflow"  # the raw-text model (rnnflow.serving), one version per export
CHAMPION = "champion"  # its alias: the best variant that passed the parity gate
# MLflow 3's UI opens an experiment of unknown kind on its GenAI overview (traces); ours is a
# model-training experiment, so it opens on the runs table.
EXPERIMENT_KIND, MODEL_KIND = "mlflow.experimentKind", "custom_model_development"
# A saved view of the runs table (the UI's "Views", shareable by URL): the variants' runs
# sorted by test accuracy, with the comparison's columns shown. runs_url() opens it.
VIEW_KEY = "rnnflow-leaderboard"
_VIEW_COLUMNS = ("test_accuracy", "test_macro_f1", "best_val_acc", "onnx_max_abs_diff")
_VIEW_STATE = {
    "orderByKey": "metrics.`test_accuracy`",
    "orderByAsc": False,
    "selectedColumns": [f"metrics.`{m}`" for m in _VIEW_COLUMNS],
}
EXPERIMENT_TAGS = {
    EXPERIMENT_KIND: MODEL_KIND,
    f"mlflow.sharedViewState.{VIEW_KEY}": json.dumps(
        {
            "name": "rnnflow: variants by test accuracy",
            "createdAt": 0,
            "state": json.dumps(_VIEW_STATE),
        }
    ),
}


def project_root() -> Path:
    """The DVC project: DVC_ROOT when a DVC stage runs us, else the current directory."""
    return Path(os.environ.get("DVC_ROOT") or ".").resolve()


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI with a relative sqlite path made absolute against the project
    root; without it, sqlite:///<project root>/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{project_root() / uri.removeprefix('sqlite:///')}"
    return uri


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local store live beside it (./mlartifacts for the default store); a
    tracking server stores them itself (it proxies them to its --artifacts-destination)."""
    if uri.startswith("sqlite:////"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


@contextmanager
def _init_lock(uri: str) -> Iterator[None]:
    """One process at a time creates a store's tables. MLflow's tracking and registry stores
    each run the schema migrations when tables are missing, unguarded in the registry's case;
    two workers doing it at once on a new sqlite file silently lose records. A sqlite store
    is locked through its folder (an flock on the directory, which leaves no file behind:
    a lock file per store piled up in /tmp, one per test workspace); another store through
    a file of its own in the temp folder."""
    folder = Path(uri.removeprefix("sqlite:///")).parent if uri.startswith("sqlite:////") else None
    if folder is not None and folder.is_dir():
        fd = os.open(folder, os.O_RDONLY)
    else:
        digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
        lock = Path(tempfile.gettempdir()) / f"rnnflow-mlflow-init-{digest}.lock"
        fd = os.open(lock, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


@functools.cache
def configure() -> str:
    """Point MLflow at the store (see tracking_uri) and the project experiment.

    An unreachable server is an error, not a silent fallback: runs would otherwise land
    somewhere the team does not look. A refused connection fails at once (no retries); a
    server that accepts but answers slowly (a busy 2-core machine running two experiments
    beside it took more than 5 s once) gets MLFLOW_HTTP_REQUEST_TIMEOUT, 30 s by default.
    """
    with timeline.tracking():
        return _configure()


def _configure() -> str:
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with _init_lock(uri):
            client = mlflow.MlflowClient()
            if uri.startswith(("sqlite:", "postgresql", "mysql", "mssql")):
                client._get_registry_client()  # creates the registry tables now, locked
            experiment = client.get_experiment_by_name(EXPERIMENT)
            if experiment is None:
                try:
                    client.create_experiment(
                        EXPERIMENT, artifact_location=_artifact_location(uri), tags=EXPERIMENT_TAGS
                    )
                except MlflowException:  # another host created it first
                    if client.get_experiment_by_name(EXPERIMENT) is None:
                        raise
            else:
                for key, value in EXPERIMENT_TAGS.items():
                    if experiment.tags.get(key) != value:
                        client.set_experiment_tag(experiment.experiment_id, key, value)
        mlflow.set_experiment(EXPERIMENT)
    except Exception as err:  # MlflowException, requests errors, sqlalchemy errors
        raise RnnflowError(
            f"MLFLOW_TRACKING_URI={uri}: tracking store unreachable ({_first_line(err)})"
        ) from err
    return uri


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:200] if lines else ''}"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", "-C", str(project_root()), *args], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def git_commit() -> str:
    """The project's current commit (with +dirty when the tree has changes), or 'unknown'."""
    sha = _git("rev-parse", "HEAD")
    if not sha:
        return "unknown"
    return sha + ("+dirty" if _git("status", "--porcelain", "--untracked-files=no") else "")


def params_hash(path: Path = PARAMS) -> str:
    """A short hash of params.yaml's content (parsed, so formatting and comments don't count)."""
    import yaml

    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return "unknown"
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class Origin:
    """Where a run comes from: the DVC experiment, its baseline commit, the params' hash."""

    dvc_exp: str
    baseline_commit: str
    params_hash: str

    @classmethod
    def current(cls) -> "Origin":
        """DVC sets DVC_EXP_NAME and DVC_EXP_BASELINE_REV for `dvc exp run` (workspace,
        --temp and queued alike); a plain `dvc repro` or a direct call is the workspace."""
        baseline = os.environ.get("DVC_EXP_BASELINE_REV") or _git("rev-parse", "HEAD")
        return cls(
            os.environ.get("DVC_EXP_NAME") or WORKSPACE, baseline or "unknown", params_hash()
        )

    def tags(self) -> dict[str, str]:
        return {
            "rnnflow.dvc_exp": self.dvc_exp,
            "rnnflow.baseline_commit": self.baseline_commit,
            "rnnflow.params_hash": self.params_hash,
        }

    def run_name(self, name: str) -> str:
        """`gru` in the workspace, `gru@<experiment>` in a DVC experiment."""
        return name if self.dvc_exp == WORKSPACE else f"{name}@{self.dvc_exp}"


def owner_tags() -> dict[str, str]:
    """This process as the owner of a run: host, pid and the pid's start time (pids recycle)."""
    import psutil

    proc = psutil.Process()
    return {
        "rnnflow.owner.host": socket.gethostname(),
        "rnnflow.owner.pid": str(proc.pid),
        "rnnflow.owner.started": f"{proc.create_time():.2f}",
    }


def owner_gone(tags: Mapping[str, str]) -> bool:
    """True only if the run's owner was a process on this host that no longer lives."""
    import psutil

    if tags.get("rnnflow.owner.host") != socket.gethostname():
        return False  # another host's run, or one without an owner: we cannot know
    try:
        proc = psutil.Process(int(tags["rnnflow.owner.pid"]))
        started = f"{proc.create_time():.2f}"
        return started != tags.get("rnnflow.owner.started") or (
            proc.status() == psutil.STATUS_ZOMBIE
        )
    except (KeyError, ValueError):
        return False
    except psutil.NoSuchProcess:
        return True


def fail_dead_runs(variant: str) -> list[str]:
    """Mark this variant's RUNNING runs whose owner is gone as FAILED; return their ids."""
    import mlflow

    running = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string=f"tags.`rnnflow.variant` = '{variant}' and attributes.status = 'RUNNING'",
        output_format="list",
    )
    client = mlflow.MlflowClient()
    dead = [run for run in running if owner_gone(run.data.tags)]
    for run in dead:
        client.set_tag(run.info.run_id, "rnnflow.failure", "owner process died (stale run)")
        client.set_terminated(run.info.run_id, status="FAILED")
    return [run.info.run_id for run in dead]


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


def _is_tracking_error(err: BaseException) -> bool:
    """An error of the tracking store itself (server gone, database down), not of our work."""
    from mlflow.exceptions import MlflowException
    from requests import RequestException  # both ship with mlflow
    from sqlalchemy.exc import SQLAlchemyError

    return isinstance(err, MlflowException | RequestException | SQLAlchemyError)


@contextmanager
def stage_run(stage: str, run_id: str | None = None, **start: Any) -> Iterator[Any]:
    """Open (run_id given) or start a run for one stage; FAILED if the block raises.

    The run gets this process as its owner and the origin tags. If the tracking store itself
    fails inside the block, the stage ends with one line naming the store; what the stage
    saved before (checkpoints, resume state) stays, so a rerun continues from there.
    """
    with timeline.tracking():
        import mlflow

        uri = configure()
        tags = Origin.current().tags() | owner_tags() | {f"rnnflow.stage.{stage}": "started"}
        run = mlflow.start_run(run_id=run_id, **start)
    try:
        with timeline.tracking():
            mlflow.set_tags(tags)
        yield run
    except BaseException as err:
        _end_failed(f"{stage}: {_first_line(err)}")
        if isinstance(err, Exception) and _is_tracking_error(err):
            raise RnnflowError(
                f"MLFLOW_TRACKING_URI={uri}: tracking store failed during {stage} "
                f"({_first_line(err)}); files written so far are kept, rerun the stage "
                "when the store is back (training resumes from its last completed epoch)"
            ) from err
        raise
    with timeline.tracking():
        mlflow.set_tag(f"rnnflow.stage.{stage}", "done")
        if "rnnflow.failure" in run.data.tags:  # an earlier attempt failed; this one did not
            mlflow.MlflowClient().delete_tag(run.info.run_id, "rnnflow.failure")
        mlflow.end_run(status="FINISHED")


def _end_failed(reason: str) -> None:
    """Mark the active run FAILED, as far as the store allows; if the store is gone, the run
    stays RUNNING there until a later stage sees that its owner is gone (fail_dead_runs)."""
    import mlflow

    with suppress(Exception):
        mlflow.set_tag("rnnflow.failure", reason)
    with suppress(Exception):
        mlflow.end_run(status="FAILED")  # pops the run locally even when the call fails


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
    with timeline.tracking():
        known = run_exists(run_id)
    if known:
        return stage_run(stage, run_id=run_id)
    name = Origin.current().run_name(variant)
    return stage_run(stage, run_name=name, tags={"rnnflow.variant": variant})


def experiments_group(origin: Origin) -> str:
    """The id of the run that groups every DVC experiment of one baseline commit, as
    `dvc exp show` groups them: leaderboard runs nest under it in the MLflow UI.

    Get or create, safe when two experiments finish at once: each creates one if none is
    visible, then all use the earliest (start time, id) and delete their own duplicate.
    """
    import mlflow

    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(EXPERIMENT).experiment_id
    query = (
        "tags.`rnnflow.kind` = 'experiments' and "
        f"tags.`rnnflow.baseline_commit` = '{origin.baseline_commit}'"
    )

    def find() -> list:
        runs = client.search_runs([experiment_id], query, max_results=50)
        return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))

    found = find()
    if found:
        return found[0].info.run_id
    created = client.create_run(
        experiment_id,
        run_name=f"experiments@{origin.baseline_commit[:7]}",
        tags={"rnnflow.kind": "experiments", "rnnflow.baseline_commit": origin.baseline_commit},
    )
    client.set_terminated(created.info.run_id, status="FINISHED")
    time.sleep(0.2)  # let a concurrent creator's run become visible
    winner = find()[0].info.run_id
    if winner != created.info.run_id:
        client.delete_run(created.info.run_id)
    return winner


def text_model_version(run_id: str | None) -> str | None:
    """The latest version of the registered raw-text model logged by this run, if any."""
    import mlflow

    if not run_exists(run_id):
        return None
    versions = mlflow.MlflowClient().search_model_versions(
        f"name = '{REGISTERED_MODEL}' and run_id = '{run_id}'"
    )
    return max((v.version for v in versions), key=int, default=None)


def point_alias(alias: str, version: str, model: str = REGISTERED_MODEL, attempts: int = 5) -> None:
    """Point `models:/MODEL@alias` at `version`. MLflow's SQL registry sets an alias by a
    read, then an insert or an update (`session.merge`): two compares crowning at the same
    moment (parallel queue workers on one team server) can both read no alias and both
    insert, and the second fails on the alias table's primary key. By then the row exists,
    so trying again updates it: the later compare wins, as it would one after the other."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(model, alias, version)
            return
        except MlflowException as err:
            text = str(err).lower()
            collided = "alias" in text and ("unique" in text or "duplicate" in text)
            if not collided or attempt == attempts - 1:
                raise
            time.sleep(0.1 * (attempt + 1))


def runs_url(base: str, experiment_id: str) -> str:
    """The UI's runs table on the saved leaderboard view (model-training mode, not GenAI)."""
    query = f"workflowType=machine_learning&viewStateShareKey={VIEW_KEY}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    """The UI's Compare page for these runs (params and metrics side by side, plots)."""
    from urllib.parse import quote

    runs = quote(json.dumps(run_ids, separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={quote(json.dumps([experiment_id]))}"


def log_parity(run_id: str, report: dict) -> None:
    """validate@VARIANT's parity report into the variant's run, and its numbers onto the
    registered raw-text model that run exported (compare crowns only versions that passed)."""
    import mlflow

    client = mlflow.MlflowClient()
    metrics = {
        "onnx_max_abs_diff": report["max_abs_diff"],
        "onnx_argmax_agreement": report["argmax_agreement"],
        "onnx_parity_passed": float(report["passed"]),
    }
    int8 = report.get("int8") or {}
    for key in ("accuracy", "accuracy_drop", "argmax_agreement", "size_kb"):
        if key in int8:
            metrics[f"int8_{key}"] = int8[key]
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_dict(run_id, report, "validation/parity.json")
    version = text_model_version(run_id)
    if version is None:
        return
    tags = {
        "parity_passed": str(report["passed"]).lower(),
        "parity_max_abs_diff": f"{report['max_abs_diff']:.3g}",
        "parity_argmax_agreement": f"{report['argmax_agreement']:.4f}",
    }
    if "accuracy_drop" in int8:  # the version also carries model.int8.onnx
        tags["int8_accuracy_drop"] = f"{int8['accuracy_drop']:.4f}"
    for key, value in tags.items():
        client.set_model_version_tag(REGISTERED_MODEL, version, key, value)
