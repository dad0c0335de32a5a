"""ONNX export of every variant, the parity gate (including its failure), and the stages."""

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from rnnflow.analysis.compare import compare
from rnnflow.analysis.evaluate import evaluate_variant
from rnnflow.analysis.gradients import gradient_flow
from rnnflow.core.errors import RnnflowError
from rnnflow.core.metrics import classification_report
from rnnflow.shipping.export import export_bundle, export_onnx, quantize_int8
from rnnflow.shipping.predict import Predictor
from rnnflow.shipping.validate import _logits_fn, check_parity, validate_bundle
from rnnflow.training.train import train_variant

from ..conftest import REPO, VARIANTS, small_params, write_params
from ..model.test_models import make, padded


def _session(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize(
    ("variant", "bidirectional"),
    [(v, False) for v in VARIANTS]
    + [("rnn", True), ("rnn_cell", True), ("rnn_cell_deep", True), ("lstm", True), ("gru", True)],
)
def test_every_variant_exports_and_matches_at_any_length(tmp_path, variant, bidirectional):
    model = make(variant, bidirectional)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, opset=17)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["tokens", "lengths"]
    assert [o.name for o in graph.output] == ["logits"]
    ops = {node.op_type for node in graph.node}
    plain_rnn = variant.startswith("rnn") and not bidirectional
    # plain RNNs run as an ONNX Loop (onnxruntime's RNN op is slow at batch 64)
    assert ("Loop" in ops and "RNN" not in ops) if plain_rnn else not ({"Loop"} & ops)
    session = _session(path)
    for lengths in ([1], [5, 3, 1], [20, 7, 7, 1, 13], list(range(1, 41)), [64] * 3):
        tokens, n = padded(lengths, seed=len(lengths))
        with torch.no_grad():
            expected = model(tokens, n).numpy()
        got = session.run(None, {"tokens": tokens.numpy(), "lengths": n.numpy()})[0]
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5, (variant, lengths)


@pytest.mark.parametrize(
    ("variant", "bidirectional", "pool"),
    [
        ("rnn", False, "mean"),
        ("rnn_cell_deep", False, "attention"),
        ("rnn_deep", False, "max"),
        ("lstm", False, "attention"),
        ("gru", False, "max"),
        ("gru", True, "mean"),
        ("rnn_cell_deep", True, "max"),
        ("rnn_cell", False, "concat"),
        ("lstm", True, "concat"),
    ],
)
def test_pooled_models_export_and_match(tmp_path, variant, bidirectional, pool):
    model = make(variant, bidirectional, pool=pool)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, opset=17)
    session = _session(path)
    for lengths in ([1], [5, 3, 1], [20, 7, 7, 1, 13], list(range(1, 41))):
        tokens, n = padded(lengths, seed=len(lengths))
        with torch.no_grad():
            expected = model(tokens, n).numpy()
        got = session.run(None, {"tokens": tokens.numpy(), "lengths": n.numpy()})[0]
        assert np.abs(got - expected).max() <= 1e-5, (variant, pool, lengths)


def exported_fp32_and_int8(model, tmp_path) -> tuple[set[str], set[str]]:
    """Export `model`, quantize it, and check both against PyTorch at lengths 1 to 40 (batches
    shorter than 3 steps too): fp32 within 1e-5, int8 the same function (its rounding is
    judged by validate@V's accuracy gate). The fp32 and int8 graphs' op types."""
    export_onnx(model, tmp_path / "m.onnx", opset=17)
    quantize_int8(tmp_path / "m.onnx", tmp_path / "m8.onnx")
    fp32, int8 = _session(tmp_path / "m.onnx"), _session(tmp_path / "m8.onnx")
    for lengths in ([1], [2, 1], [5, 3, 1], list(range(1, 41))):
        tokens, n = padded(lengths, seed=len(lengths))
        with torch.no_grad():
            expected = model(tokens, n).numpy()
        feeds = {"tokens": tokens.numpy(), "lengths": n.numpy()}
        assert np.abs(fp32.run(None, feeds)[0] - expected).max() <= 1e-5, lengths
        got = int8.run(None, feeds)[0]
        assert got.shape == expected.shape
        assert np.corrcoef(got.ravel(), expected.ravel())[0, 1] >= 0.95, lengths
    return tuple(
        {n.op_type for n in onnx.load(str(tmp_path / f)).graph.node} for f in ("m.onnx", "m8.onnx")
    )


@pytest.mark.parametrize(
    ("variant", "bidirectional", "pool"),
    [("rnn_cell", False, "last"), ("lstm", False, "attention"), ("gru", True, "max")],
)
def test_ngram_models_export_and_match_in_fp32_and_int8(tmp_path, variant, bidirectional, pool):
    """The convolution exports as ONNX Conv (int8: ConvInteger), masked as in PyTorch."""
    model = make(variant, bidirectional, pool=pool, conv_width=3, conv_channels=6)
    _, int8_ops = exported_fp32_and_int8(model, tmp_path)
    assert "ConvInteger" in int8_ops


