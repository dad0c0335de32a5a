"""`make bench`: what training, inference and the data stages cost, side by side in one run.

Sections (`--sections`, all by default), written to reports/bench.{json,md}:
- matmul: the machine's fp32 matrix-multiply limit in GFLOP/s (torch.utils.benchmark, at
  torch's thread count): the roof the training numbers are read against.
- train: per variant, real tokens/s of the training loop itself (`train.run_epoch`: forward,
  backward, clipping, AdamW) four ways on the same data and sizes: `now`; `nn`, now with the
  fused CPU kernels off (rnnflow.model.fused: torch's own recurrence, max pooling and
  dropout instead); `before` this release (the kernels off, packed input for the nn.*
  kinds, Adam's for-loop implementation, batches of 64); and the
  `tutorial` way (one cell call per step and layer, every sequence padded to the global max,
  no buckets). With the FLOPs a token costs (forward and backward of every recurrent
  matmul), `now` becomes train_gflops and share_of_matmul_limit. On CUDA, also the share of
  a step's wall time the GPU computes (the rest is launch overhead). The models are the
  variants without the n-gram bag (`model.ngram_bag`): this section measures the recurrence.
  Where params give a bag (the char level), each variant also trains with it twice, in
  interleaved rounds of their own: `bag`, as the pipeline does, and `bag_ops`, the bag
  through its module's own ops instead of its kernel (the same bits): bag_kernel_speedup.
- denormals: per variant, the pipeline's model (the bag included) trained for several
  epochs twice from the same seed, epoch by epoch in turns: with denormal floats as IEEE
  gives them, and flushed to zero as training does (fused.denormals_flushed). Adam's first
  moment decays into the denormal range where gradients stay zero; tokens/s of the later
  epochs both ways, the denormals left in Adam's moments, and whether the weights agree.
- clip: per variant, gradient clipping on the pipeline's model's gradients of one batch,
  scaled to a total norm of half train.clip_norm (below it, as in most steps after the
  first epochs): microseconds of train.clip_gradients and of nn.utils.clip_grad_norm_ (the
  same bits), in alternating blocks. Where the norm is above, both do the same work.
- latency: PyTorch eager vs onnxruntime on the same exported model, batch 1 and 64.
- size: prepare, tokenize, pack and one epoch of gru on generated corpora (10k, 100k and 1M
  texts by default): seconds and peak RSS of each stage's process.

Timing: training contenders are measured in interleaved rounds (each round times every
contender on its next chunk of batches), medians over rounds after a warm-up round, so a slow
spell of the machine hits all contenders alike; torch.utils.benchmark's blocked_autorange
times one statement at a time, which cannot interleave, and its Timer runs 1 thread unless
told otherwise. The matmul limit, a single statement, uses torch.utils.benchmark.
"""

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rnnflow.core.atomic import write_json, write_text
from rnnflow.core.cliargs import CliParser, non_empty
from rnnflow.core.config import Params, load_params
from rnnflow.core.errors import RnnflowError, run_cli
from rnnflow.core.paths import PACKED, REPORTS
from rnnflow.core.variants import VARIANTS
from rnnflow.data.batching import BucketBatchSampler, PackedSplit, make_loader
from rnnflow.data.pack import padding_report
from rnnflow.model import fused
from rnnflow.model.network import ModelConfig, RNNClassifier
from rnnflow.runtime import host
from rnnflow.runtime.timeline import RECORDS
from rnnflow.training.graphs import GraphedSteps, graphable
from rnnflow.training.train import clip_gradients, epoch_schedule, make_optimizer, run_epoch

SECTIONS = ("matmul", "train", "denormals", "clip", "latency", "size")
ROUNDS, BATCHES_PER_ROUND = 5, 12
BEFORE_BATCH = 64  # pack.batch_size before this release
DENORMAL_EPOCHS = 6  # Adam's first moment reaches the denormals after ~700 zero-gradient steps
SIZES = (10_000, 100_000, 1_000_000)


