"""Stage evaluate@VARIANT: test-split quality, confusion matrix and inference latency."""

from pathlib import Path

import numpy as np
import torch

from rnnflow.core import plots
from rnnflow.core.atomic import write_json
from rnnflow.core.config import Params
from rnnflow.core.metrics import classification_report, latency
from rnnflow.core.paths import PACKED, TOKENIZER_DIR, confusion_plot, metrics_file
from rnnflow.core.paths import checkpoint as checkpoint_path
from rnnflow.data.batching import PackedSplit, make_loader
from rnnflow.data.text import file_hash
from rnnflow.model import checkpoint
from rnnflow.runtime import host


@torch.no_grad()
def predict_split(model, split: PackedSplit, batch_size: int, device) -> tuple[np.ndarray, ...]:
    """Logits and labels of a whole split (in bucketed order)."""
    model.eval().to(device)
    logits, labels = [], []
    for x, lengths, y in make_loader(split, batch_size, pool=50, shuffle=False, seed=0):
        logits.append(model(x.to(device), lengths).cpu().numpy())
        labels.append(y.numpy())
    return np.concatenate(logits), np.concatenate(labels)


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
