"""Training stage: metrics, checkpoints, determinism, resume, and what MLflow records."""

import json

import mlflow
import pytest
import torch

from rnnflow.core.config import Params, TrainParams
from rnnflow.core.errors import RnnflowError
from rnnflow.data.batching import PackedSplit, make_loader
from rnnflow.model import checkpoint
from rnnflow.tracking.runs import EXPERIMENT
from rnnflow.training.train import (
    RESUME_DIR,
    clip_gradients,
    learning_rate,
    make_optimizer,
    run_epoch,
    train_variant,
)

from ..conftest import small_params, write_params


def _params(ws, **train) -> Params:
    return write_params(ws, small_params(train={"epochs": 3, "patience": 5} | train))


def test_train_writes_metrics_checkpoint_and_mlflow_run(workspace):
    result = train_variant(_params(workspace, lr=0.01), "gru")
    metrics = json.loads((workspace / "metrics/train/gru.json").read_text())
    assert metrics["epochs_run"] == 3 and 1 <= metrics["best_epoch"] <= 3
    assert metrics["best_val_acc"] > metrics["majority_baseline_val_acc"]
    assert result["train_tokens_per_second"] > 0
    history = json.loads((workspace / "metrics/history/gru.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(h["grad_norm_max"] >= h["grad_norm_mean"] > 0 for h in history)
    assert not (workspace / RESUME_DIR / "gru.pt").exists()

    payload = checkpoint.load(workspace / "models/gru/checkpoint.pt")
    assert payload["epoch"] == metrics["best_epoch"]
    run = mlflow.get_run(payload["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["rnnflow.variant"] == "gru"
    assert run.data.params["model.hidden_size"] == "24"
    assert run.data.params["train.lr"] == "0.01"  # as params.yaml said
    assert run.data.metrics["best_val_acc"] == pytest.approx(metrics["best_val_acc"])
    steps = mlflow.MlflowClient().get_metric_history(run.info.run_id, "val_loss")
    assert [m.step for m in steps] == [1, 2, 3]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"model_summary.txt", "curves.png", "checkpoint", "params.yaml"} <= artifacts
    assert mlflow.get_experiment(run.info.experiment_id).name == EXPERIMENT


def test_checkpoint_holds_the_best_epoch_not_the_last(workspace):
    raw = small_params(train={"epochs": 10, "patience": 10, "lr": 0.05, "schedule": "constant"})
    train_variant(write_params(workspace, raw), "rnn")
    metrics = json.loads((workspace / "metrics/train/rnn.json").read_text())
    assert metrics["best_epoch"] < metrics["epochs_run"], "setup must overfit after the best"
    model, payload = checkpoint.load_model(workspace / "models/rnn/checkpoint.pt")
    val = PackedSplit.load(workspace / "data/packed/val.npz")
    result = run_epoch(model, make_loader(val, 64, 50, False, 0), torch.device("cpu"))
    assert payload["epoch"] == metrics["best_epoch"]
    assert result.loss == pytest.approx(metrics["best_val_loss"], abs=1e-9)


def test_checkpoint_round_trip_gives_identical_logits(workspace):
    train_variant(_params(workspace, epochs=1), "rnn_cell")
    model, payload = checkpoint.load_model(workspace / "models/rnn_cell/checkpoint.pt")
    again, _ = checkpoint.load_model(workspace / "models/rnn_cell/checkpoint.pt")
    split = PackedSplit.load(workspace / "data/packed/val.npz")
    tokens, lengths, _ = split.batch(torch.arange(20).numpy())
    x, n = torch.from_numpy(tokens.astype("int64")), torch.from_numpy(lengths)
    with torch.no_grad():
        assert torch.equal(model(x, n), again(x, n))
    assert payload["labels"] and payload["vocab_hash"]


def test_same_params_same_metrics(workspace):
    params = _params(workspace, epochs=2)
    train_variant(params, "lstm")
    first = (workspace / "metrics/train/lstm.json").read_bytes()
    train_variant(params, "lstm")
    assert (workspace / "metrics/train/lstm.json").read_bytes() == first


OPTIONS = {
    "defaults": {},
    # every model and training option of its own: pooling, embedding dropout, a schedule
    # that is a function of the step, label smoothing
    "options": {
        "model": {"pool": "attention", "embedding_dropout": 0.1},
        "train": {"schedule": "cosine", "warmup": 0.2, "label_smoothing": 0.1},
    },
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_resume_after_interruption_matches_uninterrupted(workspace, monkeypatch, options):
    raw = small_params(train={"epochs": 3, "patience": 5} | options.get("train", {}))
    raw["model"]["defaults"] |= options.get("model", {})
    params = write_params(workspace, raw)
    train_variant(params, "rnn")
    reference = (workspace / "metrics/train/rnn.json").read_bytes()

    import rnnflow.training.train as train_module

    real_epoch, calls = train_module.run_epoch, {"n": 0}

    def crash_in_third_training_epoch(*args, **kwargs):
        if kwargs.get("desc", "").endswith("epoch 3"):
            raise KeyboardInterrupt  # what a killed process looks like from inside
        calls["n"] += 1
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "run_epoch", crash_in_third_training_epoch)
    with pytest.raises(KeyboardInterrupt):
        train_variant(params, "rnn")
    assert (workspace / RESUME_DIR / "rnn.pt").exists()
    monkeypatch.setattr(train_module, "run_epoch", real_epoch)
    train_variant(params, "rnn")
    assert (workspace / "metrics/train/rnn.json").read_bytes() == reference
    failed = mlflow.search_runs(
        experiment_names=[EXPERIMENT],
        filter_string="tags.`rnnflow.variant` = 'rnn' and attributes.status = 'FAILED'",
        output_format="list",
    )
    assert failed, "the interrupted run is marked FAILED"


def test_checkpoint_errors(workspace):
    bad = workspace / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(RnnflowError, match="bad.pt: corrupt or truncated checkpoint"):
        checkpoint.load(bad)
    train_variant(_params(workspace, epochs=1), "gru")
    good = (workspace / "models/gru/checkpoint.pt").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(RnnflowError, match="corrupt or truncated"):
        checkpoint.load(bad)
    with pytest.raises(RnnflowError, match="trained with vocabulary .* current tokenizer is abc"):
        checkpoint.load(workspace / "models/gru/checkpoint.pt", vocab_hash="abc")
    with pytest.raises(RnnflowError, match="checkpoint not found"):
        checkpoint.load(workspace / "models/none.pt")


def test_the_cosine_schedule_warms_up_then_decays_to_zero():
    settings = TrainParams(schedule="cosine", warmup=0.1, lr=0.01)
    lrs = [learning_rate(settings, step, 100) for step in range(100)]
    assert lrs[0] == pytest.approx(0.001) and lrs[9] == pytest.approx(0.01)  # 10 warm-up steps
    assert all(a < b for a, b in zip(lrs[:9], lrs[1:10], strict=True))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[10 + 45] == pytest.approx(0.005, rel=0.05)  # halfway down the cosine
    assert lrs[-1] < 1e-4 and learning_rate(settings, 150, 100) == 0.0
    constant = settings.model_copy(update={"schedule": "constant"})
    assert {learning_rate(constant, step, 100) for step in range(100)} == {0.01}


def test_label_smoothing_changes_the_objective_not_the_reported_loss(workspace):
    """Two steps from the same weights: smoothing moves the weights differently, and the
    loss reported is the plain cross-entropy of the same logits either way."""
    from rnnflow.model.network import ModelConfig, RNNClassifier

    split = PackedSplit.load(workspace / "data/packed/train.npz")
    loader = make_loader(split, 16, 4, shuffle=False, seed=0)
    batches = [next(iter(loader))]
    cfg = ModelConfig("gru", 200, 20, 8, 12, 1, 0.0, "tanh", False)
    results, weights = {}, {}
    for smoothing in (0.0, 0.3):
        torch.manual_seed(0)
        model = RNNClassifier(cfg)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        results[smoothing] = run_epoch(
            model, batches, torch.device("cpu"), optimizer, 1e9, label_smoothing=smoothing
        )
        weights[smoothing] = model.head.weight.detach().clone()
    assert results[0.0].loss == results[0.3].loss  # the same logits, plain cross-entropy
    assert not torch.allclose(weights[0.0], weights[0.3])


def test_a_failed_cuda_graph_capture_is_one_error_naming_the_switch(monkeypatch):
    """One trial of a 7-process search on an H100 failed inside make_graphed_callables
    (cudaErrorStreamCaptureInvalidated; the same configuration alone trained fine): the
    user gets one line naming the batch and the param that turns graphs off."""
    from rnnflow.model.network import ModelConfig, RNNClassifier
    from rnnflow.training.graphs import GraphedSteps

    def capture_fails(*_args, **_kwargs):
        raise torch.AcceleratorError(
            "CUDA error: operation failed due to a previous error during capture\n"
            "Search for `cudaErrorStreamCaptureInvalidated' in https://docs.nvidia.com/..."
        )

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", capture_fails)
    model = RNNClassifier(ModelConfig("gru", 20, 3, 8, 12, 1, 0.0, "tanh", False, "attention"))
    steps = GraphedSteps(model).train()
    tokens, lengths = torch.randint(1, 20, (4, 6)), torch.tensor([6, 5, 3, 1])
    message = (
        r"^capturing the CUDA graph of a 4 x 6 batch failed \(CUDA error: operation failed "
        r"due to a previous error during capture\); set train.cuda_graphs: false in "
        r"params.yaml to train without CUDA graphs$"
    )
    with pytest.raises(RnnflowError, match=message):
        steps(tokens, lengths)
    with torch.no_grad():  # evaluation never captures
        assert steps(tokens, lengths).shape == (4, 3)


@pytest.mark.parametrize("scale", [0.1, 1.0 / 3.0, 1.0, 3.0, float("nan")])
def test_clipping_has_clip_grad_norm_s_bits_and_skips_the_multiply_by_one(scale):
    """clip_gradients against nn.utils.clip_grad_norm_ on the same gradients: the same norm
    and gradients to the bit, below the threshold, near it, above it and with a NaN. Where
    the coefficient is 1 the gradients are not written at all (their version counters)."""
    torch.manual_seed(0)
    shapes = [(300, 64), (64,), (128, 128)]
    raw = [torch.randn(s) for s in shapes]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in raw]))
    grads = [g / total * scale for g in raw]  # total norm ~ scale
    if scale != scale:
        grads[1][3] = float("nan")
    ours, theirs = ([torch.nn.Parameter(torch.zeros(s)) for s in shapes] for _ in range(2))
    for a, b, g in zip(ours, theirs, grads, strict=True):
        a.grad, b.grad = g.clone(), g.clone()
    versions = [p.grad._version for p in ours]
    norm = clip_gradients(ours, 1.0)
    expected = torch.nn.utils.clip_grad_norm_(theirs, 1.0, foreach=True)
    assert torch.equal(norm, expected) or (norm.isnan() and expected.isnan())
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a.grad.nan_to_num(7.0), b.grad.nan_to_num(7.0))
    written = [p.grad._version != v for p, v in zip(ours, versions, strict=True)]
    clipped = not bool(1.0 / (expected + 1e-6) >= 1.0)
    assert written == [clipped] * 3 and clipped == (scale > 0.999999 or scale != scale)


