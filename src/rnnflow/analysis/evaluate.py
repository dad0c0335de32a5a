"""Stage evaluate@VARIANT: test-split quality, confusion matrix and inference latency."""

import time
from pathlib import Path

import numpy as np
import torch

from rnnflow.core import plots
from rnnflow.core.atomic import write_json
from rnnflow.core.config import Params
from rnnflow.core.paths import PACKED, TOKENIZER_DIR, confusion_plot, metrics_file
from rnnflow.core.paths import checkpoint as checkpoint_path
from rnnflow.data.batching import PackedSplit, make_loader
from rnnflow.data.text import file_hash
from rnnflow.model import checkpoint
from rnnflow.runtime import host


def classification_report(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix."""
    k = len(classes)
    confusion = np.bincount(y_true * k + y_pred, minlength=k * k).reshape(k, k)
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros(k), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros(k), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros(k), where=denom > 0)
    return {
        "accuracy": float(tp.sum() / confusion.sum()),
        "macro_f1": float(f1.mean()),
        "per_class": {
            c: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, actual, strict=True)
        },
        "confusion_matrix": confusion.tolist(),
        "classes": classes,
    }


@torch.no_grad()
def predict_split(model, split: PackedSplit, batch_size: int, device) -> tuple[np.ndarray, ...]:
    """Logits and labels of a whole split (in bucketed order)."""
    model.eval().to(device)
    logits, labels = [], []
    for x, lengths, y in make_loader(split, batch_size, pool=50, shuffle=False, seed=0):
        logits.append(model(x.to(device), lengths).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


def latency(fn, batch: tuple, repeats: int = 50, warmup: int = 5) -> dict[str, float]:
    """p50/p95 milliseconds of fn(*batch), after `warmup` calls that are not timed."""
    for _ in range(warmup):
        fn(*batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*batch)
        times.append((time.perf_counter() - start) * 1e3)
    return {"p50": float(np.percentile(times, 50)), "p95": float(np.percentile(times, 95))}


@torch.no_grad()
def latency_ms(model, split: PackedSplit, batch_size: int) -> dict[str, float]:
    """Forward-pass latency on CPU for a random batch of the split."""
    model.eval().cpu()
    x, lengths, _ = split.batch(np.random.default_rng(0).choice(len(split), size=batch_size))
    return latency(model, (torch.from_numpy(x.astype(np.int64)), torch.from_numpy(lengths)))


def plot_confusion(report: dict, title: str, path: Path) -> None:
    """Row-normalized confusion matrix as a heat map."""
    cm = np.array(report["confusion_matrix"], dtype=float)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    classes = report["classes"]
    size = 3 + 0.45 * len(classes)
    fig, ax = plots.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=60, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="actual", title=title)
    fig.colorbar(im, ax=ax, label="fraction of actual class")
    fig.tight_layout()
    plots.save(fig, path)


def evaluate_variant(params: Params, variant: str, packed_dir: Path = PACKED) -> dict:
    """Score the best checkpoint on the test split; write metrics and plot. No MLflow here:
    export@VARIANT logs these files into the variant's run (one tracking start fewer)."""
    device = host.setup(params.seed)
    model, payload = checkpoint.load_model(
        checkpoint_path(variant), file_hash(TOKENIZER_DIR / "tokenizer.json")
    )
    test = PackedSplit.load(packed_dir / "test.npz")
    logits, labels = predict_split(model, test, params.pack.batch_size, device)
    report = classification_report(labels, logits.argmax(1), payload["labels"])
    report["test_examples"] = len(labels)
    timing = {
        f"latency_ms_batch{b}_{q}": v
        for b in (1, params.pack.batch_size)
        for q, v in latency_ms(model, test, b).items()
    }
    write_json(metrics_file("eval", variant), report)
    write_json(metrics_file("timing", f"eval_{variant}"), timing)
    png = confusion_plot(variant)
    plot_confusion(report, f"{variant}: test accuracy {report['accuracy']:.3f}", png)
    return report | timing
