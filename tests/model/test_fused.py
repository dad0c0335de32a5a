"""The fused CPU kernels (rnnflow.model.fused, recurrence.cpp): the recurrence computes
nn.RNN's, nn.GRU's and nn.LSTM's function (the same outputs and the same gradients of every
weight and input), the max pooling torch's masked max, dropout's mask has dropout's
distribution, and the n-gram bag has NgramBag's bits."""

import contextlib
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from rnnflow.model import fused
from rnnflow.model.network import NgramBag, RNNClassifier, masked_max

from .test_models import make, padded

KINDS = [
    (nn.RNN, {"nonlinearity": "tanh"}),
    (nn.RNN, {"nonlinearity": "relu"}),
    (nn.GRU, {}),
    (nn.LSTM, {}),
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


@pytest.mark.parametrize("variant", ["rnn", "rnn_deep", "gru", "lstm"])
def test_models_train_through_the_kernel_and_evaluate_through_nn(variant, monkeypatch):
    calls = []
    run = fused.run
    monkeypatch.setattr(fused, "run", lambda rnn, x: calls.append(x.shape) or run(rnn, x))
    model = make(variant).train()
    tokens, lengths = padded([3, 11, 1, 7])
    logits = model(tokens, lengths)
    assert calls == [(4, 11, 8)]
    with fused.off():
        assert torch.allclose(model(tokens, lengths), logits, atol=1e-6, rtol=0)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(tokens, lengths), logits, atol=1e-6, rtol=0)
    assert len(calls) == 1  # not in evaluation, not with fused off


def test_where_the_kernel_does_not_apply():
    def applies(rnn, x):
        return fused.applies(rnn.train(), x)

    x = torch.randn(2, 3, 4)
    assert applies(nn.GRU(4, 5, batch_first=True), x)
    assert applies(nn.LSTM(4, 5, batch_first=True), x)
    assert not applies(nn.LSTM(4, 5, batch_first=True, proj_size=3), x)
    assert not applies(nn.GRU(4, 5, batch_first=True, bidirectional=True), x)
    assert not applies(nn.GRU(4, 5, batch_first=False), x)
    assert not applies(nn.GRU(4, 5, batch_first=True).double(), x.double())
    assert not fused.applies(nn.GRU(4, 5, batch_first=True).eval(), x)
    with torch.no_grad():
        assert not applies(nn.GRU(4, 5, batch_first=True), x)


def test_rnnflow_fused_0_and_off_turn_it_off(monkeypatch):
    gru, x = nn.GRU(4, 5, batch_first=True).train(), torch.randn(2, 3, 4)
    with fused.off():
        with fused.off():
            assert not fused.applies(gru, x) and not fused.trains(x)
        assert not fused.applies(gru, x)
    assert fused.applies(gru, x) and fused.trains(x)
    monkeypatch.setenv("RNNFLOW_FUSED", "0")
    assert not fused.applies(gru, x) and not fused.trains(x)


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
        assert "fused CPU kernels unavailable" in warnings[0] and "Ninja" in warnings[0]
        assert all(p.grad is not None for p in model.parameters())
    finally:
        fused.kernels.cache_clear()


def test_training_builds_the_kernel_before_the_first_timed_epoch(monkeypatch):
    built = []
    monkeypatch.setattr(fused, "kernels", lambda: built.append(1))
    cpu = torch.device("cpu")
    # a cell loop, no dropout, the last state: nothing to build
    quiet = {"dropout": 0.0, "embedding_dropout": 0.0, "pool": "last"}
    fused.warm_up(make("rnn_cell", **quiet), cpu)
    fused.warm_up(make("gru"), torch.device("cuda"))  # cuDNN there
    assert built == []
    fused.warm_up(make("rnn_deep", **quiet), cpu)  # the recurrence
    fused.warm_up(make("lstm", **quiet), cpu)  # the recurrence
    fused.warm_up(make("rnn_cell", **quiet | {"pool": "max"}), cpu)  # the max pooling
    fused.warm_up(make("rnn_cell", **quiet | {"embedding_dropout": 0.1}), cpu)  # dropout
    assert built == [1, 1, 1, 1]
    monkeypatch.setenv("RNNFLOW_FUSED", "0")
    fused.warm_up(make("gru"), cpu)
    assert built == [1, 1, 1, 1]


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


def test_each_kind_of_cpu_has_its_own_build(monkeypatch):
    """-march=native: a build for one CPU's instruction sets may not run on another's."""
    here = fused.build_dir()
    assert "avx" in fused.cpu_features() or fused.cpu_features() == platform.machine()
    monkeypatch.setattr(fused, "cpu_features", lambda: "flags : fpu sse sse2")
    assert fused.build_dir() != here and fused.build_dir().parent == here.parent


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


