"""Bad input gets one clear error: names the file/field, exit code 2, no traceback, no partial
output. Each case runs a real stage CLI in a subprocess on a copy of a small workspace."""

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rnnflow.analysis.evaluate import evaluate_variant
from rnnflow.shipping.export import export_bundle
from rnnflow.training.train import train_variant

from ..conftest import REPO, small_params, write_params


@pytest.fixture(scope="module")
def trained(data_workspace, tmp_path_factory) -> Path:
    """The small workspace with gru trained (1 epoch), evaluated and exported."""
    ws = tmp_path_factory.mktemp("trained") / "ws"
    shutil.copytree(data_workspace, ws)
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        params = write_params(ws, small_params(train={"epochs": 1}))
        train_variant(params, "gru")
        evaluate_variant(params, "gru")
        export_bundle(params, "gru")
    finally:
        os.chdir(cwd)
    return ws


def _snapshot(ws: Path) -> dict[str, str]:
    return {
        str(p.relative_to(ws)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in ws.rglob("*")
        if p.is_file() and "mlflow" not in p.name
    }


def _set(key: str, value):
    def mutate(ws: Path):
        raw = yaml.safe_load((ws / "params.yaml").read_text())
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
        (ws / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    return mutate


def _user_file(name: str, content: bytes | None, **data):
    def mutate(ws: Path):
        if content is not None:
            (ws / "data/input").mkdir(parents=True, exist_ok=True)
            (ws / "data/input" / name).write_bytes(content)
        source = name.rsplit(".", 1)[1]
        for key, value in {"source": source, "path": f"data/input/{name}", **data}.items():
            _set(f"data.{key}", value)(ws)

    return mutate


def _write(rel: str, content: bytes):
    def mutate(ws: Path):
        (ws / rel).write_bytes(content)

    return mutate


def _truncate(rel: str):
    def mutate(ws: Path):
        data = (ws / rel).read_bytes()
        (ws / rel).write_bytes(data[: len(data) // 3])

    return mutate


def _other_vocabulary(ws: Path):
    tok = ws / "data/tokenizer/tokenizer.json"
    tok.write_text(tok.read_text().replace('"<unk>"', '"<UNK>"', 1))


def _file_where_dir_goes(ws: Path):
    shutil.rmtree(ws / "data/reports")
    (ws / "data/reports").write_text("not a directory")


LINES = b"text,label\n" + b"".join(b"word%d,a\nthing%d,b\n" % (i, i) for i in range(10))
CASES = [
    # (id, stage command, mutate, expected message fragments)
    ("missing_file", "prepare", _user_file("gone.csv", None), ["data/input/gone.csv", "not found"]),
    ("empty_file", "prepare", _user_file("e.csv", b""), ["e.csv", "file is empty"]),
    ("header_only", "prepare", _user_file("h.csv", b"text,label\n"), ["h.csv", "no data rows"]),
    (
        "missing_column",
        "prepare",
        _user_file("m.csv", b"body,label\nx,y\n"),
        ["m.csv", "missing column(s) 'text'"],
    ),
    (
        "wrong_delimiter",
        "prepare",
        _user_file("d.csv", LINES.replace(b",", b";")),
        ["d.csv", "is the delimiter ',' right?"],
    ),
    (
        "non_utf8",
        "prepare",
        _user_file("l.csv", "text,label\ncafé,a\nnaïve,b\n".encode("latin-1")),
        ["l.csv", "no usable rows", "bad_encoding': 2"],
    ),
    (
        "only_whitespace_texts",
        "prepare",
        _user_file("w.csv", b"text,label\n  ,a\n\t,b\n"),
        ["w.csv", "no usable rows", "empty_text': 2"],
    ),
    (
        "nan_labels",
        "prepare",
        _user_file("n.jsonl", b'{"text":"a","label":null}\n{"text":"b","label":"NaN"}\n'),
        ["n.jsonl", "no usable rows", "missing_label': 2"],
    ),
    (
        "single_class",
        "prepare",
        _user_file("s.csv", b"text,label\n" + b"".join(b"w%d,a\n" % i for i in range(9))),
        ["found 1 class (a)", "at least 2"],
    ),
    (
        "class_too_small",
        "prepare",
        _user_file("t.csv", LINES + b"odd,c\n"),
        ["class 'c' has 1 example", "at least 3 per class"],
    ),
    (
        "unknown_variant_in_params",
        "prepare",
        _set("model.variants", {"transformer": {}}),
        ["model.variants.transformer: unknown variant"],
    ),
    ("lr_not_positive", "prepare", _set("train.lr", 0), ["params.yaml: train.lr"]),
    (
        "hidden_zero",
        "prepare",
        _set("model.defaults.hidden_size", 0),
        ["params.yaml: model.defaults.hidden_size"],
    ),
    (
        "split_not_one",
        "prepare",
        _set("data.split", {"train": 0.7, "val": 0.1, "test": 0.1}),
        ["params.yaml: data.split", "must sum to 1"],
    ),
    ("max_len_zero", "pack", _set("pack.max_len", 0), ["params.yaml: pack.max_len"]),
    ("unknown_source", "prepare", _set("data.source", "parquet"), ["params.yaml: data.source"]),
    (
        "unknown_variant_arg",
        "train transformer",
        lambda ws: None,
        ["model.variants has no variant 'transformer'"],
    ),
    (
        "corrupt_checkpoint",
        "evaluate gru",
        _write("models/gru/checkpoint.pt", b"junk"),
        ["models/gru/checkpoint.pt: corrupt or truncated checkpoint"],
    ),
    (
        "truncated_checkpoint",
        "evaluate gru",
        _truncate("models/gru/checkpoint.pt"),
        ["models/gru/checkpoint.pt: corrupt or truncated checkpoint"],
    ),
    (
        "checkpoint_other_vocabulary",
        "evaluate gru",
        _other_vocabulary,
        ["models/gru/checkpoint.pt: trained with vocabulary"],
    ),
    (
        "corrupt_onnx",
        "validate gru",
        _write("models/gru/model.onnx", b"\x08\x07junk"),
        ["models/gru/model.onnx: cannot load"],
    ),
    (
        "truncated_onnx",
        "validate gru",
        _truncate("models/gru/model.onnx"),
        ["models/gru/model.onnx: cannot load"],
    ),
    (
        "output_dir_is_a_file",
        "prepare",
        _file_where_dir_goes,
        ["cannot write data/reports/prepare.json"],
    ),
    (
        "missing_packed_data",
        "train gru",
        lambda ws: (ws / "data/packed/train.npz").unlink(),
        ["data/packed/train.npz: file not found"],
    ),
]


@pytest.mark.parametrize(
    ("stage", "mutate", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_one_clear_error(trained, tmp_path, stage, mutate, expected):
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    mutate(ws)
    before = _snapshot(ws)
    name, *args = stage.split()
    proc = subprocess.run(
        [sys.executable, "-m", f"stages.{name}", *args],
        cwd=ws,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    for fragment in expected:
        assert fragment in proc.stderr, proc.stderr
    assert proc.stderr.count(f"{name}: error:") == 1
    assert "Traceback" not in proc.stderr
    after = _snapshot(ws)
    assert after == before, f"outputs changed: {set(after.items()) ^ set(before.items())}"


def test_debug_shows_the_traceback(trained, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "nope", "--debug"],
        cwd=ws,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO)},
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_unreachable_tracking_server_fails_fast(trained, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "stages.train", "gru"],
        cwd=ws,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": "http://127.0.0.1:9"},
    )
    assert proc.returncode == 2
    assert "MLFLOW_TRACKING_URI=http://127.0.0.1:9: tracking store unreachable" in proc.stderr
    assert time.monotonic() - start < 30


def test_ten_megabyte_line_is_truncated_not_a_crash(trained, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(trained, ws)
    _user_file("big.csv", LINES + b"x" * 10_000_000 + b",a\n")(ws)
    _set("tokenize.level", "char")(ws)
    env = os.environ | {"PYTHONPATH": str(REPO)}
    for stage in ("prepare", "tokenize", "pack"):
        proc = subprocess.run(
            [sys.executable, "-m", f"stages.{stage}"],
            cwd=ws,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    report = yaml.safe_load((ws / "data/reports/pack.json").read_text())
    truncated = sum(s["truncated"] for s in report["splits"].values())
    assert truncated == 1
    max_len = yaml.safe_load((ws / "params.yaml").read_text())["pack"]["max_len"]
    assert max(s["max_length"] for s in report["splits"].values()) == max_len
