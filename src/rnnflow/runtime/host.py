"""Seeds, threads and device: the same params give the same numbers on the same machine."""

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch


def setup(seed: int, cuda: bool = True) -> torch.device:
    """Seed every RNG, make kernels deterministic, set threads; return the device to use.

    Threads: see threads(). CUDA is used when present unless RNNFLOW_DEVICE says otherwise
    (e.g. RNNFLOW_DEVICE=cpu); on CUDA, deterministic algorithms are switched on. A stage
    that computes on the CPU alone passes cuda=False: it never starts CUDA (a second or more
    per process on a GPU machine).
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if count := threads():
        torch.set_num_threads(count)
    chosen = device() if cuda else torch.device("cpu")
    if chosen.type == "cuda":
        # CPU kernels used here are deterministic already; the switch costs ~3 s of imports.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return chosen


def threads() -> int | None:
    """torch's CPU threads: RNNFLOW_THREADS if set; 1 inside a DVC experiment's temporary copy
    (queued or --temp), where parallel workers share the cores; the cores divided among the
    ranks on this machine when training on several processes (LOCAL_WORLD_SIZE); else None
    (torch's default, one per core). On 2 cores, two workers with 2 threads each trained gru
    at 10k tokens/s each, with 1 thread each at 35k (one process alone: 44k with 2 threads,
    43k with 1)."""
    if count := os.environ.get("RNNFLOW_THREADS"):
        return int(count)
    root = os.environ.get("DVC_ROOT")
    if os.environ.get("DVC_EXP_NAME") and root and Path(root).resolve() != Path.cwd().resolve():
        return 1
    if (ranks := int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) > 1:
        return threads_per_rank(ranks)
    return None


def threads_per_rank(ranks: int) -> int:
    """The machine's cores shared among `ranks` processes."""
    return max(1, (os.cpu_count() or 1) // ranks)


def device() -> torch.device:
    """cuda when available (and not overridden by RNNFLOW_DEVICE), else cpu. A rank of a
    multi-process run on CUDA gets the GPU of its LOCAL_RANK."""
    wanted = os.environ.get("RNNFLOW_DEVICE")
    chosen = torch.device(wanted or ("cuda" if torch.cuda.is_available() else "cpu"))
    if chosen.type == "cuda" and "LOCAL_RANK" in os.environ:
        chosen = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(chosen)
    return chosen


def seed_rank(seed: int, rank: int) -> None:
    """A torch RNG stream of its own for rank > 0 (dropout), derived from (seed, rank)."""
    torch.manual_seed(int(np.random.SeedSequence([seed, rank]).generate_state(1)[0]))


def rng_state() -> dict:
    """The torch RNG states (dropout); batch order is derived from (seed, epoch) instead."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore what rng_state() saved."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def busy_elsewhere(seconds: float = 0.1, ours: tuple[int, ...] = ()) -> float | None:
    """How many cores other processes kept busy over the next `seconds` (and, in a virtual
    machine, the host: its steal time): the machine's busy time less this process's and
    the processes' in `ours`, per second, from /proc. None where /proc/stat cannot be read
    (not Linux)."""
    pids = (os.getpid(), *ours)
    machine, own, clock = machine_busy_seconds(), [cpu_seconds(p) for p in pids], time.monotonic()
    time.sleep(seconds)
    after = machine_busy_seconds()
    if machine is None or after is None:
        return None
    spent = [(before, cpu_seconds(p)) for p, before in zip(pids, own, strict=True)]
    return share_elsewhere((machine, after), spent, time.monotonic() - clock)


def share_elsewhere(
    machine: tuple[float, float], ours: list[tuple[float, float]], wall: float
) -> float:
    """Cores busy elsewhere: the machine's busy seconds between two readings less those of
    our processes (each (before, after); a process gone since reads 0 and counts nothing),
    per second of wall time."""
    used = sum(max(0.0, after - before) for before, after in ours)
    return max(0.0, machine[1] - machine[0] - used) / wall


def machine_busy_seconds() -> float | None:
    """CPU seconds all cores have been busy since boot (/proc/stat: user, nice, system, irq,
    softirq and steal), None where it cannot be read."""
    try:
        with open("/proc/stat") as stat:
            ticks = [int(n) for n in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """The CPU time process `pid` has used, all its threads (/proc/PID/stat's utime and
    stime), 0 when it is gone or unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def crowding(threads: int, cores: int, elsewhere: float | None) -> str | None:
    """Why `threads` torch threads would share the cores with other busy processes, or None
    when they would not: more than one thread, and fewer than threads - 0.5 cores left free.
    There every parallel region waits for a thread the scheduler took away, and two-thread
    training ran 3-38x slower beside one busy loop (docs "Performance")."""
    if threads <= 1 or elsewhere is None or cores - elsewhere >= threads - 0.5:
        return None
    return (
        f"{elsewhere:.1f} of {cores} cores are busy with other processes; training on "
        f'{threads} threads beside them can run many times slower (docs "Performance"). '
        "RNNFLOW_THREADS=1 trains on one (other float bits, so slightly other metrics)"
    )


def warn_if_crowded(name: str) -> None:
    """Print one warning when this process's torch threads would share the cores (see
    crowding); 0.1 s of looking at the machine. The stage server counts as ours: a first
    stage may find it importing torch and MLflow, a few seconds on one core."""
    from rnnflow.runtime.stageserver import server_pid

    threads = torch.get_num_threads()
    if threads <= 1:  # never crowded: no need to look
        return
    server = server_pid()
    elsewhere = busy_elsewhere(ours=(server,) if server else ())
    if why := crowding(threads, os.cpu_count() or 1, elsewhere):
        print(f"{name}: warning: {why}", file=sys.stderr, flush=True)
