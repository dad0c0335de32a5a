"""Seeds, threads and device: the same params give the same numbers on the same machine."""

import os
import random
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
