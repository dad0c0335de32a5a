"""Shared fixtures: a small workspace with the data half of the pipeline already run."""

import os
import shutil
from pathlib import Path

import pytest
import yaml

from rnnflow.config import Params
from rnnflow.pack import pack
from rnnflow.prepare import prepare
from rnnflow.vocab import fit_vocabulary

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("rnn", "rnn_deep", "rnn_cell", "rnn_cell_deep", "lstm", "gru")


def small_params(**overrides) -> dict:
    """params.yaml content for fast tests: the real file with a small data cap and few epochs."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["max_per_class"] = 40
    raw["train"]["epochs"] = 2
    raw["model"]["defaults"] |= {"embedding_dim": 16, "hidden_size": 24}
    for section, values in overrides.items():
        raw[section] = raw.get(section, {}) | values if isinstance(values, dict) else values
    return raw


def write_params(directory: Path, raw: dict) -> Params:
    """Write params.yaml into `directory` and return it parsed."""
    (directory / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    return Params(**raw)


@pytest.fixture(autouse=True, scope="session")
def isolated_mlflow(tmp_path_factory):
    """Every test logs to a throwaway SQLite store, never to the repository's mlflow.db."""
    store = tmp_path_factory.mktemp("mlflow")
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store}/mlflow.db"
    os.environ.setdefault("RNNFLOW_DEVICE", "cpu")
    yield store


@pytest.fixture(scope="session")
def data_workspace(tmp_path_factory) -> Path:
    """A directory where prepare, tokenize and pack have run on a small builtin sample."""
    ws = tmp_path_factory.mktemp("workspace")
    params = write_params(ws, small_params())
    cwd = os.getcwd()
    os.chdir(ws)
    try:
        prepare(params)
        fit_vocabulary(params)
        pack(params)
    finally:
        os.chdir(cwd)
    return ws


@pytest.fixture
def workspace(data_workspace, tmp_path, monkeypatch) -> Path:
    """A private copy of the data workspace, as the current directory."""
    ws = tmp_path / "ws"
    shutil.copytree(data_workspace, ws)
    monkeypatch.chdir(ws)
    return ws
