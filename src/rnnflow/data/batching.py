"""Length-bucketed batches of packed splits, and the DataLoader that training and eval share."""

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rnnflow.core.errors import RnnflowError


@dataclass(frozen=True)
class PackedSplit:
    """One numericalized split: tokens [N, T] (PAD-padded), lengths [N], labels [N]."""

    tokens: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray

    @classmethod
    def load(cls, path: str | Path) -> "PackedSplit":
        """Read a split written by the pack stage."""
        try:
            with np.load(path) as z:
                return cls(z["tokens"], z["lengths"], z["labels"])
        except FileNotFoundError as err:
            raise RnnflowError(f"{path}: file not found (run `dvc repro pack`)") from err
        except (OSError, KeyError, ValueError) as err:
            raise RnnflowError(f"{path}: not a packed split ({err})") from err

    def __len__(self) -> int:
        return len(self.lengths)

    def batch(self, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows in `index`, padded only to the longest of them."""
        lengths = self.lengths[index]
        return self.tokens[index, : lengths.max()], lengths, self.labels[index]


class BucketBatchSampler:
    """Yields batches of indices with similar lengths, so little padding is needed.

    Each epoch: shuffle all indices, cut them into pools of `pool` batches, sort each pool by
    length, cut it into batches, and shuffle the batches. Every index appears exactly once per
    epoch; the order depends only on (seed, epoch).
    """

    def __init__(
        self, lengths: np.ndarray, batch_size: int, pool: int, shuffle: bool = True, seed: int = 0
    ):
        self.lengths, self.batch_size, self.pool = np.asarray(lengths), batch_size, pool
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order __iter__ yields."""
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)

    def __iter__(self) -> Iterator[np.ndarray]:
        n = len(self.lengths)
        rng = np.random.default_rng([self.seed, self.epoch])
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        step = self.batch_size * self.pool
        batches = []
        for start in range(0, n, step):
            chunk = order[start : start + step]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches += [
                chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)
            ]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)


def padding_stats(lengths: np.ndarray, batches: list[np.ndarray]) -> dict[str, float]:
    """Padded vs real tokens when each batch is padded to its own longest sequence."""
    real = int(lengths.sum())
    slots = sum(len(b) * int(lengths[b].max()) for b in batches)
    return {"pad_fraction": (slots - real) / slots, "pad_per_real_token": (slots - real) / real}


class _BatchDataset:
    """Map-style dataset whose __getitems__ returns a whole padded batch as tensors."""

    def __init__(self, split: PackedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitems__(self, index: list[int]):
        import torch

        tokens, lengths, labels = self.split.batch(np.asarray(index))
        return (
            torch.from_numpy(tokens.astype(np.int64)),
            torch.from_numpy(lengths),
            torch.from_numpy(labels),
        )


def _identity(batch):
    return batch


def make_loader(split: PackedSplit, batch_size: int, pool: int, shuffle: bool, seed: int):
    """A DataLoader of (tokens [B, T] int64, lengths [B] int64, labels [B] int64) batches.

    Data is in memory and a batch is one fancy-index, so workers would only add IPC on 2 cores.
    """
    from torch.utils.data import DataLoader

    sampler = BucketBatchSampler(split.lengths, batch_size, pool, shuffle=shuffle, seed=seed)
    return DataLoader(
        _BatchDataset(split), batch_sampler=sampler, collate_fn=_identity, num_workers=0
    )
