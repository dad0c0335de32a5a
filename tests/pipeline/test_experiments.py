"""DVC experiments meet MLflow: a parallel queue on the default store and on a real team server
(PostgreSQL + `mlflow server` on free loopback ports), and the server's faults (slow)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import mlflow
import pytest
import torch

from rnnflow.tracking import runs
from rnnflow.tracking.server import TeamServer, free_port

from ..conftest import (
    REPO,
    end_queue_workers,
    make_repo_copy,
    run,
    small_params,
    start_queue,
    tracking_at,
    write_params,
)

pytestmark = pytest.mark.slow
# Two experiments x (variants + leaderboard) runs each; fewer variants keep CI in budget
# (each stage pays ~10 s of start-up). Six variants, 14 runs, were checked by hand.
QUEUE_VARIANTS = ("gru", "rnn_cell")
SERVER_VARIANTS = ("gru",)  # the README test queues on a server too


def _params_with(variants) -> dict:
    raw = small_params(data={"max_per_class": 60})
    raw["model"]["variants"] = {v: raw["model"]["variants"][v] for v in variants}
    return raw


def _queue_two_and_wait(repo: Path, env: dict, timeout: float = 900) -> list[str]:
    """Queue hidden_size=16,24, run them with 2 parallel workers, return the experiment names.
    The stages both share run once first: two workers computing the same stage at the same
    moment can collide writing DVC's run-cache entry (seen here: `tokenize` failed with a
    missing .tmp file in .dvc/cache/runs)."""
    run("dvc repro pack", repo, env)
    run("dvc exp run --queue -S 'model.defaults.hidden_size=16,24'", repo, env)
    start_queue(repo, env)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = run("dvc queue status", repo, env).stdout
        if "Queued" not in status and "Running" not in status and "0 active" in status:
            break
        time.sleep(3)
    else:
        raise AssertionError(f"queue did not finish in {timeout:.0f} s:\n{status}")
    end_queue_workers(repo)
    assert status.count("Success") == 2, status
    shown = json.loads(run("dvc exp show --json", repo, env).stdout)
    names = [e["name"] for rev in shown for e in rev.get("experiments") or [] if e.get("name")]
    assert len(names) == 2, shown
    return names


def _check_sweep(uri: str, names: list[str], baseline: str, variants) -> dict:
    """Every run of both experiments is in the store, FINISHED, tagged and grouped."""
    per_experiment = len(variants) + 1  # one per variant and the leaderboard
    with tracking_at(uri):
        runs = mlflow.search_runs(experiment_names=["rnnflow"], output_format="list")
        client = mlflow.MlflowClient()
        versions = {
            m.name: len(client.search_model_versions(f"name='{m.name}'"))
            for m in client.search_registered_models()
        }
    by_exp = Counter(r.data.tags.get("rnnflow.dvc_exp") for r in runs)
    assert {n: by_exp[n] for n in names} == {n: per_experiment for n in names}
    statuses = Counter(r.info.status for r in runs)
    assert statuses == {"FINISHED": 2 * per_experiment + 1}, statuses  # + the group run
    assert versions == {"rnnflow": 2 * len(variants)}  # the raw-text model, one per export

    (group,) = [r for r in runs if r.data.tags.get("rnnflow.kind") == "experiments"]
    boards = [r for r in runs if r.data.tags.get("rnnflow.kind") == "leaderboard"]
    assert {b.data.tags["mlflow.parentRunId"] for b in boards} == {group.info.run_id}
    for board in boards:
        children = [r for r in runs if r.data.tags.get("rnnflow.leaderboard") == board.info.run_id]
        assert len(children) == len(variants)
        assert board.data.metrics["best_test_accuracy"] == max(
            c.data.metrics["test_accuracy"] for c in children
        )
    assert {r.data.tags["rnnflow.baseline_commit"] for r in runs} == {baseline}
    hashes = {
        n: {
            r.data.tags["rnnflow.params_hash"]
            for r in runs
            if r.data.tags.get("rnnflow.dvc_exp") == n
        }
        for n in names
    }
    assert all(len(h) == 1 for h in hashes.values()) and len(set.union(*hashes.values())) == 2
    return {b.data.tags["rnnflow.dvc_exp"]: b for b in boards}


def test_parallel_queue_records_every_run_in_the_default_store(tmp_path):
    repo = make_repo_copy(tmp_path / "rnnflow", _params_with(QUEUE_VARIANTS))
    env = {"MLFLOW_TRACKING_URI": None}
    names = _queue_two_and_wait(repo, env)
    baseline = run("git rev-parse HEAD", repo).stdout.strip()
    _check_sweep(f"sqlite:///{repo / 'mlflow.db'}", names, baseline, QUEUE_VARIANTS)
    assert not list((repo / ".dvc/tmp").rglob("mlflow.db"))


@pytest.fixture(scope="module")
def team_server():
    """PostgreSQL and `mlflow server` on free loopback ports, stopped and removed after."""
    base = Path(tempfile.mkdtemp(prefix="rnnflow-server-"))
    base.chmod(0o755)  # PostgreSQL runs as the postgres user when we are root
    server = TeamServer(base, free_port(), free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop(TeamServer.from_state(base)[1])
        shutil.rmtree(base, ignore_errors=True)


def test_parallel_queue_against_the_team_server(team_server, tmp_path):
    repo = make_repo_copy(tmp_path / "rnnflow", _params_with(SERVER_VARIANTS))
    env = {"MLFLOW_TRACKING_URI": team_server.mlflow.uri}
    names = _queue_two_and_wait(repo, env)
    baseline = run("git rev-parse HEAD", repo).stdout.strip()
    boards = _check_sweep(team_server.mlflow.uri, names, baseline, SERVER_VARIANTS)
    assert not (repo / "mlflow.db").exists(), "runs went to the local store"

    # artifacts travel through the server's proxy into its --artifacts-destination
    with tracking_at(team_server.mlflow.uri):
        board = boards[names[0]]
        local = mlflow.artifacts.download_artifacts(
            run_id=board.info.run_id, artifact_path="leaderboard.md", dst_path=str(tmp_path)
        )
    assert Path(local).read_text().startswith("| variant |")
    stored = list((team_server.dir / "artifacts").rglob("leaderboard.md"))
    assert len(stored) == 2


def _stage(ws: Path, stage: str, uri: str) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen(
        [sys.executable, "-m", f"stages.{stage}", "gru"],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_server_killed_mid_training_then_rerun_resumes(team_server, data_workspace, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(data_workspace, ws)
    epochs = 40
    write_params(ws, small_params(train={"epochs": epochs, "patience": epochs}))
    uri = team_server.mlflow.uri
    state = ws / ".rnnflow/resume/gru.pt"

    proc = _stage(ws, "train", uri)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.exists() and torch.load(state, weights_only=True)["epoch"] >= 2:
            break
        time.sleep(0.02)
    _, pid = TeamServer.from_state(team_server.dir)
    os.killpg(pid, signal.SIGKILL)  # the tracking server dies after epoch 2
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "tracking store failed during train" in lines[0], err
    assert "Traceback" not in err
    done = torch.load(state, weights_only=True)["epoch"]
    assert 2 <= done < epochs

    mlflow_pid = team_server.mlflow.start()  # same PostgreSQL: nothing recorded is lost
    state_file = team_server.state_file
    state_file.write_text(json.dumps(json.loads(state_file.read_text()) | {"pid": mlflow_pid}))
    rerun = _stage(ws, "train", uri)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out + err
    assert f"resuming after epoch {done}" in out
    metrics = json.loads((ws / "metrics/train/gru.json").read_text())
    assert metrics["epochs_run"] == epochs and not state.exists()

    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = torch.load(ws / "models/gru/checkpoint.pt", weights_only=True)["mlflow_run_id"]
    finished = client.get_run(run_id)
    killed = client.get_run(finished.data.tags["rnnflow.replaces_failed_runs"])
    assert finished.info.status == "FINISHED" and killed.info.status == "FAILED"
    assert finished.data.tags["rnnflow.resumed_from_epoch"] == str(done)
    history = _metric_steps(uri, finished.info.run_id, "val_loss")
    assert history == list(range(1, epochs + 1))
    logged = _metric_steps(uri, killed.info.run_id, "val_loss")  # up to the kill
    assert logged == list(range(1, len(logged) + 1)) and done - 1 <= len(logged) <= done


def _metric_steps(uri: str, run_id: str, key: str) -> list[int]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def test_postgres_restarted_between_stages_loses_nothing(team_server, data_workspace, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(data_workspace, ws)
    write_params(ws, small_params())
    uri = team_server.mlflow.uri
    for stage in ("train", "evaluate", "export"):  # export records the evaluation
        proc = _stage(ws, stage, uri)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, out + err
        if stage == "train":
            team_server.postgres.stop()
            team_server.postgres.start()
    run_id = torch.load(ws / "models/gru/checkpoint.pt", weights_only=True)["mlflow_run_id"]
    got = mlflow.MlflowClient(tracking_uri=uri).get_run(run_id)
    train = json.loads((ws / "metrics/train/gru.json").read_text())
    evaluation = json.loads((ws / "metrics/eval/gru.json").read_text())
    assert got.info.status == "FINISHED"
    assert got.data.metrics["best_val_acc"] == pytest.approx(train["best_val_acc"])
    assert got.data.metrics["test_accuracy"] == pytest.approx(evaluation["accuracy"])
    assert got.data.tags["rnnflow.stage.export"] == "done"


def test_two_machines_work_one_search_study_on_the_team_servers_postgres(
    team_server, data_workspace, tmp_path
):
    """Optuna's RDB storage is the distributed engine: two processes (as two machines would)
    run `python -m rnnflow.tools.search` on one study in the team server's PostgreSQL, found
    from the server's state like `make search` finds it; every trial is counted once and
    every trial is an MLflow run on the team server."""
    import optuna

    from rnnflow.tools.search import storage_url

    ws = tmp_path / "ws"
    shutil.copytree(data_workspace, ws)
    url, where = storage_url(None, team_server.dir)
    assert url.startswith("postgresql+psycopg://") and url.endswith("/optuna"), url
    assert where.startswith("the team server's PostgreSQL")
    env = os.environ | {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": team_server.mlflow.uri}
    cmd = [sys.executable, "-m", "rnnflow.tools.search", "--variant", "rnn", "--trials", "2"]
    cmd += ["--epochs", "1", "--study", "shared", "--storage", url, "--no-experiment"]
    machines = [
        subprocess.Popen(cmd, cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for proc in machines:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-2000:]
    study = optuna.load_study(study_name="shared", storage=url)
    assert sorted(t.number for t in study.trials) == [0, 1, 2, 3]
    with tracking_at(team_server.mlflow.uri):
        parents = mlflow.search_runs(
            experiment_names=["rnnflow"],
            filter_string="tags.`optuna.study` = 'shared'",
            output_format="list",
        )
        assert len(parents) == 2
        trials = mlflow.search_runs(
            experiment_names=["rnnflow"],
            filter_string="tags.`rnnflow.kind` = 'search-trial'",
            output_format="list",
        )
    assert sorted(int(r.data.tags["optuna.trial"]) for r in trials) == [0, 1, 2, 3]
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {p.info.run_id for p in parents}


def test_compares_crowning_at_once_on_the_team_server_all_succeed(team_server):
    """MLflow's SQL registry sets an alias by a read, then an insert: two compares crowning
    at the same moment (a parallel queue on one server) can both insert, and one failed on
    the alias's primary key in CI. runs.point_alias retries the collision: 16 threads set a
    new alias at once, 20 rounds; every call succeeds and the alias ends on one of their
    versions. Without the retry, 14 of 640 such calls collided here (16 threads, 40 rounds).
    (Its own registered model, so the other tests' `rnnflow` is left alone.)"""
    from concurrent.futures import ThreadPoolExecutor

    client = mlflow.MlflowClient(team_server.mlflow.uri)
    with tracking_at(team_server.mlflow.uri):
        client.create_registered_model("alias-race")
        run_id = client.create_run("0").info.run_id
        versions = [
            client.create_model_version("alias-race", f"runs:/{run_id}/m{i}", run_id).version
            for i in range(16)
        ]
        for round_ in range(20):
            alias = f"champion{round_}"
            with ThreadPoolExecutor(16) as pool:
                done = list(pool.map(runs.point_alias, [alias] * 16, versions, ["alias-race"] * 16))
            assert done == [None] * 16
            assert client.get_model_version_by_alias("alias-race", alias).version in versions