@pytest.mark.parametrize(("variant", "bidirectional"), [("rnn_cell_deep", False), ("gru", True)])
def test_ngram_bag_models_export_and_match_in_fp32_and_int8(tmp_path, variant, bidirectional):
    """The bag's hash runs in ONNX as integer Mul, Add and Mod, and its table as a Gather:
    the same ids and the same logits as PyTorch, for batches shorter than every n too (a
    table narrower than the embeddings: `ngram_dim`)."""
    model = make(variant, bidirectional, ngram_bag=(1, 2, 3), ngram_buckets=50, ngram_dim=6)
    fp32_ops, _ = exported_fp32_and_int8(model, tmp_path)
    assert {"Mod", "Gather"} <= fp32_ops


def test_gate_fails_on_a_perturbed_model(tmp_path):
    model = make("gru")
    path = tmp_path / "m.onnx"
    export_onnx(model, path, opset=17)
    proto = onnx.load(str(path))
    weight = next(t for t in proto.graph.initializer if "head" in t.name and "weight" in t.name)
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.01, weight.name))
    onnx.save(proto, str(path))
    session = _session(path)
    cases = [("case", tuple(t.numpy() for t in padded([4, 2, 9])))]

    def torch_fn(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch[0]), torch.from_numpy(batch[1])).numpy()

    def onnx_fn(batch):
        return session.run(None, {"tokens": batch[0], "lengths": batch[1]})[0]

    report = check_parity(torch_fn, onnx_fn, iter(cases), atol=1e-5)
    assert not report["passed"] and report["max_abs_diff"] > 1e-4
    clean = check_parity(torch_fn, torch_fn, iter(cases), atol=1e-5)
    assert clean["passed"] and clean["max_abs_diff"] == 0 and clean["argmax_agreement"] == 1
    # the float32-noise allowance does not hide it: this model rounds ~1e-7 from float64
    exact = _float64(model)
    noisy = check_parity(torch_fn, onnx_fn, iter(cases), 1e-5, 1e-6, exact, noise_factor=4)
    assert not noisy["passed"] and noisy["torch_float64_max_diff"] < 1e-6


def _float64(model):
    import copy

    return _logits_fn(copy.deepcopy(model).double())


