"""Fused CPU training kernels (recurrence.cpp): the same functions of the same parameters as
torch's, in fewer and cheaper passes.

- The recurrence of nn.RNN, nn.GRU and nn.LSTM: per step one matrix product and one loop
  over the batch for all the gate arithmetic, forward and backward, instead of torch's dozen
  small ops per step (RNN, GRU) or oneDNN's LSTM kernel.
- Max pooling over the valid steps: one pass that keeps each maximum's step, and a backward
  that writes the gradient there; torch's masked max copies the states, reduces across a
  non-inner dimension and compares every state again in its backward.
- Dropout's mask from a counter-based hash in vector lanes, where torch's `bernoulli_` draws
  element after element from one Mersenne Twister; seeded from torch's generator, so a seed
  still fixes every mask (but not the same masks as torch's dropout).
- The n-gram bag's hashing, masking and counting in one pass (network.NgramBag), its mean
  by the same ATen ops as the module's, and a backward that adds each counted n-gram's
  gradient to its row: the same bits, in place of some fifty small ops a step.
- Denormal floats flushed to zero on every thread while training (`denormals_flushed`).

They run when training in float32 on the CPU; evaluation, export, the parity gate and every
other device use torch's own ops. The kernels are compiled on first use with torch's own
extension builder (g++ and ninja, into TORCH_EXTENSIONS_DIR, by default
~/.cache/torch_extensions, about 10 s) and loaded after by every process, clone and venv of
the project on the machine; where they cannot be built, training uses torch's ops with one
warning. RNNFLOW_FUSED=0 turns them off (nothing is built), and so does `with off():`.
"""

import hashlib
import logging
import os
import platform
import sys
from contextlib import contextmanager
from functools import cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("recurrence.cpp")
# recurrence.cpp's Kind, by nn.RNNBase.mode
KINDS = {"RNN_TANH": 0, "RNN_RELU": 1, "GRU": 2, "LSTM": 3}
RNN_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")  # a layer's, as nn.RNN names them


_OFF = [0]  # open off() blocks


def enabled() -> bool:
    """Whether the kernels are on: RNNFLOW_FUSED anything but 0, and outside off()."""
    return os.environ.get("RNNFLOW_FUSED", "1") != "0" and not _OFF[0]


@contextmanager
def off():
    """Torch's own ops inside the block (the bench's baselines)."""
    _OFF[0] += 1
    try:
        yield
    finally:
        _OFF[0] -= 1


FLAGS = {  # tuples: torch's loader appends to the lists it is given
    "extra_cflags": ("-O3", "-march=native", "-fno-math-errno", "-fopenmp"),
    "extra_ldflags": ("-lmvec", "-fopenmp"),
}


def cpu_features() -> str:
    """The instruction sets -march=native compiles for: /proc/cpuinfo's flags (Linux), else
    the machine's name."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return flags.strip() or platform.machine()


def build_dir() -> Path:
    """Where the kernel is built, keyed by what it is built from: the source, the flags,
    torch's version and the CPU's instruction sets (a build for AVX-512 would crash on a CPU
    without it). Not torch's own keying, which rebuilds whenever the source's or torch's path
    changes (every clone and copy of the project, each venv)."""
    recipe = repr((FLAGS, torch.__version__, cpu_features()))
    key = hashlib.sha256(SOURCE.read_bytes() + recipe.encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / f"rnnflow_recurrence_{key.hexdigest()[:16]}"


@cache
def kernels():
    """torch.ops.rnnflow_recurrence, built on the first call on a machine and loaded after;
    None where it cannot be built."""
    where = build_dir()
    try:
        if not (where / "built").exists():  # written once the library is complete
            _build(where)
        # (torch's loader loaded what it built; loading it again is a no-op)
        torch.ops.load_library(where / "rnnflow_recurrence.so")
    except Exception as err:  # no compiler, no ninja, ...: torch's own kernels still work
        log.warning("fused CPU kernels unavailable, training uses torch's ops (%s)", err)
        return None
    return torch.ops.rnnflow_recurrence


def _build(where: Path) -> None:
    """Build the library into `where`, one process at a time. torch's loader guards a build
    with a `lock` file that only a finished build removes: one killed mid-build (Ctrl-C in
    the first epoch) left it, and every later process waited for it forever. Our lock is an
    flock, which the system releases when its holder dies; holding it, no one else is
    building, so a `lock` found then is such a leftover and goes."""
    import fcntl

    from torch.utils.cpp_extension import load

    where.mkdir(parents=True, exist_ok=True)
    with open(where / "build.flock", "w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if (where / "built").exists():  # another process built it while this one waited
            return
        (where / "lock").unlink(missing_ok=True)
        # ninja from the venv (a dependency) when the venv is not on PATH
        bin_dir = str(Path(sys.executable).parent)
        os.environ["PATH"] = os.pathsep.join([bin_dir, os.environ.get("PATH", "")])
        load(
            name="rnnflow_recurrence",
            sources=[str(SOURCE)],
            build_directory=str(where),
            is_python_module=False,
            **{name: list(flags) for name, flags in FLAGS.items()},
        )
        (where / "built").touch()


@contextmanager
def denormals_flushed(device: torch.device):
    """Inside the block, floats below 1.2e-38 (denormals) are zero on every CPU thread, as
    results and as inputs; the threads' mode of before comes back after it.

    Why: Adam's first moment decays by 0.9 a step wherever a gradient is zero (the rows of
    the embeddings and the n-gram table that no text of the batch uses), and after about 700
    such steps it passes through the denormal range for some 60 steps before it reaches 0.
    x86 computes with a denormal in microcode, about a hundred times slower, so from the
    fourth epoch on Adam's step took 1.3x as long (docs "Performance"). Such a value's part
    in a weight's update is below 1e-33, far under a float32 weight's rounding.

    Not on CUDA (its own mode), nor where the kernels are off or unavailable: RNNFLOW_FUSED=0
    is torch's stock arithmetic throughout."""
    ops = kernels() if device.type == "cpu" and enabled() else None
    if ops is None:
        yield
        return
    before = ops.flush_denormals(True)
    try:
        yield
    finally:
        ops.flush_denormals(before)


