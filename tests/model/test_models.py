"""Every variant: exact variable-length handling, cell loops proven equal to nn.RNN, learning."""

import pytest
import torch
from torch import nn

from rnnflow.core.config import ModelParams
from rnnflow.model.network import ModelConfig, RNNClassifier, as_torch_rnn, count_parameters

from ..conftest import VARIANTS

LAYERS = {"rnn": 1, "rnn_deep": 2, "rnn_cell": 1, "rnn_cell_deep": 3, "lstm": 2, "gru": 1}


def make(variant, bidirectional=False, nonlinearity="tanh", seed=0, **kw) -> RNNClassifier:
    torch.manual_seed(seed)
    options = (
        dict(
            vocab_size=30,
            num_classes=4,
            embedding_dim=8,
            hidden_size=12,
            num_layers=LAYERS[variant],
            dropout=0.0,
            nonlinearity=nonlinearity,
            bidirectional=bidirectional,
        )
        | kw
    )
    return RNNClassifier(ModelConfig(variant, **options)).eval()


def padded(lengths, seed=1, vocab=30):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    tokens = torch.randint(2, vocab, (len(lengths), int(lengths.max())), generator=g)
    return tokens * (torch.arange(tokens.shape[1])[None, :] < lengths[:, None]), lengths


CASES = [(v, False) for v in VARIANTS] + [
    ("rnn", True),
    ("rnn_deep", True),
    ("rnn_cell", True),
    ("rnn_cell_deep", True),
    ("lstm", True),
    ("gru", True),
]


def assert_padding_never_leaks(model: RNNClassifier) -> None:
    """The same text alone, in a batch with other lengths, and with extra columns past its
    end (pad ids, or junk ids where padded cores compute states that must not count) gives
    the same logits."""
    tokens, lengths = padded([3, 11, 1, 7])
    with torch.no_grad():
        batch = model(tokens, lengths)
        for i, n in enumerate(lengths.tolist()):
            alone = model(tokens[i : i + 1, :n], lengths[i : i + 1])
            assert torch.allclose(alone, batch[i : i + 1], atol=1e-6, rtol=0), i
        for extra in (torch.zeros(4, 9, dtype=tokens.dtype), torch.randint(2, 30, (4, 9))):
            wider = torch.cat([tokens, extra], dim=1)
            assert torch.allclose(model(wider, lengths), batch, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("variant", "bidirectional"), CASES)
def test_logits_same_alone_and_in_a_padded_batch(variant, bidirectional):
    assert_padding_never_leaks(make(variant, bidirectional))


@pytest.mark.parametrize(("cell", "twin"), [("rnn_cell", "rnn"), ("rnn_cell_deep", "rnn_deep")])
@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_stacked_cells_simulate_a_deep_rnn(cell, twin, nonlinearity, bidirectional):
    """The tutorial's claim, proven: cells with nn.RNN's weights give nn.RNN's outputs, in
    one direction and in both (the reverse cells carry nn.RNN's *_reverse weights)."""
    layers = 1 if cell == "rnn_cell" else 3
    options = dict(nonlinearity=nonlinearity, num_layers=layers, bidirectional=bidirectional)
    cells = make(cell, **options)
    rnn = make(twin, seed=5, **options)
    state = {k: v for k, v in rnn.state_dict().items() if not k.startswith("core.")}
    reverse = [("cells_reverse", "_reverse")] if bidirectional else []
    for group, suffix in [("cells", ""), *reverse]:
        for i in range(layers):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                state[f"core.{group}.{i}.{name}"] = rnn.state_dict()[
                    f"core.rnn.{name}_l{i}{suffix}"
                ]
    cells.load_state_dict(state)
    tokens, lengths = padded([9, 2, 14, 5, 1])
    with torch.no_grad():
        assert torch.allclose(cells(tokens, lengths), rnn(tokens, lengths), atol=1e-5, rtol=0)
        assert torch.allclose(
            as_torch_rnn(cells)(tokens, lengths), cells(tokens, lengths), atol=1e-5, rtol=0
        )


