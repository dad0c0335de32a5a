"""`make bench-ddp`: training tokens/s on 1 and on N processes, side by side in one run.

Each measurement trains the project's model (params.yaml, the packed data) with the real
loop (`train.run_epoch`, DDP on several processes) for a fixed number of batches, after
one round of warm-up. Measurements of 1 and N processes alternate, so a slow spell of the
machine hits both; the number that matters is the ratio. Writes reports/bench_ddp.{json,md}.
"""

import itertools
import os
import platform
import statistics

import torch

from rnnflow.core.atomic import write_json, write_text
from rnnflow.core.cliargs import CliParser, up_to
from rnnflow.core.config import Params, load_params
from rnnflow.core.errors import run_cli
from rnnflow.core.paths import PACKED, REPORTS
from rnnflow.runtime import host
from rnnflow.training import distributed
from rnnflow.training.train import Trainer, TrainState, run_epoch


def rank_rates(
    params: Params, variant: str, steps: int, rounds: int, threads: int | None = None
) -> list[float]:
    """On this rank (or alone): tokens/s of all ranks together, per round of `steps`
    training batches; a warm-up round first. `threads` overrides torch's CPU threads."""
    device = host.setup(params.seed)
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    with distributed.joined(device) as world:
        rates = _rates(params, variant, steps, rounds, device, world)  # DDP freed in there
    torch.set_num_threads(before)
    return rates[1:]


def _rates(params: Params, variant: str, steps: int, rounds: int, device, world) -> list[float]:
    trainer = Trainer.build(params, variant, PACKED, device, world)
    trainer.start(TrainState(), params.seed)
    rates = []
    for r in range(rounds + 1):
        trainer.train_loader.batch_sampler.set_epoch(r + 1)
        batches = list(itertools.islice(trainer.train_loader, steps))
        result = run_epoch(
            trainer.model, batches, device, trainer.optimizer, params.train.clip_norm, world=world
        )
        rates.append(result.tokens / result.seconds)
    return rates


def measure(
    params: Params, variants: list[str], processes: int, steps: int, rounds: int, repeats: int = 2
) -> dict:
    """Median tokens/s per variant of three configurations, in turn, `repeats` times: one process
    with torch's threads, one process with as many threads as each rank gets, and
    `processes` processes."""
    per_rank = host.threads_per_rank(processes)
    configs = {
        "1 process": lambda v: rank_rates(params, v, steps, rounds),
        f"1 process, {per_rank} thread(s)": lambda v: rank_rates(
            params, v, steps, rounds, per_rank
        ),
        f"{processes} processes": lambda v: distributed.launch(
            processes, rank_rates, params, v, steps, rounds, name="bench-ddp"
        ),
    }
    results = {}
    for variant in variants:
        rates: dict[str, list[float]] = {name: [] for name in configs}
        for _, (name, run) in itertools.product(range(repeats), configs.items()):
            rates[name] += run(variant)
        medians = {name: statistics.median(r) for name, r in rates.items()}
        results[variant] = {"tokens_per_s": medians, "rounds": rates}
        print(
            f"bench-ddp {variant}: " + ", ".join(f"{k} {v:,.0f} tok/s" for k, v in medians.items())
        )
    return results


def to_markdown(results: dict) -> str:
    names = list(next(iter(results["variants"].values()))["tokens_per_s"])
    one, same_threads, many = names
    lines = [
        f"| variant | {one} | {same_threads} | {many} | {many} vs {one} | {many} vs "
        f"{same_threads} |",
        "|---|---|---|---|---|---|",
    ]
    for variant, r in results["variants"].items():
        rate = r["tokens_per_s"]
        lines.append(
            f"| {variant} | {rate[one]:,.0f} | {rate[same_threads]:,.0f} | {rate[many]:,.0f} "
            f"| {rate[many] / rate[one]:.2f}x | {rate[many] / rate[same_threads]:.2f}x |"
        )
    s, m = results["settings"], results["machine"]
    lines += [
        "",
        f"- tokens/s of training (forward, backward, all-reduce, clip, Adam step) over "
        f"{s['steps']} batches of the epoch, {s['rounds']} rounds x 2 per configuration "
        f"(median), configurations in turn, after a warm-up round; the global batch is "
        f"{s['batch_size']} texts in every configuration (split across the processes)",
        f"- {m['cpu_count']} cores, {m['device']}, torch {m['torch']}, Python {m['python']}",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m rnnflow.tools.scaling", description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=up_to(64), default=2, help="DDP ranks (1-64)")
    parser.add_argument("--steps", type=up_to(100_000), default=40, help="batches per round")
    parser.add_argument("--rounds", type=up_to(1000), default=3)
    parser.add_argument("--variants", default="", help="comma-separated; default: all")
    parser.add_argument("--batch-size", type=up_to(65_536), help="instead of pack.batch_size")
    args = parser.parse_args(argv)
    run_cli(lambda: bench_ddp(args), "bench-ddp")


def bench_ddp(args) -> None:
    """Measure, then write reports/bench_ddp.{json,md} (named by --batch-size if given)."""
    params = load_params()
    if args.batch_size:
        pack = params.pack.model_copy(update={"batch_size": args.batch_size})
        params = params.model_copy(update={"pack": pack})
    variants = args.variants.split(",") if args.variants else list(params.model.variants)
    for variant in variants:
        params.variant(variant)
    results = {
        "variants": measure(params, variants, args.processes, args.steps, args.rounds),
        "settings": {
            "processes": args.processes,
            "steps": args.steps,
            "rounds": args.rounds,
            "batch_size": params.pack.batch_size,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "device": str(host.device()),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
    }
    name = "bench_ddp" + (f"_batch{args.batch_size}" if args.batch_size else "")
    write_json(REPORTS / f"{name}.json", results)
    markdown = to_markdown(results)
    write_text(REPORTS / f"{name}.md", markdown)
    print(markdown)


if __name__ == "__main__":
    main()
