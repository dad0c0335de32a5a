"""Property-based tests of the text path (hypothesis)."""

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnflow.data.batching import BucketBatchSampler, PackedSplit
from rnnflow.data.text import PAD_ID, build_tokenizer, encode, pad_batch

from ..model.test_models import make

ALPHABET = "abcdefghijklmnopqrstuvwxyzäöüßéñ' -"
CHAR_TOK = build_tokenizer([ALPHABET], "char", lowercase=False, min_freq=1, max_vocab=100)
WORD_TOK = build_tokenizer(["alpha beta gamma delta , ."], "word", False, 1, 100)
MODELS = {v: make(v) for v in ("rnn_cell_deep", "lstm", "gru")}


@given(st.text(alphabet=ALPHABET, min_size=1, max_size=60))
def test_char_round_trip(text):
    ids = encode(CHAR_TOK, [text], max_len=100)[0]
    assert "".join(CHAR_TOK.id_to_token(i) for i in ids) == text


@given(
    st.lists(
        st.sampled_from(["alpha", "beta", "gamma", "delta", ",", "."]), min_size=1, max_size=30
    )
)
def test_word_round_trip(words):
    ids = encode(WORD_TOK, [" ".join(words)], max_len=100)[0]
    assert [WORD_TOK.id_to_token(i) for i in ids] == words


@given(
    st.lists(st.lists(st.integers(1, 50), min_size=1, max_size=20), min_size=1, max_size=30),
    st.integers(1, 8),
)
def test_padding_and_bucketing_keep_every_sequence(seqs, batch_size):
    tokens, lengths = pad_batch(seqs)
    mask = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    assert (mask.sum(1) == lengths).all()
    assert ((tokens != PAD_ID) == mask).all()
    split = PackedSplit(tokens, lengths, np.arange(len(seqs)))
    seen = []
    for index in BucketBatchSampler(lengths, batch_size, pool=3, seed=1):
        batch, n, labels = split.batch(index)
        for row, label in enumerate(labels):
            assert batch[row, : n[row]].tolist() == seqs[label]
            assert (batch[row, n[row] :] == PAD_ID).all()
        seen += labels.tolist()
    assert sorted(seen) == list(range(len(seqs)))


@settings(max_examples=25, deadline=None)
@given(
    st.sampled_from(sorted(MODELS)),
    st.lists(st.integers(1, 12), min_size=1, max_size=6),
    st.integers(1, 10),
    st.integers(0, 2**16),
)
def test_logits_invariant_to_extra_padding(variant, lengths, extra, seed):
    g = torch.Generator().manual_seed(seed)
    n = torch.tensor(lengths)
    tokens = torch.randint(2, 30, (len(lengths), max(lengths)), generator=g)
    tokens = tokens * (torch.arange(max(lengths))[None, :] < n[:, None])
    wider = torch.cat([tokens, torch.zeros(len(lengths), extra, dtype=tokens.dtype)], 1)
    with torch.no_grad():
        model = MODELS[variant]
        assert torch.allclose(model(tokens, n), model(wider, n), atol=1e-6, rtol=0)