def recurrence_fits(rnn: nn.RNNBase) -> bool:
    """Whether the kernel computes `rnn`: an RNN, GRU or LSTM of one direction, batch first,
    with biases and no projection."""
    return (
        rnn.mode in KINDS
        and not rnn.bidirectional
        and not rnn.proj_size
        and rnn.bias
        and rnn.batch_first
    )


def serves(module: nn.Module) -> bool:
    """Whether training `module` runs something through the kernels: an RNN the recurrence
    fits, a `Dropout` that drops, a module that max-pools (`max_pools` True) or an n-gram bag
    that uses its kernel (`use_kernel` True)."""
    if isinstance(module, nn.RNNBase):
        return recurrence_fits(module)
    if isinstance(module, Dropout):
        return module.p > 0
    return getattr(module, "max_pools", False) or getattr(module, "use_kernel", False)


def warm_up(model: nn.Module, device: torch.device) -> None:
    """Build (or load) the kernels now if training `model` on `device` would use them, so
    that no timed epoch pays for the build."""
    if device.type == "cpu" and enabled() and any(serves(m) for m in model.modules()):
        kernels()


def trains(x: torch.Tensor) -> bool:
    """Whether an op on `x` runs through the kernels: float32 on the CPU, gradients on, not
    traced or exported, the kernels on and built."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.is_grad_enabled()
        and not torch.jit.is_tracing()
        and not torch.onnx.is_in_onnx_export()
        and enabled()
        and kernels() is not None
    )


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
    """Whether `rnn` on `x` trains through the kernel: the recurrence fits it, it is in
    training mode, and `trains(x)`."""
    return recurrence_fits(rnn) and rnn.training and trains(x)


def run(rnn: nn.RNNBase, x: torch.Tensor) -> torch.Tensor:
    """rnn(x)[0] for a batch-first x [B, T, E]: every layer through the kernel, with
    nn.RNNBase's dropout between layers."""
    kind = KINDS[rnn.mode]
    for layer in range(rnn.num_layers):
        if layer:
            x = dropout(x, rnn.dropout, training=True)
        w_ih, w_hh, b_ih, b_hh = (getattr(rnn, f"{n}_l{layer}") for n in RNN_WEIGHTS)
        # RNN and LSTM add both biases before their nonlinearities: one bias in the projection
        bias = b_ih if kind == KINDS["GRU"] else b_ih + b_hh
        xp = F.linear(x, w_ih, bias).contiguous()
        x = _Recurrence.apply(xp, w_hh, b_hh, kind)
    return x


class _MaxPool(torch.autograd.Function):
    """states [B, T, F], lengths [B] -> the maximum over each sequence's valid steps [B, F]."""

    @staticmethod
    def forward(ctx, states, lengths):
        values, index = kernels().max_pool(states, lengths)
        ctx.save_for_backward(index)
        ctx.steps = states.shape[1]
        return values

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return kernels().max_pool_backward(grad, index, ctx.steps), None


def max_pool(states: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The elementwise maximum over each sequence's valid steps, [B, T, F] -> [B, F], where
    `trains(states)`. Its gradient goes to the first step holding each maximum (torch's
    amax shares it among equal maxima: the same wherever no two steps tie)."""
    return _MaxPool.apply(states, lengths)


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout(x, p, training), with the kernels' mask where `trains(x)`: x times 0 or
    1 / (1 - p), the mask seeded by one draw from torch's generator."""
    if not (training and 0 < p < 1 and trains(x)):
        return F.dropout(x, p, training)
    seed = int(torch.randint(0, 2**62, ()))
    return x * kernels().dropout_mask(x.shape, p, seed)


class Dropout(nn.Dropout):
    """nn.Dropout through `dropout`: the kernels' mask when training on the CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


class _NgramBag(torch.autograd.Function):
    """The table [K, D], tokens [B, T], lengths [B] -> each text's mean counted n-gram row."""

    @staticmethod
    def forward(ctx, table, tokens, lengths, ngrams, base, draws, p):
        out, ids, valid = kernels().ngram_bag(tokens, lengths, table, ngrams, base, draws, p)
        ctx.save_for_backward(ids, valid)
        ctx.buckets = table.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        ids, valid = ctx.saved_tensors
        table = kernels().ngram_bag_backward(grad, ids, valid, ctx.buckets)
        return table, None, None, None, None, None, None


def ngram_bag(
    table: torch.Tensor,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    ngrams: tuple[int, ...],
    base: int,
    draws: torch.Tensor | None,
    p: float,
) -> torch.Tensor:
    """NgramBag's output where `trains(table)`: the mean row of each text's n-grams that lie
    inside it and, with `draws` (torch.rand's, one per n-gram), drew at least `p`."""
    return _NgramBag.apply(table, tokens, lengths, list(ngrams), base, draws, p)
