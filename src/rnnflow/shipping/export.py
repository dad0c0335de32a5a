"""Stage export@VARIANT: an ONNX bundle that runs with onnxruntime and tokenizers alone.

The exporter choice lives here, in one place. torch 2.13's default (dynamo) exporter fails on
pack_padded_sequence, so we use the TorchScript exporter (dynamo=False), which maps packed
nn.LSTM/GRU to ONNX LSTM/GRU ops with `sequence_lens`; onnxruntime runs those fast.

Plain RNN kinds (nn.RNN and the RNNCell loops) are exported differently: onnxruntime's ONNX
RNN op runs a batch of 64 slower than eager PyTorch (0.6-0.9x; its per-step GEMM and
activation are not the optimised kernels its LSTM/GRU use), and a Python loop over RNNCell
would be unrolled to the example's length. So their weights go into LoopRNNCore, whose time
loop is TorchScript: it exports as an ONNX Loop of MatMul/Add/Tanh/Where, which onnxruntime
runs with its MLAS GEMM, faster than eager at batch 1 and 64 and closer to PyTorch's numbers
(the loop does what CellLoopCore does). The validate stage proves parity at every length up
to pack.max_len.
"""

import copy
import shutil
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from rnnflow.core.atomic import atomic_path, read_json, write_json
from rnnflow.core.config import Params
from rnnflow.core.errors import RnnflowError
from rnnflow.core.paths import TOKENIZER_DIR, bundle_dir, confusion_plot, metrics_file
from rnnflow.core.paths import checkpoint as checkpoint_path
from rnnflow.data.text import file_hash
from rnnflow.data.vocab import labels_path
from rnnflow.model import checkpoint
from rnnflow.model.network import CellLoopCore, RNNClassifier, TorchRNNCore, as_torch_rnn
from rnnflow.runtime import timeline
from rnnflow.shipping.predict import BUNDLE_FILES, INT8_FILE
from rnnflow.tracking import runs

EXPORTER = "torchscript"
INPUTS, OUTPUT = ("tokens", "lengths"), "logits"


@torch.jit.script
def _rnn_layer(x: torch.Tensor, u: torch.Tensor, valid: torch.Tensor, relu: bool):
    """One RNN layer over projected inputs x [B, T, H]: (last state, every step's state)."""
    h = torch.zeros(x.shape[0], u.shape[0], dtype=x.dtype)
    states = []
    for t in range(x.shape[1]):
        z = torch.addmm(x[:, t], h, u)
        h = torch.where(valid[:, t], torch.relu(z) if relu else torch.tanh(z), h)
        states.append(h)
    return h, torch.stack(states, 1)


@torch.jit.script
def _rnn_last(x: torch.Tensor, u: torch.Tensor, valid: torch.Tensor, relu: bool):
    """The top layer: only its state at each sequence's last valid step is needed."""
    h = torch.zeros(x.shape[0], u.shape[0], dtype=x.dtype)
    for t in range(x.shape[1]):
        z = torch.addmm(x[:, t], h, u)
        h = torch.where(valid[:, t], torch.relu(z) if relu else torch.tanh(z), h)
    return h


@torch.jit.script
def _rnn_last_two(
    x: torch.Tensor,
    u1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
    u2: torch.Tensor,
    valid: torch.Tensor,
    relu: bool,
):
    """The top two layers in one time loop (no sequence between them to collect)."""
    h1 = torch.zeros(x.shape[0], u1.shape[0], dtype=x.dtype)
    h2 = torch.zeros(x.shape[0], u2.shape[0], dtype=x.dtype)
    for t in range(x.shape[1]):
        m = valid[:, t]
        z = torch.addmm(x[:, t], h1, u1)
        h1 = torch.where(m, torch.relu(z) if relu else torch.tanh(z), h1)
        z = torch.addmm(torch.addmm(b2, h1, w2), h2, u2)
        h2 = torch.where(m, torch.relu(z) if relu else torch.tanh(z), h2)
    return h2


