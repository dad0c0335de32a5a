"""rnnflow predict: raw text in, labels out, with onnxruntime and tokenizers alone."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rnnflow.analysis.evaluate import evaluate_variant
from rnnflow.core.errors import RnnflowError
from rnnflow.data.text import END_ID, START_ID, encode, load_tokenizer
from rnnflow.shipping.export import export_bundle
from rnnflow.shipping.predict import Predictor
from rnnflow.training.train import train_variant

from ..conftest import small_params, write_params

BLOCK_TORCH = textwrap.dedent(
    """
    import sys
    class _NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch must not be imported by predict")
    sys.meta_path.insert(0, _NoTorch())
    from rnnflow.shipping.cli import main
    main(sys.argv[1:])
    """
)


@pytest.fixture
def bundle(workspace):
    params = write_params(workspace, small_params(train={"epochs": 2}))
    train_variant(params, "gru")
    evaluate_variant(params, "gru")
    export_bundle(params, "gru")
    return workspace / "models/gru"


def _cli(args, cwd, stdin=None):
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH, *args],
        cwd=cwd,
        input=stdin,
        capture_output=True,
        text=True,
        env=os.environ.copy(),
    )


def test_predict_cli_without_torch(bundle, workspace):
    proc = _cli(
        ["predict", "--model", str(bundle), "Nakamura", "O'Brien", "--top-k", "3"], workspace
    )
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    labels = json.loads((bundle / "labels.json").read_text())["labels"]
    assert [r["text"] for r in results] == ["Nakamura", "O'Brien"]
    for r in results:
        assert r["label"] in labels and len(r["probabilities"]) == 3
        assert r["probability"] == max(r["probabilities"].values())


def test_predict_jsonl_from_stdin_matches_api(bundle, workspace):
    lines = "\n".join([json.dumps({"text": "Tremblay"}), json.dumps("Virtanen"), ""])
    proc = _cli(["predict", "--model", str(bundle), "--input", "-"], workspace, stdin=lines)
    assert proc.returncode == 0, proc.stderr
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    api = Predictor(bundle).predict(["Tremblay", "Virtanen"])
    for cli_result, api_result in zip(results, api, strict=True):
        assert cli_result["label"] == api_result["label"]
        assert sum(cli_result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        for label, p in api_result["probabilities"].items():
            assert cli_result["probabilities"][label] == pytest.approx(p, abs=1e-6)


def test_batching_does_not_change_results(bundle):
    predictor = Predictor(bundle)
    texts = ["Nakamura", "Li", "Van der Berg", "Ó Súilleabháin", "X"] * 7
    one_by_one = [predictor.predict([t])[0]["probabilities"] for t in texts]
    batched = [r["probabilities"] for r in predictor.predict(texts, batch_size=4)]
    for a, b in zip(one_by_one, batched, strict=True):
        assert a == pytest.approx(b, abs=1e-6)


def test_tokens_count_the_text_not_its_marks(bundle):
    tok = load_tokenizer(bundle / "tokenizer.json")
    assert encode(tok, ["Li"], 128)[0] == [
        START_ID,
        tok.token_to_id("l"),
        tok.token_to_id("i"),
        END_ID,
    ]
    results = Predictor(bundle).predict(["Nakamura", "☃☃☃", "Li"])
    assert [r["tokens"] for r in results] == [8, 3, 2]


def test_predict_errors(bundle, workspace):
    predictor = Predictor(bundle)
    with pytest.raises(RnnflowError, match="text #2 is empty"):
        predictor.predict(["ok", "  "])
    unknown = predictor.predict(["☃☃☃"])[0]
    assert unknown["warning"] == "every token is unknown to the vocabulary"
    proc = _cli(["predict", "--model", str(workspace / "nowhere"), "x"], workspace)
    assert proc.returncode == 2 and "not a model bundle (missing model.onnx" in proc.stderr
    (bundle / "model.onnx").write_bytes(b"garbage")
    proc = _cli(["predict", "--model", str(bundle), "x"], workspace)
    assert proc.returncode == 2 and "model.onnx: cannot load" in proc.stderr
    assert "Traceback" not in proc.stderr
