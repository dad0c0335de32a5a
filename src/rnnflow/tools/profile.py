"""`make profile`: where a forced `dvc repro` spends its wall time, per stage.

It runs `dvc repro -f` twice, every stage cold in a process of its own
(RNNFLOW_STAGE_SERVER=0, as before the stage server) and then with the warm stage server,
each stage recording its start-up, own work and tracking/IO (rnnflow.runtime.timeline). What
the stage processes leave of the wall time is DVC's own bookkeeping between and around them
(hashing, caching, rewriting dvc.lock) and the processes' exits. Writes
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
from dataclasses import asdict, dataclass
from pathlib import Path

from rnnflow.runtime.timeline import RECORDS

PARTS = ("startup", "work", "tracking")


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
    from rnnflow.runtime.stageserver import ENABLED, with_this_python
    from rnnflow.runtime.stageserver import main as server

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
    from rnnflow.core.atomic import write_json, write_text
    from rnnflow.core.cliargs import CliParser
    from rnnflow.core.errors import run_cli
    from rnnflow.core.paths import REPORTS

    parser = CliParser(prog="python -m rnnflow.tools.profile", description=__doc__)
    parser.add_argument(
        "--modes", default="cold,warm", help="comma-separated: cold, warm (default: both)"
    )
    parser.add_argument("targets", nargs="*", help="dvc repro targets (default: everything)")
    args = parser.parse_args(argv)

    def run() -> None:
        from rnnflow.core.errors import RnnflowError

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