def test_cell_loop_matches_plain_rnncell_calls():
    """The hoisted input projection computes exactly what calling nn.RNNCell per step does."""
    model = make("rnn_cell_deep")
    tokens, lengths = padded([6, 6])
    x = model.embedding(tokens)
    h = [torch.zeros(2, 12) for _ in model.core.cells]
    with torch.no_grad():
        for t in range(6):
            inp = x[:, t]
            for i, cell in enumerate(model.core.cells):
                h[i] = cell(inp, h[i])
                inp = h[i]
        expected = model.head(h[-1])
        assert torch.allclose(model(tokens, lengths), expected, atol=1e-6, rtol=0)


def test_parameter_counts():
    assert count_parameters(make("rnn")) == 30 * 8 + (8 * 12 + 12 * 12 + 24) + 12 * 4 + 4
    assert count_parameters(make("lstm")) > count_parameters(make("gru", num_layers=2))


@pytest.mark.parametrize("variant", VARIANTS)
def test_training_steps_lower_the_loss_and_overfit_32_examples(variant):
    model = make(variant, hidden_size=32).train()
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 10, (32,), generator=g)
    tokens = torch.randint(2, 30, (32, 9), generator=g)
    tokens = tokens * (torch.arange(9)[None, :] < lengths[:, None])
    labels = torch.randint(0, 4, (32,), generator=g)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    losses = []
    for _ in range(150):
        loss = nn.functional.cross_entropy(model(tokens, lengths), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[10] < losses[0]
    accuracy = (model.eval()(tokens, lengths).argmax(1) == labels).float().mean()
    assert accuracy >= 0.95, (variant, float(accuracy), losses[-1])


@pytest.mark.parametrize("variant", ["rnn", "rnn_deep", "lstm", "gru"])
def test_padded_path_equals_the_packed_one_in_value_and_gradient(variant):
    """One direction trains on padded batches (torch's fast paths) and reads each sequence's
    last valid step: the logits and every gradient equal the packed computation's."""
    model = make(variant, dropout=0.0).train()
    assert not model.core.packed
    tokens, lengths = padded([3, 11, 1, 7, 11, 2])
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    results = []
    for packed in (False, True):
        model.core.packed = packed
        model.zero_grad()
        logits = model(tokens, lengths)
        nn.functional.cross_entropy(logits, labels).backward()
        results.append((logits.detach(), [p.grad.clone() for p in model.parameters()]))
    (a, grads_a), (b, grads_b) = results
    assert torch.allclose(a, b, atol=1e-6, rtol=0)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(ga, gb, atol=1e-6, rtol=0)


def test_bidirectional_models_stay_on_packed_input():
    """The backward direction must start at each sequence's own last step: packed only."""
    model = make("gru", bidirectional=True)
    assert model.core.packed
    tokens, lengths = padded([4, 2])
    with torch.no_grad():
        full = model(tokens, lengths)
        model.core.packed = False  # reading a padded backward pass would be wrong
        assert not torch.allclose(model(tokens, lengths), full, atol=1e-4)


POOLED = [
    (variant, bidirectional, pool)
    for pool in ("mean", "max", "attention", "concat")
    for variant, bidirectional in [
        ("rnn", False),
        ("rnn_deep", False),
        ("rnn_cell", False),
        ("rnn_cell_deep", False),
        ("lstm", False),
        ("gru", False),
        ("lstm", True),
        ("rnn", True),
        ("rnn_cell_deep", True),
    ]
]


@pytest.mark.parametrize(("variant", "bidirectional", "pool"), POOLED)
def test_pooling_never_reads_padding(variant, bidirectional, pool):
    assert_padding_never_leaks(make(variant, bidirectional, pool=pool))


@pytest.mark.parametrize("pool", ["last", "mean", "max", "attention", "concat"])
def test_each_pooling_computes_what_it_says(pool):
    """Against the states of nn.RNN computed by hand: the head reads the last state, their
    mean, their elementwise max, their softmax(score)-weighted sum, or last, max and mean
    side by side."""
    model = make("rnn", pool=pool)
    tokens, lengths = padded([6])
    with torch.no_grad():
        states, _ = model.core.rnn(model.embedding(tokens))
        states = states[0]  # [T, H]
        summary = {
            "last": states[-1],
            "mean": states.mean(0),
            "max": states.max(0).values,
        }.get(pool)
        if pool == "attention":
            weights = torch.softmax(model.pool.score(states).squeeze(-1), 0)
            summary = (weights[:, None] * states).sum(0)
        if pool == "concat":
            summary = torch.cat([states[-1], states.max(0).values, states.mean(0)])
            assert model.head.in_features == 3 * states.shape[1]
        expected = model.head(summary)
        assert torch.allclose(model(tokens, lengths)[0], expected, atol=1e-6, rtol=0)


def test_embedding_dropout_drops_only_while_training():
    model = make("gru", embedding_dropout=0.5)
    tokens, lengths = padded([9, 4])
    with torch.no_grad():
        assert torch.equal(model(tokens, lengths), model(tokens, lengths))  # eval: deterministic
        model.train()
        torch.manual_seed(0)
        first = model(tokens, lengths)
        torch.manual_seed(1)
        assert not torch.allclose(first, model(tokens, lengths))


CONV = [(v, False) for v in VARIANTS] + [("gru", True), ("rnn_cell_deep", True)]


@pytest.mark.parametrize(("variant", "bidirectional"), CONV)
def test_ngram_convolution_never_reads_padding(variant, bidirectional):
    """The window of a text's last tokens reaches past its end: zeros there, whatever the pad
    length, the pad ids or junk ids, and the batch mates."""
    model = make(variant, bidirectional, pool="max", conv_width=3, conv_channels=5)
    assert_padding_never_leaks(model)


def test_ngram_features_are_each_windows_convolution():
    """Step t reads [e_t, relu(W [e_t-1; e_t; e_t+1] + b)], zeros outside the text."""
    model = make("gru", conv_width=3, conv_channels=5)
    tokens, lengths = padded([4, 2])
    conv = model.ngrams.conv
    with torch.no_grad():
        features = model.inputs(tokens, lengths)
        assert features.shape == (2, 4, 8 + 5)
        for row, n in enumerate(lengths.tolist()):
            emb = torch.cat(
                [torch.zeros(1, 8), model.embedding(tokens[row, :n]), torch.zeros(1, 8)]
            )
            for t in range(n):
                window = emb[t : t + 3]  # [3, E]: the tokens t-1, t, t+1
                expected = torch.relu((conv.weight * window.T[None]).sum((1, 2)) + conv.bias)
                assert torch.allclose(features[row, t, :8], emb[t + 1], atol=1e-6, rtol=0)
                assert torch.allclose(features[row, t, 8:], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize(("variant", "bidirectional"), [("gru", False), ("rnn_cell", True)])
def test_ngram_bag_never_reads_padding(variant, bidirectional):
    """An n-gram reaching past a text's end is not in its bag, whatever lies there."""
    model = make(variant, bidirectional, ngram_bag=(1, 2, 3), ngram_buckets=97)
    assert_padding_never_leaks(model)


def test_ngram_bag_is_the_mean_of_each_ngrams_hashed_row():
    """The bag, computed by hand: every n-gram inside the text, hashed as a polynomial in its
    token ids (base: the vocabulary, seeded by n, reduced modulo the buckets), one row each,
    averaged; a text shorter than every n reads zeros."""
    model = make("gru", ngram_bag=(2, 3), ngram_buckets=101)
    tokens, lengths = padded([6, 1, 3, 2])
    with torch.no_grad():
        bag = model.bag(tokens, lengths)
        assert bag.shape == (4, 8)
        table = model.bag.table.weight
        for row, n_tokens in enumerate(lengths.tolist()):
            text = tokens[row, :n_tokens].tolist()
            ids = []
            for n in (2, 3):
                for start in range(n_tokens - n + 1):
                    h = n
                    for token in text[start : start + n]:
                        h = (h * 30 + token) % 101
                    ids.append(h)
            expected = table[ids].mean(0) if ids else torch.zeros(8)
            assert torch.allclose(bag[row], expected, atol=1e-6, rtol=0), (row, ids)
        assert len(set(model.bag.ids(tokens, lengths)[0][0, :5].tolist())) > 1
    assert bag[1].abs().max() == 0  # one token: no bigram, no trigram


def test_ngram_dropout_leaves_whole_ngrams_out_of_the_mean_when_training_only():
    """Training, each n-gram inside the text is left out of the bag's mean with chance
    ngram_dropout (none left: zeros), another draw each call; evaluating, the mean of all of
    them, as without it."""
    model = make("gru", ngram_bag=(2, 3), ngram_buckets=101, ngram_dropout=0.3)
    plain = make("gru", ngram_bag=(2, 3), ngram_buckets=101)
    tokens, lengths = padded([9, 4, 12, 1, 7], seed=3)
    with torch.no_grad():
        assert torch.equal(model.bag(tokens, lengths), plain.bag(tokens, lengths))
        ids, valid = model.bag.ids(tokens, lengths)
        rows = model.bag.table.weight[ids]  # [B, M, dim]
        model.train()
        kept, total, bags = 0, 0, []
        for seed in range(300):
            torch.manual_seed(seed)
            keep = valid & (torch.rand(valid.shape) >= 0.3)  # the draw the bag makes
            torch.manual_seed(seed)
            bag = model.bag(tokens, lengths)
            count = keep.sum((1, 2)).clamp(min=1).unsqueeze(1)
            expected = (rows * keep).sum(1) / count
            assert torch.allclose(bag, expected, atol=1e-6, rtol=0), seed
            kept, total = kept + int(keep.sum()), total + int(valid.sum())
            bags.append(bag)
    assert abs(kept / total - 0.7) < 0.02, kept / total  # 300 x 52 n-grams: SD 0.004
    assert bags[0][3].abs().max() == 0  # one token: no n-gram to keep
    assert not torch.equal(bags[0], bags[1])


def test_ngram_bag_changes_the_logits_and_widens_the_head():
    """The head reads the pooled states and the bag side by side."""
    plain, bagged = make("lstm"), make("lstm", ngram_bag=(2,), ngram_buckets=50)
    assert bagged.head.in_features == plain.head.in_features + 8
    assert count_parameters(bagged) == count_parameters(plain) + 50 * 8 + 8 * 4
    tokens, lengths = padded([5, 4])
    with torch.no_grad():
        before = bagged(tokens, lengths)
        bagged.bag.table.weight.add_(1.0)
        assert (bagged(tokens, lengths) - before).abs().max() > 1e-3


def test_ngram_dim_sets_the_bags_width_and_zero_means_the_embeddings():
    """`ngram_dim` is the table's width and the head's extra inputs; 0 (a checkpoint saved
    before the field) means embedding_dim, as it was."""
    plain, narrow = make("gru"), make("gru", ngram_bag=(2, 3), ngram_buckets=50, ngram_dim=5)
    assert narrow.bag.table.weight.shape == (50, 5)
    assert narrow.head.in_features == plain.head.in_features + 5
    assert count_parameters(narrow) == count_parameters(plain) + 50 * 5 + 5 * 4
    tokens, lengths = padded([7, 3, 1])
    with torch.no_grad():
        assert narrow.bag(tokens, lengths).shape == (3, 5)
        assert narrow(tokens, lengths).shape == (3, 4)
    old = make("gru", ngram_bag=(2, 3), ngram_buckets=50, ngram_dim=0)
    assert old.bag.table.weight.shape == (50, 8)
    # params: null (the default) is that 0; a number is the width
    options = ModelParams(ngram_bag=[2, 3], embedding_dim=8)
    assert ModelConfig.of("gru", options, 30, 4).ngram_dim == 0
    wide = ModelConfig.of("gru", options.model_copy(update={"ngram_dim": 24}), 30, 4)
    assert RNNClassifier(wide).bag.table.weight.shape == (16384, 24)


@pytest.mark.parametrize("bidirectional", [False, True])
def test_cell_loops_with_ngrams_carry_into_nn_rnn(bidirectional):
    """The export twin of a cell-loop model keeps the convolution and the n-gram bag."""
    cells = make(
        "rnn_cell_deep",
        bidirectional,
        conv_width=5,
        conv_channels=4,
        ngram_bag=(2, 3),
        ngram_buckets=64,
    )
    twin = as_torch_rnn(cells)
    assert twin.core.rnn.input_size == 8 + 4
    tokens, lengths = padded([9, 2, 14, 5, 1])
    with torch.no_grad():
        assert torch.allclose(twin(tokens, lengths), cells(tokens, lengths), atol=1e-5, rtol=0)
