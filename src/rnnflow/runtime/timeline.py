"""Each stage's timeline: start-up, own work and tracking/IO, for `make profile`.

Every stage process splits its life into three parts (recorded only when RNNFLOW_TIMELINE
names a folder, one JSON file per stage process):
- start-up: from the moment DVC started the stage's process to the start of its work
  (interpreter, imports, or the hand-over to the warm stage server and the fork);
- tracking/IO: MLflow (configuration, runs, params, metrics, logged models and artifacts)
  and the per-epoch resume state, timed where they happen (`with tracking():`);
- own work: the rest of the stage function, i.e. what the stage is for (reading its inputs,
  training, evaluating, exporting, writing its declared outputs).
What the sum of the stage processes leaves of the wall time of `dvc repro -f` is DVC's own
bookkeeping (hashing, caching, dvc.lock), between and around the stages.

rnnflow.tools.profile runs the forced repro and adds the records up.
"""

import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rnnflow.core.atomic import WRITTEN

RECORDS = "RNNFLOW_TIMELINE"  # the folder stage processes write their records to


@dataclass
class _Clock:
    stage: str = ""
    started: float = 0.0  # the stage process's start (epoch seconds)
    work_start: float = 0.0
    tracking: float = 0.0  # seconds inside tracking() blocks
    depth: int = 0


_clock = _Clock()


def begin(stage: str) -> None:
    """The stage's work starts now; its process started when the stage server's client or
    this process did (RNNFLOW_STAGE_T0, else this process's start time)."""
    from rnnflow.runtime.stageserver import T0, process_start_time

    _clock.stage, _clock.tracking = stage, 0.0
    _clock.started = float(os.environ.get(T0) or process_start_time())
    _clock.work_start = time.time()


def rename(stage: str) -> None:
    """Name the stage once its arguments are known (`train` -> `train@gru`)."""
    _clock.stage = stage


@contextmanager
def tracking() -> Iterator[None]:
    """Count the block's wall time as tracking/IO (nested blocks count once)."""
    _clock.depth += 1
    start = time.perf_counter()
    try:
        yield
    finally:
        _clock.depth -= 1
        if _clock.depth == 0:
            _clock.tracking += time.perf_counter() - start


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: Linux's VmHWM, which starts afresh at exec
    (getrusage's maxrss can carry the RSS of the process that forked it)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def end() -> None:
    """Write this stage's record if RNNFLOW_TIMELINE asks for one."""
    folder = os.environ.get(RECORDS)
    if not folder or not _clock.stage:
        return
    now = time.time()
    record = {
        "stage": _clock.stage,
        "started": _clock.started,
        "ended": now,
        "startup": _clock.work_start - _clock.started,
        "tracking": _clock.tracking,
        "work": now - _clock.work_start - _clock.tracking,
        "peak_rss_mb": peak_rss_mb(),
        "written": sorted(set(WRITTEN)),  # every file written through core.atomic
    }
    path = Path(folder) / f"{_clock.stage.replace('@', '_')}.{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