def test_weight_decay_is_decoupled_and_zero_is_adam():
    """train.weight_decay shrinks a weight by lr * weight_decay of itself a step, whatever
    its gradient (AdamW), where Adam's L2 term would pass through the moments and move it
    by about lr; at 0 the optimizer takes Adam's steps to the bit."""
    settings = TrainParams(lr=0.004, weight_decay=0.1)
    p = torch.nn.Parameter(torch.ones(1000))
    optimizer = make_optimizer([p], settings)
    p.grad = torch.zeros(1000)
    optimizer.step()
    assert torch.allclose(p.detach(), torch.full((1000,), 1 - 0.004 * 0.1), rtol=0, atol=1e-7)
    coupled = torch.nn.Parameter(torch.ones(1000))
    adam = torch.optim.Adam([coupled], lr=0.004, weight_decay=0.1)
    coupled.grad = torch.zeros(1000)
    adam.step()
    assert torch.allclose(coupled.detach(), torch.full((1000,), 1 - 0.004), atol=1e-6)

    torch.manual_seed(0)
    a, b = (torch.nn.Parameter(torch.randn(300)) for _ in range(2))
    b.data.copy_(a.data)
    ours = make_optimizer([a], TrainParams(lr=0.004, weight_decay=0.0))
    adam = torch.optim.Adam([b], lr=0.004, fused=True)
    for _ in range(5):
        g = torch.randn(300)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        adam.step()
    assert torch.equal(a, b)
