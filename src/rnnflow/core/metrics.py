"""Scores and timings the stages report: classification metrics and call latency (numpy)."""

import time

import numpy as np


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
