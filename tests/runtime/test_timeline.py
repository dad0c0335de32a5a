"""The pipeline's timeline: each stage process splits its life into start-up, own work and
tracking/IO; a forced repro's wall time is those plus DVC's own time between stages."""

import json
import time

import pytest

from rnnflow.runtime import timeline
from rnnflow.tools import profile


def test_a_stage_records_its_parts(tmp_path, monkeypatch):
    monkeypatch.setenv(timeline.RECORDS, str(tmp_path))
    monkeypatch.setenv("RNNFLOW_STAGE_T0", f"{time.time() - 0.5:.3f}")  # started 0.5 s ago
    timeline.begin("train")
    timeline.rename("train@gru")
    time.sleep(0.05)
    with timeline.tracking(), timeline.tracking():  # nested blocks count once
        time.sleep(0.1)
    timeline.end()
    (record,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert record["stage"] == "train@gru"
    assert record["startup"] == pytest.approx(0.5, abs=0.05)
    assert record["tracking"] == pytest.approx(0.1, abs=0.03)
    assert record["work"] == pytest.approx(0.05, abs=0.03)
    total = record["startup"] + record["tracking"] + record["work"]
    assert total == pytest.approx(record["ended"] - record["started"], abs=1e-6)


def test_no_record_unless_asked(tmp_path, monkeypatch):
    monkeypatch.delenv(timeline.RECORDS, raising=False)
    monkeypatch.chdir(tmp_path)
    timeline.begin("prepare")
    timeline.end()
    assert list(tmp_path.iterdir()) == []


def test_a_run_adds_up_to_its_wall_time():
    stages = [
        {
            "stage": "prepare",
            "started": 0.0,
            "ended": 2.0,
            "startup": 1.0,
            "work": 0.8,
            "tracking": 0.2,
        },
        {
            "stage": "train@rnn",
            "started": 3.0,
            "ended": 10.0,
            "startup": 0.5,
            "work": 6.0,
            "tracking": 0.5,
        },
        {
            "stage": "train@gru",
            "started": 10.5,
            "ended": 20.0,
            "startup": 0.5,
            "work": 8.0,
            "tracking": 1.0,
        },
    ]
    run = profile.Run("warm", 21.0, stages)
    totals = run.totals()
    assert totals == pytest.approx({"startup": 2.0, "work": 14.8, "tracking": 1.7, "dvc": 2.5})
    assert sum(totals.values()) == pytest.approx(run.wall)
    assert run.overhead_share() == pytest.approx(1 - 14.8 / 21.0)
    assert run.by_kind()["train"] == pytest.approx({"startup": 1.0, "work": 14.0, "tracking": 1.5})
    md = profile.to_markdown([run])
    assert "| train | 1.0 / 14.0 / 1.5 |" in md and "29.5%" in md
