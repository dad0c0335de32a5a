"""kill -9 during train@VARIANT, run it again: training resumes and ends with the same metrics."""

import os
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import torch

from ..conftest import REPO, small_params, tracking_at, write_params


def _train(ws, env):
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", "gru"],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_killed_training_resumes_to_identical_metrics(data_workspace, tmp_path):
    env = os.environ | {
        "PYTHONPATH": str(REPO),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
    }
    runs = {}
    for name in ("clean", "killed"):
        ws = tmp_path / name
        shutil.copytree(data_workspace, ws)
        write_params(ws, small_params(train={"epochs": 6, "patience": 10}))
        runs[name] = ws

    clean = _train(runs["clean"], env)
    assert clean.wait(timeout=300) == 0, clean.stdout.read()

    ws = runs["killed"]
    state = ws / ".rnnflow/resume/gru.pt"
    proc = _train(ws, env)
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert state.exists() and not (ws / "metrics/train/gru.json").exists()
    (ws / "models/gru/checkpoint.pt").unlink(missing_ok=True)  # dvc repro removes outputs

    resumed = _train(ws, env)
    out, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out
    assert "resuming after epoch" in out
    assert (ws / "metrics/train/gru.json").read_bytes() == (
        runs["clean"] / "metrics/train/gru.json"
    ).read_bytes()
    assert not state.exists()
    a = torch.load(ws / "models/gru/checkpoint.pt", weights_only=True)
    b = torch.load(runs["clean"] / "models/gru/checkpoint.pt", weights_only=True)
    assert a["epoch"] == b["epoch"]
    assert all(torch.equal(a["model_state"][k], b["model_state"][k]) for k in b["model_state"])

    with tracking_at(env["MLFLOW_TRACKING_URI"]):
        finished = mlflow.search_runs(
            experiment_names=["rnnflow"],
            output_format="list",
            filter_string="attributes.status = 'FINISHED'",
            order_by=["attributes.start_time DESC"],
        )[0]
        killed_id = finished.data.tags["rnnflow.replaces_failed_runs"]
        killed = mlflow.get_run(killed_id)
        assert killed.info.status == "FAILED"
        assert finished.data.tags["rnnflow.resumed_from_epoch"].isdigit()
