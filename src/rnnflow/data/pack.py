"""Stage pack: numericalize every split, and report how much padding bucketing saves."""

from pathlib import Path

import numpy as np

from rnnflow.core import plots
from rnnflow.core.atomic import atomic_path, write_json
from rnnflow.core.config import Params
from rnnflow.core.paths import DATA_REPORTS, PACKED, SPLITS, TOKENIZER_DIR, split_file
from rnnflow.data.batching import BucketBatchSampler, padding_stats
from rnnflow.data.prepare import read_split
from rnnflow.data.text import UNK_ID, encode, load_tokenizer, pad_batch
from rnnflow.data.vocab import labels_path, load_labels

CHUNK = 10_000  # texts encoded at a time: memory stays flat however large the split


def numericalize(
    texts: list[str], labels: list[str], tok, classes: list[str], max_len: int
) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays for one split and its stats; texts that give no token are dropped and counted.
    Texts are encoded CHUNK at a time, each chunk's kept texts padded to their own longest,
    then copied into one array as wide as the split's longest: no stage holds a Python object
    per token of the whole split, and a generous max_len costs no memory the texts do not use."""
    index = {name: i for i, name in enumerate(classes)}
    label_ids = np.array([index.get(label, -1) for label in labels], dtype=np.int64)
    unknown = label_ids < 0
    lengths = np.zeros(len(texts), dtype=np.int64)
    truncated = np.zeros(len(texts), dtype=bool)
    keep = np.zeros(len(texts), dtype=bool)
    blocks = []
    for start in range(0, len(texts), CHUNK):
        ids = encode(tok, texts[start : start + CHUNK], max_len + 1)  # +1: was it cut?
        chunk = slice(start, start + len(ids))
        found = np.array([len(seq) for seq in ids], dtype=np.int64)
        lengths[chunk] = np.minimum(found, max_len)
        truncated[chunk] = found > max_len
        keep[chunk] = (lengths[chunk] > 0) & ~unknown[chunk]
        kept = [seq[:max_len] for seq, ok in zip(ids, keep[chunk], strict=True) if ok]
        blocks.append(pad_batch(kept)[0].astype(np.int32))
    empty = lengths == 0
    kept_lengths = lengths[keep]
    tokens = np.zeros((len(kept_lengths), max(1, int(kept_lengths.max(initial=0)))), np.int32)
    row = 0
    for block in blocks:
        tokens[row : row + len(block), : block.shape[1]] = block
        row += len(block)
    arrays = {
        "tokens": tokens,
        "lengths": kept_lengths,
        "labels": label_ids[keep],
    }
    n_tokens = int(kept_lengths.sum())
    stats = {
        "sequences": int(keep.sum()),
        "dropped_empty": int(empty.sum()),
        "dropped_unknown_label": int((~empty & unknown).sum()),
        "truncated": int(truncated[keep].sum()),
        "tokens": n_tokens,
        "mean_length": float(kept_lengths.mean()) if keep.any() else 0.0,
        "max_length": int(kept_lengths.max(initial=0)),
        "unk_rate": float((arrays["tokens"] == UNK_ID).sum() / max(1, n_tokens)),
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
