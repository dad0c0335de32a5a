"""How many cores other processes take, and the warning when training would share them."""

import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from rnnflow.runtime import host
from rnnflow.training.train import train_variant

from ..conftest import small_params, write_params


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_busy_elsewhere_sees_one_busy_loop_as_one_core():
    quiet = host.busy_elsewhere(0.5)
    loop = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # started
        busy = host.busy_elsewhere(0.5)
        counted_as_ours = host.busy_elsewhere(0.5, ours=(loop.pid,))  # as the stage server
    finally:
        loop.kill()
        loop.wait()
    assert busy - quiet > 0.7 and busy <= (os.cpu_count() or 1) + 0.1
    assert counted_as_ours < quiet + 0.3
    stop = threading.Event()

    def spin():
        while not stop.is_set():
            pass

    spinner = threading.Thread(target=spin)
    spinner.start()  # this process's own work, a core's worth: not elsewhere
    try:
        own = host.busy_elsewhere(0.5)
    finally:
        stop.set()
        spinner.join()
    assert own < quiet + 0.3


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
