"""Readers for the builtin data and users' csv/tsv/jsonl files."""

import json

import pytest

from rnnflow.core.errors import RnnflowError
from rnnflow.data.prepare import deduplicate
from rnnflow.data.sources import SURNAME_LANGUAGES, load_builtin, read_delimited, read_jsonl


def test_builtin_surnames_are_a_real_multiclass_dataset():
    table = load_builtin()
    rows, dropped = deduplicate(table)
    languages = {label for _, label in rows}
    assert languages == set(SURNAME_LANGUAGES)
    assert len(languages) >= 10
    assert len(rows) >= 8000
    assert dropped["duplicate"] > 0  # the same name under several locales of one language
    labels = dict(rows)
    assert labels.get("Nakamura") is None  # not a Latin-script locale we ship
    assert labels["Tremblay"] == "French"
    assert labels["Virtanen"] == "Finnish"


def test_csv_reader_keeps_good_rows_and_counts_bad_ones(tmp_path):
    path = tmp_path / "d.csv"
    path.write_bytes(
        b'text,label\n"hello, world",greeting\n  ,empty\nno label,\nbad \xff byte,x\n'
        b'"multi\nline",greeting\nok,NaN\n'
    )
    table = read_delimited(path, ",", "text", "label")
    assert table.texts == ["hello, world", "multi\nline"]
    assert table.labels == ["greeting", "greeting"]
    assert dict(table.dropped) == {"empty_text": 1, "missing_label": 2, "bad_encoding": 1}


def test_tsv_reader_with_custom_columns(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("id\tsentence\ty\n1\tgood film\tpos\n2\tbad film\tneg\n", encoding="utf-8")
    table = read_delimited(path, "\t", "sentence", "y")
    assert list(zip(table.texts, table.labels, strict=True)) == [
        ("good film", "pos"),
        ("bad film", "neg"),
    ]


def test_jsonl_reader_counts_invalid_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    lines = [
        json.dumps({"text": "a b", "label": 1}),
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"text": "c", "label": None}),
        "",
        json.dumps({"text": "d", "label": "x"}),
    ]
    path.write_text("\n".join(lines), encoding="utf-8")
    table = read_jsonl(path, "text", "label")
    assert table.texts == ["a b", "d"]
    assert table.labels == ["1", "x"]
    assert dict(table.dropped) == {"invalid_json": 2, "missing_label": 1}


@pytest.mark.parametrize(
    ("content", "delimiter", "message"),
    [
        (None, ",", "file not found"),
        (b"", ",", "file is empty"),
        (b"   \n", ",", "file is empty"),
        (b"text,label\n", ",", "has a header but no data rows"),
        (b"body,label\nx,y\n", ",", "missing column(s) 'text'"),
        (b"text\tlabel\nx\ty\n", ",", "is the delimiter ',' right?"),
    ],
)
def test_bad_files_get_one_clear_error(tmp_path, content, delimiter, message):
    path = tmp_path / "in.csv"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(RnnflowError) as err:
        read_delimited(path, delimiter, "text", "label")
    assert message in str(err.value)
    assert str(path) in str(err.value)
