"""CUDA graphs for training steps: a launch-bound step recorded once per batch shape, replayed.

On a GPU these small recurrent models are launch-bound: measured on an H100 (make gpu-check),
the GPU computed during 7-13% of a training step's wall time; the rest was the CPU launching
kernels one by one (a cell loop launches several per time step, forward and backward). A
CUDA graph records a step's kernels once and replays them with one launch: 3-4x the tokens/s
of eager steps for nn.RNN/GRU/LSTM and 8-9x for the cell loops on that machine.

Graphs need static shapes; batches vary in length (buckets) and the last one in size, so one
graph is captured per (batch, length) shape the first time it occurs (torch.cuda.
make_graphed_callables: forward and backward, a few warm-up steps, then the capture) and
replayed afterwards. The loss, clipping and Adam's fused step run eagerly around it. Only
where capture is safe: CUDA, one process (DDP's all-reduce hooks run inside the backward),
and a core that reads padded batches (packing moves lengths to the host mid-step).
"""

import torch
from torch import nn

from rnnflow.core.errors import RnnflowError


class _OneShape(nn.Module):
    """The model behind one captured shape: make_graphed_callables replaces this wrapper's
    forward, never the model's own."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, lengths)


class GraphedSteps(nn.Module):
    """`model` with its training forward and backward replayed from a CUDA graph per batch
    shape; evaluation (no grad, or eval mode) calls the model itself."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.graphs: dict[tuple, nn.Module] = {}  # shape -> graphed wrapper (not submodules)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if not (self.training and torch.is_grad_enabled()):
            return self.model(tokens, lengths)
        shape = (*tokens.shape, lengths.shape[0])
        if shape not in self.graphs:
            try:
                self.graphs[shape] = torch.cuda.make_graphed_callables(
                    _OneShape(self.model), (tokens, lengths)
                )
            except RuntimeError as err:  # torch.AcceleratorError among them
                raise RnnflowError(
                    f"capturing the CUDA graph of a {tokens.shape[0]} x "
                    f"{tokens.shape[1]} batch failed ({str(err).splitlines()[0]}); set "
                    "train.cuda_graphs: false in params.yaml to train without CUDA graphs"
                ) from err
        return self.graphs[shape](tokens, lengths)


def graphable(model: nn.Module, device: torch.device, world_size: int) -> bool:
    """Whether training `model` on `device` may replay CUDA graphs."""
    return device.type == "cuda" and world_size == 1 and not getattr(model.core, "packed", False)
