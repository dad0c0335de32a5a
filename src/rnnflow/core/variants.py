"""The registry of model variants (torch-free, so params can be validated without torch)."""

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Variant:
    """What a variant name means: which recurrent core, and how many layers it must have."""

    core: Literal["rnn", "lstm", "gru", "rnn_cell"]
    layers: Literal["one", "many", "any"]
    description: str


VARIANTS: dict[str, Variant] = {
    "rnn": Variant("rnn", "one", "one nn.RNN layer"),
    "rnn_deep": Variant("rnn", "many", "stacked nn.RNN (num_layers > 1)"),
    "rnn_cell": Variant("rnn_cell", "one", "a loop over nn.RNNCell"),
    "rnn_cell_deep": Variant("rnn_cell", "many", "stacked nn.RNNCell loops"),
    "lstm": Variant("lstm", "any", "nn.LSTM"),
    "gru": Variant("gru", "any", "nn.GRU"),
}


def check_variant(name: str, options) -> None:
    """Raise ValueError if `name` is unknown or its options do not fit the variant."""
    if name not in VARIANTS:
        raise ValueError(f"model.variants.{name}: unknown variant (known: {', '.join(VARIANTS)})")
    spec = VARIANTS[name]
    if spec.layers == "one" and options.num_layers != 1:
        raise ValueError(f"model.variants.{name}: num_layers must be 1, got {options.num_layers}")
    if spec.layers == "many" and options.num_layers < 2:
        raise ValueError(f"model.variants.{name}: num_layers must be > 1, got {options.num_layers}")
    if spec.core in ("lstm", "gru") and options.nonlinearity != "tanh":
        raise ValueError(f"model.variants.{name}: nonlinearity applies to RNN kinds only")
