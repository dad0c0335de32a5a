"""The memory-horizon sweep: accuracy against sequence length on the `longrange` task.

`make longrange` queues one DVC experiment per length (data.source=longrange, the evaluate and
gradients stages of every variant), runs them on two workers, then calls this module, which
waits for the queue and reads the results back from `dvc exp show --json`:

    reports/longrange.json   per experiment: length, and per variant test accuracy and the
                             fitted gradient decay per step (trained and at init)
    reports/longrange.md     the table
    reports/longrange.png    accuracy against length for every variant, and gradient decay
                             per step against accuracy
"""

import json
import subprocess
import time
from pathlib import Path

from rnnflow.core import plots
from rnnflow.core.atomic import write_json, write_text
from rnnflow.core.cliargs import CliParser
from rnnflow.core.errors import RnnflowError, run_cli
from rnnflow.core.paths import REPORTS

CHANCE = 0.25  # four classes, balanced


def dvc(*args: str) -> str:
    proc = subprocess.run(["dvc", *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RnnflowError(f"dvc {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return proc.stdout


def wait_for_queue(timeout: float = 4 * 3600, poll: float = 10) -> None:
    """Until nothing is queued and no worker is active (a task killed long ago can stay
    listed as Running; the workers are what run)."""
    deadline = time.monotonic() + timeout
    while True:
        status = dvc("queue", "status")
        if "Queued" not in status and "0 active" in status:
            break
        if time.monotonic() > deadline:
            raise RnnflowError(f"the DVC queue is still busy after {timeout:.0f} s")
        time.sleep(poll)
    if "Failed" in status:
        print(f"longrange: some experiments failed (`dvc queue logs NAME`):\n{status}")


def _leaf(tree: dict, *keys: str):
    for key in keys:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def collect(exp_show: list[dict]) -> list[dict]:
    """One row per longrange experiment in `dvc exp show --json` output."""
    rows = []
    for baseline in exp_show:
        for exp in baseline.get("experiments") or []:
            if (exp.get("executor") or {}).get("state", "success") != "success":
                continue  # queued, running or failed: its metrics are still the baseline's
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                params = _leaf(data, "params", "params.yaml", "data", "data") or {}
                if params.get("source") != "longrange":
                    continue
                metrics = data.get("metrics") or {}
                variants = {}
                for path, content in metrics.items():
                    name = Path(path).stem
                    values = content.get("data") or {}
                    if path.startswith("metrics/eval/"):
                        variants.setdefault(name, {})["test_accuracy"] = values.get("accuracy")
                    elif path.startswith("metrics/gradients/"):
                        entry = variants.setdefault(name, {})
                        entry["decay_per_step"] = values.get("decay_per_step")
                        entry["decay_per_step_init"] = values.get("decay_per_step_init")
                rows.append(
                    {
                        "experiment": rev.get("name") or exp.get("name"),
                        "length": params.get("length"),
                        "size": params.get("size"),
                        "variants": variants,
                    }
                )
    return sorted(rows, key=lambda r: (r["length"] or 0, r["experiment"] or ""))


def to_markdown(rows: list[dict]) -> str:
    variants = sorted({v for r in rows for v in r["variants"]})
    head = "| length | " + " | ".join(variants) + " |"
    lines = [
        "Test accuracy (gradient decay per step, trained), chance 0.25:",
        "",
        head,
        "|" + "---|" * (len(variants) + 1),
    ]
    for r in rows:
        cells = []
        for v in variants:
            m = r["variants"].get(v, {})
            acc, decay = m.get("test_accuracy"), m.get("decay_per_step")
            cells.append(
                "-" if acc is None else f"{acc:.3f}" + (f" ({decay:.2f})" if decay else "")
            )
        lines.append(f"| {r['length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    variants = sorted({v for r in rows for v in r["variants"]})
    fig, (ax1, ax2) = plots.subplots(1, 2, figsize=(12, 4.5))
    for i, v in enumerate(variants):
        pts = [
            (r["length"], r["variants"][v].get("test_accuracy")) for r in rows if v in r["variants"]
        ]
        pts = [(x, y) for x, y in pts if y is not None]
        ax1.plot(*zip(*pts, strict=True), marker="o", color=f"C{i}", label=v)
        dec = [
            (r["variants"][v].get("decay_per_step"), r["variants"][v].get("test_accuracy"))
            for r in rows
            if v in r["variants"]
        ]
        dec = [(x, y) for x, y in dec if x is not None and y is not None]
        if dec:
            ax2.scatter(*zip(*dec, strict=True), color=f"C{i}", label=v)
    ax1.axhline(CHANCE, color="k", ls="--", lw=0.8, label="chance")
    ax1.set(
        xscale="log",
        xlabel="sequence length (steps the class must be carried)",
        ylabel="test accuracy",
        ylim=(0, 1.02),
        title="Memory horizon",
    )
    ax1.legend(fontsize=8)
    ax2.axhline(CHANCE, color="k", ls="--", lw=0.8)
    ax2.set(
        xlabel="fitted decay of ||dL/dh_t|| per step back (trained)",
        ylabel="test accuracy",
        ylim=(0, 1.02),
        title="Gradient decay against accuracy",
    )
    fig.tight_layout()
    plots.save(fig, path)


def report(out_dir: Path = REPORTS) -> list[dict]:
    rows = collect(json.loads(dvc("exp", "show", "--json")))
    if not rows:
        raise RnnflowError("no longrange experiment found in `dvc exp show`; run `make longrange`")
    write_json(out_dir / "longrange.json", rows)
    write_text(out_dir / "longrange.md", to_markdown(rows))
    plot(rows, out_dir / "longrange.png")
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(
        prog="python -m rnnflow.analysis.longrange", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--no-wait", action="store_true", help="report without waiting")
    args = parser.parse_args(argv)
    if not args.no_wait:
        wait_for_queue()
    print(to_markdown(report()))


if __name__ == "__main__":
    run_cli(main, "longrange")
