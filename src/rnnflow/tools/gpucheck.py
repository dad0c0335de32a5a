"""`make gpu-check`: the CUDA path end to end, every step under its own timeout, one report.

Steps, each a subprocess killed with its whole process group when its time is up; a step
that fails or hangs is recorded and the check goes on to the next:
1. device: what torch sees (GPU, compute capability, CUDA, cuDNN, NCCL);
2. data: `dvc repro pack` in a fresh copy of the project (the data the next steps train on);
3. bench: rnnflow.bench's matmul and train sections on this device: tokens/s per variant,
   GFLOP/s, and on CUDA how busy the GPU is (the rest is launch overhead) and what CUDA
   graphs of the steps save;
4. torchrun: `torchrun --standalone --nproc_per_node=1 -m stages.train gru` in that copy:
   one rank in an NCCL process group (gloo on the CPU);
5. refuse: `train.processes: 2` on a machine with one GPU must stop with one line naming
   the field and exit 2 (on the CPU two gloo ranks are allowed and train);
6. pipeline: `dvc repro`, the rest of the whole pipeline, with each stage's timeline;
7. bf16: gru and rnn_cell trained with `train.precision: bf16`, then evaluated, exported and
   validated: the ONNX model stays fp32 and must pass the parity gate;
8. bench_cpu: the same bench on this machine's CPU, for the GPU-vs-CPU table.
The report (reports/gpu_check.{json,md}) is rewritten after every step, so a run killed from
outside still leaves what it measured; the check exits 2 naming the steps that failed. Steps
share --budget seconds: a step gets at most what is left. `--skip bench,torchrun` leaves
steps out; `--keep DIR` leaves the project copy (its checkpoints, metrics, timeline) in DIR.
RNNFLOW_DEVICE=cpu runs it all on the CPU (`--quick`: a small sample and model), the smoke
test CI runs.
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from rnnflow.core.atomic import write_json, write_text
from rnnflow.core.cliargs import CliParser, non_empty
from rnnflow.core.errors import RnnflowError, run_cli
from rnnflow.core.paths import REPORTS
from rnnflow.runtime.stageserver import with_this_python
from rnnflow.runtime.timeline import RECORDS
from rnnflow.tools.profile import Run

# The checkout this rnnflow belongs to (src/rnnflow/tools/ -> the project root).
CHECKOUT = Path(__file__).resolve().parents[3]
# What a copy of the project needs to run the pipeline (data/input holds the user's files).
PROJECT_FILES = ("dvc.yaml", "params.yaml", "pyproject.toml", ".dvcignore", ".dvc/config")
PROJECT_DIRS = ("stages", "src", "data/input")
# Each step's own time limit in seconds (the whole check also stays within --budget).
TIMEOUTS = {
    "device": 60,
    "data": 90,
    "pipeline": 360,
    "torchrun": 90,
    "refuse": 60,
    "bench": 100,
    "bf16": 90,
    "bench_cpu": 90,
}
QUICK = {
    "data": {"max_per_class": 40},
    "train": {"epochs": 2},
    "model": {"defaults": {"embedding_dim": 16, "hidden_size": 24}},
    # a test split of about 60 texts: one changed answer of the int8 model is 1.7% of its
    # accuracy (the tests' small params allow the same)
    "parity": {"int8_max_drop": 0.05},
}
BF16_VARIANTS = ("gru", "rnn_cell")
PROBE = """import json, torch
c = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "available": c,
    "device": torch.cuda.get_device_name(0) if c else "cpu",
    "capability": list(torch.cuda.get_device_capability(0)) if c else None,
    "cudnn": torch.backends.cudnn.version() if c else None,
    "nccl": ".".join(map(str, torch.cuda.nccl.version())) if c else None,
    "gpus": torch.cuda.device_count()}))"""


def copy_project(root: Path, dest: Path, overrides: dict, git: bool = True) -> Path:
    """A fresh project at `dest`: the pipeline's files, params.yaml with `overrides` merged,
    a git repository when git is installed and wanted (else DVC without SCM)."""
    for name in PROJECT_FILES:
        if (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)
    for name in PROJECT_DIRS:
        if (root / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(root / name, dest / name, ignore=ignore)
    set_params(dest, overrides)
    if git and shutil.which("git"):
        subprocess.run(
            "git init -q && git add -A && "
            "git -c user.name=rnnflow -c user.email=rnnflow@localhost commit -qm copy",
            shell=True,
            cwd=dest,
            check=True,
        )
    else:
        (dest / ".dvc").mkdir(exist_ok=True)
        with open(dest / ".dvc" / "config", "a") as fh:
            fh.write("[core]\n    no_scm = true\n")
    return dest


def set_params(project: Path, overrides: dict) -> str:
    """Merge `overrides` into the project's params.yaml; return the file's text before."""
    path = project / "params.yaml"
    before = path.read_text()
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(before), overrides), sort_keys=False))
    return before


def merge(base: dict, extra: dict) -> dict:
    """`base` with `extra` merged in, nested sections key by key."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


