"""MKL's vector math (VML) picks a function's kernel on its first call, and a first call on
several threads at once can run one thread's share through a low-accuracy kernel
(pytorch/pytorch#188792). Importing rnnflow.model.network calls every VML op once first."""

import json
import subprocess
import sys

import pytest

# A parent forks `n` children; each runs its process's first tanh on 8 threads (after a
# matrix product has started the thread pool, as a model's input projection does) and
# reports whether any value is further than 1e-6 from float64's (right: 3e-8).
STORM = """
import json, os, sys
import torch
import torch.nn.functional as F
if sys.argv[1] == "network":
    import rnnflow.model.network  # noqa: F401
n, wrong = int(sys.argv[2]), 0
for _ in range(n):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        torch.set_num_threads(8)
        g = torch.Generator().manual_seed(0)
        x = F.linear(torch.randn(512, 128, generator=g), torch.randn(128, 128, generator=g))
        x = x * 0.1
        error = (torch.tanh(x).double() - torch.tanh(x.double())).abs().max()
        os.write(w, b"1" if error > 1e-6 else b"0")
        os._exit(0)
    os.close(w)
    wrong += os.read(r, 1) == b"1"
    os.close(r)
    os.waitpid(pid, 0)
print(json.dumps({"wrong": wrong, "of": n}))
"""


def storm(mode: str, n: int) -> dict:
    run = [sys.executable, "-c", STORM, mode, str(n)]
    proc = subprocess.run(run, capture_output=True, text=True, timeout=300, check=True)
    return json.loads(proc.stdout)


@pytest.mark.slow
def test_first_concurrent_tanh_is_accurate_after_importing_the_network():
    plain = storm("torch", 1000)
    if plain["wrong"] == 0:
        pytest.skip("no first-call VML race on this machine (1,000 processes without a warm-up)")
    warmed = storm("network", 1000)
    assert warmed["wrong"] == 0, (plain, warmed)
