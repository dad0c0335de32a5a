"""How many cores other processes take, and the warning when training would share them."""

import os
import subprocess
import sys
import time

import pytest
import torch

from rnnflow.runtime import host
from rnnflow.training.train import train_variant

from ..conftest import small_params, write_params


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_busy_elsewhere_sees_a_busy_loop():
    """At least the loop's own CPU time in the same window: whatever else the machine runs
    only adds to it. (What counts as ours is left out: the arithmetic's test, below.)"""
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started
        used, clock = host.cpu_seconds(loop.pid), time.monotonic()
        seen = host.busy_elsewhere(0.5)
        rate = (host.cpu_seconds(loop.pid) - used) / (time.monotonic() - clock)
    finally:
        loop.kill()
        loop.wait()
    assert rate > 0.2, "the busy loop got no CPU: the machine is too busy to measure"
    assert rate - 0.15 <= seen <= (os.cpu_count() or 1) + 0.1


def test_elsewhere_is_the_machines_busy_time_less_ours():
    # 2.5 s busy over 1 s; this process 0.9 s, a process of ours 0.6 s, one gone (reads 0)
    ours = [(4.0, 4.9), (9.0, 9.6), (1.0, 0.0)]
    assert host.share_elsewhere((100.0, 102.5), ours, wall=1.0) == pytest.approx(1.0)
    assert host.share_elsewhere((100.0, 102.5), ours[:1], wall=2.0) == pytest.approx(0.8)
    assert host.share_elsewhere((100.0, 100.5), ours, wall=1.0) == 0.0  # never below 0


def test_crowding_is_fewer_free_cores_than_threads_less_a_half():
    message = host.crowding(threads=2, cores=2, elsewhere=1.0)
    assert message.startswith("1.0 of 2 cores are busy with other processes; training on 2 ")
    assert "RNNFLOW_THREADS=1" in message
    assert host.crowding(threads=16, cores=16, elsewhere=1.0) is not None  # 15 < 15.5
    assert host.crowding(threads=2, cores=2, elsewhere=0.4) is None  # 1.6 cores free
    assert host.crowding(threads=8, cores=16, elsewhere=8.0) is None  # 8 free for 8
    assert host.crowding(threads=1, cores=2, elsewhere=1.9) is None  # one thread never waits
    assert host.crowding(threads=2, cores=2, elsewhere=None) is None  # not measured


def test_training_warns_once_when_its_threads_would_share_the_cores(workspace, monkeypatch, capsys):
    threads = torch.get_num_threads()
    monkeypatch.setenv("RNNFLOW_THREADS", "2")
    monkeypatch.setattr(
        host, "busy_elsewhere", lambda seconds=0.1, ours=(): 1.0 + os.cpu_count() - 2
    )
    try:
        train_variant(write_params(workspace, small_params(train={"epochs": 1})), "gru")
    finally:
        torch.set_num_threads(threads)
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and warnings[0].startswith("train@gru: warning: ")
    assert (workspace / "metrics/train/gru.json").exists()  # and it trained
