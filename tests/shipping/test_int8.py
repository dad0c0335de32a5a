"""Every export also writes an int8 model; validate@V gates its accuracy drop; predict, the
CLI and the raw-text MLflow model can run it."""

import json
import subprocess
import sys
from collections import Counter

import mlflow
import onnx
import pytest

from rnnflow.core.errors import RnnflowError
from rnnflow.shipping import validate
from rnnflow.shipping.predict import INT8_FILE, Predictor
from rnnflow.shipping.validate import validate_bundle

from .test_export import shipped  # noqa: F401 - the fixture: two variants shipped


def quantized_ops(path) -> Counter:
    """Op types of an ONNX model, the bodies of its Loops included."""
    ops: Counter = Counter()

    def walk(graph):
        for node in graph.node:
            ops[node.op_type] += 1
            for attribute in node.attribute:
                if attribute.g.node:
                    walk(attribute.g)

    walk(onnx.load(str(path)).graph)
    return ops


def test_int8_models_are_smaller_and_within_the_gate(workspace, shipped):  # noqa: F811
    for variant in ("rnn_cell_deep", "lstm"):
        report = json.loads((workspace / f"metrics/validate/{variant}.json").read_text())
        int8 = report["int8"]
        fp32_kb = (workspace / f"models/{variant}/model.onnx").stat().st_size / 1024
        int8_kb = (workspace / f"models/{variant}/{INT8_FILE}").stat().st_size / 1024
        assert int8["size_kb"] == pytest.approx(int8_kb) and int8["fp32_size_kb"] == fp32_kb
        assert int8_kb < fp32_kb  # at this tiny size the graph, not the weights, is most bytes
        ops = quantized_ops(workspace / f"models/{variant}/{INT8_FILE}")
        if variant == "lstm":
            assert ops["DynamicQuantizeLSTM"] == 1 and ops["MatMulInteger"] >= 1  # LSTM, head
        else:  # the time loops' input and recurrent MatMuls (subgraphs included), the head
            assert ops["MatMulInteger"] >= 3
        assert int8["accuracy_drop"] == pytest.approx(int8["fp32_accuracy"] - int8["accuracy"])
        assert int8["accuracy_drop"] <= int8["max_drop"] == 0.05
        # a 2-epoch model of this size is nearly uniform (near-ties flip), but it agrees with
        # its int8 twin far above chance (1/15 for unrelated models); an accuracy change of d
        # needs at least a share d of changed answers
        assert 0.5 < int8["argmax_agreement"] <= 1 - abs(int8["accuracy_drop"]) + 1e-9
        timing = json.loads((workspace / f"metrics/timing/validate_{variant}.json").read_text())
        for batch in (1, 64):  # run-to-run numbers: in the timing file, not the report
            assert timing[f"int8_latency_ms_batch{batch}_p50"] > 0
            assert timing[f"fp32_latency_ms_batch{batch}_p50"] > 0
            assert not any("latency" in key for key in int8)
        bundle = json.loads((workspace / f"models/{variant}/bundle.json").read_text())
        assert bundle["int8"]["file"] == INT8_FILE


def test_the_int8_gate_fails_with_one_line(workspace, shipped, monkeypatch):  # noqa: F811
    real = validate.int8_report

    def worse(*args):
        return real(*args) | {"accuracy": 0.5, "fp32_accuracy": 0.55, "accuracy_drop": 0.05}

    monkeypatch.setattr(validate, "int8_report", worse)
    gate = shipped.model_copy(
        update={"parity": shipped.parity.model_copy(update={"int8_max_drop": 0.01})}
    )
    metrics = workspace / "metrics/validate/lstm.json"
    metrics.unlink()
    message = (
        "models/lstm/model.int8.onnx: int8 gate FAILED for lstm - test accuracy 0.5000 "
        "against fp32 0.5500 (drop 0.0500, allowed 0.01)"
    )
    with pytest.raises(RnnflowError) as failed:
        validate_bundle(gate, "lstm")
    assert str(failed.value) == message
    assert not metrics.exists()  # no partial output


def test_predict_and_the_cli_run_the_int8_model(workspace, shipped):  # noqa: F811
    texts = ["Nakamura", "Tremblay", "Virtanen", "Okafor"]
    fp32 = Predictor(workspace / "models/lstm").predict(texts)
    int8 = Predictor(workspace / "models/lstm", int8=True).predict(texts)
    assert [r["text"] for r in int8] == texts
    for a, b in zip(fp32, int8, strict=True):
        assert sum(a["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert sum(b["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    cmd = [sys.executable, "-m", "rnnflow.shipping.cli", "predict", "--model", "models/lstm"]
    out = subprocess.run([*cmd, "--int8", *texts], cwd=workspace, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["label"] for line in out.stdout.splitlines()] == [
        r["label"] for r in int8
    ]
    (workspace / f"models/lstm/{INT8_FILE}").unlink()
    out = subprocess.run([*cmd, "--int8", "x"], cwd=workspace, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == (
        f"rnnflow: error: models/lstm/{INT8_FILE}: no int8 model in this bundle (export it again)"
    )


def test_the_registered_model_loads_either_precision(workspace, shipped):  # noqa: F811
    versions = mlflow.MlflowClient().search_model_versions("name='rnnflow'")
    newest = max(versions, key=lambda v: int(v.version))
    uri = f"models:/rnnflow/{newest.version}"
    texts = ["Nakamura", "Okafor"]
    fp32 = mlflow.pyfunc.load_model(uri).predict(texts)
    int8 = mlflow.pyfunc.load_model(uri, model_config={"precision": "int8"}).predict(texts)
    variant = newest.tags["variant"]
    expected = Predictor(workspace / f"models/{variant}", int8=True).predict(texts)
    assert [p.label for p in int8] == [r["label"] for r in expected]
    for got, want in zip(int8, expected, strict=True):
        assert got.probability == pytest.approx(want["probability"], abs=1e-6)
    assert len(fp32) == 2
    with pytest.raises(Exception, match="precision: expected fp32 or int8, got 'int4'"):
        mlflow.pyfunc.load_model(uri, model_config={"precision": "int4"})
