"""Gradient flow through time (gradients@VARIANT) and the longrange memory task."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnflow.analysis.gradients import (
    decay_per_step,
    flow,
    layer_weights,
    state_gradient_norms,
    unrolled_logits,
    zero_deltas,
)
from rnnflow.core.config import Params
from rnnflow.data.batching import PackedSplit
from rnnflow.data.sources import LONGRANGE_NOISE, LONGRANGE_SIGNALS, load_longrange

from ..conftest import VARIANTS, small_params
from ..model.test_models import make, padded


def test_longrange_is_deterministic_balanced_and_labelled_by_its_first_character():
    table = load_longrange(length=30, size=400, seed=7)
    assert table.texts == load_longrange(length=30, size=400, seed=7).texts
    assert table.texts != load_longrange(length=30, size=400, seed=8).texts
    assert len(table.texts) == 400 and all(len(t) == 30 for t in table.texts)
    for text, label in zip(table.texts, table.labels, strict=True):
        assert label == f"class_{text[0]}" and text[0] in LONGRANGE_SIGNALS
        assert set(text[1:]) <= set(LONGRANGE_NOISE)
    assert sorted(set(table.labels)) == [f"class_{s}" for s in LONGRANGE_SIGNALS]
    assert {table.labels.count(c) for c in set(table.labels)} == {100}
    # the noise carries no class: each noise character is about as frequent in every class
    rows = list(zip(table.texts, table.labels, strict=True))
    by_class = {c: [t for t, lab in rows if lab == c] for c in set(table.labels)}
    shares = [np.mean([t[1:].count("e") / 29 for t in texts]) for texts in by_class.values()]
    assert max(shares) - min(shares) < 0.02


def test_longrange_params_make_pack_max_len_follow_the_length():
    raw = small_params(data={"source": "longrange", "length": 120, "size": 200})
    raw["tokenize"]["marks"] = False
    params = Params(**raw)
    assert params.pack.max_len == 120 and params.token_level == "char"
    for marks, level, max_len in [
        (True, "auto", 122),
        ("auto", "auto", 122),
        ("auto", "word", 120),
    ]:
        raw["tokenize"] |= {"marks": marks, "level": level}  # <s> and </s>: two more tokens
        assert Params(**raw).pack.max_len == max_len, (marks, level)
    other = small_params(pack={"max_len": 77})
    assert Params(**other).pack.max_len == 77  # other sources keep their own


@pytest.mark.parametrize(
    ("variant", "pool", "bidirectional"),
    [(v, "last", False) for v in VARIANTS]
    + [(v, "last", True) for v in VARIANTS]
    + [
        ("rnn_deep", "mean", False),
        ("gru", "attention", False),
        ("lstm", "max", False),
        ("rnn_cell_deep", "concat", False),
        ("lstm", "concat", True),
        ("rnn_cell_deep", "max", True),
    ],
)
@pytest.mark.parametrize(("conv_width", "ngram_bag"), [(0, ()), (3, (2, 3))])
def test_unrolled_model_is_the_model(variant, pool, bidirectional, conv_width, ngram_bag):
    """Pooled and bidirectional models too: the unrolled states go through the model's own
    pooling, the backward direction runs from the last position to 0; with the n-gram
    convolution, the unrolled steps read its features; the head reads the n-gram bag too."""
    model = make(
        variant,
        bidirectional,
        pool=pool,
        conv_width=conv_width,
        conv_channels=4,
        ngram_bag=ngram_bag,
        ngram_buckets=64,
    )
    model = model.eval()
    tokens, lengths = padded([9, 9, 9, 9], seed=3)
    with torch.no_grad():
        expected = model(tokens, lengths)
        got = unrolled_logits(model, tokens, zero_deltas(model, 4, 9))
        assert torch.allclose(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    ("variant", "bidirectional"),
    [("rnn_deep", False), ("lstm", False), ("gru", False), ("gru", True), ("rnn_cell_deep", True)],
)
def test_state_gradients_match_finite_differences(variant, bidirectional):
    """dL/dh_t from autograd equals (L(h_t + eps e_j) - L(h_t - eps e_j)) / 2 eps, in float64,
    for every layer, direction and step of a tiny model."""
    model = make(variant, bidirectional).double().eval()
    tokens, _ = padded([6, 6], seed=5)
    labels = torch.tensor([1, 2])
    norms = state_gradient_norms(model, tokens, labels)
    _, layers = layer_weights(model)
    directions = 2 if bidirectional else 1
    assert norms.shape == (len(layers), directions, 2, 6)
    hidden, eps = model.cfg.hidden_size, 1e-6

    def loss(layer, direction, t, row, j, step):
        deltas = zero_deltas(model, 2, 6, dtype=torch.float64)
        deltas[layer][direction][t][row, j] = step
        logits = unrolled_logits(model, tokens, deltas)
        return float(F.cross_entropy(logits, labels, reduction="sum"))

    with torch.no_grad():
        for layer in range(len(layers)):
            for direction in range(directions):
                for t in (0, 3, 5):
                    for row in (0, 1):
                        grad = [
                            (
                                loss(layer, direction, t, row, j, eps)
                                - loss(layer, direction, t, row, j, -eps)
                            )
                            / (2 * eps)
                            for j in range(hidden)
                        ]
                        expected = np.linalg.norm(grad)
                        assert norms[layer, direction, row, t] == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_last_step_gradient_is_the_heads_own(bidirectional):
    """Where a direction ends (forward: the last position; backward: position 0) dL/dh is
    that direction's block of W_head^T (softmax - onehot): an independent formula."""
    model = make("gru", bidirectional).eval()
    tokens, lengths = padded([7, 7, 7], seed=2)
    labels = torch.tensor([0, 3, 1])
    norms = state_gradient_norms(model, tokens, labels)
    hidden = model.cfg.hidden_size
    with torch.no_grad():
        p = F.softmax(model(tokens, lengths), dim=1)
        p[torch.arange(3), labels] -= 1
        head = (p @ model.head.weight).numpy()  # dL/d(pooled features)
    np.testing.assert_allclose(
        norms[-1, 0, :, -1], np.linalg.norm(head[:, :hidden], axis=1), rtol=1e-5
    )
    if bidirectional:
        backward = np.linalg.norm(head[:, hidden:], axis=1)
        np.testing.assert_allclose(norms[-1, 1, :, 0], backward, rtol=1e-5)


