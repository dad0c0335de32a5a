"""Embedding -> recurrent core -> linear head on the last valid step, for every variant."""

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from rnnflow.core.config import ModelParams
from rnnflow.core.variants import VARIANTS
from rnnflow.data.text import PAD_ID


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

    @classmethod
    def of(cls, variant: str, options: ModelParams, vocab_size: int, num_classes: int):
        """A config from a variant's merged params."""
        return cls(variant, vocab_size, num_classes, **options.model_dump())

    def to_dict(self) -> dict:
        """Plain dict, for checkpoints and MLflow params."""
        return asdict(self)


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
        # input projection of all steps in one matmul and oneDNN's fused LSTM, on CUDA
        # cuDNN without packing), which packed input never does. Length buckets keep the
        # extra padded steps at a few percent. Two directions need packing: the backward
        # direction must start at each sequence's own last step.
        self.packed = cfg.bidirectional

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not self.packed:
            out, _ = self.rnn(emb)
            last = (lengths.to(out.device) - 1).clamp(min=0)
            return out[torch.arange(out.shape[0], device=out.device), last]
        packed = pack_padded_sequence(emb, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, _ = self.rnn(packed)
        # Read the last layer's states from its output sequence rather than from h_n: the
        # same numbers, and the TorchScript ONNX exporter (torch 2.13) crashes on one-layer
        # modules whose output sequence is left unused.
        out, _ = pad_packed_sequence(out, batch_first=True)  # [B, T, directions * H]
        hidden = self.rnn.hidden_size
        last = (lengths.to(out.device) - 1).clamp(min=0)
        forward = out[torch.arange(out.shape[0], device=out.device), last, :hidden]
        if self.directions == 1:
            return forward
        return torch.cat([forward, out[:, 0, hidden:]], dim=1)  # backward state at position 0


class CellLoopCore(nn.Module):
    """Stacked nn.RNNCell run step by step; padded steps never change the hidden state.

    The loop is layer-major: layer i sees layer i-1's state at the same step, exactly as a
    time-major loop would, but each layer's input projection (x @ W_ih + b_ih) is done for all
    steps in one matmul, leaving only h @ W_hh inside the Python loop.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        sizes = [cfg.embedding_dim] + [cfg.hidden_size] * (cfg.num_layers - 1)
        self.cells = nn.ModuleList(
            nn.RNNCell(n_in, cfg.hidden_size, nonlinearity=cfg.nonlinearity) for n_in in sizes
        )
        self.activation = torch.tanh if cfg.nonlinearity == "tanh" else torch.relu
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, emb: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        batch, steps, _ = emb.shape
        valid = torch.arange(steps, device=emb.device)[None, :] < lengths.to(emb.device)[:, None]
        valid = valid.unsqueeze(-1)  # [B, T, 1]
        x, last = emb, len(self.cells) - 1
        for layer, cell in enumerate(self.cells):
            if layer:
                x = self.dropout(x)
            # x @ W_ih + b_ih + b_hh for all steps at once; the loop adds only h @ W_hh.
            projected = F.linear(x, cell.weight_ih, cell.bias_ih + cell.bias_hh)
            w_hh = cell.weight_hh.t()
            h = emb.new_zeros(batch, cell.hidden_size)
            outputs = []
            for t in range(steps):
                h_new = self.activation(torch.addmm(projected[:, t], h, w_hh))
                h = torch.where(valid[:, t], h_new, h)  # h = m * h_new + (1 - m) * h, exactly
                if layer < last:
                    outputs.append(h)
            if layer < last:
                x = torch.stack(outputs, dim=1)
        return h


def build_core(cfg: ModelConfig) -> nn.Module:
    """The recurrent core a variant name stands for (see rnnflow.variants.VARIANTS)."""
    kind = VARIANTS[cfg.variant].core
    return CellLoopCore(cfg) if kind == "rnn_cell" else TorchRNNCore(kind, cfg)


class RNNClassifier(nn.Module):
    """tokens [B, T] int64 + lengths [B] int64 -> logits [B, classes]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim, padding_idx=PAD_ID)
        self.core = build_core(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        features = cfg.hidden_size * (2 if cfg.bidirectional else 1)
        self.head = nn.Linear(features, cfg.num_classes)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.core(self.embedding(tokens), lengths)))


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
    twin.core = TorchRNNCore("rnn", model.cfg)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("core.")}
    for i, cell in enumerate(model.core.cells):
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            state[f"core.rnn.{name}_l{i}"] = getattr(cell, name).detach().clone()
    twin.load_state_dict(state)
    return twin.to(next(model.parameters()).device).train(model.training)
