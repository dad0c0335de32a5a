"""params.yaml validation: every bad value is one error naming the field."""

import pytest
import yaml

from rnnflow.core.config import load_params
from rnnflow.core.errors import RnnflowError

from ..conftest import REPO


def _load_with(tmp_path, mutate):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    mutate(raw)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_params(path)


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert list(params.model.variants) == [
        "rnn",
        "rnn_deep",
        "rnn_cell",
        "rnn_cell_deep",
        "lstm",
        "gru",
    ]
    assert params.variant("rnn_deep").num_layers == 2
    assert params.variant("lstm").hidden_size == params.model.defaults.hidden_size
    assert params.token_level == "char" and params.token_marks is True


@pytest.mark.parametrize(
    ("tokenize", "source", "marks"),
    [
        ({"marks": "auto"}, "builtin", True),  # auto: the char level only
        ({"marks": "auto"}, "csv", False),
        ({"marks": "auto", "level": "char"}, "csv", True),
        ({"marks": "auto", "level": "bpe"}, "builtin", False),
        ({"marks": True}, "csv", True),
        ({"marks": False}, "builtin", False),
    ],
)
def test_marks_auto_means_the_char_level(tmp_path, tokenize, source, marks):
    def mutate(raw):
        raw["tokenize"] |= tokenize
        raw["data"] |= {"source": source, "path": "x.csv" if source == "csv" else None}

    assert _load_with(tmp_path, mutate).token_marks is marks


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda r: r["train"].update(lr=0), "train.lr: Input should be greater than 0"),
        (lambda r: r["train"].update(lr=-1e-3), "train.lr: Input should be greater than 0"),
        (lambda r: r["model"]["defaults"].update(hidden_size=0), "model.defaults.hidden_size"),
        (lambda r: r["data"]["split"].update(train=0.5), "must sum to 1, got 0.7"),
        (lambda r: r["pack"].update(max_len=0), "pack.max_len: Input should be greater than"),
        (lambda r: r["data"].update(source="s3"), "data.source: Input should be 'builtin'"),
        (lambda r: r["data"].update(source="csv"), "source 'csv' needs data.path"),
        (lambda r: r["model"]["variants"].update(transformer={}), "unknown variant"),
        (lambda r: r["model"]["variants"].update(rnn={"num_layers": 2}), "num_layers must be 1"),
        (lambda r: r["model"]["variants"].update(rnn_deep={"num_layers": 1}), "must be > 1"),
        (lambda r: r["model"]["variants"].update(rnn_cell={"pool": "sum"}), "rnn_cell.pool"),
        (lambda r: r["model"]["defaults"].update(embedding_dropout=1), "embedding_dropout"),
        (lambda r: r["train"].update(schedule="step"), "train.schedule: Input should be"),
        (
            lambda r: r["model"]["defaults"].update(conv_width=4),
            "model.defaults.conv_width: must be 0 (no convolution) or odd",
        ),
        (lambda r: r["model"]["variants"].update(gru={"conv_channels": 0}), "gru.conv_channels"),
        (
            lambda r: r["model"]["defaults"].update(ngram_bag=[2, 2]),
            "model.defaults.ngram_bag: must be distinct n-gram lengths from 1 to 8, e.g. [2, 3], "
            "not [2, 2]",
        ),
        (lambda r: r["model"]["variants"].update(lstm={"ngram_bag": [0]}), "lstm.ngram_bag"),
        (lambda r: r["model"]["defaults"].update(ngram_buckets=0), "model.defaults.ngram_buckets"),
        (lambda r: r["model"]["variants"].update(gru={"ngram_dropout": 1.0}), "gru.ngram_dropout"),
        (lambda r: r["model"]["defaults"].update(ngram_dim=0), "model.defaults.ngram_dim"),
        (lambda r: r["train"].update(label_smoothing=-0.1), "train.label_smoothing"),
        (lambda r: r["tokenize"].update(level="sentencepiece"), "tokenize.level: Input should"),
        (
            lambda r: r["tokenize"].update(marks="maybe"),
            "tokenize.marks: Input should be 'auto', True or False",
        ),
        (lambda r: r["train"].update(epochs="many"), "train.epochs: Input should be a valid int"),
        (lambda r: r.update(tokenise={}), "tokenise: Extra inputs are not permitted"),
    ],
)
def test_invalid_params_name_the_field(tmp_path, mutate, expected):
    with pytest.raises(RnnflowError) as err:
        _load_with(tmp_path, mutate)
    assert expected in str(err.value)
    assert str(tmp_path / "params.yaml") in str(err.value)


def test_unknown_variant_lookup_lists_known(tmp_path):
    params = _load_with(tmp_path, lambda r: None)
    with pytest.raises(RnnflowError, match="has no variant 'bert'.*listed: rnn, rnn_deep"):
        params.variant("bert")


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(RnnflowError, match="file not found"):
        load_params(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [unclosed\n")
    with pytest.raises(RnnflowError, match="not valid YAML"):
        load_params(tmp_path / "bad.yaml")
