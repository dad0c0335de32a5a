"""Stage gradients@VARIANT: how the loss gradient flows back through time.

The tutorial's claim: a plain RNN's gradient vanishes (or explodes) as it flows back through
the steps, and LSTM/GRU gating keeps it alive. Measured here: on a fixed, seeded set of test
sequences, the norm of dL/dh_t, the gradient of the loss with respect to the hidden state
after step t (every layer), for the trained checkpoint and for the same architecture at
initialisation. The sequences are grouped by length (no padding) and unrolled step by step
with torch's own cell functions on the model's weights; dL/dh_t is the gradient with respect
to a zero added to h_t, i.e. through every later step and layer.

Written to metrics/gradients/VARIANT.json: per step before the end of the sequence
(k = T - 1 - t; the head reads k = 0) the mean log10 norm over sequences, and the decay per
step fitted to it (10 ** slope of log10 norm against k: below 1 vanishing, above 1 exploding).

Bidirectional models: each direction is measured on its own time axis. The forward direction
is read as above (the headline series and decays); the backward direction reads the text
from its end to its start, so its "steps before the end" are k = t (its last state, at
position 0, is what the head's `last` reads) and it is written beside the forward one
(`log10_grad_norm_backward`, `decay_per_step_backward`).
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rnnflow.core.atomic import write_json
from rnnflow.core.config import Params
from rnnflow.core.paths import PACKED, TOKENIZER_DIR, metrics_file
from rnnflow.core.paths import checkpoint as checkpoint_path
from rnnflow.data.batching import PackedSplit
from rnnflow.data.text import file_hash
from rnnflow.model import checkpoint
from rnnflow.model.network import RNN_WEIGHTS, CellLoopCore, RNNClassifier
from rnnflow.runtime import host

SEQUENCES = 512  # test sequences in the fixed set
MIN_SEQUENCES = 20  # a step enters the decay fit only if this many sequences reach it


Weights = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # w_ih w_hh b_ih b_hh


def layer_weights(model: RNNClassifier) -> tuple[str, list[list[Weights]]]:
    """(cell kind, per layer the weights of each direction: forward, then backward)."""
    core = model.core
    if isinstance(core, CellLoopCore):
        layers = [
            [tuple(getattr(cells[i], n) for n in RNN_WEIGHTS) for _, cells in core.directions()]
            for i in range(len(core.cells))
        ]
        return f"rnn_{model.cfg.nonlinearity}", layers
    rnn = core.rnn
    kinds = {nn.LSTM: "lstm", nn.GRU: "gru", nn.RNN: f"rnn_{model.cfg.nonlinearity}"}
    suffixes = ["", "_reverse"] if rnn.bidirectional else [""]
    layers = [
        [tuple(getattr(rnn, f"{n}_l{i}{s}") for n in RNN_WEIGHTS) for s in suffixes]
        for i in range(rnn.num_layers)
    ]
    return kinds[type(rnn)], layers


def unrolled_logits(
    model: RNNClassifier, tokens: torch.Tensor, deltas: list[list[list[torch.Tensor]]]
) -> torch.Tensor:
    """The model's logits for equal-length sequences, step by step, with
    deltas[layer][direction][t] added to that direction's hidden state at position t (zeros:
    the model's own function). The backward direction runs from the last position to 0."""
    kind, layers = layer_weights(model)
    batch, steps = tokens.shape
    lengths = torch.full((batch,), steps, dtype=torch.int64)  # equal lengths: no padding
    x = model.inputs(tokens, lengths)  # [B, T, E] (with the n-gram features, if any)
    for layer, directions in enumerate(layers):
        outputs, lasts = [], []
        for direction, (w_ih, w_hh, b_ih, b_hh) in enumerate(directions):
            h = c = x.new_zeros(batch, w_hh.shape[1])
            states = [h] * steps
            for t in range(steps) if direction == 0 else reversed(range(steps)):
                if kind == "lstm":
                    h, c = torch.lstm_cell(x[:, t], (h, c), w_ih, w_hh, b_ih, b_hh)
                elif kind == "gru":
                    h = torch.gru_cell(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
                elif kind == "rnn_relu":
                    h = torch.rnn_relu_cell(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
                else:
                    h = torch.rnn_tanh_cell(x[:, t], h, w_ih, w_hh, b_ih, b_hh)
                h = h + deltas[layer][direction][t]
                states[t] = h
            outputs.append(torch.stack(states, dim=1))
            lasts.append(h)  # forward: at the last position; backward: at position 0
        x = torch.cat(outputs, dim=2)
    return model.classify(tokens, lengths, x, torch.cat(lasts, dim=1))


def zero_deltas(model: RNNClassifier, batch: int, steps: int, **options):
    """deltas[layer][direction][t] for `unrolled_logits`: zeros [batch, hidden]."""
    _, layers = layer_weights(model)
    hidden = model.cfg.hidden_size
    return [
        [[torch.zeros(batch, hidden, **options) for _ in range(steps)] for _ in directions]
        for directions in layers
    ]


def state_gradient_norms(model: RNNClassifier, tokens: torch.Tensor, labels: torch.Tensor):
    """||dL/dh_t|| per layer, direction, sequence and step: array [layers, directions, B, T];
    L is the summed cross-entropy, so each sequence's gradient is its own."""
    batch, steps = tokens.shape
    dtype = model.embedding.weight.dtype
    deltas = zero_deltas(model, batch, steps, dtype=dtype, requires_grad=True)
    loss = F.cross_entropy(unrolled_logits(model, tokens, deltas), labels, reduction="sum")
    flat = [d for layer in deltas for direction in layer for d in direction]
    grads = torch.autograd.grad(loss, flat)
    norms = torch.stack([g.norm(dim=1) for g in grads])
    return norms.reshape(len(deltas), len(deltas[0]), steps, batch).permute(0, 1, 3, 2).numpy()


def fixed_sequences(split: PackedSplit, count: int, seed: int) -> list[np.ndarray]:
    """The same `count` test-split indices for every variant and run, grouped by length."""
    rng = np.random.default_rng(seed)
    picked = np.sort(rng.choice(len(split), size=min(count, len(split)), replace=False))
    lengths = split.lengths[picked]
    return [picked[lengths == n] for n in np.unique(lengths)]


def flow(
    model: RNNClassifier, split: PackedSplit, groups: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """Mean log10 ||dL/dh|| per layer, direction and step before that direction's end:
    [layers, directions, max T] (NaN where no sequence is that long), and the number of
    sequences per step."""
    model.eval()
    _, layers = layer_weights(model)
    longest = int(max(split.lengths[g[0]] for g in groups))
    total = np.zeros((len(layers), len(layers[0]), longest))
    count = np.zeros(longest)
    for group in groups:
        tokens, lengths, labels = split.batch(group)
        steps = int(lengths[0])
        norms = state_gradient_norms(
            model, torch.from_numpy(tokens[:, :steps].astype(np.int64)), torch.from_numpy(labels)
        )
        logs = np.log10(np.maximum(norms, 1e-30))  # [layers, directions, B, t]
        logs[:, 0] = logs[:, 0, :, ::-1]  # forward: k = T - 1 - t; backward: k = t
        total[:, :, :steps] += logs.sum(axis=2)
        count[:steps] += len(group)
    with np.errstate(invalid="ignore"):
        return total / count, count


def decay_per_step(mean_log10: np.ndarray, count: np.ndarray) -> float | None:
    """10 ** slope of a least-squares line through mean log10 norm against steps before the
    end, over the steps that at least MIN_SEQUENCES sequences reach."""
    steps = np.flatnonzero(count >= MIN_SEQUENCES)
    if len(steps) < 2:
        return None
    slope = np.polyfit(steps, mean_log10[steps], 1)[0]
    return float(10**slope)


def gradient_flow(params: Params, variant: str, packed_dir: Path = PACKED) -> dict:
    """Measure the trained checkpoint and the same architecture at initialisation."""
    host.setup(params.seed, cuda=False)  # small unrolled steps: the CPU, as on every machine
    model, payload = checkpoint.load_model(
        checkpoint_path(variant), file_hash(TOKENIZER_DIR / "tokenizer.json")
    )
    model = model.cpu()
    torch.manual_seed(params.seed)
    initial = RNNClassifier(model.cfg)
    split = PackedSplit.load(packed_dir / "test.npz")
    groups = fixed_sequences(split, SEQUENCES, params.seed)
    trained, count = flow(model, split, groups)  # [layers, directions, steps]
    at_init, _ = flow(initial, split, groups)
    top, top_init = trained[-1], at_init[-1]  # the last layer's directions
    backward = len(top) == 2
    series = [
        {
            "steps_before_end": k,
            "log10_grad_norm": _num(top[0, k]),
            "log10_grad_norm_init": _num(top_init[0, k]),
            "sequences": int(count[k]),
        }
        | {f"log10_grad_norm_layer{i}": _num(trained[i, 0, k]) for i in range(len(trained) - 1)}
        | ({"log10_grad_norm_backward": _num(top[1, k])} if backward else {})
        for k in range(len(count))
    ]
    report = {
        "series": series,
        "variant": variant,
        "sequences": int(count[0]),
        "layers": len(trained),
        "directions": len(top),
        "decay_per_step": _num(decay_per_step(top[0], count)),
        "decay_per_step_init": _num(decay_per_step(top_init[0], count)),
        "decay_per_step_by_layer": [_num(decay_per_step(t[0], count)) for t in trained],
        "fit_steps": int((count >= MIN_SEQUENCES).sum()),
    }
    if backward:
        report["decay_per_step_backward"] = _num(decay_per_step(top[1], count))
        report["decay_per_step_backward_init"] = _num(decay_per_step(top_init[1], count))
    write_json(metrics_file("gradients", variant), report)
    return {k: v for k, v in report.items() if k != "series"}


def _num(value) -> float | None:
    """A JSON-friendly float: rounded to 6 significant digits, None for NaN."""
    if value is None or not np.isfinite(value):
        return None
    return float(f"{float(value):.6g}")
