"""Stage prepare: deduplicate, resolve conflicting labels, and split stratified by class."""

import json
import random
from collections import Counter, defaultdict
from pathlib import Path

from rnnflow.core.atomic import atomic_path, write_json
from rnnflow.core.config import Params
from rnnflow.core.errors import RnnflowError
from rnnflow.core.paths import DATA_REPORTS, RAW, SPLITS, split_file
from rnnflow.data.sources import RawTable, iter_rows, load_source


def dedup_key(text: str) -> str:
    """Texts equal under this key count as the same text (case and spacing ignored)."""
    return " ".join(text.casefold().split())


def deduplicate(table: RawTable) -> tuple[list[tuple[str, str]], Counter]:
    """One row per distinct text. Repeats are counted as `duplicate`; a text seen with several
    labels keeps its majority label, and a tie is dropped as `conflicting_label`."""
    groups: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for text, label in iter_rows(table):
        groups[dedup_key(text)].append((text, label))
    rows, dropped = [], Counter()
    for members in groups.values():
        votes = Counter(label for _, label in members).most_common()
        if len(votes) > 1 and votes[0][1] == votes[1][1]:
            dropped["conflicting_label"] += len(members)
            continue
        label = votes[0][0]
        dropped["duplicate"] += votes[0][1] - 1
        dropped["minority_label"] += len(members) - votes[0][1]
        rows.append((next(t for t, lab in members if lab == label), label))
    return rows, +dropped


def split_counts(n: int, fractions: dict[str, float]) -> dict[str, int] | None:
    """How many of n examples go to each split; None if a split would be empty."""
    val = max(1, round(n * fractions["val"]))
    test = max(1, round(n * fractions["test"]))
    train = n - val - test
    return None if train < 1 else {"train": train, "val": val, "test": test}


def stratified_split(
    rows: list[tuple[str, str]], fractions: dict[str, float], seed: int
) -> dict[str, list[tuple[str, str]]]:
    """Split rows so every class keeps the same proportions in train, val and test."""
    by_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in rows:
        by_class[row[1]].append(row)
    if len(by_class) < 2:
        raise RnnflowError(
            f"data: found {len(by_class)} class ({', '.join(by_class) or 'none'}); "
            "a classifier needs at least 2"
        )
    rng = random.Random(seed)
    splits: dict[str, list[tuple[str, str]]] = {s: [] for s in SPLITS}
    for label in sorted(by_class):
        members = sorted(by_class[label])
        counts = split_counts(len(members), fractions)
        if counts is None:
            raise RnnflowError(
                f"data: class '{label}' has {len(members)} example(s); a stratified "
                "train/val/test split needs at least 3 per class"
            )
        rng.shuffle(members)
        splits["train"] += members[: counts["train"]]
        splits["val"] += members[counts["train"] : counts["train"] + counts["val"]]
        splits["test"] += members[counts["train"] + counts["val"] :]
    for part in splits.values():
        rng.shuffle(part)
    return splits


def cap_per_class(rows: list[tuple[str, str]], cap: int, seed: int) -> tuple[list, int]:
    """Keep at most `cap` rows per class (a seeded sample); return rows and how many were cut."""
    by_class: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for row in sorted(rows):
        by_class[row[1]].append(row)
    rng, kept = random.Random(seed), []
    for label in sorted(by_class):
        members = by_class[label]
        kept += rng.sample(members, cap) if len(members) > cap else members
    return kept, len(rows) - len(kept)


def prepare(params: Params, out_dir: Path | None = None, report_dir: Path = DATA_REPORTS) -> dict:
    """Load the configured source, clean and split it, and write the splits and a report."""
    table = load_source(params.data, RAW, params.seed)
    rows, dropped = deduplicate(table)
    dropped.update(table.dropped)
    if params.data.max_per_class:
        rows, cut = cap_per_class(rows, params.data.max_per_class, params.seed)
        if cut:
            dropped["over_max_per_class"] += cut
    if not rows:
        raise RnnflowError(
            f"{table.origin}: no usable rows left (dropped: {dict(dropped) or 'nothing read'})"
        )
    splits = stratified_split(rows, params.data.split.model_dump(), params.seed)
    for split, part in splits.items():
        target = split_file(split) if out_dir is None else out_dir / f"{split}.jsonl"
        with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8") as fh:
            for text, label in part:
                fh.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")
    classes = sorted({label for _, label in rows})
    report = {
        "source": params.data.source,
        "origin": table.origin,
        "rows_read": len(table.texts) + sum(table.dropped.values()),
        "rows_kept": len(rows),
        "dropped": dict(sorted(dropped.items())),
        "classes": len(classes),
        "split_sizes": {s: len(p) for s, p in splits.items()},
        "per_class": {
            label: {s: sum(1 for _, lab in p if lab == label) for s, p in splits.items()}
            for label in classes
        },
    }
    write_json(report_dir / "prepare.json", report)
    return report


def read_split(path: Path) -> tuple[list[str], list[str]]:
    """Texts and labels of a prepared split file."""
    texts, labels = [], []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            texts.append(row["text"])
            labels.append(row["label"])
    return texts, labels
