"""Stage validate@VARIANT: the shipped ONNX must equal PyTorch, or the pipeline stops."""

import copy
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from rnnflow.core.atomic import write_json
from rnnflow.core.config import Params
from rnnflow.core.errors import RnnflowError
from rnnflow.core.metrics import classification_report, latency
from rnnflow.core.paths import PACKED, bundle_dir, metrics_file
from rnnflow.core.paths import checkpoint as checkpoint_path
from rnnflow.data.batching import BucketBatchSampler, PackedSplit
from rnnflow.data.text import file_hash
from rnnflow.model import checkpoint
from rnnflow.shipping.predict import INT8_FILE, Predictor
from rnnflow.tracking import runs

Batch = tuple[np.ndarray, np.ndarray]


def _shaped_batch(rng, test: PackedSplit, lengths: list[int]) -> Batch:
    """A batch with the given lengths, filled with real test-split tokens: sequences are
    concatenated until long enough, so edge cases test shapes on realistic input."""
    lengths = np.array(lengths, dtype=np.int64)
    tokens = np.zeros((len(lengths), int(lengths.max())), dtype=np.int64)
    for row, n in enumerate(lengths):
        pieces, total = [], 0
        while total < n:
            i = rng.integers(len(test))
            pieces.append(test.tokens[i, : test.lengths[i]])
            total += int(test.lengths[i])
        tokens[row, :n] = np.concatenate(pieces)[:n]
    return tokens, lengths


