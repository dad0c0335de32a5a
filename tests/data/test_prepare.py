"""Stage prepare: dedup, conflicting labels, stratified split without leakage."""

import json
from collections import Counter

import pytest

from rnnflow.core.errors import RnnflowError
from rnnflow.data.prepare import dedup_key, deduplicate, prepare, stratified_split
from rnnflow.data.sources import RawTable

from ..conftest import small_params, write_params

FRACTIONS = {"train": 0.8, "val": 0.1, "test": 0.1}


def _table(rows):
    table = RawTable()
    for text, label in rows:
        table.add(text, label)
    return table


def test_dedup_majority_and_ties():
    rows, dropped = deduplicate(
        _table([("Smith", "en"), ("smith ", "en"), ("SMITH", "de"), ("Roy", "fr"), ("roy", "en")])
    )
    assert rows == [("Smith", "en")]
    assert dropped == Counter({"duplicate": 1, "minority_label": 1, "conflicting_label": 2})


def test_stratified_split_keeps_proportions_and_never_leaks():
    rows = [(f"a{i}", "a") for i in range(500)] + [(f"b{i}", "b") for i in range(100)]
    splits = stratified_split(rows, FRACTIONS, seed=1)
    counts = {s: Counter(label for _, label in p) for s, p in splits.items()}
    assert counts["train"] == {"a": 400, "b": 80}
    assert counts["val"] == {"a": 50, "b": 10}
    assert counts["test"] == {"a": 50, "b": 10}
    texts = [{dedup_key(t) for t, _ in p} for p in splits.values()]
    assert not (texts[0] & texts[1] or texts[0] & texts[2] or texts[1] & texts[2])
    assert sum(len(p) for p in splits.values()) == 600
    assert stratified_split(rows, FRACTIONS, seed=1) == splits
    assert stratified_split(rows, FRACTIONS, seed=2) != splits


def test_single_class_and_tiny_class_are_errors():
    with pytest.raises(RnnflowError, match="found 1 class \\(a\\); a classifier needs at least 2"):
        stratified_split([(f"a{i}", "a") for i in range(10)], FRACTIONS, 0)
    rows = [(f"a{i}", "a") for i in range(10)] + [("b0", "b"), ("b1", "b")]
    with pytest.raises(RnnflowError, match="class 'b' has 2 example"):
        stratified_split(rows, FRACTIONS, 0)


def test_prepare_on_user_csv_writes_splits_and_report(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    lines = ["text,label"] + [f"good thing {i},pos" for i in range(30)]
    lines += [f"bad thing {i},neg" for i in range(30)] + ["good thing 1,pos", " ,neg"]
    (tmp_path / "in.csv").write_text("\n".join(lines) + "\n")
    params = write_params(tmp_path, small_params(data={"source": "csv", "path": "in.csv"}))
    report = prepare(params)
    assert report["rows_read"] == 62
    assert report["rows_kept"] == 60
    assert report["dropped"] == {"duplicate": 1, "empty_text": 1}
    assert report["split_sizes"] == {"train": 48, "val": 6, "test": 6}
    assert report["per_class"]["neg"] == {"train": 24, "val": 3, "test": 3}
    on_disk = json.loads((tmp_path / "data/reports/prepare.json").read_text())
    assert on_disk == report
    train = (tmp_path / "data/prepared/train.jsonl").read_text().splitlines()
    assert len(train) == 48 and {"text", "label"} == set(json.loads(train[0]))


def test_prepare_fails_cleanly_when_nothing_is_usable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.csv").write_bytes(b"text,label\n\xff\xfe,a\n  ,b\n")
    params = write_params(tmp_path, small_params(data={"source": "csv", "path": "in.csv"}))
    with pytest.raises(RnnflowError, match="no usable rows left.*bad_encoding': 1.*empty_text': 1"):
        prepare(params)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").rglob("*.jsonl"))
