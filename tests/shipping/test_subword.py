"""A subword (bpe / wordpiece) bundle works unchanged: export, the parity gate, predict."""

import json
import subprocess
import sys

from rnnflow.data.text import UNK_ID, encode, level_of, load_tokenizer
from rnnflow.shipping.predict import Predictor
from rnnflow.shipping.validate import validate_bundle

from ..conftest import small_params, write_params
from .test_browser import ship


def test_a_subword_bundle_passes_the_gate_and_predicts(tmp_path, monkeypatch):
    """bpe end to end; wordpiece differs only inside `tokenizers` (tests/data/test_text.py)."""
    level = "bpe"
    topics = {
        "sport": "the team scored a late goal and the coach praised the defence",
        "music": "the band played their new album to a loud and happy crowd",
    }
    lines = ["text,label"] + [
        f'"{words} {i}",{label}' for label, words in topics.items() for i in range(60)
    ]
    (tmp_path / "texts.csv").write_text("\n".join(lines) + "\n")
    raw = small_params(data={"source": "csv", "path": "texts.csv", "max_per_class": None})
    raw["tokenize"] |= {"level": level, "max_vocab": 120}
    raw["model"]["variants"] = {"gru": {}}
    bundle = ship(tmp_path, raw, "gru")
    monkeypatch.chdir(tmp_path)
    report = validate_bundle(write_params(tmp_path, raw), "gru")
    assert report["passed"] and report["max_abs_diff"] <= 1e-5
    tok = load_tokenizer(bundle / "tokenizer.json")
    assert level_of(tok) == level
    unseen = "the defenders scored"  # words never seen whole: known pieces, no <unk>
    assert UNK_ID not in encode(tok, [unseen], 32)[0]
    expected = Predictor(bundle).predict([unseen])[0]
    cmd = [sys.executable, "-m", "rnnflow.shipping.cli", "predict", "--model", str(bundle)]
    out = subprocess.run([*cmd, unseen], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["label"] == expected["label"] and got["tokens"] == expected["tokens"] > 3
