"""Training on several processes: torch.distributed and DistributedDataParallel.

train@VARIANT runs in one of three ways:
- one process (`train.processes: 1`, no WORLD_SIZE in the environment): no process group;
- `train.processes: N` > 1: the stage launches N local processes through torch's elastic
  launcher (the engine behind `torchrun`, standalone rendezvous on 127.0.0.1) and waits;
- started by an outside `torchrun` (WORLD_SIZE set, e.g. several machines): it joins that
  group and `train.processes` is not used.
Ranks talk over gloo on the CPU and NCCL on CUDA. A `World` says who this process is and
holds the few collectives training needs; with one process they cost nothing.
"""

import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from rnnflow.core.errors import RnnflowError

# Seconds a collective waits for a rank that stopped answering without dying (a dead rank
# is noticed at once: its sockets close and the launcher sees its exit). Ranks other than 0
# wait at the next epoch's first step while rank 0 saves and logs an epoch.
TIMEOUT_VARIABLE, TIMEOUT_SECONDS = "RNNFLOW_DIST_TIMEOUT", 600
# Seconds the launcher gives the other ranks to stop after one failed, before SIGKILL.
SHUTDOWN_SECONDS = 10


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of one training run."""

    rank: int = 0
    size: int = 1

    @property
    def leader(self) -> bool:
        """Rank 0: the one process that writes files and tracks the run."""
        return self.rank == 0

    def rows(self, n: int) -> slice:
        """This rank's rows of a training batch of n: contiguous, disjoint, sizes differing by
        at most one; empty when n < size."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def owns(self, batch: int) -> bool:
        """Whether this rank evaluates whole batch number `batch` (round robin)."""
        return batch % self.size == self.rank

    def sum(self, table: np.ndarray) -> np.ndarray:
        """Elementwise sum of every rank's float64 table (itself with one process)."""
        if self.size == 1:
            return table
        tensor = torch.from_numpy(np.ascontiguousarray(table, dtype=np.float64))
        if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
        return tensor.cpu().numpy()

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order (a list of one with one process)."""
        if self.size == 1:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if self.size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


SINGLE = World()


def launched() -> bool:
    """True in a process started by torchrun or by launch() (they set WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ


@contextmanager
def joined(device: torch.device) -> Iterator[World]:
    """This process's World: the launcher's group when launched (NCCL for a CUDA device,
    else gloo), the single process otherwise. A group created here is destroyed here; one
    that already exists (a script that called init_process_group) is used as it is.

    What holds the group (a DistributedDataParallel model) must be freed inside the block:
    do the work in a function called there, not in the block's own variables. A DDP model
    freed after the group is destroyed makes its reducer end the gloo group while holding
    the GIL, and a gloo thread freeing the tensor of a finished collective then waits for
    that GIL forever (two-rank training hung at its very end 1 run in 3)."""
    if not launched():
        yield SINGLE
        return
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=_timeout())
    try:
        yield World(dist.get_rank(), dist.get_world_size())
    except BaseException as err:
        # The failed code's frames may hold a DDP model: free it before the group (above);
        # the traceback keeps its lines, not its local variables.
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        if created:
            dist.destroy_process_group()


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_VARIABLE, str(TIMEOUT_SECONDS))
    try:
        seconds = float(raw)
    except ValueError:
        seconds = 0
    if seconds <= 0:
        raise RnnflowError(f"{TIMEOUT_VARIABLE}={raw!r}: expected a number of seconds > 0")
    return timedelta(seconds=seconds)


def launch(processes: int, fn: Callable[..., Any], *args: Any, name: str) -> Any:
    """Run fn(*args) on `processes` local processes through torch's elastic launcher (what
    `torchrun --standalone --nproc-per-node N` does) and return rank 0's result.

    If a rank fails or is killed, the launcher stops the others and this raises one
    RnnflowError naming the rank and the cause; no rank is restarted.
    """
    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # The ranks' error files (what describe_failure reads) go to a folder of this launch's,
    # removed with it. Left to torch, each launch leaves a /tmp/torchelastic_* folder, and
    # each failed rank a pytorch-errorfile-*.pickle (torch.multiprocessing, in the temp
    # folder of the launching process: pointed at this one while the launch runs).
    with tempfile.TemporaryDirectory(prefix="rnnflow-ranks-") as logs, _temp_folder(logs):
        config = LaunchConfig(
            min_nodes=1,
            max_nodes=1,
            nproc_per_node=processes,
            logs_specs=DefaultLogsSpecs(log_dir=logs),
            run_id=uuid.uuid4().hex,
            rdzv_backend="c10d",
            rdzv_endpoint="127.0.0.1:0",  # a free loopback port
            local_addr="127.0.0.1",
            max_restarts=0,
            start_method="spawn",
            shutdown_timeout=SHUTDOWN_SECONDS,
        )
        with _quiet("torch.distributed.elastic", "torch.multiprocessing"), _no_tracker_warning():
            try:
                return elastic_launch(config, _rank_main)(os.getpid(), fn, *args)[0]
            except ChildFailedError as err:
                raise RnnflowError(f"{name}: {describe_failure(err.failures)}") from None


