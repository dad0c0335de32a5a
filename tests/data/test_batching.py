"""Length bucketing: every index once per epoch, far less padding, deterministic order."""

import json

import numpy as np
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from rnnflow.data.batching import BucketBatchSampler, PackedSplit, make_loader, padding_stats


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 200), min_size=1, max_size=400),
    batch_size=st.integers(1, 70),
    pool=st.integers(1, 20),
    epoch=st.integers(0, 5),
)
def test_every_index_exactly_once_per_epoch(lengths, batch_size, pool, epoch):
    sampler = BucketBatchSampler(np.array(lengths), batch_size, pool, shuffle=True, seed=3)
    sampler.set_epoch(epoch)
    batches = list(sampler)
    flat = np.concatenate(batches)
    assert sorted(flat.tolist()) == list(range(len(lengths)))
    assert all(1 <= len(b) <= batch_size for b in batches)
    assert len(batches) == len(sampler)


def test_bucketing_pads_far_less_than_global_padding():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 30, size=5000)
    sampler = BucketBatchSampler(lengths, 64, pool=50, seed=0)
    bucketed = padding_stats(lengths, list(sampler))["pad_per_real_token"]
    perm = rng.permutation(len(lengths))
    random = padding_stats(lengths, [perm[i : i + 64] for i in range(0, 5000, 64)])
    global_max = padding_stats(lengths, [np.arange(5000)])["pad_per_real_token"]
    assert bucketed < 0.03
    assert bucketed < random["pad_per_real_token"] / 20
    assert global_max > 0.8


def test_order_depends_only_on_seed_and_epoch():
    lengths = np.arange(1, 300) % 17 + 1

    def order(seed, epoch):
        sampler = BucketBatchSampler(lengths, 16, 4, seed=seed)
        sampler.set_epoch(epoch)
        return np.concatenate(list(sampler)).tolist()

    assert order(1, 0) == order(1, 0)
    assert order(1, 0) != order(1, 1)
    assert order(1, 0) != order(2, 0)


def test_loader_batches_are_padded_to_their_own_max(workspace):
    split = PackedSplit.load(workspace / "data/packed/train.npz")
    seen = 0
    for tokens, lengths, labels in make_loader(split, 32, pool=10, shuffle=True, seed=0):
        assert tokens.shape == (len(lengths), int(lengths.max()))
        assert tokens.dtype.is_floating_point is False and str(tokens.dtype) == "torch.int64"
        mask = np.arange(tokens.shape[1])[None, :] < lengths.numpy()[:, None]
        assert (tokens.numpy()[~mask] == 0).all() and (tokens.numpy()[mask] != 0).all()
        assert len(labels) == len(lengths)
        seen += len(lengths)
    assert seen == len(split)


def test_pack_report_numbers(workspace):
    report = json.loads((workspace / "data/reports/pack.json").read_text())
    train = report["splits"]["train"]
    split = PackedSplit.load(workspace / "data/packed/train.npz")
    assert train["sequences"] == len(split) == len(split.labels)
    assert train["tokens"] == int(split.lengths.sum())
    max_len = yaml.safe_load((workspace / "params.yaml").read_text())["pack"]["max_len"]
    assert train["max_length"] <= report["max_len"] == max_len
    pad = report["padding_train_epoch"]
    assert pad["bucketed"]["pad_fraction"] < 0.15 < 0.4 < pad["global_max"]["pad_fraction"]
    assert pad["bucketed"]["pad_fraction"] < pad["random_batches"]["pad_fraction"]
    png = (workspace / "data/reports/pack_lengths.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