class Check:
    """The steps run so far and what they found; written out after every step."""

    def __init__(self, project: Path, budget: float, report: Path, skip: frozenset = frozenset()):
        self.project, self.report, self.skip = project, report, skip
        self.deadline = time.monotonic() + budget
        self.steps: dict[str, dict] = {}

    def run(self, name: str, cmd: list[str], env: dict | None = None) -> dict:
        """Run one step under min(its timeout, what is left of the budget), with the copy's
        own code first on the import path."""
        paths = [str(self.project / "src"), os.environ.get("PYTHONPATH", "")]
        env = {"PYTHONPATH": os.pathsep.join(p for p in paths if p)} | (env or {})
        left = self.deadline - time.monotonic()
        limit = min(TIMEOUTS[name], left)
        if name in self.skip or left < 5:
            why = "--skip" if name in self.skip else "no time left"
            self.steps[name] = {"command": " ".join(cmd), "exit": f"skipped ({why})"}
            self.write()
            return self.steps[name]
        start = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=self.project,
            env=with_this_python(os.environ | env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own group: a timeout kills all it started
        )
        try:
            out, _ = proc.communicate(timeout=limit)
            status = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            status = "timeout"
        self.steps[name] = {
            "command": " ".join(cmd),
            "exit": status,
            "seconds": round(time.monotonic() - start, 1),
            "limit_s": round(limit),
            "tail": out[-4000:],
        }
        print(f"gpu-check {name}: exit {status} in {self.steps[name]['seconds']} s", flush=True)
        self.write()
        return self.steps[name]

    def note(self, name: str, **found) -> None:
        """Add what a step found (numbers read from its outputs) and rewrite the report; a
        skipped step found nothing."""
        if skipped(self.steps[name]):
            return
        self.steps[name].update(found)
        self.write()

    def json(self, relative: str) -> dict:
        """A JSON output of the project copy ({} if the step did not write it)."""
        try:
            return json.loads((self.project / relative).read_text())
        except (OSError, ValueError):
            return {}

    def write(self) -> None:
        write_json(self.report.with_suffix(".json"), {"steps": self.steps})
        write_text(self.report.with_suffix(".md"), to_markdown(self.steps))


def to_markdown(steps: dict[str, dict]) -> str:
    lines = ["| step | exit | seconds | found |", "|---|---|---|---|"]
    for name, step in steps.items():
        lines.append(
            f"| {name} | {step['exit']} | {step.get('seconds', '-')} | {step.get('summary', '')} |"
        )
    return "\n".join(lines) + "\n"