# ----------------------------------------------------------------------------- the roof


def matmul_limit(device: torch.device, seconds: float = 1.0) -> float:
    """GFLOP/s of a large fp32 matrix product on `device` (TF32 off), at torch's threads."""
    from torch.utils import benchmark

    n = 4096 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        timer = benchmark.Timer(
            "a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads()
        )
        median = timer.blocked_autorange(min_run_time=seconds).median
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    return 2 * n**3 / median / 1e9


def train_flops_per_token(cfg: ModelConfig) -> float:
    """FLOPs of one training step per real token: every recurrent layer's input and hidden
    matmuls (2 * gates * hidden * (inputs + hidden) per direction), forward plus backward
    (input and weight gradients: twice the forward). Embedding and head are left out."""
    gates = {"rnn": 1, "rnn_cell": 1, "gru": 3, "lstm": 4}[VARIANTS[cfg.variant].core]
    directions = 2 if cfg.bidirectional else 1
    total, inputs = 0, cfg.embedding_dim
    for _ in range(cfg.num_layers):
        total += directions * 2 * gates * cfg.hidden_size * (inputs + cfg.hidden_size)
        inputs = cfg.hidden_size * directions
    return 3.0 * total


# ------------------------------------------------------------------------ the contenders


def recurrent_config(params: Params, variant: str, vocab: int, classes: int) -> ModelConfig:
    """A variant's model as params.yaml gives it, less the n-gram bag."""
    return replace(ModelConfig.of(variant, params.variant(variant), vocab, classes), ngram_bag=())


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


def contenders(params: Params, train: PackedSplit, device: torch.device) -> dict:
    """name -> (model, optimizer, batches): now, nn, before and tutorial for every variant."""
    vocab, classes = int(train.tokens.max()) + 1, int(train.labels.max()) + 1
    bs, pool = params.pack.batch_size, params.pack.bucket_pool
    count = (ROUNDS + 1) * BATCHES_PER_ROUND
    batches = {
        "now": _batches(train, bs, True, pool, count),
        "before": _batches(train, BEFORE_BATCH, True, pool, count),
        "tutorial": _batches(train, BEFORE_BATCH, False, pool, count),
    }
    batches["nn"] = batches["now"]
    out = {}
    for variant in params.model.variants:
        cfg = recurrent_config(params, variant, vocab, classes)
        for way in ("now", "nn", "before", "tutorial"):
            torch.manual_seed(params.seed)
            model = (TutorialModel(cfg) if way == "tutorial" else RNNClassifier(cfg)).to(device)
            if way == "before" and hasattr(model.core, "packed"):
                model.core.packed = True  # the packed path every nn.* kind took before
            # now, nn: train.py's optimizer; before, tutorial: Adam's defaults, as it was
            if way in ("now", "nn"):
                optimizer = make_optimizer(model.parameters(), params.train)
            else:
                optimizer = torch.optim.Adam(model.parameters(), lr=params.train.lr)
            if way in ("now", "nn") and params.train.cuda_graphs and graphable(model, device, 1):
                model = GraphedSteps(model)  # as train.py does on CUDA
            out[f"{variant}/{way}"] = (model, optimizer, batches[way])
    return out


def bag_contenders(params: Params, train: PackedSplit, device: torch.device) -> dict:
    """name -> (model, optimizer, batches): bag and bag_ops for every variant whose params
    give an n-gram bag (none on words). Timed in rounds of their own: after the tutorial's
    batches, padded to the global max, the next contender starts on a cold cache."""
    vocab, classes = int(train.tokens.max()) + 1, int(train.labels.max()) + 1
    count = (ROUNDS + 1) * BATCHES_PER_ROUND
    batches = _batches(train, params.pack.batch_size, True, params.pack.bucket_pool, count)
    out = {}
    for variant in params.model.variants:
        cfg = ModelConfig.of(variant, params.variant(variant), vocab, classes)
        for way in ("bag", "bag_ops") if cfg.ngram_bag else ():
            torch.manual_seed(params.seed)
            model = RNNClassifier(cfg).to(device)
            model.bag.use_kernel = way == "bag"
            optimizer = make_optimizer(model.parameters(), params.train)
            out[f"{variant}/{way}"] = (model, optimizer, batches)
    return out


