"""`make bench`: every variant side by side, in one process, on the same data and sizes.

Writes reports/bench.{json,md} and logs them to MLflow. The machines are noisy: medians over
repeats after warm-up, and the numbers that matter are the ratios.
"""

import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from rnnflow import runtime, tracking
from rnnflow.atomic import write_json, write_text
from rnnflow.batching import BucketBatchSampler, PackedSplit
from rnnflow.config import Params, load_params
from rnnflow.errors import run_cli
from rnnflow.export import export_onnx
from rnnflow.models import ModelConfig, RNNClassifier
from rnnflow.pack import padding_report
from rnnflow.paths import PACKED, REPORTS
from rnnflow.variants import VARIANTS

REPEATS, BATCHES_PER_REPEAT, WARMUP = 7, 10, 3


class TutorialModel(nn.Module):
    """The reference, written the tutorial's way: one cell call per step and layer, over
    sequences all padded to the global max length, reading the state after the last step."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        kind = VARIANTS[cfg.variant].core
        cell = {"lstm": nn.LSTMCell, "gru": nn.GRUCell}.get(kind, nn.RNNCell)
        sizes = [cfg.embedding_dim] + [cfg.hidden_size] * (cfg.num_layers - 1)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim)
        self.cells = nn.ModuleList(cell(n, cfg.hidden_size) for n in sizes)
        self.head = nn.Linear(cfg.hidden_size, cfg.num_classes)
        self.lstm = kind == "lstm"

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        zeros = x.new_zeros(x.shape[0], self.head.in_features)
        state = [(zeros, zeros) if self.lstm else zeros for _ in self.cells]
        for t in range(x.shape[1]):
            inp = x[:, t]
            for i, cell in enumerate(self.cells):
                state[i] = cell(inp, state[i])
                inp = state[i][0] if self.lstm else state[i]
        return self.head(inp)


def paired_latency(a, b, rounds: int = 7, calls: int = 40, warmup: int = 20):
    """p50/p95 milliseconds of two no-argument calls, timed in alternating blocks (a's block,
    b's block, ... `rounds` times), so slow drifts of the machine hit both alike. Blocks, not
    single calls: each runtime's thread pool spins for a while after a call, which would
    slow the other one's next call."""
    times: dict[int, list[float]] = {0: [], 1: []}
    for fn in (a, b):
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for which, fn in enumerate((a, b)):
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                times[which].append((time.perf_counter() - start) * 1e3)
    return tuple(
        {"p50": float(np.percentile(t, 50)), "p95": float(np.percentile(t, 95))}
        for t in times.values()
    )


def _batches(split: PackedSplit, batch_size: int, bucketed: bool, pool: int, count: int):
    """`count` training batches as tensors: bucketed and padded to their own max, or random
    and padded to the global max (the tutorial's way)."""
    if bucketed:
        order = list(BucketBatchSampler(split.lengths, batch_size, pool, seed=0))
    else:
        perm = np.random.default_rng(0).permutation(len(split))
        order = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    out = []
    for index in order[:count]:
        tokens, lengths, labels = split.batch(index)
        if not bucketed:
            full = np.zeros((len(index), split.tokens.shape[1]), dtype=tokens.dtype)
            full[:, : tokens.shape[1]] = tokens
            tokens = full
        out.append(tuple(torch.from_numpy(a.astype(np.int64)) for a in (tokens, lengths, labels)))
    return out


def _train_step(model: nn.Module):
    """A closure doing forward + backward + optimizer step on one batch."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(x, n, y):
        optimizer.zero_grad(set_to_none=True)
        loss_fn(model(x, n), y).backward()
        optimizer.step()

    return step


def train_throughput(models: dict[str, tuple[nn.Module, list]]) -> dict[str, float]:
    """Median real tokens/s of each (model, batches), forward + backward + step.

    Measurements are interleaved: every repeat times each model in turn, so a slow spell of
    the machine hits all of them alike instead of skewing one ratio.
    """
    steps = {name: _train_step(model) for name, (model, _) in models.items()}
    for name, (_, batches) in models.items():
        for x, n, y in batches[:WARMUP]:
            steps[name](x, n, y)
    rates: dict[str, list[float]] = {name: [] for name in models}
    for r in range(REPEATS):
        for name, (_, batches) in models.items():
            chunk = batches[r * BATCHES_PER_REPEAT : (r + 1) * BATCHES_PER_REPEAT] or batches
            start = time.perf_counter()
            for x, n, y in chunk:
                steps[name](x, n, y)
            tokens = sum(int(n.sum()) for _, n, _ in chunk)
            rates[name].append(tokens / (time.perf_counter() - start))
    return {name: statistics.median(r) for name, r in rates.items()}


def run_bench(params: Params, packed_dir: Path = PACKED) -> dict:
    """Measure everything the bench reports; returns the JSON-able results."""
    runtime.setup(params.seed)
    train = PackedSplit.load(packed_dir / "train.npz")
    vocab = int(train.tokens.max()) + 1
    classes = int(train.labels.max()) + 1
    bs, pool = params.pack.batch_size, params.pack.bucket_pool
    count = WARMUP + REPEATS * BATCHES_PER_REPEAT
    ours_batches = _batches(train, bs, True, pool, count)
    ref_batches = _batches(train, bs, False, pool, count)
    results: dict = {
        "variants": {},
        "settings": {
            "batch_size": bs,
            "repeats": REPEATS,
            "batches_per_repeat": BATCHES_PER_REPEAT,
        },
    }
    configs = {
        v: ModelConfig.of(v, params.variant(v), vocab, classes) for v in params.model.variants
    }
    torch.manual_seed(params.seed)
    contenders = {}
    for variant, cfg in configs.items():
        contenders[variant] = (RNNClassifier(cfg), ours_batches)
        contenders[f"{variant}/reference"] = (TutorialModel(cfg), ref_batches)
    rates = train_throughput(contenders)
    rng = np.random.default_rng(0)
    # the same batches for every variant; eager and onnxruntime calls alternate, so the
    # machine's noise hits both alike
    latency_batches = {b: train.batch(rng.choice(len(train), size=b)) for b in (1, 64)}
    for variant, cfg in configs.items():
        ours, reference = rates[variant], rates[f"{variant}/reference"]
        model = RNNClassifier(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, Path(tmp) / "m.onnx", params.export.opset)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(
                str(Path(tmp) / "m.onnx"), options, providers=["CPUExecutionProvider"]
            )
        lat = {}
        for b, (tokens, lengths, _) in latency_batches.items():
            x, n = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(lengths)
            feed = {"tokens": x.numpy(), "lengths": n.numpy()}
            with torch.no_grad():
                eager, onnx = paired_latency(
                    lambda m=model, x=x, n=n: m(x, n),
                    lambda s=session, f=feed: s.run(None, f),
                )
            lat[f"batch{b}"] = {
                "torch_eager_ms": eager,
                "onnxruntime_ms": onnx,
                "speedup_p50": eager["p50"] / onnx["p50"],
            }
        results["variants"][variant] = {
            "train_tokens_per_s": ours,
            "reference_tokens_per_s": reference,
            "speedup_vs_reference": ours / reference,
            "latency": lat,
        }
        print(
            f"bench {variant}: {ours:,.0f} tok/s vs reference {reference:,.0f} "
            f"({ours / reference:.1f}x); onnx batch-1 speedup {lat['batch1']['speedup_p50']:.1f}x"
        )
    v = results["variants"]
    results["cell_vs_module_time_ratio"] = {
        f"{cell}/{mod}": v[mod]["train_tokens_per_s"] / v[cell]["train_tokens_per_s"]
        for cell, mod in (("rnn_cell", "rnn"), ("rnn_cell_deep", "rnn_deep"))
        if cell in v and mod in v
    }
    results["padding"] = padding_report(train.lengths, bs, pool, seed=0)
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["machine"] = {
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cuda": torch.cuda.is_available(),
    }
    return results


def to_markdown(results: dict) -> str:
    """The bench results as markdown tables."""
    lines = [
        "| variant | train tok/s | reference tok/s | speedup | ORT vs eager, batch 1 (p50) "
        "| ORT vs eager, batch 64 (p50) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["variants"].items():
        cells = [
            name,
            f"{r['train_tokens_per_s']:,.0f}",
            f"{r['reference_tokens_per_s']:,.0f}",
            f"{r['speedup_vs_reference']:.2f}x",
        ]
        for b in ("batch1", "batch64"):
            lat = r["latency"][b]
            cells.append(
                f"{lat['torch_eager_ms']['p50']:.3f} -> "
                f"{lat['onnxruntime_ms']['p50']:.3f} ms ({lat['speedup_p50']:.1f}x)"
            )
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for pair, ratio in results["cell_vs_module_time_ratio"].items():
        lines.append(f"- time ratio {pair}: {ratio:.2f}")
    pad = results["padding"]
    lines.append(
        f"- padded tokens per real token: {pad['bucketed']['pad_per_real_token']:.1%} bucketed, "
        f"{pad['global_max']['pad_per_real_token']:.1%} padded to the global max"
    )
    m = results["machine"]
    lines.append(
        f"- peak RSS {results['peak_rss_mb']:.0f} MB; {m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, "
        f"onnxruntime {m['onnxruntime']}, Python {m['python']}"
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    """Run the bench on data/packed (run `dvc repro pack` first) and write the reports."""
    params = load_params()
    results = run_bench(params)
    write_json(REPORTS / "bench.json", results)
    md = to_markdown(results)
    write_text(REPORTS / "bench.md", md)
    print(md)
    with tracking.stage_run("bench", run_name="bench", tags={"rnnflow.kind": "bench"}):
        import mlflow

        mlflow.log_artifact(str(REPORTS / "bench.md"))
        mlflow.log_dict(json.loads((REPORTS / "bench.json").read_text()), "bench.json")


if __name__ == "__main__":
    run_cli(main, "bench")