def gpu_check(
    root: Path,
    budget: float,
    quick: bool,
    report: Path,
    skip: frozenset = frozenset(),
    keep: Path | None = None,
) -> dict:
    """Run every step not in `skip` in a fresh copy of the project at `root` (at `keep`, left
    there, when given); return the steps."""
    python, dvc = sys.executable, [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory(prefix="rnnflow-gpu-check-") as scratch:
        tmp = keep or Path(scratch)
        project = copy_project(root, tmp / "rnnflow", QUICK if quick else {})
        check = Check(project, budget, report, skip)

        step = check.run("device", [python, "-c", PROBE])
        device = _last_json_line(step.get("tail", ""))
        on_gpu = bool(device.get("available")) and os.environ.get("RNNFLOW_DEVICE") != "cpu"
        check.note("device", found=device, summary=f"{device.get('device')}, {device}")

        check.run("data", [*dvc, "repro", "pack"])

        sections = ["--sections", "matmul,train", *(["--quick"] if quick else [])]
        bench = [python, "-m", "rnnflow.tools.bench", *sections, "--out"]
        check.run("bench", [*bench, "reports/bench_device"])
        found = check.json("reports/bench_device.json")
        check.note("bench", results=found, summary=_bench_summary(found))

        torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
        torchrun += ["--log-dir", str(tmp / "torchrun")]  # else a /tmp/torchelastic_* stays
        check.run("torchrun", [*torchrun, "-m", "stages.train", "gru"])
        timing = check.json("metrics/timing/train_gru.json")
        check.note(
            "torchrun",
            summary=f"{'nccl' if on_gpu else 'gloo'}: {timing.get('train_processes')} rank, "
            f"{timing.get('train_tokens_per_second', 0):,.0f} tok/s",
        )

        saved = set_params(project, {"train": {"processes": 2}})
        step = check.run("refuse", [python, "-m", "stages.train", "gru"])
        (project / "params.yaml").write_text(saved)
        last = ([line for line in step.get("tail", "").splitlines() if line.strip()] or [""])[-1]
        refused = step["exit"] == 2 and "train.processes" in last
        expected = on_gpu and device.get("gpus", 0) < 2
        check.note("refuse", refused=refused, ok=refused or not expected, summary=last[:160])

        records = tmp / "timeline"
        step = check.run("pipeline", [*dvc, "repro"], env={RECORDS: str(records)})
        stages = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
        run = Run("warm", step.get("seconds", 0), sorted(stages, key=lambda s: s["started"]))
        board = check.json("reports/leaderboard.json")
        parity = {r["variant"]: check.json(f"metrics/validate/{r['variant']}.json") for r in board}
        timing = {v: check.json(f"metrics/timing/train_{v}.json") for v in parity}
        check.note(
            "pipeline",
            timeline=run.to_dict(),
            leaderboard=board,
            train_tokens_per_s={v: t.get("train_tokens_per_second") for v, t in timing.items()},
            summary=f"{len(board)} variants; parity passed "
            f"{sum(bool(p.get('passed')) for p in parity.values())}/{len(parity)}"
            + (f"; best {board[0]['variant']} {board[0]['test_accuracy']:.4f}" if board else ""),
        )

        saved = set_params(project, {"train": {"precision": "bf16"}} if on_gpu else {})
        check.run("bf16", [*dvc, "repro", *(f"validate@{v}" for v in BF16_VARIANTS)])
        (project / "params.yaml").write_text(saved)
        bf16 = {
            v: {
                "parity_passed": check.json(f"metrics/validate/{v}.json").get("passed"),
                "max_abs_diff": check.json(f"metrics/validate/{v}.json").get("max_abs_diff"),
                "test_accuracy": check.json(f"metrics/eval/{v}.json").get("accuracy"),
                "tokens_per_s": check.json(f"metrics/timing/train_{v}.json").get(
                    "train_tokens_per_second"
                ),
            }
            for v in BF16_VARIANTS
        }
        check.note(
            "bf16",
            results=bf16,
            summary=", ".join(
                f"{v}: parity {'pass' if r['parity_passed'] else 'FAIL'}, test acc "
                f"{r['test_accuracy']}"
                for v, r in bf16.items()
            ),
        )

        if on_gpu:
            check.run("bench_cpu", [*bench, "reports/bench_cpu"], env={"RNNFLOW_DEVICE": "cpu"})
            found = check.json("reports/bench_cpu.json")
            check.note("bench_cpu", results=found, summary=_bench_summary(found))
    return check.steps


# Every step but `device` (what the others are judged against) can be left out.
SKIPPABLE = tuple(name for name in TIMEOUTS if name != "device")


def failed_steps(steps: dict[str, dict]) -> list[str]:
    """The steps that did not do what they are for: a non-zero exit or a timeout, except
    `refuse`, judged by whether it refused where it had to; skipped steps are not failures."""
    failed = []
    for name, step in steps.items():
        if skipped(step):
            continue
        if not (step.get("ok") if name == "refuse" else step["exit"] == 0):
            failed.append(name)
    return failed


def skipped(step: dict) -> bool:
    """Whether Check.run left the step out (--skip, or no time left): its exit says so."""
    return str(step["exit"]).startswith("skipped")


def step_names(text: str) -> frozenset:
    """--skip's value: step names separated by commas, each one of SKIPPABLE."""
    names = frozenset(n.strip() for n in text.split(",") if n.strip())
    if not names or not names <= set(SKIPPABLE):
        raise argparse.ArgumentTypeError(
            f"expected step names from {','.join(SKIPPABLE)}, got {text!r}"
        )
    return names


def _bench_summary(results: dict) -> str:
    return ", ".join(
        f"{v} {r['train_tokens_per_s']:,.0f} tok/s" for v, r in results.get("variants", {}).items()
    )


def _last_json_line(text: str) -> dict:
    for line in reversed(text.splitlines()):
        try:
            found = json.loads(line)
        except ValueError:
            continue
        if isinstance(found, dict):
            return found
    return {}


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m rnnflow.tools.gpucheck", description=__doc__)
    parser.add_argument("--budget", type=float, default=540, help="seconds for all steps")
    parser.add_argument("--quick", action="store_true", help="small data and model (smoke test)")
    parser.add_argument(
        "--out", type=non_empty, default=str(REPORTS / "gpu_check"), help="report path stem"
    )
    parser.add_argument(
        "--skip",
        type=step_names,
        default=frozenset(),
        help=f"steps not to run, comma-separated: {','.join(SKIPPABLE)}",
    )
    parser.add_argument(
        "--keep", type=non_empty, help="make the project copy here and leave it (a new folder)"
    )
    args = parser.parse_args(argv)

    def run() -> None:
        if not 0 < args.budget <= 86400:
            raise RnnflowError(f"--budget: expected seconds in (0, 86400], got {args.budget:g}")
        keep = Path(args.keep).resolve() if args.keep else None
        if keep and keep.exists():
            raise RnnflowError(f"--keep: {keep} already exists (give a new folder)")
        out = Path(args.out).resolve()
        steps = gpu_check(Path.cwd(), args.budget, args.quick, out, args.skip, keep)
        print(to_markdown(steps))
        if failed := failed_steps(steps):
            raise RnnflowError(
                f"failed: {', '.join(failed)} (each step's output ends its entry in "
                f"{out.with_suffix('.json')})"
            )

    run_cli(run, "gpu-check")


if __name__ == "__main__":
    main()
