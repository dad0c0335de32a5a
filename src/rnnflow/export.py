"""Stage export@VARIANT: an ONNX bundle that runs with onnxruntime and tokenizers alone.

The exporter choice lives here, in one place. torch 2.13's default (dynamo) exporter fails on
pack_padded_sequence, so we use the TorchScript exporter (dynamo=False), which maps packed
nn.RNN/LSTM/GRU to ONNX RNN/LSTM/GRU ops with `sequence_lens`. A Python loop over RNNCell
would be unrolled to the example's length by either exporter, so cell-loop variants are
exported through the mathematically identical nn.RNN (models.as_torch_rnn); the validate
stage proves parity at every length up to pack.max_len.
"""

import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from rnnflow import checkpoint, tracking
from rnnflow.atomic import atomic_path, read_json, write_json
from rnnflow.config import Params
from rnnflow.errors import RnnflowError
from rnnflow.models import RNNClassifier, as_torch_rnn
from rnnflow.paths import TOKENIZER_DIR, bundle_dir, metrics_file
from rnnflow.paths import checkpoint as checkpoint_path
from rnnflow.text import file_hash
from rnnflow.vocab import labels_path

EXPORTER = "torchscript"
INPUTS, OUTPUT = ("tokens", "lengths"), "logits"


def export_onnx(model: RNNClassifier, path: Path, opset: int) -> None:
    """Write `model` as ONNX with dynamic batch and sequence length, and check it."""
    net = as_torch_rnn(model).eval().cpu()
    tokens = torch.tensor([[2, 3, 4, 5, 6], [7, 8, 9, 0, 0], [3, 0, 0, 0, 0]])
    lengths = torch.tensor([5, 3, 1])
    with atomic_path(path) as tmp, warnings.catch_warnings():
        # The exporter warns that LSTM with batch > 1 "can cause an error" and that it is
        # deprecated; validate@VARIANT checks every batch size and length we ship.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (tokens, lengths),
            str(tmp),
            dynamo=False,
            opset_version=opset,
            input_names=list(INPUTS),
            output_names=[OUTPUT],
            dynamic_axes={
                "tokens": {0: "batch", 1: "sequence"},
                "lengths": {0: "batch"},
                "logits": {0: "batch"},
            },
        )
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except onnx.checker.ValidationError as err:
            raise RnnflowError(f"{path}: exported model fails onnx.checker ({err})") from err


def export_bundle(params: Params, variant: str) -> dict:
    """models/VARIANT/: model.onnx, tokenizer.json, labels.json, bundle.json; log to MLflow."""
    out = bundle_dir(variant)
    vocab_hash = file_hash(TOKENIZER_DIR / "tokenizer.json")
    model, payload = checkpoint.load_model(checkpoint_path(variant), vocab_hash)
    export_onnx(model, out / "model.onnx", params.export.opset)
    for source in (TOKENIZER_DIR / "tokenizer.json", labels_path()):
        with atomic_path(out / source.name) as tmp:
            shutil.copyfile(source, tmp)
    evaluation = read_json(metrics_file("eval", variant))
    bundle = {
        "variant": variant,
        "exporter": EXPORTER,
        "opset": params.export.opset,
        "inputs": {"tokens": "int64 [batch, sequence]", "lengths": "int64 [batch]"},
        "outputs": {"logits": f"float32 [batch, {len(payload['labels'])}]"},
        "vocab_hash": vocab_hash,
        "max_len": params.pack.max_len,
        "labels": payload["labels"],
        "model_config": payload["model_config"],
        "metrics": {k: evaluation[k] for k in ("accuracy", "macro_f1")},
        "mlflow_run_id": payload.get("mlflow_run_id"),
        "torch_version": torch.__version__,
    }
    write_json(out / "bundle.json", bundle)
    with tracking.variant_run("export", variant, payload.get("mlflow_run_id")):
        _log_onnx_model(out, variant, len(payload["labels"]))
    return bundle


def _log_onnx_model(out: Path, variant: str, num_classes: int) -> None:
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    signature = ModelSignature(
        inputs=Schema(
            [
                TensorSpec(np.dtype(np.int64), (-1, -1), "tokens"),
                TensorSpec(np.dtype(np.int64), (-1,), "lengths"),
            ]
        ),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes), "logits")]),
    )
    example = {
        "tokens": np.array([[2, 3, 4], [5, 6, 0]], dtype=np.int64),
        "lengths": np.array([3, 2], dtype=np.int64),
    }
    mlflow.onnx.log_model(
        onnx.load(str(out / "model.onnx")),
        name="onnx_model",
        signature=signature,
        input_example=example,
        registered_model_name=f"rnnflow-{variant}",
        # Stated, not inferred: inference loads the model in a subprocess (~10 s per export).
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
    )
    for name in ("bundle.json", "tokenizer.json", "labels.json"):
        mlflow.log_artifact(str(out / name), "bundle")
