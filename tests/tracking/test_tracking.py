"""Tracking: where the store is, what tags a run carries, which RUNNING runs may be FAILED."""

import os
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import mlflow
import pytest

from rnnflow.tracking import runs

from ..conftest import REPO, tracking_at


def test_default_store_is_at_the_dvc_project_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    assert runs.tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    # inside a queued experiment's temporary copy, DVC_ROOT names the real project
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert runs.tracking_uri() == f"sqlite:///{tmp_path}/project/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/team.db")
    assert runs.tracking_uri() == f"sqlite:///{tmp_path}/project/runs/team.db"
    for absolute in ("sqlite:////srv/mlflow.db", "http://127.0.0.1:5000"):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", absolute)
        assert runs.tracking_uri() == absolute
    assert runs._artifact_location("sqlite:////srv/x/mlflow.db") == "file:///srv/x/mlartifacts"
    assert runs._artifact_location("http://127.0.0.1:5000") is None


def test_origin_names_the_dvc_experiment(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("seed: 1\ntrain: {lr: 0.1}\n")
    workspace = runs.Origin.current()
    assert workspace.dvc_exp == "workspace" and workspace.run_name("gru") == "gru"
    (tmp_path / "params.yaml").write_text("# same content\ntrain: {lr: 0.1}\nseed: 1\n")
    assert runs.Origin.current().params_hash == workspace.params_hash
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-oast")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "a" * 40)
    (tmp_path / "params.yaml").write_text("seed: 1\ntrain: {lr: 0.2}\n")
    exp = runs.Origin.current()
    assert exp.tags() == {
        "rnnflow.dvc_exp": "brisk-oast",
        "rnnflow.baseline_commit": "a" * 40,
        "rnnflow.params_hash": exp.params_hash,
    }
    assert exp.params_hash != workspace.params_hash and len(exp.params_hash) == 12
    assert exp.run_name("gru") == "gru@brisk-oast"


def _running_run(client, experiment_id, owner: dict) -> str:
    run = client.create_run(experiment_id, tags={"rnnflow.variant": "gru"} | owner)
    return run.info.run_id


def test_only_runs_whose_owner_is_gone_are_failed(tmp_path):
    runs.configure()
    client = mlflow.MlflowClient()
    experiment_id = mlflow.get_experiment_by_name(runs.EXPERIMENT).experiment_id
    for run in client.search_runs([experiment_id], "tags.`rnnflow.variant` = 'gru'"):
        client.set_terminated(run.info.run_id)  # earlier tests' runs are not ours to judge
    dead = subprocess.Popen([sys.executable, "-c", "import os; print(os.getpid())"])
    dead.wait()
    me = runs.owner_tags()
    reused = me | {"rnnflow.owner.started": "1.00"}  # our pid, but started at another time
    other_host = {**me, "rnnflow.owner.host": socket.gethostname() + "-elsewhere"}
    ids = {
        "live": _running_run(client, experiment_id, me),
        "dead": _running_run(client, experiment_id, me | {"rnnflow.owner.pid": str(dead.pid)}),
        "pid_reused": _running_run(client, experiment_id, reused),
        "other_host": _running_run(client, experiment_id, other_host),
        "no_owner": _running_run(client, experiment_id, {}),
    }
    failed = runs.fail_dead_runs("gru")
    assert sorted(failed) == sorted([ids["dead"], ids["pid_reused"]])
    status = {name: client.get_run(i).info.status for name, i in ids.items()}
    assert status == {
        "live": "RUNNING",
        "dead": "FAILED",
        "pid_reused": "FAILED",
        "other_host": "RUNNING",
        "no_owner": "RUNNING",
    }
    for run_id in (ids["live"], ids["other_host"], ids["no_owner"]):
        client.set_terminated(run_id)


WRITER = textwrap.dedent(
    """
    import sys, time
    from rnnflow.tracking import runs
    import mlflow
    start = float(sys.argv[1])
    while time.time() < start:
        time.sleep(0.001)
    runs.configure()
    for i in range(5):
        with mlflow.start_run(tags={"writer": sys.argv[2]}):
            mlflow.log_metric("i", i)
    """
)


def test_two_processes_on_a_new_sqlite_store_lose_nothing(tmp_path):
    """Both create the store's tables at the same instant; every run survives."""
    uri = f"sqlite:///{tmp_path}/fresh.db"
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env = os.environ | {
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONPATH": str(REPO / "src"),
        "TMPDIR": str(tmpdir),
    }
    start = __import__("time").time() + 6  # both wait for the same moment, imports done
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(start), str(n)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    with tracking_at(uri):
        found = mlflow.search_runs(experiment_names=[runs.EXPERIMENT], output_format="list")
    assert sorted(r.data.tags["writer"] for r in found) == ["0"] * 5 + ["1"] * 5
    assert all(r.info.status == "FINISHED" for r in found)
    # locked through the store's folder: no lock file of ours left (MLflow keeps its own)
    assert [p.name for p in tmpdir.iterdir() if p.name.startswith("rnnflow")] == []


def test_stages_run_the_code_of_their_own_checkout(tmp_path):
    """A queued experiment's temporary copy must not import the workspace's rnnflow."""
    import shutil

    copy = tmp_path / "exp-copy"
    shutil.copytree(REPO / "stages", copy / "stages")
    shutil.copytree(REPO / "src/rnnflow", copy / "src/rnnflow")
    probe = "import stages, rnnflow; print(rnnflow.__file__)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=copy, capture_output=True, text=True)
    assert out.stdout.strip() == str(copy / "src/rnnflow/__init__.py"), out.stderr


def _bare_python() -> Path:
    """The interpreter the venv was made from: none of the project's packages."""
    bare = Path(sys.base_prefix) / "bin" / "python3"
    if subprocess.run([bare, "-c", "import torch"], capture_output=True).returncode == 0:
        pytest.skip(f"{bare} has torch installed")
    return bare


def test_stages_use_the_project_venv_however_dvc_is_invoked():
    """`.venv/bin/dvc repro` runs `python` from PATH, not the venv: the stage re-executes
    itself with the project's interpreter, keeping its arguments."""
    probe = "import stages, sys; print(sys.prefix); print(sys.argv[1:])"
    out = subprocess.run(
        [_bare_python(), "-c", probe, "gru"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    prefix, argv = out.stdout.strip().splitlines()
    assert Path(prefix).resolve() == (REPO / ".venv").resolve()
    assert argv == "['gru']"


def test_stages_without_any_venv_say_what_to_run(tmp_path):
    import shutil

    shutil.copytree(REPO / "stages", tmp_path / "stages")
    out = subprocess.run(
        [_bare_python(), "-m", "stages.train", "gru"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "DVC_ROOT"},
    )
    assert out.returncode == 1
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith("stages: torch, mlflow, dvc not importable by ")
    assert line.endswith(
        f"no project venv at {tmp_path / '.venv'}: run `make install` (it creates .venv), "
        "then rerun"
    )


def test_one_torch_thread_per_worker_in_a_queued_experiment(tmp_path, monkeypatch):
    from rnnflow.runtime.host import threads

    monkeypatch.delenv("RNNFLOW_THREADS", raising=False)
    monkeypatch.chdir(tmp_path)
    assert threads() is None  # not under DVC: torch's default
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-oast")
    assert threads() is None  # `dvc exp run` in the workspace itself
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "project"))
    assert threads() == 1  # a temporary copy: workers run side by side
    monkeypatch.setenv("RNNFLOW_THREADS", "3")
    assert threads() == 3


def test_postgres_folder_check_sees_ancestors_a_relative_path_hides(tmp_path, monkeypatch):
    """As root, PostgreSQL runs as `postgres`; a folder under a 0700 ancestor is out of its
    reach even when we name it relative to a working directory inside that ancestor."""
    import pwd

    from rnnflow.tracking.server import PG_USER, Postgres

    if os.geteuid() != 0:
        pytest.skip("only root hands PostgreSQL to another user")
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        pytest.skip("no postgres user")
    locked = tmp_path / "locked"
    (locked / "project/.rnnflow/server").mkdir(parents=True)
    locked.chmod(0o700)
    monkeypatch.chdir(locked / "project")
    pg = Postgres(Path(".rnnflow/server/pg"), 5999)
    assert not pg._reachable_by_pg_user(Path(".rnnflow/server"))
    open_dir = Path(tempfile.mkdtemp(prefix="rnnflow-open-"))
    try:
        open_dir.chmod(0o755)
        assert pg._reachable_by_pg_user(open_dir)
    finally:
        open_dir.rmdir()
