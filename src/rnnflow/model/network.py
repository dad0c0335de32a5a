"""Embedding -> (n-gram convolution) -> recurrent core -> pooling -> linear head, every variant.

With `conv_width` > 0 the core reads, beside each token's embedding, `conv_channels` features
of the window of `conv_width` tokens centred on it (nn.Conv1d + ReLU over the embeddings,
padded steps zeroed first, so a text's features do not depend on its padding).

A core returns (states, last): the top layer's state at every step [B, T, F] (None when the
pooling does not read it) and its state at each sequence's last valid step [B, F] (nn.*
cores: None when the pooling does not read it). `Pool`
summarises them for the head: `last` (the last state; bidirectional: the forward direction's
last and the backward direction's first), `mean` and `max` over the valid steps, or
`attention` (a learned score per step, softmax over the valid steps), or `concat` (last, max
and mean side by side). Padded steps never
reach the head: they are masked out, whatever a core computed there."""

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnflow.core.config import ModelParams
from rnnflow.core.variants import VARIANTS
from rnnflow.data.text import PAD_ID
from rnnflow.model import fused

# The float unary ops ATen computes on the CPU through MKL's vector math, VML
# (aten/src/ATen/cpu/vml.h); the models use tanh (nn.RNN, nn.GRU, the cell loops).
VML_OPS = (
    "acos", "asin", "atan", "cos", "erf", "erfc", "erfinv", "exp",
    "log", "log10", "log2", "sin", "sqrt", "tan", "tanh", "trunc",
)  # fmt: skip


def warm_vector_math() -> None:
    """Call each of VML_OPS once on this thread, float32 and float64. oneMKL 2024.2 (torch
    2.13's) picks a VML function's kernel on its first call; when that first call runs on
    several threads at once (an op on more than a few thousand elements), one thread's share
    can come from a low-accuracy kernel, for that call only (pytorch/pytorch#188792). Here:
    a tanh 5.0e-5 from float64 instead of 3.2e-8 on the main thread's rows of a model's first
    batch, in 1 process in 20 to 50; a cell loop's first training step then had other
    gradients in 7 of 400 (docs "ONNX and serving"). Called once, it stays right: so this
    runs when the module is imported, before any model computes."""
    for dtype in (torch.float32, torch.float64):
        x = torch.full((1,), 0.5, dtype=dtype)
        for name in VML_OPS:
            getattr(torch, name)(x)


warm_vector_math()


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model (saved in checkpoints)."""

    variant: str
    vocab_size: int
    num_classes: int
    embedding_dim: int
    hidden_size: int
    num_layers: int
    dropout: float
    nonlinearity: str
    bidirectional: bool
    pool: str = "last"  # saved by older checkpoints without the fields below
    embedding_dropout: float = 0.0
    conv_width: int = 0
    conv_channels: int = 0
    ngram_bag: tuple[int, ...] = ()
    ngram_buckets: int = 0
    ngram_dropout: float = 0.0
    ngram_dim: int = 0  # 0: embedding_dim (params' null; checkpoints saved before the field)

    @classmethod
    def of(cls, variant: str, options: ModelParams, vocab_size: int, num_classes: int):
        """A config from a variant's merged params."""
        fields = options.model_dump()
        fields |= {"ngram_bag": tuple(fields["ngram_bag"]), "ngram_dim": fields["ngram_dim"] or 0}
        return cls(variant, vocab_size, num_classes, **fields)

    def to_dict(self) -> dict:
        """Plain dict, for checkpoints and MLflow params."""
        return asdict(self)


RNN_WEIGHTS = fused.RNN_WEIGHTS