def test_a_build_killed_midway_does_not_hang_the_next_one(tmp_path):
    """A build killed midway leaves torch's `lock` file and a half-built folder; two processes
    then starting together must both get the kernels from one build, not wait forever."""
    script = (
        "import sys\n"
        "from rnnflow.model import fused\n"
        "where = fused.build_dir()\n"
        "if sys.argv[1] == 'kill':\n"
        "    where.mkdir(parents=True)\n"
        "    (where / 'lock').touch()  # what a killed build of torch's loader leaves\n"
        "    (where / 'recurrence.o').write_bytes(b'half')\n"
        "else:\n"
        "    assert fused.kernels() is not None\n"
        "    print(fused.kernels().dropout_mask([4], 0.5, 1).tolist())\n"
    )
    env = os.environ | {"TORCH_EXTENSIONS_DIR": str(tmp_path)}
    run = [sys.executable, "-c", script]
    subprocess.run([*run, "kill"], env=env, check=True, timeout=120)
    procs = [
        subprocess.Popen([*run, "go"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    assert outs[0][0] == outs[1][0] and outs[0][0].startswith(b"[")
    (built,) = tmp_path.iterdir()
    assert (built / "built").exists() and not (built / "lock").exists()


# ---------------------------------------------------------------------------- max pooling


def torch_max(states, lengths):
    with fused.off():
        return masked_max(states, lengths)


@pytest.mark.parametrize(("lengths", "steps"), [([3, 11, 1, 7], 11), ([1], 1), ([5, 5], 9)])
def test_max_pool_equals_torch_values_and_gradients(lengths, steps):
    torch.manual_seed(len(lengths) + steps)
    states = torch.randn(len(lengths), steps, 33, requires_grad=True)
    lengths = torch.tensor(lengths)
    weights = torch.randn(len(lengths), 33)
    results = []
    for pool in (torch_max, fused.max_pool):
        states.grad = None
        out = pool(states, lengths)
        (out * weights).sum().backward()
        results.append((out.detach(), states.grad.clone()))
    (ref, ref_grad), (out, grad) = results
    assert out.shape == (len(lengths), 33)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    beyond = torch.arange(steps)[None, :] >= lengths[:, None]
    assert grad[beyond].abs().sum() == 0  # padding gets no gradient
    assert (grad != 0).sum() == weights.numel()  # one step per feature


def test_max_pool_never_reads_padding():
    torch.manual_seed(3)
    states, lengths = torch.randn(3, 6, 5), torch.tensor([2, 6, 4])
    noisy = states.clone()
    noisy[0, 2:], noisy[2, 4:] = 100.0, float("nan")
    with torch.enable_grad():
        assert torch.equal(fused.max_pool(states, lengths), fused.max_pool(noisy, lengths))


def test_max_pool_ties_give_the_gradient_to_the_first_step_and_nan_wins():
    states = torch.tensor([[[1.0, 2.0], [1.0, float("nan")], [0.5, 2.0]]], requires_grad=True)
    out = fused.max_pool(states, torch.tensor([3]))
    out.sum().backward()
    assert out[0, 0] == 1.0 and out[0, 1].isnan()  # torch.max's NaN too
    assert states.grad.tolist() == [[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]]
    empty = fused.max_pool(torch.zeros(1, 2, 3, requires_grad=True), torch.tensor([0]))
    assert torch.equal(empty, torch.full((1, 3), -torch.inf))  # as torch's masked max


@pytest.mark.parametrize("pool", ["max", "concat"])
def test_models_max_pool_through_the_kernel_when_training(pool, monkeypatch):
    calls = []
    kernel = fused.max_pool
    monkeypatch.setattr(fused, "max_pool", lambda s, n: calls.append(s.shape) or kernel(s, n))
    model = make("lstm", pool=pool).train()
    tokens, lengths = padded([3, 11, 1, 7])
    logits = model(tokens, lengths)
    assert calls == [(4, 11, 12)]
    with fused.off():
        assert torch.allclose(model(tokens, lengths), logits, atol=1e-6, rtol=0)
    with torch.no_grad():
        model(tokens, lengths)
    assert len(calls) == 1  # not without gradients, not with the kernels off


# -------------------------------------------------------------------------------- dropout


def test_dropout_mask_has_dropouts_distribution():
    n, p = 1_000_001, 0.2  # odd: the last pair is cut
    mask = fused.kernels().dropout_mask([n], p, 12345)
    assert mask.shape == (n,) and mask.dtype == torch.float32
    kept = mask != 0
    assert torch.equal(mask[kept], torch.full((int(kept.sum()),), 1 / (1 - p)))
    sd = (p * (1 - p) / n) ** 0.5
    assert abs(1 - kept.float().mean().item() - p) < 6 * sd
    # no pattern between neighbours (a pair shares one hash) or from one block to the next
    both = (~kept[:-1:2] & ~kept[1::2]).float().mean().item()
    assert abs(both - p * p) < 6 * (p * p * (1 - p * p) / (n // 2)) ** 0.5
    blocks = (~kept[: 1000 * 1000]).view(1000, 1000).float().mean(1)
    assert blocks.std().item() < 1.5 * (p * (1 - p) / 1000) ** 0.5
    assert not torch.equal(mask[:1000], fused.kernels().dropout_mask([n], p, 12346)[:1000])


def test_dropout_is_seeded_by_torch_and_the_same_on_any_number_of_threads():
    x = torch.ones(64, 17, 33, requires_grad=True)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 1):
            torch.set_num_threads(n)
            torch.manual_seed(7)
            results.append(fused.dropout(x, 0.3, training=True))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
    assert not torch.equal(results[0], fused.dropout(x, 0.3, training=True))  # next draw


def test_dropout_gradient_is_its_mask_and_evaluation_is_the_identity():
    torch.manual_seed(0)
    x = torch.randn(8, 5, 7, requires_grad=True)
    out = fused.dropout(x, 0.5, training=True)
    out.sum().backward()
    mask = out.detach() / x.detach()
    assert set(mask.flatten().round(decimals=5).tolist()) == {0.0, 2.0}
    assert torch.allclose(x.grad, mask, atol=1e-6, rtol=0)
    assert fused.dropout(x, 0.5, training=False) is x
    assert torch.equal(fused.dropout(x, 0.0, training=True), x)
    layer = fused.Dropout(0.5).eval()
    assert layer(x) is x


def test_dropout_falls_back_to_torch_where_the_kernels_do_not_apply(monkeypatch):
    calls = []
    monkeypatch.setattr(F, "dropout", lambda x, p, training: calls.append(p) or x)
    x = torch.randn(4, 3)
    with torch.no_grad():
        fused.dropout(x, 0.1, training=True)
    fused.dropout(x.double(), 0.2, training=True)
    with fused.off():
        fused.dropout(x, 0.3, training=True)
    assert calls == [0.1, 0.2, 0.3]
    fused.dropout(x, 0.4, training=True)
    assert calls == [0.1, 0.2, 0.3]


# ------------------------------------------------------------------------------ n-gram bag


def bag_and_grad(bag, tokens, lengths, seed, kernel=True):
    """The bag's output and its table's gradient for fixed output weights, from `seed`."""
    bag.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # n-gram dropout's draws
    if kernel:
        out = bag(tokens, lengths)
    else:
        with fused.off():
            out = bag(tokens, lengths)
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    (out * weights).sum().backward()
    return out.detach(), bag.table.weight.grad.clone()


@pytest.mark.parametrize(
    ("ngrams", "buckets", "dim", "vocab", "p", "lengths"),
    [
        ((2, 3), 16384, 64, 60, 0.2, [10, 3, 1, 0, 7, 10]),  # the char-level default
        ((2, 3), 97, 5, 60, 0.0, [42, 1, 17]),  # no dropout; collisions in 97 rows
        ((1, 2, 3, 4, 5), 1000, 33, 30000, 0.3, [130, 2, 64]),  # word ids, more than 256 n-grams
        ((3,), 16, 4, 5, 0.5, [2, 1]),  # every text shorter than its n-grams: zeros
    ],
)
def test_ngram_bag_has_the_modules_bits(ngrams, buckets, dim, vocab, p, lengths):
    """Training on the CPU, NgramBag runs through the kernel: the same output and the same
    table gradient to the bit as its own ops, the same n-gram dropout draws included."""
    torch.manual_seed(len(lengths))
    bag = NgramBag(ngrams, buckets, dim, vocab, p).train()
    tokens, lengths = padded(lengths, vocab=vocab)
    calls = []
    kernel = fused.ngram_bag
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fused, "ngram_bag", lambda *a: calls.append(a[1].shape) or kernel(*a))
        out, grad = bag_and_grad(bag, tokens, lengths, seed=5)
    ref, ref_grad = bag_and_grad(bag, tokens, lengths, seed=5, kernel=False)
    assert calls == [tokens.shape] and out.shape == (len(lengths), dim)
    assert torch.equal(out, ref) and torch.equal(grad, ref_grad)
    counted = (lengths >= min(ngrams)).sum().item()
    assert (out.abs().sum(1) > 0).sum() <= counted  # a text with no n-gram inside: zeros
    assert grad.abs().sum() > 0 if counted else grad.abs().sum() == 0
    again, _ = bag_and_grad(bag, tokens, lengths, seed=6)
    assert p == 0 or not counted or not torch.equal(again, out)  # other draws, other n-grams


def test_ngram_bag_never_reads_padding_and_evaluates_through_its_own_ops(monkeypatch):
    torch.manual_seed(0)
    bag = NgramBag((2, 3), 64, 6, 30, 0.0).train()
    tokens, lengths = padded([5, 2, 4])
    noisy = tokens.clone()
    noisy[1, 2:], noisy[2, 4:] = 29, 17  # past each end
    with torch.enable_grad():
        assert torch.equal(bag(tokens, lengths), bag(noisy, lengths))
    calls = []
    monkeypatch.setattr(fused, "ngram_bag", lambda *a: calls.append(1))
    bag(tokens.int(), lengths)  # training: the kernel (int32 tokens too)
    with torch.no_grad():
        bag(tokens, lengths)
    bag.eval()(tokens, lengths)
    with fused.off():
        bag.train()(tokens, lengths)
    bag.use_kernel = False  # the bench's baseline
    bag(tokens, lengths)
    assert calls == [1]  # not without gradients, in evaluation, with the kernels off or unused


# ----------------------------------------------------------------------------- denormals

TINY = torch.finfo(torch.float32).tiny  # the smallest normal float32, 1.2e-38


def _denormals(t: torch.Tensor) -> int:
    return int(((t != 0) & (t.abs() < TINY)).sum())


@pytest.fixture
def two_threads():
    """At least two intra-op threads, on any machine (OpenMP starts them on one core too)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    yield
    torch.set_num_threads(threads)


def test_denormals_are_flushed_on_every_thread_inside_the_block_only(two_threads):
    """A product large enough that ATen splits it over the threads: every half denormal
    outside the block, zero inside it (results flushed, and denormal inputs read as zero),
    denormal again after it; a nested block leaves the outer one's mode on."""
    cpu, n = torch.device("cpu"), 1 << 20
    small, denormal = torch.full((n,), 4 * TINY), torch.full((n,), TINY / 4)
    assert _denormals(small * 0.01) == n
    with fused.denormals_flushed(cpu):
        product = small * 0.01
        assert _denormals(product) == 0 and int((product == 0).sum()) == n
        assert float((denormal * 1.0).abs().max()) == 0.0  # an input read as zero
        with fused.denormals_flushed(cpu):
            pass
        assert _denormals(small * 0.01) == 0  # still on after the inner block
    assert _denormals(small * 0.01) == n
    assert float((denormal * 1.0).min()) == TINY / 4


def test_adams_decaying_moments_stay_normal_while_training(two_threads):
    """Adam's fused step on a parameter whose gradient is zero: its first moment, one step
    from the denormal range, becomes 0 inside the block and a denormal outside it, and the
    parameter is the same either way."""
    cpu, n = torch.device("cpu"), 1 << 20
    results = []
    for flush in (False, True):
        p = nn.Parameter(torch.ones(n))
        adam = torch.optim.Adam([p], lr=1e-3, fused=True)
        p.grad = torch.full((n,), 1e-3)
        adam.step()
        adam.state[p]["exp_avg"].fill_(1.1 * TINY)
        p.grad = torch.zeros(n)
        with fused.denormals_flushed(cpu) if flush else contextlib.nullcontext():
            adam.step()
        results.append((_denormals(adam.state[p]["exp_avg"]), p.detach().clone()))
    (kept, p_ieee), (flushed, p_flushed) = results
    assert kept == n and flushed == 0
    assert torch.equal(p_ieee, p_flushed)


def test_denormals_stay_ieee_where_the_kernels_are_off_or_on_cuda(monkeypatch):
    """RNNFLOW_FUSED=0 and off() are torch's stock arithmetic; a CUDA device has its own."""
    small = torch.full((1 << 20,), 4 * TINY)
    with fused.off(), fused.denormals_flushed(torch.device("cpu")):
        assert _denormals(small * 0.01) == 1 << 20
    with fused.denormals_flushed(torch.device("cuda")):
        assert _denormals(small * 0.01) == 1 << 20
    monkeypatch.setenv("RNNFLOW_FUSED", "0")
    with fused.denormals_flushed(torch.device("cpu")):
        assert _denormals(small * 0.01) == 1 << 20
