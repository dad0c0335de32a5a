"""Checkpoints: saved atomically, loaded with clear errors and a vocabulary check."""

from pathlib import Path
from typing import Any

import torch

from rnnflow.core.atomic import atomic_path
from rnnflow.core.errors import RnnflowError
from rnnflow.model.network import ModelConfig, RNNClassifier


def save(path: Path, payload: dict[str, Any]) -> None:
    """Write a checkpoint dict atomically (a crash never leaves a truncated file)."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load(path: Path, vocab_hash: str | None = None) -> dict[str, Any]:
    """Read a checkpoint; if vocab_hash is given, it must match the one trained with."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise RnnflowError(f"{path}: checkpoint not found (run the train stage first)") from err
    except Exception as err:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise RnnflowError(f"{path}: corrupt or truncated checkpoint ({err})") from err
    if not isinstance(payload, dict) or "model_state" not in payload:
        raise RnnflowError(f"{path}: not an rnnflow checkpoint")
    if vocab_hash is not None and payload.get("vocab_hash") != vocab_hash:
        raise RnnflowError(
            f"{path}: trained with vocabulary {payload.get('vocab_hash')}, but the current "
            f"tokenizer is {vocab_hash}; retrain (dvc repro) or use the matching tokenizer"
        )
    return payload


def load_model(path: Path, vocab_hash: str | None = None) -> tuple[RNNClassifier, dict]:
    """Rebuild the model of a checkpoint in eval mode, on the CPU."""
    payload = load(path, vocab_hash)
    model = RNNClassifier(ModelConfig(**payload["model_config"]))
    try:
        model.load_state_dict(payload["model_state"])
    except RuntimeError as err:
        raise RnnflowError(f"{path}: weights do not fit the saved config ({err})") from err
    return model.eval(), payload