@contextmanager
def _temp_folder(folder: str) -> Iterator[None]:
    """tempfile's folder in this process is `folder` inside the block."""
    before = tempfile.tempdir
    tempfile.tempdir = folder
    try:
        yield
    finally:
        tempfile.tempdir = before


def _rank_main(launcher: int, fn: Callable[..., Any], *args: Any) -> Any:
    """One rank. It ends with its launcher (kill -9 of the stage leaves no rank training
    on), and SIGTERM (how the launcher stops ranks) unwinds it like an error, so an open
    MLflow run is marked FAILED. When another rank dies, this one's next collective fails
    with a lost connection: a consequence, so it waits for the launcher to see the cause
    (and stop it) instead of racing it to be reported first."""
    _end_with(launcher)
    exit_on_sigterm()
    try:
        return fn(*args)
    except Exception as err:
        if _lost_peer(str(err)):
            time.sleep(2 * SHUTDOWN_SECONDS)
        raise


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit(143) in the main thread, so the process unwinds (`finally`
    blocks, context managers) and exits with 128 + SIGTERM. Python ignores an exception
    raised inside a finalizer (a __del__ or weakref callback, such as SQLAlchemy's while
    MLflow logs), prints "Exception ignored in ..." and runs on; a SIGTERM whose SystemExit
    is lost that way is sent again from a helper thread, and lands once the finalizer is done.
    """
    code = 128 + signal.SIGTERM

    def handler(*_: Any) -> None:
        raise SystemExit(code)

    previous = sys.unraisablehook

    def resend(unraisable: Any) -> None:
        lost = unraisable.exc_value
        if not (isinstance(lost, SystemExit) and lost.code == code):
            previous(unraisable)
            return
        # not os.kill here: in the main thread it runs the handler at once, inside this hook
        again = threading.Timer(0.01, os.kill, (os.getpid(), signal.SIGTERM))
        again.daemon = True
        again.start()

    sys.unraisablehook = resend
    signal.signal(signal.SIGTERM, handler)


def _end_with(parent: int) -> None:
    """Linux: ask the kernel for SIGKILL when the parent process dies (PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        return
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before the call above
        os._exit(1)


def describe_failure(failures: dict[int, Any]) -> str:
    """The root cause among failed ranks, in one line: a rank killed by a signal, else the
    first whose error is not a consequence (SIGTERM from the launcher, a lost peer)."""
    rank, failure = min(failures.items(), key=lambda kv: _order(kv[1]))
    how = f"rank {rank} of the run (pid {failure.pid})"
    if sig := _signal(failure):
        return f"{how} was killed by {sig.name}"
    message = _message(failure)
    if _lost_peer(message):
        return f"{how} lost its connection to another rank, which stopped first ({message})"
    return f"{how} failed: {message}"


def _order(failure: Any) -> tuple:
    sig = _signal(failure)
    consequence = sig == signal.SIGTERM or _lost_peer(_message(failure))
    return (sig is None or sig == signal.SIGTERM, consequence, failure.timestamp)


def _signal(failure: Any) -> signal.Signals | None:
    """The signal that ended a rank: a negative exit code, or 128 + n from our handler."""
    code = failure.exitcode
    number = -code if code < 0 else code - 128 if code > 128 else 0
    try:
        return signal.Signals(number) if number else None
    except ValueError:
        return None


def _message(failure: Any) -> str:
    """The first line of a failed rank's exception, as its error file recorded it."""
    data = failure.error_file_data
    message = data.get("message") if isinstance(data, dict) else None
    if isinstance(message, dict):
        message = message.get("message")
    text = str(message or "").strip()
    if not text or text == "<NONE>":
        return f"exit code {failure.exitcode}"
    return text.splitlines()[0].removeprefix("RnnflowError: ")


def _lost_peer(message: str) -> bool:
    """gloo's and NCCL's errors for a peer that went away."""
    return any(
        s in message
        for s in ("Connection reset by peer", "Connection closed by peer", "Broken pipe")
    )


@contextmanager
def _no_tracker_warning() -> Iterator[None]:
    """multiprocessing's resource tracker (a process of its own, reading PYTHONWARNINGS when
    it starts) warns of the semaphores of a killed rank: noise after the one error."""
    before = os.environ.get("PYTHONWARNINGS")
    ignore = "ignore:resource_tracker:UserWarning"
    os.environ["PYTHONWARNINGS"] = f"{before},{ignore}" if before else ignore
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("PYTHONWARNINGS")
        else:
            os.environ["PYTHONWARNINGS"] = before


@contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """Hide the launcher's own log lines (config dumps, per-rank tracebacks): a failure is
    reported once, by launch()."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)