def parity_cases(test: PackedSplit, batch_size: int, max_len: int) -> Iterator:
    """(case name, batch) pairs: the whole test split, then edge shapes."""
    for index in BucketBatchSampler(test.lengths, batch_size, pool=50, shuffle=False):
        tokens, lengths, _ = test.batch(index)
        yield "test_split", (tokens.astype(np.int64), lengths)
    rng = np.random.default_rng(0)
    longest = int(np.argmax(test.lengths))
    tokens, lengths, _ = test.batch(np.array([longest]))
    yield "longest_test_sequence", (tokens.astype(np.int64), lengths)
    yield "batch_1", _shaped_batch(rng, test, [5])
    yield "length_1", _shaped_batch(rng, test, [1, 1, 1])
    yield "unsorted_lengths", _shaped_batch(rng, test, [3, max_len, 1, 7, 2, max_len // 2 + 1])
    yield (
        "batch_larger_than_export_example",
        _shaped_batch(rng, test, rng.integers(1, max_len + 1, size=257).tolist()),
    )
    yield "every_length_to_max_len", _shaped_batch(rng, test, list(range(1, max_len + 1)))
    yield "all_max_len", _shaped_batch(rng, test, [max_len] * 4)


def check_parity(
    torch_fn: Callable[[Batch], np.ndarray],
    onnx_fn: Callable[[Batch], np.ndarray],
    cases: Iterator,
    atol: float,
    rtol: float = 0.0,
    exact_fn: Callable[[Batch], np.ndarray] | None = None,
    noise_factor: float = 0.0,
) -> dict:
    """Compare logits per case: every |delta| must be <= atol + rtol * |torch logit| (the rule
    of torch.testing.assert_close) + noise_factor * the case's float32 error, and every
    argmax must agree. The float32 error is how far PyTorch's own float32 logits are from
    exact_fn's (the same model in float64) on that case: onnxruntime rounds differently,
    and an ill-conditioned trained model amplifies rounding past any fixed atol, while an
    export bug (padding leaking in, a wrong direction) stays orders of magnitude above it.
    Reports max/mean |delta| and both sides' distance to float64."""
    seen: dict[str, dict[str, list]] = {}
    for name, batch in cases:
        a, b = torch_fn(batch), onnx_fn(batch)
        if a.shape != b.shape:
            raise RnnflowError(
                f"parity: case {name}: shapes differ, torch {a.shape} vs onnx {b.shape}"
            )
        exact = exact_fn(batch) if exact_fn else a
        for key, value in zip("abe", (a, b, exact), strict=True):
            seen.setdefault(name, {}).setdefault(key, []).append(value)
    cases_out = {}
    for name, arrays in seen.items():
        a, b, exact = (np.concatenate(arrays[k]) for k in "abe")
        diff = np.abs(a - b)
        float32_error = float(np.abs(a - exact).max())
        allowed = atol + rtol * np.abs(a) + noise_factor * float32_error
        cases_out[name] = {
            "max_abs_diff": float(diff.max()),
            "max_tolerance_used": float((diff / allowed).max()),
            "mean_abs_diff": float(diff.mean()),
            "torch_float64_max_diff": float32_error,
            "onnx_float64_max_diff": float(np.abs(b - exact).max()),
            "argmax_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
            "examples": len(a),
        }
    max_diff = max(c["max_abs_diff"] for c in cases_out.values())
    agreement = min(c["argmax_agreement"] for c in cases_out.values())
    tolerance_used = max(c["max_tolerance_used"] for c in cases_out.values())
    return {
        "atol": atol,
        "rtol": rtol,
        "noise_factor": noise_factor,
        "max_tolerance_used": tolerance_used,
        "max_abs_diff": max_diff,
        "torch_float64_max_diff": max(c["torch_float64_max_diff"] for c in cases_out.values()),
        "mean_abs_diff": float(np.mean([c["mean_abs_diff"] for c in cases_out.values()])),
        "argmax_agreement": agreement,
        "passed": bool(tolerance_used <= 1.0 and agreement == 1.0),
        "cases": cases_out,
    }


def int8_report(fp32: Predictor, int8: Predictor, test: PackedSplit, batch_size: int) -> dict:
    """The int8 model against the fp32 one on the whole test split: test accuracy and
    macro-F1 of each (and the drop), argmax agreement and size on disk. Deterministic:
    latencies, which are not, come from int8_latency."""
    predicted: dict[str, list] = {"fp32": [], "int8": []}
    truth = []
    for index in BucketBatchSampler(test.lengths, batch_size, pool=50, shuffle=False):
        tokens, lengths, labels = test.batch(index)
        for name, predictor in (("fp32", fp32), ("int8", int8)):
            predicted[name].append(predictor.logits(tokens.astype(np.int64), lengths).argmax(1))
        truth.append(labels)
    y = np.concatenate(truth)
    fp32_pred, int8_pred = (np.concatenate(predicted[n]) for n in ("fp32", "int8"))
    scores = {
        name: classification_report(y, pred, fp32.labels)
        for name, pred in (("fp32", fp32_pred), ("int8", int8_pred))
    }
    return {
        "accuracy": scores["int8"]["accuracy"],
        "macro_f1": scores["int8"]["macro_f1"],
        "fp32_accuracy": scores["fp32"]["accuracy"],
        "fp32_macro_f1": scores["fp32"]["macro_f1"],
        "accuracy_drop": scores["fp32"]["accuracy"] - scores["int8"]["accuracy"],
        "macro_f1_drop": scores["fp32"]["macro_f1"] - scores["int8"]["macro_f1"],
        "argmax_agreement": float((fp32_pred == int8_pred).mean()),
        "size_kb": (int8.dir / INT8_FILE).stat().st_size / 1024,
        "fp32_size_kb": (fp32.dir / "model.onnx").stat().st_size / 1024,
    }


def int8_latency(fp32: Predictor, int8: Predictor, test: PackedSplit) -> dict:
    """onnxruntime latency p50 (ms) of both models at batch 1 and 64, on seeded test rows."""
    rng = np.random.default_rng(0)
    timing = {}
    for size in (1, 64):
        tokens, lengths, _ = test.batch(rng.choice(len(test), size=size))
        batch = (tokens.astype(np.int64), lengths)
        for name, predictor in (("fp32", fp32), ("int8", int8)):
            timing[f"{name}_latency_ms_batch{size}_p50"] = latency(predictor.logits, batch)["p50"]
    return timing


def validate_bundle(params: Params, variant: str, packed_dir: Path = PACKED) -> dict:
    """Run the parity gate for one variant; raise (non-zero exit) if ONNX differs from torch.
    Then the int8 gate: the int8 model may lose at most parity.int8_max_drop test accuracy."""
    predictor = Predictor(bundle_dir(variant))
    model, payload = checkpoint.load_model(
        checkpoint_path(variant), file_hash(bundle_dir(variant) / "tokenizer.json")
    )

    def onnx_fn(batch: Batch) -> np.ndarray:
        return predictor.logits(*batch)

    test = PackedSplit.load(packed_dir / "test.npz")
    cases = parity_cases(test, params.pack.batch_size, params.pack.max_len)
    report = check_parity(
        _logits_fn(model),
        onnx_fn,
        cases,
        params.parity.atol,
        params.parity.rtol,
        exact_fn=_logits_fn(copy.deepcopy(model).double()),  # the reference for rounding
        noise_factor=params.parity.noise_factor,
    )
    if not report["passed"]:
        _fail(variant, payload.get("mlflow_run_id"), report, params)
    quantized = Predictor(bundle_dir(variant), int8=True)
    int8 = int8_report(predictor, quantized, test, 64)
    report["int8"] = int8 | {"max_drop": params.parity.int8_max_drop}
    if int8["accuracy_drop"] > params.parity.int8_max_drop:
        raise RnnflowError(
            f"{bundle_dir(variant)}/{INT8_FILE}: int8 gate FAILED for {variant} - test accuracy "
            f"{int8['accuracy']:.4f} against fp32 {int8['fp32_accuracy']:.4f} (drop "
            f"{int8['accuracy_drop']:.4f}, allowed {params.parity.int8_max_drop:g})"
        )
    # latencies vary from run to run: the timing file has them, the report stays a
    # deterministic function of the params and data
    timing = int8_latency(predictor, quantized, test)
    write_json(metrics_file("validate", variant), report)
    write_json(metrics_file("timing", f"validate_{variant}"), timing)
    return report | {"timing": timing}


def _logits_fn(model: torch.nn.Module) -> Callable[[Batch], np.ndarray]:
    """The PyTorch model as a function of a numpy batch, in the model's own precision."""

    @torch.no_grad()
    def logits(batch: Batch) -> np.ndarray:
        return model(torch.from_numpy(batch[0]), torch.from_numpy(batch[1])).numpy()

    return logits


def _fail(variant: str, run_id: str | None, report: dict, params: Params) -> None:
    """Record the failed gate in the variant's run (marked FAILED) and stop the pipeline.
    A passing gate needs no MLflow here: compare records every variant's parity numbers."""
    worst = max(report["cases"].items(), key=lambda kv: kv[1]["max_tolerance_used"])
    message = (
        f"{bundle_dir(variant)}/model.onnx: parity gate FAILED - max |delta logits| "
        f"{report['max_abs_diff']:.3g} (allowed {params.parity.atol:g} + "
        f"{params.parity.rtol:g} * |logit| + {params.parity.noise_factor:g} * float32 error "
        f"{worst[1]['torch_float64_max_diff']:.3g}), argmax agreement "
        f"{report['argmax_agreement']:.4f}; worst case '{worst[0]}'"
    )
    with runs.variant_run("validate", variant, run_id) as run:
        runs.log_parity(run.info.run_id, report)
        raise RnnflowError(message)  # inside the run, so the run is marked FAILED