def train_rates(runners: dict, device: torch.device, clip_norm: float) -> dict[str, float]:
    """Median real tokens/s per contender: a warm-up chunk each, then ROUNDS interleaved
    rounds, each timing every contender on its next chunk of batches with run_epoch."""
    rates: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(ROUNDS + 1):
        for name, (model, optimizer, batches) in runners.items():
            chunk = batches[r * BATCHES_PER_ROUND : (r + 1) * BATCHES_PER_ROUND] or batches
            if device.type == "cuda":
                torch.cuda.synchronize()
            # now, bag: as fit() trains (denormals flushed); nn, before, tutorial: torch's own
            kernels = name.endswith(("/now", "/bag", "/bag_ops"))
            with fused.denormals_flushed(device) if kernels else fused.off():
                result = run_epoch(model, chunk, device, optimizer, clip_norm)
            if r:  # round 0 warms up
                rates[name].append(result.tokens / result.seconds)
    return {name: statistics.median(r) for name, r in rates.items()}


def gpu_busy_share(model, optimizer, batches, device, clip_norm: float) -> float | None:
    """On CUDA: the GPU's kernel time over the wall time of some training steps (1.0: the
    GPU never waits; low: launch-bound, the CPU cannot feed it kernels fast enough)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    run_epoch(model, batches[:3], device, optimizer, clip_norm)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        run_epoch(model, batches[:BATCHES_PER_ROUND], device, optimizer, clip_norm)
        torch.cuda.synchronize()
        wall = time.perf_counter() - start
    kernel_us = sum(e.self_device_time_total for e in prof.key_averages())
    return float(kernel_us / 1e6 / wall)


def cuda_graph_gain(model, batch, device, steps: int = 50) -> dict | None:
    """On CUDA: tokens/s of one fixed training batch, eager vs the forward and backward
    captured once as CUDA graphs (torch.cuda.make_graphed_callables) and replayed; Adam's
    fused step runs outside the graphs in both. What a graph would save a launch-bound loop."""
    if device.type != "cuda":
        return None
    x, lengths, y = (t.to(device) for t in batch)
    tokens = int(lengths.sum())
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = nn.CrossEntropyLoss()

    def rate(forward) -> float:
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                start = time.perf_counter()
            optimizer.zero_grad(set_to_none=False)
            loss_fn(forward(x, lengths), y).backward()
            optimizer.step()
        torch.cuda.synchronize()
        return steps * tokens / (time.perf_counter() - start)

    model.train()
    eager = rate(model)
    try:
        graphed = torch.cuda.make_graphed_callables(model, (x, lengths))
        replayed = rate(graphed)
    except Exception as err:  # capture can fail on ops that sync with the host
        return {"eager_tokens_per_s": eager, "error": f"{type(err).__name__}: {err}"[:300]}
    return {
        "eager_tokens_per_s": eager,
        "graph_tokens_per_s": replayed,
        "speedup": replayed / eager,
        "batch": list(x.shape),
    }


def bench_train(params: Params, device: torch.device, limit: float | None) -> dict:
    """The train section: tokens/s now, before and the tutorial's way, GFLOP/s now."""
    train = PackedSplit.load(PACKED / "train.npz")
    runners = contenders(params, train, device)
    rates = train_rates(runners, device, params.train.clip_norm)
    rates |= train_rates(bag_contenders(params, train, device), device, params.train.clip_norm)
    vocab, classes = int(train.tokens.max()) + 1, int(train.labels.max()) + 1
    out = {}
    for variant in params.model.variants:
        cfg = recurrent_config(params, variant, vocab, classes)
        flops = train_flops_per_token(cfg)
        now = rates[f"{variant}/now"]
        row = {
            "train_tokens_per_s": now,
            "nn_tokens_per_s": rates[f"{variant}/nn"],
            "before_tokens_per_s": rates[f"{variant}/before"],
            "tutorial_tokens_per_s": rates[f"{variant}/tutorial"],
            "speedup_vs_nn": now / rates[f"{variant}/nn"],
            "speedup_vs_before": now / rates[f"{variant}/before"],
            "speedup_vs_tutorial": now / rates[f"{variant}/tutorial"],
            "train_flops_per_token": flops,
            "train_gflops": now * flops / 1e9,
        }
        if limit:
            row["share_of_matmul_limit"] = row["train_gflops"] / limit
        if f"{variant}/bag" in rates:
            row["bag_tokens_per_s"] = rates[f"{variant}/bag"]
            row["bag_ops_tokens_per_s"] = rates[f"{variant}/bag_ops"]
            row["bag_kernel_speedup"] = row["bag_tokens_per_s"] / row["bag_ops_tokens_per_s"]
        busy = gpu_busy_share(*runners[f"{variant}/now"], device, params.train.clip_norm)
        if busy is not None:
            row["gpu_busy_share"] = busy
            batches = runners[f"{variant}/now"][2]
            median = sorted(batches, key=lambda b: b[0].shape[1])[len(batches) // 2]
            torch.manual_seed(params.seed)
            row["cuda_graph"] = cuda_graph_gain(RNNClassifier(cfg).to(device), median, device)
        out[variant] = row
        print(
            f"bench train {variant}: {now:,.0f} tok/s ({row['speedup_vs_nn']:.2f}x nn.*, "
            f"{row['speedup_vs_before']:.2f}x before, "
            f"{row['speedup_vs_tutorial']:.2f}x tutorial), {row['train_gflops']:.1f} GFLOP/s"
            + (
                f"; with the bag {row['bag_kernel_speedup']:.2f}x"
                if "bag_tokens_per_s" in row
                else ""
            ),
            flush=True,
        )
    return out


# ---------------------------------------------------------------------------- denormals


def denormal_count(optimizer: torch.optim.Optimizer) -> int:
    """Elements of Adam's moments that are denormal floats (nonzero, below 1.2e-38)."""
    tiny = torch.finfo(torch.float32).tiny
    return sum(
        int(((t != 0) & (t.abs() < tiny)).sum())
        for state in optimizer.state.values()
        for name, t in state.items()
        if name in ("exp_avg", "exp_avg_sq")
    )


def bench_denormals(params: Params, device: torch.device, epochs: int) -> dict:
    """The denormals section: per variant, two copies of the pipeline's model and Adam from
    the same seed trained on the same batches (train.py's loader, schedule and smoothing),
    epoch by epoch in turns (which goes first alternates): `ieee`, denormals as they come,
    and `flushed`, as fit() trains. Tokens/s of each epoch both ways; the speedup is the
    median over the second half of the epochs, when the moments have had time to decay."""
    train = PackedSplit.load(PACKED / "train.npz")
    vocab, classes = int(train.tokens.max()) + 1, int(train.labels.max()) + 1
    settings, batch = params.train, params.pack.batch_size
    loader = make_loader(train, batch, params.pack.bucket_pool, shuffle=True, seed=params.seed)
    steps, out = len(loader), {}
    for variant in params.model.variants:
        cfg = ModelConfig.of(variant, params.variant(variant), vocab, classes)
        runs = {}
        for way in ("ieee", "flushed"):
            torch.manual_seed(params.seed)
            model = RNNClassifier(cfg).to(device)
            runs[way] = (model, make_optimizer(model.parameters(), settings), [])
        for epoch in range(1, epochs + 1):
            loader.batch_sampler.set_epoch(epoch)
            schedule = epoch_schedule(settings, (epoch - 1) * steps, steps * settings.epochs)
            for way in ("ieee", "flushed") if epoch % 2 else ("flushed", "ieee"):
                model, adam, rates = runs[way]
                torch.manual_seed(params.seed + epoch)  # the same dropout both ways
                with fused.denormals_flushed(device) if way == "flushed" else nullcontext():
                    result = run_epoch(
                        model,
                        loader,
                        device,
                        adam,
                        settings.clip_norm,
                        label_smoothing=settings.label_smoothing,
                        lr_at=schedule,
                    )
                rates.append(result.tokens / result.seconds)
        (a, adam_a, ieee), (b, adam_b, flushed) = runs["ieee"], runs["flushed"]
        late = slice(epochs // 2, None)
        pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
        row = {
            "epochs": epochs,
            "steps": epochs * steps,
            "ieee_tokens_per_s": ieee,
            "flushed_tokens_per_s": flushed,
            "ieee_late_tokens_per_s": statistics.median(ieee[late]),
            "flushed_late_tokens_per_s": statistics.median(flushed[late]),
            "ieee_denormal_moments": denormal_count(adam_a),
            "flushed_denormal_moments": denormal_count(adam_b),
            "weights_max_abs_diff": max(float((x - y).abs().max()) for x, y in pairs),
        }
        row["speedup"] = row["flushed_late_tokens_per_s"] / row["ieee_late_tokens_per_s"]
        out[variant] = row
        print(
            f"bench denormals {variant}: flushed {row['speedup']:.2f}x IEEE over epochs "
            f"{epochs // 2 + 1}-{epochs}; {row['ieee_denormal_moments']:,} denormal moments "
            f"against {row['flushed_denormal_moments']:,}; "
            f"weights {row['weights_max_abs_diff']:.1e} apart",
            flush=True,
        )
    return out


def bench_clip(params: Params, device: torch.device, blocks: int = 7, calls: int = 50) -> dict:
    """The clip section: per variant, the median microseconds of clip_gradients and of
    clip_grad_norm_ on the same gradients (total norm half train.clip_norm, so unclipped),
    over alternating blocks of `calls` calls."""
    train = PackedSplit.load(PACKED / "train.npz")
    vocab, classes = int(train.tokens.max()) + 1, int(train.labels.max()) + 1
    batch = _batches(train, params.pack.batch_size, True, params.pack.bucket_pool, 1)[0]
    clip_norm, out = params.train.clip_norm, {}
    ways = {
        "now": lambda ps: clip_gradients(ps, clip_norm),
        "stock": lambda ps: nn.utils.clip_grad_norm_(ps, clip_norm, foreach=True),
    }
    for variant in params.model.variants:
        cfg = ModelConfig.of(variant, params.variant(variant), vocab, classes)
        torch.manual_seed(params.seed)
        model = RNNClassifier(cfg).to(device).train()
        x, lengths, y = (t.to(device) for t in batch)
        nn.functional.cross_entropy(model(x, lengths), y).backward()
        ps = [p for p in model.parameters() if p.grad is not None]
        scale = 0.5 * clip_norm / float(nn.utils.get_total_norm([p.grad for p in ps]))
        for p in ps:
            p.grad.mul_(scale)
        times: dict[str, list[float]] = {way: [] for way in ways}
        for _ in range(blocks):
            for way, clip in ways.items():
                start = time.perf_counter()
                for _ in range(calls):
                    clip(ps)
                times[way].append((time.perf_counter() - start) / calls * 1e6)
        now, stock = (statistics.median(times[w]) for w in ways)
        out[variant] = {"now_us": now, "stock_us": stock, "speedup": stock / now}
        print(f"bench clip {variant}: {stock:.0f} -> {now:.0f} us", flush=True)
    return out


# ---------------------------------------------------------------------------- inference


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


def bench_latency(params: Params) -> dict:
    """Eager PyTorch vs onnxruntime on the same exported model and the same batches."""
    import onnxruntime as ort

    from rnnflow.shipping.export import export_onnx

    train = PackedSplit.load(PACKED / "train.npz")
    vocab, classes = int(train.tokens.max()) + 1, int(train.labels.max()) + 1
    rng = np.random.default_rng(0)
    batches = {b: train.batch(rng.choice(len(train), size=b)) for b in (1, 64)}
    out = {}
    for variant in params.model.variants:
        torch.manual_seed(params.seed)
        model = RNNClassifier(ModelConfig.of(variant, params.variant(variant), vocab, classes))
        model.eval()
        with tempfile.TemporaryDirectory() as tmp:
            export_onnx(model, Path(tmp) / "m.onnx", params.export.opset)
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(
                str(Path(tmp) / "m.onnx"), options, providers=["CPUExecutionProvider"]
            )
        rows = {}
        for b, (tokens, lengths, _) in batches.items():
            x, n = torch.from_numpy(tokens.astype(np.int64)), torch.from_numpy(lengths)
            feed = {"tokens": x.numpy(), "lengths": n.numpy()}
            with torch.no_grad():
                eager, onnx = paired_latency(
                    lambda m=model, x=x, n=n: m(x, n),
                    lambda s=session, f=feed: s.run(None, f),
                )
            rows[f"batch{b}"] = {
                "torch_eager_ms": eager,
                "onnxruntime_ms": onnx,
                "speedup_p50": eager["p50"] / onnx["p50"],
            }
        out[variant] = rows
        print(f"bench latency {variant}: ORT {rows['batch1']['speedup_p50']:.1f}x at batch 1")
    return out


# ------------------------------------------------------------------------ corpus size


WORDS = 2000  # the generated corpus' vocabulary
CLASSES = 4


def generate_corpus(path: Path, texts: int, seed: int) -> None:
    """A labelled csv of `texts` rows: 4 classes, 5-15 words each, drawn from a Zipf-like
    vocabulary that each class shifts, so there is something to learn. Written in chunks."""
    rng = np.random.default_rng(seed)
    words = np.array([f"w{i}" for i in range(WORDS)])
    weights = 1.0 / np.arange(1, WORDS + 1)
    shifted = [np.roll(weights, 37 * c) for c in range(CLASSES)]
    probs = [w / w.sum() for w in shifted]
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("text,label\n")
        for start in range(0, texts, 50_000):
            n = min(50_000, texts - start)
            labels = rng.integers(CLASSES, size=n)
            lengths = rng.integers(5, 16, size=n)
            lines = []
            for label, length in zip(labels, lengths, strict=True):
                ids = rng.choice(WORDS, size=length, p=probs[label])
                lines.append(f"{' '.join(words[ids])},c{label}\n")
            fh.write("".join(lines))


def _stage(cmd: list[str], cwd: Path, env: dict) -> dict:
    """Run one stage process: its wall seconds and its own peak RSS (MB), which the stage
    records in its timeline entry (rnnflow.runtime.timeline)."""
    with tempfile.TemporaryDirectory() as records:
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env | {RECORDS: records}, capture_output=True)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace").strip().splitlines()[-1:]
            raise RnnflowError(f"bench size: {' '.join(cmd)} failed: {' '.join(tail)}")
        (record,) = [json.loads(p.read_text()) for p in Path(records).glob("*.json")]
    return {"seconds": seconds, "peak_rss_mb": record["peak_rss_mb"]}


def bench_size(params: Params, sizes: tuple[int, ...]) -> dict:
    """prepare, tokenize, pack and one epoch of gru at each corpus size, each stage its own
    (cold) process, in a fresh copy of the project."""
    import yaml

    from rnnflow.tools.gpucheck import CHECKOUT, copy_project, merge

    stages = ("prepare", "tokenize", "pack", "train")
    out = {}
    for size in sizes:
        with tempfile.TemporaryDirectory(prefix="rnnflow-size-") as tmp:
            project = Path(tmp) / "project"
            overrides = {
                "data": {"source": "csv", "path": "data/input/generated.csv"},
                "tokenize": {"level": "word"},
                "train": {"epochs": 1, "processes": 1},
                "model": {"variants": {"gru": params.model.variants.get("gru") or {}}},
            }
            everything = merge(params.model_dump(), overrides)
            everything["model"]["variants"] = overrides["model"]["variants"]
            copy_project(CHECKOUT, project, everything, git=False)
            generate_corpus(project / "data/input/generated.csv", size, params.seed)
            env = os.environ | {
                "RNNFLOW_STAGE_SERVER": "0",  # each stage's own process, own peak RSS
                "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db",
            }
            row = {}
            for stage in stages:
                cmd = [sys.executable, "-m", f"stages.{stage}"] + (
                    ["gru"] if stage == "train" else []
                )
                row[stage] = _stage(cmd, project, env)
            tokens = yaml.safe_load((project / "data/reports/pack.json").read_text())
            row["train_tokens"] = tokens["splits"]["train"]["tokens"]
        out[str(size)] = row
        print(
            f"bench size {size:,}: "
            + ", ".join(
                f"{s} {row[s]['seconds']:.1f} s / {row[s]['peak_rss_mb']:.0f} MB" for s in stages
            ),
            flush=True,
        )
    return out


# ------------------------------------------------------------------------------- report


def run_bench(params: Params, sections: tuple[str, ...], sizes: tuple[int, ...]) -> dict:
    """Measure the chosen sections; returns the JSON-able results."""
    device = host.setup(params.seed)
    results: dict = {"sections": list(sections)}
    limit = None
    if "matmul" in sections:
        limit = matmul_limit(device)
        results["matmul_limit_gflops"] = limit
        print(f"bench matmul: {limit:.0f} GFLOP/s fp32 on {device}", flush=True)
    if "train" in sections:
        results["variants"] = bench_train(params, device, limit)
        train = PackedSplit.load(PACKED / "train.npz")
        results["padding"] = padding_report(
            train.lengths, params.pack.batch_size, params.pack.bucket_pool, seed=0
        )
    if "denormals" in sections:
        results["denormals"] = bench_denormals(params, device, DENORMAL_EPOCHS)
    if "clip" in sections:
        results["clip"] = bench_clip(params, device)
    if "latency" in sections:
        results["latency"] = bench_latency(params)
    if "size" in sections:
        results["size"] = bench_size(params, sizes)
    results["settings"] = {
        "batch_size": params.pack.batch_size,
        "before_batch_size": BEFORE_BATCH,
        "rounds": ROUNDS,
        "batches_per_round": BATCHES_PER_ROUND,
        "hidden_size": params.model.defaults.hidden_size,
        "denormal_epochs": DENORMAL_EPOCHS,
    }
    results["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results["machine"] = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(0) if device.type == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    return results


def to_markdown(results: dict) -> str:
    """The bench results as markdown tables."""
    lines = []
    limit = results.get("matmul_limit_gflops")
    if "variants" in results:
        lines += [
            "| variant | now tok/s | now vs nn.* | before tok/s | now vs before | tutorial tok/s "
            "| now vs tutorial | GFLOP/s | share of matmul limit |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name, r in results["variants"].items():
            share = r.get("share_of_matmul_limit")
            lines.append(
                f"| {name} | {r['train_tokens_per_s']:,.0f} | {r['speedup_vs_nn']:.2f}x "
                f"| {r['before_tokens_per_s']:,.0f} "
                f"| {r['speedup_vs_before']:.2f}x | {r['tutorial_tokens_per_s']:,.0f} "
                f"| {r['speedup_vs_tutorial']:.2f}x | {r['train_gflops']:.1f} "
                f"| {'-' if share is None else f'{share:.2f}'} |"
            )
        bags = {name: r for name, r in results["variants"].items() if "bag_tokens_per_s" in r}
        if bags:
            lines += [
                "",
                "| variant | with the bag tok/s | the bag's own ops tok/s | the bag's kernel |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {name} | {r['bag_tokens_per_s']:,.0f} | {r['bag_ops_tokens_per_s']:,.0f} "
                f"| {r['bag_kernel_speedup']:.2f}x |"
                for name, r in bags.items()
            ]
        lines.append("")
    if "denormals" in results:
        lines += [
            "| variant | epochs | IEEE tok/s (later epochs) | flushed tok/s | flushed vs IEEE "
            "| denormal moments, IEEE / flushed | weights apart |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, r in results["denormals"].items():
            lines.append(
                f"| {name} | {r['epochs']} | {r['ieee_late_tokens_per_s']:,.0f} "
                f"| {r['flushed_late_tokens_per_s']:,.0f} "
                f"| {r['speedup']:.2f}x | {r['ieee_denormal_moments']:,} / "
                f"{r['flushed_denormal_moments']:,} | {r['weights_max_abs_diff']:.1e} |"
            )
        lines.append("")
    if "clip" in results:
        lines += [
            "| variant | clip_grad_norm_ us | clip_gradients us | speedup |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {r['stock_us']:.0f} | {r['now_us']:.0f} | {r['speedup']:.2f}x |"
            for name, r in results["clip"].items()
        ]
        lines.append("")
    if limit:
        lines.append(f"- fp32 matmul limit: {limit:.0f} GFLOP/s")
    if "padding" in results:
        pad = results["padding"]
        lines.append(
            f"- padded tokens per real token: {pad['bucketed']['pad_per_real_token']:.1%} "
            f"bucketed, {pad['global_max']['pad_per_real_token']:.1%} padded to the global max"
        )
    if "latency" in results:
        lines += [
            "",
            "| variant | ORT vs eager, batch 1 (p50) | ORT vs eager, batch 64 (p50) |",
            "|---|---|---|",
        ]
        for name, rows in results["latency"].items():
            cells = [
                f"{rows[b]['torch_eager_ms']['p50']:.3f} -> {rows[b]['onnxruntime_ms']['p50']:.3f}"
                f" ms ({rows[b]['speedup_p50']:.1f}x)"
                for b in ("batch1", "batch64")
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "size" in results:
        stages = ("prepare", "tokenize", "pack", "train")
        lines += [
            "",
            "| texts | " + " | ".join(f"{s} s / peak MB" for s in stages) + " |",
            "|---|" + "---|" * len(stages),
        ]
        for size, row in results["size"].items():
            cells = [f"{row[s]['seconds']:.1f} / {row[s]['peak_rss_mb']:.0f}" for s in stages]
            lines.append(f"| {int(size):,} | " + " | ".join(cells) + " |")
    m = results["machine"]
    lines.append(
        f"\n- {m['device']}{' (' + m['gpu'] + ')' if m['gpu'] else ''}; {m['cpu_count']} cores, "
        f"{m['torch_threads']} torch threads, torch {m['torch']}, Python {m['python']}"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m rnnflow.tools.bench", description=__doc__)
    parser.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="corpus sizes")
    parser.add_argument(
        "--out", type=non_empty, default=str(REPORTS / "bench"), help="report path stem"
    )
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke test)")
    args = parser.parse_args(argv)

    def run() -> None:
        global ROUNDS, BATCHES_PER_ROUND, DENORMAL_EPOCHS
        sections = tuple(s.strip() for s in args.sections.split(",") if s.strip())
        unknown = sorted(set(sections) - set(SECTIONS))
        if not sections or unknown:
            raise RnnflowError(f"--sections: expected some of {', '.join(SECTIONS)}")
        try:
            sizes = tuple(int(s) for s in args.sizes.split(",") if s.strip())
        except ValueError:
            sizes = ()
        if "size" in sections and (not sizes or min(sizes) < 100):
            raise RnnflowError(f"--sizes: expected texts per corpus >= 100, got {args.sizes!r}")
        if args.quick:
            ROUNDS, BATCHES_PER_ROUND, DENORMAL_EPOCHS = 1, 2, 2
        results = run_bench(load_params(), sections, sizes)
        out = Path(args.out)
        write_json(out.with_suffix(".json"), results)
        md = to_markdown(results)
        write_text(out.with_suffix(".md"), md)
        print(md)

    run_cli(run, "bench")


if __name__ == "__main__":
    main()
