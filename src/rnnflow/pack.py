"""Stage pack: numericalize every split, and report how much padding bucketing saves."""

from pathlib import Path

import numpy as np

from rnnflow import plots
from rnnflow.atomic import atomic_path, write_json
from rnnflow.batching import BucketBatchSampler, padding_stats
from rnnflow.config import Params
from rnnflow.paths import DATA_REPORTS, PACKED, SPLITS, TOKENIZER_DIR, split_file
from rnnflow.prepare import read_split
from rnnflow.text import UNK_ID, encode, load_tokenizer, pad_batch
from rnnflow.vocab import labels_path, load_labels


def numericalize(
    texts: list[str], labels: list[str], tok, classes: list[str], max_len: int
) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays for one split and its stats; texts that give no token are dropped and counted."""
    index = {name: i for i, name in enumerate(classes)}
    ids = encode(tok, texts, max_len + 1)  # one extra token tells us what truncation cut
    keep = [i for i, seq in enumerate(ids) if seq and labels[i] in index]
    truncated = sum(len(ids[i]) > max_len for i in keep)
    seqs = [ids[i][:max_len] for i in keep]
    tokens, lengths = pad_batch(seqs)
    arrays = {
        "tokens": tokens.astype(np.int32),
        "lengths": lengths,
        "labels": np.array([index[labels[i]] for i in keep], dtype=np.int64),
    }
    n_tokens = int(lengths.sum())
    stats = {
        "sequences": len(seqs),
        "dropped_empty": sum(1 for seq in ids if not seq),
        "dropped_unknown_label": sum(
            1 for i, seq in enumerate(ids) if seq and labels[i] not in index
        ),
        "truncated": truncated,
        "tokens": n_tokens,
        "mean_length": float(lengths.mean()) if len(seqs) else 0.0,
        "max_length": int(lengths.max(initial=0)),
        "unk_rate": float((tokens == UNK_ID).sum() / max(1, n_tokens)),
    }
    return arrays, stats


def padding_report(lengths: np.ndarray, batch_size: int, pool: int, seed: int) -> dict:
    """Padding of one epoch: length buckets vs. random batches vs. padding all to the longest."""
    bucketed = list(BucketBatchSampler(lengths, batch_size, pool, shuffle=True, seed=seed))
    perm = np.random.default_rng(seed).permutation(len(lengths))
    random_batches = [perm[i : i + batch_size] for i in range(0, len(perm), batch_size)]
    everything = [np.arange(len(lengths))]
    return {
        "bucketed": padding_stats(lengths, bucketed),
        "random_batches": padding_stats(lengths, random_batches),
        "global_max": padding_stats(lengths, everything),
    }


def plot_lengths(lengths: dict[str, np.ndarray], max_len: int, path: Path) -> None:
    """Histogram of sequence lengths per split, with the truncation limit marked."""
    fig, ax = plots.subplots(figsize=(7, 4))
    top = max(int(v.max(initial=1)) for v in lengths.values())
    bins = np.arange(1, top + 2) - 0.5 if top <= 80 else 60
    for split, values in lengths.items():
        ax.hist(values, bins=bins, alpha=0.6, label=f"{split} (n={len(values)})")
    ax.axvline(max_len + 0.5, color="k", linestyle="--", label=f"pack.max_len={max_len}")
    ax.set(xlabel="tokens per sequence", ylabel="sequences", title="Sequence lengths")
    ax.legend()
    fig.tight_layout()
    plots.save(fig, path, dpi=100)


def pack(params: Params, out_dir: Path = PACKED, report_dir: Path = DATA_REPORTS) -> dict:
    """Numericalize train/val/test; write .npz arrays, pack.json and the length histogram."""
    tok = load_tokenizer(TOKENIZER_DIR / "tokenizer.json")
    classes = load_labels(labels_path())
    report: dict = {"max_len": params.pack.max_len, "splits": {}}
    all_lengths = {}
    for split in SPLITS:
        texts, labels = read_split(split_file(split))
        arrays, stats = numericalize(texts, labels, tok, classes, params.pack.max_len)
        with atomic_path(out_dir / f"{split}.npz") as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        report["splits"][split] = stats
        all_lengths[split] = arrays["lengths"]
    report["padding_train_epoch"] = padding_report(
        all_lengths["train"], params.pack.batch_size, params.pack.bucket_pool, params.seed
    )
    report["batch_size"] = params.pack.batch_size
    write_json(report_dir / "pack.json", report)
    plot_lengths(all_lengths, params.pack.max_len, report_dir / "pack_lengths.png")
    return report
