"""`make profile`: a forced repro's wall time is the stages' start-up, own work and
tracking/IO plus DVC's time between them, recorded by the stages themselves."""

import json
import sys

import pytest

from ..conftest import make_repo_copy, run, small_params

pytestmark = pytest.mark.slow


def test_profile_of_a_forced_repro_adds_up(tmp_path):
    project = make_repo_copy(tmp_path / "rnnflow", small_params())
    env = {"MLFLOW_TRACKING_URI": None}
    cmd = f"{sys.executable} -m rnnflow.tools.profile --modes warm prepare tokenize pack"
    out = run(cmd, project, env=env).stdout
    assert "outside the stages' own work" in out
    report = json.loads((project / "reports/profile.json").read_text())
    warm = report["runs"]["warm"]
    assert sorted(s["stage"] for s in warm["stages"]) == ["pack", "prepare", "tokenize"]
    totals = warm["totals"]
    assert sum(totals.values()) == pytest.approx(warm["wall"], rel=1e-9)
    assert all(totals[p] >= 0 for p in ("startup", "work", "tracking", "dvc"))
    assert report["overhead_share"] == pytest.approx(1 - totals["work"] / warm["wall"])
    assert 0 < report["overhead_share"] < 1
    for stage in warm["stages"]:  # each stage wrote what it declares
        assert stage["written"] and stage["peak_rss_mb"] > 10