class TorchRNNCore(nn.Module):
    """nn.RNN / nn.LSTM / nn.GRU; returns the last layer's state at each sequence's true last
    step (and, bidirectional, the backward direction's at position 0)."""

    def __init__(self, kind: str, cfg: ModelConfig):
        super().__init__()
        cls = {"rnn": nn.RNN, "lstm": nn.LSTM, "gru": nn.GRU}[kind]
        extra = {"nonlinearity": cfg.nonlinearity} if kind == "rnn" else {}
        self.rnn = cls(
            cfg.embedding_dim,
            cfg.hidden_size,
            num_layers=cfg.num_layers,
            batch_first=True,
            dropout=cfg.dropout if cfg.num_layers > 1 else 0.0,
            bidirectional=cfg.bidirectional,
            **extra,
        )
        self.directions = 2 if cfg.bidirectional else 1
        # One direction runs on the padded batch and reads each sequence's last valid step:
        # steps after a sequence's end cannot reach that step, so the result is the packed
        # one (tested <= 1e-6), and padded input takes torch's faster paths (on the CPU the
        # input projection of all steps in one matmul and oneDNN's fused LSTM for evaluation,
        # on CUDA cuDNN without packing), which packed input never does. Length buckets keep the
        # extra padded steps at a few percent. Two directions need packing: the backward
        # direction must start at each sequence's own last step.
        self.packed = cfg.bidirectional
        self.reads_last = cfg.pool in ("last", "concat")  # else the head never reads `last`
        # Training on the CPU, the padded path runs through the fused recurrence kernel (the
        # same function of the same weights; rnnflow.model.fused).

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor):
        if not self.packed:
            if fused.applies(self.rnn, emb):
                out = fused.run(self.rnn, emb)
            else:
                out, _ = self.rnn(emb)
            return out, self.last_states(out, lengths)
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        # Read the last layer's states from its output sequence rather than from h_n: the
        # same numbers, and the TorchScript ONNX exporter (torch 2.13) crashes on one-layer
        # modules whose output sequence is left unused.
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=emb.shape[1])
        return out, self.last_states(out, lengths)

    def last_states(self, out: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """out [B, T, directions * H] (zeros after each end) -> the forward direction's state at
        each sequence's last valid step and the backward direction's at position 0; None
        when the pooling does not read them."""
        if not self.reads_last:
            return None
        rows = torch.arange(out.shape[0], device=out.device)
        last = (lengths.to(out.device) - 1).clamp(min=0)
        hidden = self.rnn.hidden_size
        forward = out[rows, last, :hidden]
        if self.directions == 1:
            return forward
        return torch.cat([forward, out[:, 0, hidden:]], dim=1)


class CellLoopCore(nn.Module):
    """Stacked nn.RNNCell run step by step; padded steps never change the hidden state.

    The loop is layer-major: layer i sees layer i-1's state at the same step, exactly as a
    time-major loop would, but each layer's input projection (x @ W_ih + b_ih) is done for all
    steps in one matmul, leaving only h @ W_hh inside the Python loop.

    Bidirectional, as nn.RNN is: each layer also runs a second cell (cells_reverse) over each
    sequence reversed within its own length, and the next layer reads both directions'
    states side by side; the head's `last` is the forward direction's last state and the
    backward direction's state at position 0.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.keep_states = cfg.pool != "last"  # the top layer's states, for the pooling
        directions = 2 if cfg.bidirectional else 1
        sizes = [cfg.embedding_dim] + [cfg.hidden_size * directions] * (cfg.num_layers - 1)

        def cells() -> nn.ModuleList:
            return nn.ModuleList(
                nn.RNNCell(n_in, cfg.hidden_size, nonlinearity=cfg.nonlinearity) for n_in in sizes
            )

        self.cells = cells()
        self.cells_reverse = cells() if cfg.bidirectional else None
        self.activation = torch.tanh if cfg.nonlinearity == "tanh" else torch.relu
        self.dropout = fused.Dropout(cfg.dropout)

    def directions(self) -> list[tuple[str, nn.ModuleList]]:
        """(nn.RNN's parameter suffix, the layers' cells) per direction: forward, backward."""
        pairs = [("", self.cells)]
        if self.cells_reverse is not None:
            pairs.append(("_reverse", self.cells_reverse))
        return pairs

    def _run(self, cell: nn.RNNCell, x: torch.Tensor, valid: torch.Tensor, keep: bool):
        """One direction of one layer: (every step's state or None, the last state)."""
        # x @ W_ih + b_ih + b_hh for all steps at once; the loop adds only h @ W_hh.
        projected = F.linear(x, cell.weight_ih, cell.bias_ih + cell.bias_hh)
        w_hh = cell.weight_hh.t()
        h = x.new_zeros(x.shape[0], cell.hidden_size)
        outputs = []
        for t in range(x.shape[1]):
            h_new = self.activation(torch.addmm(projected[:, t], h, w_hh))
            h = torch.where(valid[:, t], h_new, h)  # h = m * h_new + (1 - m) * h, exactly
            if keep:
                outputs.append(h)
        return (torch.stack(outputs, dim=1) if keep else None), h

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor):
        steps = emb.shape[1]
        lengths = lengths.to(emb.device)
        positions = torch.arange(steps, device=emb.device)[None, :]
        valid = (positions < lengths[:, None]).unsqueeze(-1)  # [B, T, 1]
        if self.cells_reverse is not None:
            # each sequence reversed within its length (padding stays put): its own inverse
            flip = torch.where(
                positions < lengths[:, None], lengths[:, None] - 1 - positions, positions
            )
            index = flip.unsqueeze(-1)
        x, top = emb, len(self.cells) - 1
        for layer, cell in enumerate(self.cells):
            if layer:
                x = self.dropout(x)
            keep = layer < top or self.keep_states
            states, h = self._run(cell, x, valid, keep)
            if self.cells_reverse is not None:
                backward = torch.gather(x, 1, index.expand(-1, -1, x.shape[2]))
                back_states, h_back = self._run(self.cells_reverse[layer], backward, valid, keep)
                h = torch.cat([h, h_back], dim=1)
                if keep:
                    back_states = torch.gather(back_states, 1, index.expand_as(back_states))
                    states = torch.cat([states, back_states], dim=2)
            x = states
        return (x if self.keep_states else None), h


def build_core(cfg: ModelConfig) -> nn.Module:
    """The recurrent core a variant name stands for (see rnnflow.variants.VARIANTS)."""
    kind = VARIANTS[cfg.variant].core
    return CellLoopCore(cfg) if kind == "rnn_cell" else TorchRNNCore(kind, cfg)


class Pool(nn.Module):
    """The sequence summary the head reads: last, mean, max or attention over valid steps,
    or `concat`: last, max and mean side by side (ULMFiT's concat pooling, Howard and Ruder
    2018), so the head has 3x the features."""

    def __init__(self, kind: str, features: int):
        super().__init__()
        self.kind = kind
        self.score = nn.Linear(features, 1) if kind == "attention" else None
        self.out_features = features * (3 if kind == "concat" else 1)  # what the head reads
        self.max_pools = kind in ("max", "concat")  # through fused.max_pool when training

    def forward(self, states, last: torch.Tensor | None, lengths: torch.Tensor) -> torch.Tensor:
        if self.kind == "last":
            return last
        if self.kind == "max":
            return masked_max(states, lengths)
        valid = valid_steps(states, lengths)
        if self.kind == "mean":
            return masked_mean(states, valid, lengths)
        if self.kind == "concat":
            peak = masked_max(states, lengths)
            return torch.cat([last, peak, masked_mean(states, valid, lengths)], dim=1)
        scores = self.score(states).masked_fill(~valid, -torch.inf)  # [B, T, 1]
        return (torch.softmax(scores, dim=1) * states).sum(1)


def masked_mean(states: torch.Tensor, valid: torch.Tensor, lengths: torch.Tensor):
    """Mean over each sequence's valid steps: [B, T, F] -> [B, F]."""
    total = torch.where(valid, states, torch.zeros_like(states)).sum(1)
    return total / lengths.to(states.device).clamp(min=1).unsqueeze(1).to(states.dtype)


def masked_max(states: torch.Tensor, lengths: torch.Tensor):
    """Elementwise max over each sequence's valid steps: [B, T, F] -> [B, F] (training on
    the CPU through the fused kernel, the same values)."""
    if fused.trains(states):
        return fused.max_pool(states, lengths)
    valid = valid_steps(states, lengths)
    return torch.where(valid, states, torch.full_like(states, -torch.inf)).amax(1)


def valid_steps(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, T, 1]: True where step t of x [B, T, F] is before its sequence's length."""
    steps = torch.arange(x.shape[1], device=x.device)
    return (steps[None, :] < lengths.to(x.device)[:, None]).unsqueeze(-1)


class NgramConv(nn.Module):
    """Each step's embedding with `channels` ReLU features of the `width` tokens centred on
    it: [B, T, E] -> [B, T, E + channels]. Steps past a text's length are zeroed before the
    convolution, so they read as the convolution's own zero padding: a text's features are
    the same at every pad length and beside any batch mates."""

    def __init__(self, embedding_dim: int, width: int, channels: int):
        super().__init__()
        self.conv = nn.Conv1d(embedding_dim, channels, width, padding=width // 2)

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        emb = torch.where(valid_steps(emb, lengths), emb, torch.zeros_like(emb))
        features = torch.relu(self.conv(emb.transpose(1, 2))).transpose(1, 2)
        return torch.cat([emb, features], dim=2)


class NgramBag(nn.Module):
    """fastText's bag of n-grams (Joulin et al. 2017): the mean embedding of a text's n-grams
    of the given lengths, each hashed into one of `buckets` rows of a table: tokens [B, T] ->
    [B, dim]. The hash is a polynomial in the token ids, base `vocab_size`, reduced modulo
    `buckets` after every token (integer ops that ONNX runs as they are). An n-gram counts
    only if all its tokens are before the text's length, so padding never enters the mean.
    Training, each n-gram is left out of the mean with chance `dropout` (none left: zeros);
    on the CPU through fused.ngram_bag, one kernel call with this module's bits."""

    def __init__(
        self, ngrams: tuple[int, ...], buckets: int, dim: int, vocab_size: int, dropout: float = 0.0
    ):
        super().__init__()
        self.ngrams, self.buckets, self.base = tuple(ngrams), buckets, vocab_size
        self.dropout = dropout
        self.table = nn.Embedding(buckets, dim)
        self.use_kernel = True  # training on the CPU: through fused.ngram_bag (the bench's A/B)

    def ids(self, tokens: torch.Tensor, lengths: torch.Tensor):
        """Bucket ids [B, M] of the n-grams starting at every step, per length n (M = T times
        the number of lengths), and [B, M, 1]: True where the n-gram lies inside the text."""
        steps = tokens.shape[1]
        start = torch.arange(steps, device=tokens.device)[None, :]
        ids, valid = [], []
        for n in self.ngrams:
            # n - 1 pad ids on the right, so the n-gram at every start has its n tokens
            # (slices from fixed starts: no negative ends when a batch is shorter than n)
            right = F.pad(tokens, (0, n - 1), value=PAD_ID)
            h = torch.full_like(tokens, n)  # the length seeds the hash: a bigram != a trigram
            for k in range(n):
                h = (h * self.base + right[:, k : k + steps]) % self.buckets
            ids.append(h)
            valid.append(start + (n - 1) < lengths.to(tokens.device)[:, None])
        return torch.cat(ids, dim=1), torch.cat(valid, dim=1).unsqueeze(-1)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if self.use_kernel and self.training and fused.trains(self.table.weight):
            shape = (tokens.shape[0], tokens.shape[1] * len(self.ngrams), 1)  # valid's, below
            draws = torch.rand(shape) if self.dropout else None
            table = self.table.weight
            return fused.ngram_bag(
                table, tokens, lengths, self.ngrams, self.base, draws, self.dropout
            )
        ids, valid = self.ids(tokens, lengths)
        if self.training and self.dropout:
            valid = valid & (torch.rand(valid.shape, device=valid.device) >= self.dropout)
        # the pooling's masked mean, over the n-grams inside the text (none: zeros)
        return masked_mean(self.table(ids), valid, valid.sum((1, 2)))


class RNNClassifier(nn.Module):
    """tokens [B, T] int64 + lengths [B] int64 -> logits [B, classes]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim, padding_idx=PAD_ID)
        self.embedding_dropout = fused.Dropout(cfg.embedding_dropout)
        self.ngrams = None
        self.core_cfg = cfg  # the core's own config: its input width is the features'
        if cfg.conv_width:
            self.ngrams = NgramConv(cfg.embedding_dim, cfg.conv_width, cfg.conv_channels)
            self.core_cfg = replace(cfg, embedding_dim=cfg.embedding_dim + cfg.conv_channels)
        self.core = build_core(self.core_cfg)
        features = cfg.hidden_size * (2 if cfg.bidirectional else 1)
        self.pool = Pool(cfg.pool, features)
        self.bag = None
        bag_features = 0
        if cfg.ngram_bag:
            bag_features = cfg.ngram_dim or cfg.embedding_dim
            self.bag = NgramBag(
                cfg.ngram_bag,
                cfg.ngram_buckets,
                bag_features,
                cfg.vocab_size,
                cfg.ngram_dropout,
            )
        self.dropout = fused.Dropout(cfg.dropout)
        self.head = nn.Linear(self.pool.out_features + bag_features, cfg.num_classes)

    def inputs(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """What the core reads at each step: [B, T, embedding_dim (+ conv_channels)]."""
        emb = self.embedding_dropout(self.embedding(tokens))
        return emb if self.ngrams is None else self.ngrams(emb, lengths)

    def classify(self, tokens, lengths, states, last) -> torch.Tensor:
        """The logits from the core's output: the pooled states (and the n-gram bag, beside
        them, with the embeddings' dropout) through dropout and the linear head."""
        features = self.pool(states, last, lengths)
        if self.bag is not None:
            bag = self.embedding_dropout(self.bag(tokens, lengths))
            features = torch.cat([features, bag], dim=1)
        return self.head(self.dropout(features))

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        states, last = self.core(self.inputs(tokens, lengths), lengths)
        return self.classify(tokens, lengths, states, last)


def count_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def as_torch_rnn(model: RNNClassifier) -> RNNClassifier:
    """The same function built on nn.RNN: a cell-loop model's weights carried into nn.RNN
    (layer i's cell -> *_l{i}); other variants are returned unchanged. Used for ONNX export,
    where a Python loop would be unrolled to one fixed length."""
    if not isinstance(model.core, CellLoopCore):
        return model
    twin = RNNClassifier(model.cfg)
    twin.core = TorchRNNCore("rnn", model.core_cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("core.")}
    for suffix, cells in model.core.directions():
        for i, cell in enumerate(cells):
            for name in RNN_WEIGHTS:
                state[f"core.rnn.{name}_l{i}{suffix}"] = getattr(cell, name).detach().clone()
    twin.load_state_dict(state)
    return twin.to(next(model.parameters()).device).train(model.training)
