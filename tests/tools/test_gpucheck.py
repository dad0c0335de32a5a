"""`make gpu-check`'s machinery: no step can hang the run (each has its own timeout and is
killed with everything it started), the budget is shared, and the report survives each step."""

import json
import os
import sys
import time

import pytest
import yaml

from rnnflow.tools import gpucheck

from ..conftest import REPO


def test_a_step_that_hangs_is_killed_with_what_it_started(tmp_path, monkeypatch):
    monkeypatch.setitem(gpucheck.TIMEOUTS, "device", 2)
    check = gpucheck.Check(tmp_path, budget=60, report=tmp_path / "report")
    pid_file = tmp_path / "grandchild.pid"
    hang = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); "
        f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(300)"
    )
    start = time.monotonic()
    step = check.run("device", [sys.executable, "-c", hang])
    assert step["exit"] == "timeout" and step["limit_s"] == 2
    assert time.monotonic() - start < 20
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # the whole process group got SIGKILL
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("the step's child survived its timeout")
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["steps"]["device"]["exit"] == "timeout"  # written at once


def test_steps_share_one_budget(tmp_path):
    check = gpucheck.Check(tmp_path, budget=7, report=tmp_path / "report")
    first = check.run("pipeline", [sys.executable, "-c", "import time; time.sleep(10)"])
    assert first["exit"] == "timeout" and first["limit_s"] <= 7
    second = check.run("bench", [sys.executable, "-c", "print('never')"])
    assert second["exit"] == "skipped (no time left)"
    assert (tmp_path / "report.md").read_text().count("skipped") == 1


def test_a_copy_of_the_project_runs_its_own_params(tmp_path):
    project = gpucheck.copy_project(REPO, tmp_path / "copy", gpucheck.QUICK, git=False)
    params = yaml.safe_load((project / "params.yaml").read_text())
    assert params["train"]["epochs"] == 2 and params["model"]["defaults"]["hidden_size"] == 24
    assert params["model"]["defaults"]["dropout"] == 0.2  # merged, not replaced
    assert (project / "stages/train.py").is_file() and (project / "src/rnnflow").is_dir()
    assert "no_scm = true" in (project / ".dvc/config").read_text()


def test_a_skipped_step_runs_nothing_and_finds_nothing(tmp_path):
    check = gpucheck.Check(tmp_path, budget=60, report=tmp_path / "report", skip={"bench"})
    marker = tmp_path / "ran"
    step = check.run("bench", [sys.executable, "-c", f"open({str(marker)!r}, 'w')"])
    check.note("bench", summary="gru 1 tok/s")
    assert step == {"command": step["command"], "exit": "skipped (--skip)"}
    assert not marker.exists()
    ran = check.run("data", [sys.executable, "-c", "print('data ran')"])
    assert ran["exit"] == 0 and "data ran" in ran["tail"]
    report = (tmp_path / "report.md").read_text()
    assert "| bench | skipped (--skip) | - |  |" in report and "| data | 0 |" in report


def test_the_check_fails_naming_the_steps_that_failed(tmp_path, monkeypatch, capsys):
    """A step that exits non-zero or times out fails the check (exit 2, one line naming it);
    `refuse` fails only when it had to refuse and did not; skipped steps are not failures.
    The CPU smoke run once reported a failed pipeline step and exited 0."""
    steps = {
        "device": {"exit": 0},
        "data": {"exit": 0},
        "bench": {"exit": "skipped (--skip)"},
        "torchrun": {"exit": "timeout"},
        "refuse": {"exit": 0, "ok": True},  # on the CPU two gloo ranks may train
        "pipeline": {"exit": 255},
    }
    assert gpucheck.failed_steps(steps) == ["torchrun", "pipeline"]
    assert gpucheck.failed_steps(steps | {"refuse": {"exit": 0, "ok": False}}) == [
        "torchrun",
        "refuse",
        "pipeline",
    ]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(gpucheck, "gpu_check", lambda *args: steps)
    with pytest.raises(SystemExit) as stopped:  # a failed step must fail the check
        gpucheck.main(["--out", "report"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    report = tmp_path / "report.json"
    expected = f"failed: torchrun, pipeline (each step's output ends its entry in {report})"
    assert err == f"gpu-check: error: {expected}"
    passed = {name: step for name, step in steps.items() if name not in ("torchrun", "pipeline")}
    monkeypatch.setattr(gpucheck, "gpu_check", lambda *args: passed)
    gpucheck.main(["--out", "report"])  # returns: every step that ran did its job
