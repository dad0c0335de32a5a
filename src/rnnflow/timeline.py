"""Where a forced `dvc repro` spends its wall time: per stage, start-up, own work, tracking/IO.

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

`make profile` (python -m rnnflow.timeline) runs `dvc repro -f` with every stage cold, in a
process of its own (RNNFLOW_STAGE_SERVER=0), and then with the warm stage server, and writes
reports/profile.{json,md}; `overhead_share` is the share of the wall time outside the stages'
own work.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

RECORDS = "RNNFLOW_TIMELINE"  # the folder stage processes write their records to
PARTS = ("startup", "work", "tracking")


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
    from rnnflow.stageserver import T0, process_start_time

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
    }
    path = Path(folder) / f"{_clock.stage.replace('@', '_')}.{os.getpid()}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))


# ------------------------------------------------------------------------------ the report


@dataclass
class Run:
    """One forced `dvc repro`: its wall time and each stage's parts."""

    mode: str
    wall: float
    stages: list[dict]

    def totals(self) -> dict[str, float]:
        sums = {part: sum(s[part] for s in self.stages) for part in PARTS}
        sums["dvc"] = self.wall - sum(s["ended"] - s["started"] for s in self.stages)
        return sums

    def overhead_share(self) -> float:
        return 1.0 - self.totals()["work"] / self.wall

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Parts summed over the variants of each stage kind (train@rnn + train@gru + ...)."""
        kinds: dict[str, dict[str, float]] = defaultdict(lambda: dict.fromkeys(PARTS, 0.0))
        for s in self.stages:
            for part in PARTS:
                kinds[s["stage"].split("@")[0]][part] += s[part]
        return dict(kinds)

    def to_dict(self) -> dict:
        return asdict(self) | {
            "totals": self.totals(),
            "overhead_share": self.overhead_share(),
            "by_kind": self.by_kind(),
        }


def forced_repro(mode: str, targets: list[str]) -> Run:
    """`dvc repro -f` with every stage recording its parts; `mode` cold or warm."""
    from rnnflow.stageserver import ENABLED, with_this_python
    from rnnflow.stageserver import main as server

    server(["stop"])  # warm or cold, no server is running when the run starts
    with tempfile.TemporaryDirectory() as records:
        env = with_this_python(os.environ | {RECORDS: records})
        env[ENABLED] = "1" if mode == "warm" else "0"
        start = time.time()
        dvc = [sys.executable, "-m", "dvc", "repro", "-f", *targets]
        proc = subprocess.run(dvc, env=env, text=True)
        wall = time.time() - start
        if proc.returncode != 0:
            raise SystemExit(f"profile: dvc repro -f failed ({proc.returncode})")
        stages = [json.loads(p.read_text()) for p in Path(records).glob("*.json")]
    stages.sort(key=lambda s: s["started"])
    return Run(mode, wall, stages)


def to_markdown(runs: list[Run]) -> str:
    """Per stage kind and in total: start-up / own work / tracking-IO seconds, per mode."""
    lines = [
        "| stage | " + " | ".join(f"{r.mode}: start-up / work / tracking s" for r in runs) + " |",
        "|---|" + "---|" * len(runs),
    ]
    kinds = list(runs[0].by_kind())
    for kind in kinds:
        cells = []
        for run in runs:
            k = run.by_kind().get(kind, dict.fromkeys(PARTS, 0.0))
            cells.append(" / ".join(f"{k[p]:.1f}" for p in PARTS))
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines.append(
        "| DVC between stages | " + " | ".join(f"{r.totals()['dvc']:.1f}" for r in runs) + " |"
    )
    lines.append("| **wall** | " + " | ".join(f"**{r.wall:.1f}**" for r in runs) + " |")
    lines.append(
        "| outside the stages' own work | "
        + " | ".join(f"{r.overhead_share():.1%}" for r in runs)
        + " |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    from rnnflow.atomic import write_json, write_text
    from rnnflow.errors import run_cli
    from rnnflow.paths import REPORTS

    parser = argparse.ArgumentParser(prog="python -m rnnflow.timeline", description=__doc__)
    parser.add_argument(
        "--modes", default="cold,warm", help="comma-separated: cold, warm (default: both)"
    )
    parser.add_argument("targets", nargs="*", help="dvc repro targets (default: everything)")
    args = parser.parse_args(argv)

    def run() -> None:
        from rnnflow.errors import RnnflowError

        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        if not modes or set(modes) - {"cold", "warm"}:
            raise RnnflowError(f"--modes: expected cold and/or warm, got {args.modes!r}")
        runs = [forced_repro(mode, args.targets) for mode in modes]
        report = {
            "runs": {r.mode: r.to_dict() for r in runs},
            "overhead_share": runs[-1].overhead_share(),
            "mode": runs[-1].mode,
        }
        write_json(REPORTS / "profile.json", report)
        md = to_markdown(runs)
        write_text(REPORTS / "profile.md", md)
        print(md)

    run_cli(run, "profile")


if __name__ == "__main__":
    main(sys.argv[1:])
