"""Classify raw text with an exported bundle: onnxruntime, tokenizers and numpy only (no torch)."""

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from rnnflow.core.errors import RnnflowError
from rnnflow.data.text import UNK_ID, encode, file_hash, load_tokenizer, own_ids, pad_batch

BUNDLE_FILES = ("model.onnx", "tokenizer.json", "labels.json", "bundle.json")
INT8_FILE = "model.int8.onnx"  # the same model with int8 weights (export writes both)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, numerically stable."""
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


class Predictor:
    """A loaded bundle (models/VARIANT/) that turns texts into labels and probabilities,
    with its fp32 model or (int8=True) the int8 one."""

    def __init__(self, bundle: str | Path, threads: int = 0, int8: bool = False):
        self.dir = Path(bundle)
        missing = [f for f in BUNDLE_FILES if not (self.dir / f).is_file()]
        if missing:
            raise RnnflowError(f"{self.dir}: not a model bundle (missing {', '.join(missing)})")
        try:
            self.meta = json.loads((self.dir / "bundle.json").read_text(encoding="utf-8"))
            self.labels = json.loads((self.dir / "labels.json").read_text(encoding="utf-8"))[
                "labels"
            ]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise RnnflowError(
                f"{self.dir}: bundle.json or labels.json is invalid ({err})"
            ) from err
        self.tokenizer = load_tokenizer(self.dir / "tokenizer.json")
        if file_hash(self.dir / "tokenizer.json") != self.meta.get("vocab_hash"):
            raise RnnflowError(f"{self.dir}/tokenizer.json: does not match bundle.json vocab_hash")
        model = self.dir / (INT8_FILE if int8 else "model.onnx")
        if not model.is_file():
            raise RnnflowError(f"{model}: no int8 model in this bundle (export it again)")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(
                str(model), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime raises its own exception types
            raise RnnflowError(f"{model}: cannot load ({err})") from err

    def logits(self, tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Raw model output for an already numericalized batch."""
        return self.session.run(["logits"], {"tokens": tokens, "lengths": lengths})[0]

    def predict(self, texts: Sequence[str], batch_size: int = 256) -> list[dict]:
        """One result per text: label, probability of each class, and token counts."""
        for i, text in enumerate(texts):
            if not isinstance(text, str) or not text.strip():
                raise RnnflowError(f"text #{i + 1} is empty; nothing to classify")
        results = []
        for start in range(0, len(texts), batch_size):
            chunk = texts[start : start + batch_size]
            ids = encode(self.tokenizer, chunk, self.meta["max_len"])
            own = [own_ids(self.tokenizer, seq) for seq in ids]  # without <s> and </s>
            for i, seq in enumerate(own):
                if not seq:
                    raise RnnflowError(f"text #{start + i + 1} gives no token; nothing to classify")
            probs = softmax(self.logits(*pad_batch(ids)))
            for text, seq, p in zip(chunk, own, probs, strict=True):
                result = {
                    "text": text,
                    "label": self.labels[int(p.argmax())],
                    "probability": float(p.max()),
                    "probabilities": {c: float(v) for c, v in zip(self.labels, p, strict=True)},
                    "tokens": len(seq),
                }
                if all(t == UNK_ID for t in seq):
                    result["warning"] = "every token is unknown to the vocabulary"
                results.append(result)
        return results
