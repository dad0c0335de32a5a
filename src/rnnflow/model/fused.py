"""Fused CPU training of nn.RNN and nn.GRU: the same function of the same parameters,
computed by recurrence.cpp (per step one matrix product and one loop over the batch for all
the gate arithmetic, forward and backward) instead of torch's dozen small ops per step.

`TorchRNNCore` uses it when training a one-direction RNN or GRU core in float32 on the CPU;
evaluation, export, the parity gate and every other device use the nn.* module itself. nn.LSTM
keeps oneDNN's fused kernel, which this one did not beat (0.97-1.02x, docs "Performance").

The kernel is compiled on first use with torch's own extension builder (g++ and ninja, into
TORCH_EXTENSIONS_DIR, by default ~/.cache/torch_extensions, about 10 s) and loaded after by
every process, clone and venv of the project on the machine; where it cannot be built,
training falls back to the nn.* module with one warning. RNNFLOW_FUSED=0 turns it off
(nothing is built).
"""

import hashlib
import logging
import os
import sys
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("recurrence.cpp")
KINDS = {"RNN_TANH": 0, "RNN_RELU": 1, "GRU": 2}  # recurrence.cpp's Kind, by nn.RNNBase.mode
RNN_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # a layer's, as nn.RNN names them


def enabled() -> bool:
    """Whether RNNFLOW_FUSED leaves the fused kernel on (anything but 0)."""
    return os.environ.get("RNNFLOW_FUSED", "1") != "0"


FLAGS = {  # tuples: torch's loader appends to the lists it is given
    "extra_cflags": ("-O3", "-march=native", "-fno-math-errno", "-fopenmp"),
    "extra_ldflags": ("-lmvec", "-fopenmp"),
}


def build_dir() -> Path:
    """Where the kernel is built, keyed by what it is built from: the source, the flags and
    torch's version. Not torch's own keying, which rebuilds whenever the source's or torch's
    path changes (every clone and copy of the project, each venv)."""
    key = hashlib.sha256(SOURCE.read_bytes() + repr((FLAGS, torch.__version__)).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"rnnflow_recurrence_{key.hexdigest()[:16]}"


@cache
def kernels():
    """torch.ops.rnnflow_recurrence, built on the first call on a machine and loaded after;
    None where it cannot be built."""
    from torch.utils.cpp_extension import load

    where = build_dir()
    try:
        if (where / "built").exists():  # written once the library below is complete
            torch.ops.load_library(where / "rnnflow_recurrence.so")
        else:
            # ninja from the venv (a dependency) when the venv is not on PATH
            bin_dir = str(Path(sys.executable).parent)
            os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
            where.mkdir(parents=True, exist_ok=True)
            load(
                name="rnnflow_recurrence",
                sources=[str(SOURCE)],
                build_directory=str(where),
                is_python_module=False,
                **{name: list(flags) for name, flags in FLAGS.items()},
            )
            (where / "built").touch()
    except Exception as err:  # no compiler, no ninja, ...: torch's own kernels still work
        log.warning("fused CPU recurrence unavailable, training uses nn.* (%s)", err)
        return None
    return torch.ops.rnnflow_recurrence


def warm_up(model: nn.Module, device: torch.device) -> None:
    """Build (or load) the kernel now if training `model` on `device` would use it, so that
    no timed epoch pays for the build."""
    recurrences = [m for m in model.modules() if isinstance(m, nn.RNNBase) and m.mode in KINDS]
    if device.type == "cpu" and enabled() and recurrences:
        kernels()


class _Recurrence(torch.autograd.Function):
    """One layer, one direction: xp [B, T, G*H] (input projection) -> states [B, T, H]."""

    @staticmethod
    def forward(ctx, xp, w_hh, b_hh, kind: int):
        out, prev, saved = kernels().forward(xp, w_hh, b_hh, kind)
        ctx.save_for_backward(out, prev, saved, w_hh)
        ctx.kind = kind
        return out

    @staticmethod
    def backward(ctx, grad_out):
        out, prev, saved, w_hh = ctx.saved_tensors
        dxp, dw, db = kernels().backward(grad_out, out, prev, saved, w_hh, ctx.kind)
        return dxp, dw, (db if ctx.kind == KINDS["GRU"] else None), None


def applies(rnn: nn.RNNBase, x: torch.Tensor) -> bool:
    """Whether `rnn` on `x` can train through the kernel: an RNN or GRU of one direction,
    float32 on the CPU, gradients on, not traced or exported, RNNFLOW_FUSED not 0, the kernel
    built."""
    return (
        rnn.mode in KINDS
        and rnn.training
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and not rnn.bidirectional
        and not rnn.proj_size
        and rnn.bias
        and rnn.batch_first
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and enabled()
        and kernels() is not None
    )


def run(rnn: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
    """rnn(x)[0] for a batch-first x [B, T, E]: every layer through the kernel, with
    nn.RNNBase's dropout between layers."""
    kind = KINDS[rnn.mode]
    for layer in range(rnn.num_layers):
        if layer:
            x = F.dropout(x, rnn.dropout, training=True)
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{n}_l{layer}") for n in RNN_WEIGHTS)
        # an RNN adds both biases before its nonlinearity: one bias in the projection
        bias = b_ih if kind == KINDS["GRU"] else b_ih + b_hh
        xp = F.linear(x, w_ih, bias).contiguous()
        x = _Recurrence.apply(xp, w_hh, b_hh, kind)
    return x
