"""End to end: `dvc repro` of the whole pipeline in a fresh copy of the repository (slow)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import REPO, VARIANTS, small_params

pytestmark = pytest.mark.slow


def _run(cmd, cwd, check=True):
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI")  # the copy uses its own default store, ./mlflow.db
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, shell=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """A git repository holding the tracked files of this one, with small params."""
    dest = tmp_path_factory.mktemp("clone") / "rnnflow"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    raw = small_params(data={"max_per_class": 60})
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    _run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", dest)
    return dest


def test_full_pipeline_from_a_fresh_copy(repo_copy):
    out = _run("dvc repro", repo_copy).stdout
    for variant in VARIANTS:
        assert f"Running stage 'validate@{variant}'" in out
        parity = json.loads((repo_copy / f"metrics/validate/{variant}.json").read_text())
        assert parity["passed"] and parity["max_abs_diff"] <= 1e-5
        for name in ("model.onnx", "tokenizer.json", "labels.json", "bundle.json"):
            assert (repo_copy / f"models/{variant}/{name}").is_file()
    board = json.loads((repo_copy / "reports/leaderboard.json").read_text())
    assert sorted(r["variant"] for r in board) == sorted(VARIANTS)
    assert all(r["test_accuracy"] > r["majority_baseline_val_acc"] for r in board)

    # nothing changed -> nothing runs
    again = _run("dvc repro", repo_copy).stdout
    assert "Running stage" not in again

    # metrics and plots are visible to dvc
    shown = _run("dvc metrics show --json", repo_copy).stdout
    assert "metrics/eval/gru.json" in shown and "metrics/train/rnn_cell.json" in shown
    _run("dvc plots show -o plots_html", repo_copy)
    assert (repo_copy / "plots_html/index.html").is_file()

    # predict from the bundle, as a user would
    pred = _run(f"{sys.executable} -m rnnflow.cli predict --model models/gru Tremblay", repo_copy)
    assert json.loads(pred.stdout)["text"] == "Tremblay"


def test_two_full_runs_give_identical_metrics(repo_copy):
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the full run above")
    kinds = ("train", "eval", "validate")
    first = {p: p.read_bytes() for k in kinds for p in (repo_copy / "metrics" / k).glob("*.json")}
    assert len(first) == 3 * len(VARIANTS)
    _run("dvc repro --force", repo_copy)
    second = {p: p.read_bytes() for p in first}
    assert second == first


def test_param_change_reruns_only_what_depends_on_it(repo_copy):
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the full run above")
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["tokenize"]["min_freq"] = 3
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run("dvc repro pack", repo_copy).stdout
    assert "Running stage 'tokenize'" in out and "Running stage 'pack'" in out
    assert "Running stage 'prepare'" not in out
    status = _run("dvc status --json", repo_copy).stdout
    assert "train@lstm" in status and "prepare" not in json.loads(status)
    _run("git checkout params.yaml && dvc repro pack", repo_copy)

    # an experiment with word-level tokens runs the data half
    exp = _run("dvc exp run pack -S tokenize.level=word", repo_copy).stdout
    assert "Running stage 'tokenize'" in exp
