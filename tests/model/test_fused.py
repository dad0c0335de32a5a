"""The fused CPU recurrence (rnnflow.model.fused, recurrence.cpp) computes nn.RNN's and
nn.GRU's function: the same outputs and the same gradients of every weight and input."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from rnnflow.model import fused
from rnnflow.model.network import RNNClassifier

from .test_models import make, padded

KINDS = [
    (nn.RNN, {"nonlinearity": "tanh"}),
    (nn.RNN, {"nonlinearity": "relu"}),
    (nn.GRU, {}),
]


@pytest.fixture(autouse=True)
def built():
    assert fused.kernels() is not None, "the kernel did not build (g++, ninja?)"


@pytest.mark.parametrize(("cls", "kw"), KINDS)
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize(("batch", "steps"), [(13, 6), (1, 1), (64, 17)])
def test_outputs_and_gradients_equal_torch(cls, kw, layers, batch, steps):
    torch.manual_seed(layers * 100 + steps)
    rnn = cls(5, 24, num_layers=layers, batch_first=True, **kw)
    x = torch.randn(batch, steps, 5, requires_grad=True)
    weights = torch.randn(batch, steps, 24)  # a loss that reads every step
    results = []
    for run in (lambda: rnn(x)[0], lambda: fused.run(rnn, x)):
        rnn.zero_grad()
        x.grad = None
        out = run()
        (out * weights).sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in rnn.parameters()] + [x.grad]))
    (ref, ref_grads), (out, grads) = results
    assert out.shape == (batch, steps, 24)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    names = [n for n, _ in rnn.named_parameters()] + ["x"]
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        scale = float(r.abs().max()) + 1
        assert torch.allclose(g, r, atol=2e-6 * scale, rtol=0), (name, (g - r).abs().max())


def test_the_same_inputs_give_the_same_bits():
    torch.manual_seed(0)
    rnn = nn.GRU(8, 32, batch_first=True)
    x = torch.randn(40, 9, 8, requires_grad=True)
    grads = []
    for _ in range(2):
        rnn.zero_grad()
        fused.run(rnn, x).square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in rnn.parameters()]))
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("variant", ["rnn", "rnn_deep", "gru"])
def test_models_train_through_the_kernel_and_evaluate_through_nn(variant, monkeypatch):
    calls = []
    run = fused.run
    monkeypatch.setattr(fused, "run", lambda rnn, x: calls.append(x.shape) or run(rnn, x))
    model = make(variant).train()
    tokens, lengths = padded([3, 11, 1, 7])
    logits = model(tokens, lengths)
    assert calls == [(4, 11, 8)]
    model.core.fused = False
    assert torch.allclose(model(tokens, lengths), logits, atol=1e-6, rtol=0)
    model.eval()
    model.core.fused = True
    with torch.no_grad():
        assert torch.allclose(model(tokens, lengths), logits, atol=1e-6, rtol=0)
    assert len(calls) == 1  # not in evaluation, not with fused off


def test_where_the_kernel_does_not_apply():
    def applies(rnn, x):
        return fused.applies(rnn.train(), x)

    x = torch.randn(2, 3, 4)
    assert applies(nn.GRU(4, 5, batch_first=True), x)
    assert not applies(nn.LSTM(4, 5, batch_first=True), x)  # oneDNN's kernel is as fast
    assert not applies(nn.GRU(4, 5, batch_first=True, bidirectional=True), x)
    assert not applies(nn.GRU(4, 5, batch_first=False), x)
    assert not applies(nn.GRU(4, 5, batch_first=True).double(), x.double())
    assert not fused.applies(nn.GRU(4, 5, batch_first=True).eval(), x)
    with torch.no_grad():
        assert not applies(nn.GRU(4, 5, batch_first=True), x)


def test_rnnflow_fused_0_turns_it_off(monkeypatch):
    monkeypatch.setenv("RNNFLOW_FUSED", "0")
    assert not fused.applies(nn.GRU(4, 5, batch_first=True).train(), torch.randn(2, 3, 4))


def test_a_failed_build_warns_once_and_training_uses_nn(monkeypatch, caplog, tmp_path):
    import torch.utils.cpp_extension as ext

    def no_compiler(**kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(ext, "load", no_compiler)
    monkeypatch.setattr(fused, "build_dir", lambda: tmp_path / "never-built")
    fused.kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="rnnflow.model.fused"):
            model: RNNClassifier = make("gru").train()
            tokens, lengths = padded([3, 5])
            model(tokens, lengths).sum().backward()
            model(tokens, lengths)
        warnings = [r.getMessage() for r in caplog.records]
        assert len(warnings) == 1
        assert "fused CPU recurrence unavailable" in warnings[0] and "Ninja" in warnings[0]
        assert all(p.grad is not None for p in model.parameters())
    finally:
        fused.kernels.cache_clear()


def test_training_builds_the_kernel_before_the_first_timed_epoch(monkeypatch):
    built = []
    monkeypatch.setattr(fused, "kernels", lambda: built.append(1))
    cpu = torch.device("cpu")
    fused.warm_up(make("lstm"), cpu)  # oneDNN's LSTM: nothing to build
    fused.warm_up(make("rnn_cell"), cpu)
    fused.warm_up(make("gru"), torch.device("cuda"))  # cuDNN there
    assert built == []
    fused.warm_up(make("rnn_deep"), cpu)
    assert built == [1]
    monkeypatch.setenv("RNNFLOW_FUSED", "0")
    fused.warm_up(make("gru"), cpu)
    assert built == [1]


def test_one_build_serves_every_copy_of_the_project(tmp_path, monkeypatch):
    """The build is keyed by the source's bytes, the flags and torch's version, not by where
    the source or torch lie: a clone elsewhere finds the same library."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    here = fused.build_dir()
    copy = tmp_path / "clone" / "recurrence.cpp"
    copy.parent.mkdir()
    copy.write_bytes(fused.SOURCE.read_bytes())
    monkeypatch.setattr(fused, "SOURCE", copy)
    assert fused.build_dir() == here and here.parent == tmp_path / "ext"
    copy.write_bytes(copy.read_bytes() + b"// changed\n")
    assert fused.build_dir() != here


def test_the_build_is_marked_complete_and_loaded_from_there():
    where = fused.build_dir()
    assert (where / "built").exists() and (where / "rnnflow_recurrence.so").exists()


def test_a_fresh_machine_builds_once_and_a_second_call_loads_that_build(tmp_path):
    """In a new process with an empty extension folder: the first call builds, a second one
    (its cache cleared) finds the same build, and `built` marks it; torch's loader must not
    have changed the key by appending to the flags it was given."""
    script = (
        "from rnnflow.model import fused\n"
        "first = fused.build_dir()\n"
        "assert fused.kernels() is not None\n"
        "fused.kernels.cache_clear()\n"
        "assert fused.kernels() is not None and fused.build_dir() == first\n"
        "print(first)\n"
    )
    env = os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = [p.name for p in tmp_path.iterdir()]
    assert built == [Path(proc.stdout.strip()).name]
    assert (tmp_path / built[0] / "built").exists()