class LoopRNNCore(nn.Module):
    """A unidirectional RNN (nn.RNN or RNNCell loop weights) as TorchScript time loops, for
    export: layer i computes h = act(x W_i + b_i + h U_i), padded steps keep h."""

    def __init__(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        relu: bool,
        keep_states: bool = False,
    ):
        super().__init__()
        self.keep_states = keep_states  # the pooling reads the top layer's every state
        self.w = nn.ParameterList(nn.Parameter(w.t().contiguous()) for w, _, _ in layers)
        self.u = nn.ParameterList(nn.Parameter(u.t().contiguous()) for _, u, _ in layers)
        self.b = nn.ParameterList(nn.Parameter(b.clone()) for _, _, b in layers)
        self.relu = relu

    def forward(self, x: torch.Tensor, lengths: torch.Tensor):
        valid = (torch.arange(x.shape[1])[None, :] < lengths[:, None]).unsqueeze(-1)
        n = len(self.w)
        if self.keep_states:  # every layer's sequence, the top one's for the pooling
            for i in range(n):
                h, x = _rnn_layer(x @ self.w[i] + self.b[i], self.u[i], valid, self.relu)
            return x, h
        for i in range(n - 2):
            _, x = _rnn_layer(x @ self.w[i] + self.b[i], self.u[i], valid, self.relu)
        if n >= 2:
            i = n - 2
            x = x @ self.w[i] + self.b[i]
            w2, b2, u2 = self.w[i + 1], self.b[i + 1], self.u[i + 1]
            return None, _rnn_last_two(x, self.u[i], w2, b2, u2, valid, self.relu)
        return None, _rnn_last(x @ self.w[0] + self.b[0], self.u[0], valid, self.relu)


def exportable(model: RNNClassifier) -> RNNClassifier:
    """The model to hand the exporter: LSTM/GRU and bidirectional RNNs on packed input (ONNX
    LSTM/GRU/RNN ops with sequence_lens: onnxruntime skips the padded steps), unidirectional
    plain RNNs and cell loops on LoopRNNCore."""
    if isinstance(model.core, CellLoopCore) and model.cfg.bidirectional:
        model = as_torch_rnn(model)  # the same function as a bidirectional nn.RNN, packed
    core = model.core
    if isinstance(core, TorchRNNCore) and (core.packed or not isinstance(core.rnn, nn.RNN)):
        twin = copy.deepcopy(model)
        twin.core.packed = True
        return twin
    if isinstance(core, CellLoopCore):
        cells = core.cells
        layers = [(c.weight_ih, c.weight_hh, c.bias_ih + c.bias_hh) for c in cells]
    else:
        rnn = core.rnn
        layers = [
            tuple(getattr(rnn, f"{name}_l{i}") for name in ("weight_ih", "weight_hh"))
            + (getattr(rnn, f"bias_ih_l{i}") + getattr(rnn, f"bias_hh_l{i}"),)
            for i in range(rnn.num_layers)
        ]
    twin = RNNClassifier(model.cfg)
    twin.load_state_dict(
        {k: v for k, v in model.state_dict().items() if not k.startswith("core.")}, strict=False
    )
    with torch.no_grad():
        detached = [tuple(t.detach().cpu() for t in layer) for layer in layers]
        relu, keep = model.cfg.nonlinearity == "relu", model.cfg.pool != "last"
        twin.core = LoopRNNCore(detached, relu, keep)
    return twin


def export_onnx(model: RNNClassifier, path: Path, opset: int) -> None:
    """Write `model` as ONNX with dynamic batch and sequence length, and check it."""
    net = exportable(model.cpu()).eval()
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


def quantize_int8(source: Path, path: Path) -> None:
    """`path`: `source` with int8 weights, by onnxruntime's dynamic quantization (weights
    int8, activations quantized per call), the time loops' MatMuls included (subgraphs).
    Measured on our graphs: the plain RNNs' loops and nn.LSTM's LSTM op (ORT's
    DynamicQuantizeLSTM) shrink 3.3-3.6x; ONNX's GRU op has no quantized kernel in
    onnxruntime, so for gru only the head is int8."""
    import logging

    from onnxruntime.quantization import QuantType, quantize_dynamic

    quiet = logging.getLogger("root").level
    logging.getLogger("root").setLevel(logging.ERROR)  # "consider pre-processing" advice
    try:
        with atomic_path(path) as tmp:
            quantize_dynamic(
                str(source),
                str(tmp),
                weight_type=QuantType.QInt8,
                extra_options={"EnableSubgraph": True},
            )
    finally:
        logging.getLogger("root").setLevel(quiet)