def test_gate_allows_what_float32_rounding_itself_does(tmp_path):
    """A model whose recurrence amplifies rounding (large recurrent weights, a large head):
    PyTorch float32 is itself ~1e-3 from float64, and onnxruntime as far from PyTorch. A
    fixed atol refuses that as an export bug; the noise allowance accepts it, and reports
    both sides' distance to float64."""
    model = make("rnn_deep", pool="mean", hidden_size=64, embedding_dim=16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.mul_(4.0 if "hh" in name else 30.0 if "head" in name else 1.0)
    path = tmp_path / "m.onnx"
    export_onnx(model, path, opset=17)
    session = _session(path)
    cases = [("case", tuple(t.numpy() for t in padded(list(range(1, 41)) * 4, seed=3)))]

    def torch_fn(batch):
        with torch.no_grad():
            return model(torch.from_numpy(batch[0]), torch.from_numpy(batch[1])).numpy()

    def onnx_fn(batch):
        return session.run(None, {"tokens": batch[0], "lengths": batch[1]})[0]

    fixed = check_parity(torch_fn, onnx_fn, iter(cases), 1e-5, 1e-6)
    assert not fixed["passed"] and fixed["max_abs_diff"] > 1e-4
    report = check_parity(torch_fn, onnx_fn, iter(cases), 1e-5, 1e-6, _float64(model), 4)
    case = report["cases"]["case"]
    assert report["passed"] and report["argmax_agreement"] == 1
    assert case["torch_float64_max_diff"] > 1e-4 and case["onnx_float64_max_diff"] > 1e-4
    assert case["max_abs_diff"] <= 4 * case["torch_float64_max_diff"]


def test_classification_report_numbers():
    report = classification_report(
        np.array([0, 0, 1, 1, 2]), np.array([0, 1, 1, 1, 0]), list("abc")
    )
    assert report["accuracy"] == pytest.approx(3 / 5)
    assert report["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert report["per_class"]["b"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert report["macro_f1"] == pytest.approx((0.5 + 0.8 + 0.0) / 3)


@pytest.fixture
def shipped(workspace):
    """Two variants trained, evaluated, exported and validated in the small workspace."""
    raw = small_params()
    raw["model"]["variants"] = {"rnn_cell_deep": {"num_layers": 2}, "lstm": {"bidirectional": True}}
    params = write_params(workspace, raw)
    for variant in raw["model"]["variants"]:
        train_variant(params, variant)
        evaluate_variant(params, variant)
        export_bundle(params, variant)
        validate_bundle(params, variant)
        with pytest.MonkeyPatch.context() as patch:  # it computes on the CPU: on a GPU machine
            patch.setattr(torch.cuda, "is_available", _no_cuda)  # CUDA's start cost 5 s each
            gradient_flow(params, variant)
    return params


def _no_cuda(*_args):
    raise AssertionError("gradients@VARIANT asked for CUDA")


def test_stages_produce_a_validated_bundle_and_leaderboard(workspace, shipped):
    import mlflow

    rows = compare(shipped)  # records every variant's parity numbers in MLflow
    for variant in ("rnn_cell_deep", "lstm"):
        bundle = json.loads((workspace / f"models/{variant}/bundle.json").read_text())
        assert bundle["opset"] == 17 and bundle["exporter"] == "torchscript"
        assert set(bundle["metrics"]) == {"accuracy", "macro_f1"}
        parity = json.loads((workspace / f"metrics/validate/{variant}.json").read_text())
        assert parity["passed"] and parity["max_abs_diff"] <= 1e-5
        assert parity["argmax_agreement"] == 1.0
        assert parity["cases"]["test_split"]["examples"] == len(
            (workspace / "data/prepared/test.jsonl").read_text().splitlines()
        )
        assert {"batch_1", "length_1", "unsorted_lengths", "every_length_to_max_len"} <= set(
            parity["cases"]
        )
        evaluation = json.loads((workspace / f"metrics/eval/{variant}.json").read_text())
        assert 0 <= evaluation["macro_f1"] <= evaluation["accuracy"] + 0.5
        run = mlflow.get_run(bundle["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.metrics["onnx_parity_passed"] == 1.0
        assert run.data.metrics["test_accuracy"] == evaluation["accuracy"]  # logged by export
        assert run.data.metrics["grad_decay_per_step"] > 0  # by compare, from gradients@V
        flow = json.loads((workspace / f"metrics/gradients/{variant}.json").read_text())
        directions = 2 if variant == "lstm" else 1  # lstm is bidirectional here
        assert flow["directions"] == directions and flow["sequences"] > 0
        backward = [row.get("log10_grad_norm_backward") for row in flow["series"]]
        assert (backward[0] is not None) == (directions == 2)  # each direction on its own axis
        assert ("decay_per_step_backward" in flow) == (directions == 2)
        client = mlflow.MlflowClient()
        (version,) = client.search_model_versions(f"name='rnnflow' and run_id='{run.info.run_id}'")
        assert version.tags["variant"] == variant
        assert float(version.tags["test_accuracy"]) == pytest.approx(evaluation["accuracy"], 1e-3)
        assert version.tags["parity_passed"] == "true"
        assert float(version.tags["parity_max_abs_diff"]) <= 1e-5
        assert version.tags["precision"] == "fp32"  # the model's default; int8 on request
        # the gate held: within the configured drop (0.05 on this 60-90 text split)
        assert run.data.metrics["int8_accuracy_drop"] <= shipped.parity.int8_max_drop

    assert [r["variant"] for r in rows] == sorted(
        ["rnn_cell_deep", "lstm"],
        key=lambda v: -next(r for r in rows if r["variant"] == v)["test_accuracy"],
    )
    md = (workspace / "reports/leaderboard.md").read_text()
    assert md.count("| pass |") == 2 and "Majority-class baseline" in md
    parent = mlflow.search_runs(
        experiment_names=["rnnflow"],
        filter_string="tags.`rnnflow.kind` = 'leaderboard'",
        output_format="list",
        order_by=["attributes.start_time DESC"],
    )[0]
    for variant in ("rnn_cell_deep", "lstm"):  # top-level in the runs table, linked to the board
        bundle = json.loads((workspace / f"models/{variant}/bundle.json").read_text())
        run = mlflow.get_run(bundle["mlflow_run_id"])
        assert "mlflow.parentRunId" not in run.data.tags
        assert run.data.tags["rnnflow.leaderboard"] == parent.info.run_id
        assert parent.data.tags[f"rnnflow.run.{variant}"] == run.info.run_id

    # the champion: the best test accuracy among versions that passed parity
    champion = mlflow.MlflowClient().get_model_version_by_alias("rnnflow", "champion")
    assert champion.tags["variant"] == rows[0]["variant"] == parent.data.tags["rnnflow.champion"]
    texts = ["Nakamura", "O'Brien"]
    served = mlflow.pyfunc.load_model("models:/rnnflow@champion").predict(texts)
    expected = Predictor(workspace / f"models/{rows[0]['variant']}").predict(texts)
    assert [p.label for p in served] == [e["label"] for e in expected]
    for got, want in zip(served, expected, strict=True):
        assert got.probabilities == pytest.approx(want["probabilities"], abs=1e-6)
        assert sum(got.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_validate_stage_exits_nonzero_on_mismatch(workspace, shipped):
    path = workspace / "models/lstm/model.onnx"
    proto = onnx.load(str(path))
    bias = next(t for t in proto.graph.initializer if "head" in t.name and "bias" in t.name)
    bias.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(bias) + 0.01, bias.name))
    onnx.save(proto, str(path))
    with pytest.raises(RnnflowError, match="parity gate FAILED - max .delta logits. 0.01 "):
        validate_bundle(shipped, "lstm")
    proc = subprocess.run(
        [sys.executable, "-m", "stages.validate", "lstm"],
        cwd=workspace,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(REPO), **__import__("os").environ},
    )
    assert proc.returncode == 2
    assert "validate: error: models/lstm/model.onnx: parity gate FAILED" in proc.stderr
    assert "Traceback" not in proc.stderr