def test_flow_series_has_one_value_per_step_and_a_fitted_decay():
    model = make("rnn", False)
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 16, size=200)
    tokens = np.zeros((200, 15), dtype=np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = rng.integers(2, model.cfg.vocab_size, size=n)
    split = PackedSplit(tokens, lengths.astype(np.int64), rng.integers(0, 3, size=200))
    groups = [np.flatnonzero(lengths == n) for n in np.unique(lengths)]
    mean_log10, count = flow(model, split, groups)
    assert mean_log10.shape == (1, 1, 15) and count.shape == (15,)
    assert count[0] == 200 and all(np.diff(count) <= 0)  # fewer sequences reach further back
    assert count[-1] == (lengths == 15).sum()
    decay = decay_per_step(mean_log10[0, 0], count)
    assert decay is not None and 0 < decay < 1  # an untrained tanh RNN: vanishing
    # an exact geometric series is fitted exactly
    assert decay_per_step(np.log10(0.5) * np.arange(10), np.full(10, 50)) == pytest.approx(0.5)


def test_longrange_report_reads_finished_longrange_experiments_only():
    from rnnflow.analysis.longrange import collect, to_markdown

    def exp(name, state, source, length, acc):
        params = {"data": {"data": {"source": source, "length": length, "size": 400}}}
        metrics = {
            "metrics/eval/gru.json": {"data": {"accuracy": acc}},
            "metrics/gradients/gru.json": {
                "data": {"decay_per_step": 0.9, "decay_per_step_init": 0.5}
            },
        }
        rev = {"name": name, "data": {"params": {"params.yaml": params}, "metrics": metrics}}
        return {"name": name, "executor": {"state": state}, "revs": [rev]}

    shown = [
        {
            "name": "main",
            "experiments": [
                exp("long", "success", "longrange", 50, 0.75),
                exp("short", "success", "longrange", 10, 1.0),
                exp("busy", "running", "longrange", 100, 0.77),  # metrics not its own yet
                exp("names", "success", "builtin", 50, 0.77),
            ],
        },
    ]
    rows = collect(shown)
    assert [(r["experiment"], r["length"]) for r in rows] == [("short", 10), ("long", 50)]
    assert rows[1]["variants"]["gru"] == {
        "test_accuracy": 0.75,
        "decay_per_step": 0.9,
        "decay_per_step_init": 0.5,
    }
    assert "| 50 | 0.750 (0.90) |" in to_markdown(rows)