def export_bundle(params: Params, variant: str) -> dict:
    """models/VARIANT/: model.onnx (fp32), model.int8.onnx, tokenizer.json, labels.json,
    bundle.json; log to MLflow."""
    out = bundle_dir(variant)
    vocab_hash = file_hash(TOKENIZER_DIR / "tokenizer.json")
    model, payload = checkpoint.load_model(checkpoint_path(variant), vocab_hash)
    export_onnx(model, out / "model.onnx", params.export.opset)
    quantize_int8(out / "model.onnx", out / INT8_FILE)
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
        "int8": {"file": INT8_FILE, "method": "onnxruntime quantize_dynamic, QInt8 weights"},
        "metrics": {k: evaluation[k] for k in ("accuracy", "macro_f1")},
        "mlflow_run_id": payload.get("mlflow_run_id"),
        "torch_version": torch.__version__,
    }
    write_json(out / "bundle.json", bundle)
    run_id = payload.get("mlflow_run_id")
    with runs.variant_run("export", variant, run_id), timeline.tracking():
        _log_evaluation(variant, evaluation)
        _log_onnx_model(out, len(payload["labels"]))
        version = _log_text_model(out, variant, bundle["metrics"])
    return bundle | {"registered_version": version}


def _log_evaluation(variant: str, evaluation: dict) -> None:
    """evaluate@VARIANT's results, recorded here so that stage needs no MLflow start-up."""
    import mlflow

    timing = read_json(metrics_file("timing", f"eval_{variant}"))
    mlflow.log_metrics(
        {"test_accuracy": evaluation["accuracy"], "test_macro_f1": evaluation["macro_f1"]} | timing
    )
    mlflow.log_dict(evaluation, "evaluation/test_report.json")
    mlflow.log_artifact(str(confusion_plot(variant)), "evaluation")


def _log_onnx_model(out: Path, num_classes: int) -> None:
    """The ONNX flavor in the run (tensors in, logits out), for callers that tokenize."""
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
        # Stated, not inferred: inference loads the model in a subprocess (~10 s per export).
        pip_requirements=mlflow.onnx.get_default_pip_requirements(),
    )
    for name in ("bundle.json", "tokenizer.json", "labels.json", INT8_FILE):
        mlflow.log_artifact(str(out / name), "bundle")


# The torch-free modules the raw-text model runs, as paths inside the rnnflow package (with
# the __init__ of each package on the way, so `rnnflow.shipping.serving` imports as itself).
SERVING_MODULES = (
    "__init__.py",
    "core/__init__.py",
    "core/errors.py",
    "data/__init__.py",
    "data/text.py",
    "shipping/__init__.py",
    "shipping/predict.py",
    "shipping/serving.py",
)


def _log_text_model(out: Path, variant: str, metrics: dict) -> str:
    """The raw-text pyfunc model (rnnflow.serving), registered as `rnnflow`; returns the new
    version. It carries the bundle and only the torch-free modules it runs, so loading it
    anywhere needs neither torch nor an installed rnnflow."""
    import tempfile

    import mlflow
    import onnxruntime
    import pydantic
    import tokenizers

    from rnnflow.shipping import serving

    package = Path(serving.__file__).parents[1]  # src/rnnflow
    with tempfile.TemporaryDirectory() as tmp:
        bundle, code = Path(tmp) / "bundle", Path(tmp) / "rnnflow"
        bundle.mkdir()
        for name in (*BUNDLE_FILES, INT8_FILE):
            shutil.copyfile(out / name, bundle / name)
        for module in SERVING_MODULES:
            (code / module).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(package / module, code / module)
        info = mlflow.pyfunc.log_model(
            name="text_model",
            python_model=Path(serving.__file__),
            artifacts={"bundle": str(bundle)},
            code_paths=[str(code)],
            model_config=serving.LIMITS,
            input_example=["Nakamura", "O'Brien"],
            registered_model_name=runs.REGISTERED_MODEL,
            pip_requirements=[
                f"mlflow=={mlflow.__version__}",
                f"onnxruntime=={onnxruntime.__version__}",
                f"tokenizers=={tokenizers.__version__}",
                f"numpy=={np.__version__}",
                f"pydantic=={pydantic.__version__}",
            ],
        )
    version = str(info.registered_model_version)
    client = mlflow.MlflowClient()
    tags = {"variant": variant, "precision": serving.LIMITS["precision"]}
    tags |= {f"test_{k}": f"{v:.4f}" for k, v in metrics.items()}
    for key, value in tags.items():
        client.set_model_version_tag(runs.REGISTERED_MODEL, version, key, value)
    return version
