"""Training on several processes (DistributedDataParallel over gloo on loopback).

The fast tests run real process groups started by rnnflow's own launcher; the slow ones run
the train stage with `train.processes: 2`, kill a rank, and join an outside torchrun.
"""

import gc
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import psutil
import pytest
import torch
import yaml

from rnnflow.core.config import load_params
from rnnflow.core.errors import RnnflowError
from rnnflow.data.batching import PackedSplit, make_loader
from rnnflow.model import checkpoint
from rnnflow.model.network import ModelConfig, RNNClassifier
from rnnflow.training import distributed
from rnnflow.training.distributed import SINGLE, World
from rnnflow.training.train import run_epoch, train_variant

from ..conftest import REPO, VARIANTS, data_stages, small_params, write_params

CASES = {"37 rows": 37, "1 row": 1}  # an odd batch (19 + 18 rows), fewer rows than ranks


def _split(data_workspace, rows: int) -> PackedSplit:
    full = PackedSplit.load(data_workspace / "data/packed/train.npz")
    pick = np.arange(rows)
    return PackedSplit(full.tokens[pick], full.lengths[pick], full.labels[pick])


def _model(variant: str, vocab: int) -> RNNClassifier:
    layers = 2 if variant.endswith("deep") else 1
    torch.manual_seed(0)
    return RNNClassifier(ModelConfig(variant, vocab, 18, 8, 12, layers, 0.0, "tanh", False))


def _one_step_gradients(model, split: PackedSplit, world: World) -> list[torch.Tensor]:
    """The gradients of one training step on the whole split as one batch, taken by the
    training loop itself (SGD with lr 0 leaves the weights, no clipping)."""
    loader = make_loader(split, len(split), 1, shuffle=False, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    run_epoch(model, loader, torch.device("cpu"), optimizer, clip_norm=1e9, world=world)
    module = getattr(model, "module", model)
    return [p.grad.detach().clone() for p in module.parameters()]


def _ranks_gradients(data_workspace, vocab: int) -> dict:
    """On each of 2 ranks: DDP-wrapped models, one step on this rank's rows of each case."""
    with distributed.joined(torch.device("cpu")) as world:
        return _gradients_in(world, data_workspace, vocab)  # its DDP models die in there


def _gradients_in(world: World, data_workspace, vocab: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    grads = {}
    for variant in VARIANTS:
        for case, rows in CASES.items():
            model = DistributedDataParallel(_model(variant, vocab))
            grads[variant, case] = _one_step_gradients(model, _split(data_workspace, rows), world)
    val = PackedSplit.load(data_workspace / "data/packed/val.npz")
    loader = make_loader(val, 16, 50, shuffle=False, seed=0)
    evaluation = run_epoch(_model("gru", vocab), loader, torch.device("cpu"), world=world)
    return world.gather((world.rank, grads, evaluation))


def _vocab(data_workspace) -> int:
    return int(PackedSplit.load(data_workspace / "data/packed/train.npz").tokens.max()) + 1


def test_two_ranks_with_half_batches_take_the_whole_batch_step(data_workspace):
    vocab = _vocab(data_workspace)
    ranks = distributed.launch(2, _ranks_gradients, data_workspace, vocab, name="test")
    assert [rank for rank, _, _ in ranks] == [0, 1]
    for variant in VARIANTS:
        for case, rows in CASES.items():
            whole = _one_step_gradients(
                _model(variant, vocab), _split(data_workspace, rows), SINGLE
            )
            assert any(float(g.abs().max()) > 1e-3 for g in whole)
            for rank, grads, _ in ranks:
                assert len(grads[variant, case]) == len(whole)
                for got, want in zip(grads[variant, case], whole, strict=True):
                    diff = float((got - want).abs().max())
                    assert diff <= 1e-6, f"{variant} {case} rank {rank}: |grad diff| {diff:.2e}"

    # Validation is split by whole batches and summed in batch order: the same numbers.
    val = PackedSplit.load(data_workspace / "data/packed/val.npz")
    loader = make_loader(val, 16, 50, shuffle=False, seed=0)
    alone = run_epoch(_model("gru", vocab), loader, torch.device("cpu"))
    for _, _, evaluation in ranks:
        assert evaluation.accuracy == alone.accuracy
        assert evaluation.loss == pytest.approx(alone.loss, rel=1e-12, abs=0)
        assert evaluation.tokens == alone.tokens == int(val.lengths.sum())


def _ddp_models_at_teardown(workspace: Path, fail: bool) -> list[int]:
    """On each of 2 ranks: train@gru, or a DDP step that then fails; how many
    DistributedDataParallel models were not yet freed when the process group was destroyed."""
    from torch.nn.parallel import DistributedDataParallel

    alive, destroy = [], torch.distributed.destroy_process_group

    def counting_destroy(*args, **kwargs):
        alive.append(sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects()))
        destroy(*args, **kwargs)

    def fail_after_a_step(world: World):
        model = DistributedDataParallel(_model("gru", _vocab(workspace)))
        _one_step_gradients(model, _split(workspace, 8), world)
        raise RnnflowError("a rank's error")

    torch.distributed.destroy_process_group = counting_destroy
    os.chdir(workspace)
    if fail:
        with pytest.raises(RnnflowError), distributed.joined(torch.device("cpu")) as world:
            fail_after_a_step(world)
    else:
        train_variant(load_params(workspace / "params.yaml"), "gru")
    return alive


@pytest.mark.parametrize("fail", [False, True], ids=["training", "an error"])
def test_no_ddp_model_outlives_its_process_group(workspace, fail):
    """A DDP model freed after its gloo group is destroyed can hang the process for ever (see
    distributed.joined): none is left when the group is destroyed, after training or an error."""
    assert distributed.launch(2, _ddp_models_at_teardown, workspace, fail, name="test") == [0]


def test_rows_of_a_batch_are_disjoint_and_cover_it():
    for size in (1, 2, 3, 8):
        for n in (1, 2, 7, 64, 65):
            parts = [World(rank, size).rows(n) for rank in range(size)]
            covered = np.concatenate([np.arange(n)[s] for s in parts])
            assert covered.tolist() == list(range(n))
            assert max(s.stop - s.start for s in parts) - min(s.stop - s.start for s in parts) <= 1
    owned = [[b for b in range(7) if World(r, 3).owns(b)] for r in range(3)]
    assert owned == [[0, 3, 6], [1, 4], [2, 5]]


def _fail_on_rank_1():
    with distributed.joined(torch.device("cpu")) as world:
        if world.rank == 1:
            raise RnnflowError("data/packed/train.npz: not a packed split (bad zip)")
        torch.distributed.barrier()


def test_a_bad_timeout_is_one_error_naming_the_variable(monkeypatch):
    monkeypatch.setenv("RNNFLOW_DIST_TIMEOUT", "soon")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with (
        pytest.raises(RnnflowError, match="RNNFLOW_DIST_TIMEOUT='soon': expected a number"),
        distributed.joined(torch.device("cpu")),
    ):
        pass


def _rank():
    with distributed.joined(torch.device("cpu")) as world:
        return world.rank


@pytest.fixture
def private_tmpdir(tmp_path, monkeypatch) -> Path:
    """TMPDIR of this process and the processes it starts: a new empty folder."""
    folder = tmp_path / "tmpdir"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    return folder


def test_a_failing_rank_is_one_error_naming_it(private_tmpdir):
    with pytest.raises(RnnflowError) as info:
        distributed.launch(2, _fail_on_rank_1, name="train@gru")
    message = str(info.value)
    assert message.startswith("train@gru: rank 1 of the run (pid ")
    assert message.endswith("failed: data/packed/train.npz: not a packed split (bad zip)")
    assert "\n" not in message
    assert list(private_tmpdir.iterdir()) == []  # the ranks' error files went with the launch


def test_a_launch_returns_rank_0s_result_and_leaves_no_folder(private_tmpdir):
    """torch's launcher alone would leave a torchelastic_* folder per launch in TMPDIR."""
    assert distributed.launch(2, _rank, name="probe") == 0
    assert list(private_tmpdir.iterdir()) == []


SIGTERM_IN_A_FINALIZER = """
import os, signal
from rnnflow.training.distributed import exit_on_sigterm

exit_on_sigterm()


class Finalized:
    def __del__(self):  # SIGTERM lands here: its SystemExit is one Python ignores
        os.kill(os.getpid(), signal.SIGTERM)  # the handler runs inside this call


try:
    Finalized()
    while True:
        sum(range(1000))
finally:
    print("unwound", flush=True)
"""


def test_sigterm_inside_a_finalizer_still_unwinds_and_exits_quietly():
    """The CI saw a surviving rank print 'Exception ignored in ... SystemExit: 143' (SIGTERM
    from the launcher landed in SQLAlchemy's weakref callback) before the one-line error.
    With a plain handler, this script prints that and runs on until killed."""
    done = subprocess.run(
        [sys.executable, "-c", SIGTERM_IN_A_FINALIZER], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 128 + 15, done.stderr
    assert done.stdout.splitlines() == ["unwound"]
    assert done.stderr == ""


# ------------------------------------------------------------------ slow: the stage itself


@pytest.fixture(scope="module")
def builtin_workspace(tmp_path_factory) -> Path:
    """All of the builtin surnames prepared, tokenized and packed; a small gru trains on it."""
    raw = small_params(data={"max_per_class": None}, train={"epochs": 4, "lr": 0.004})
    raw["model"]["defaults"] |= {"hidden_size": 32, "dropout": 0.2}
    return data_stages(tmp_path_factory.mktemp("builtin"), raw)


def _copy(src: Path, dest: Path, processes: int) -> Path:
    shutil.copytree(src, dest)
    raw = yaml.safe_load((dest / "params.yaml").read_text())
    raw["train"]["processes"] = processes
    write_params(dest, raw)
    return dest


def _stage(ws: Path, variant: str = "gru") -> subprocess.Popen:
    # cold: _ranks looks for the ranks among this process's children, and a warm stage server
    # (one an earlier test started) would run them among its own
    env = os.environ | {"PYTHONPATH": str(REPO), "RNNFLOW_STAGE_SERVER": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "stages.train", variant],
        cwd=ws,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ranks(stage: subprocess.Popen) -> list[psutil.Process]:
    """The stage's rank processes (spawned by the elastic launcher), oldest first."""
    kids = psutil.Process(stage.pid).children(recursive=True)
    return sorted((k for k in kids if "--multiprocessing-fork" in k.cmdline()), key=lambda k: k.pid)


@pytest.mark.slow
def test_two_processes_match_one_and_a_killed_rank_resumes(builtin_workspace, tmp_path):
    ws = _copy(builtin_workspace, tmp_path / "one", 1)
    os.chdir(ws)
    one = train_variant(load_params(ws / "params.yaml"), "gru")
    os.chdir(tmp_path)
    assert one["best_val_acc"] > 2 * one["majority_baseline_val_acc"], "the setup must learn"

    # Two processes; one rank gets kill -9 after the first epoch: one clear error, soon.
    ws = _copy(builtin_workspace, tmp_path / "two", 2)
    stage = _stage(ws)
    state = ws / ".rnnflow/resume/gru.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and stage.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    ranks = _ranks(stage)
    victim = ranks[-1]
    victim.kill()
    killed_at = time.monotonic()
    out, err = stage.communicate(timeout=60)
    assert time.monotonic() - killed_at < 30
    assert stage.returncode == 2, out + err
    # which rank the youngest process holds is the launcher's choice: either is one rank
    assert re.fullmatch(
        rf"train: error: train@gru: rank [01] of the run \(pid {victim.pid}\) was killed by "
        r"SIGKILL; the other ranks were stopped; the run is kept after epoch 1 "
        r"\(\.rnnflow/resume/gru\.pt\): rerun to resume from there",
        err.strip(),
    ), err
    assert not (ws / "metrics/train/gru.json").exists()
    assert len(ranks) == 2 and not [r for r in ranks if _alive(r)], "no rank is left behind"

    # The rerun resumes after epoch 1 and reaches the accuracy of one process.
    resumed = _stage(ws)
    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, out + err
    assert "train@gru: resuming after epoch 1" in out
    history = json.loads((ws / "metrics/history/gru.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    two = json.loads((ws / "metrics/train/gru.json").read_text())
    timing = json.loads((ws / "metrics/timing/train_gru.json").read_text())
    assert one["train_processes"] == 1 and timing["train_processes"] == 2
    assert abs(two["best_val_acc"] - one["best_val_acc"]) <= 0.02, (one, two)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _train_every_variant() -> dict:
    """One rank of a 2-process group: every variant in turn, on the group made once."""
    with distributed.joined(torch.device("cpu")):
        params = load_params()
        return {variant: train_variant(params, variant) for variant in VARIANTS}


@pytest.mark.slow
def test_every_variant_trains_under_ddp(workspace):
    write_params(workspace, small_params(train={"epochs": 2, "lr": 0.01}))  # see repo_copy
    results = distributed.launch(2, _train_every_variant, name="test")
    assert set(results) == set(VARIANTS)
    for variant in VARIANTS:
        history = json.loads((workspace / f"metrics/history/{variant}.json").read_text())
        assert history[-1]["train_loss"] < history[0]["train_loss"], variant
        assert results[variant]["train_processes"] == 2
        payload = checkpoint.load(workspace / f"models/{variant}/checkpoint.pt")
        run = mlflow.get_run(payload["mlflow_run_id"])
        assert run.info.status == "FINISHED" and run.data.params["world_size"] == "2"
    assert not (workspace / ".rnnflow/resume").exists() or not any(
        (workspace / ".rnnflow/resume").iterdir()
    )


def _tree(ws: Path) -> dict[str, int]:
    return {str(p.relative_to(ws)): p.stat().st_mtime_ns for p in ws.rglob("*")}


@pytest.mark.slow
def test_two_machines_joined_by_torchrun_only_rank_0_writes(data_workspace, tmp_path):
    """Two "machines" on loopback, as README "Several machines" shows: each its own copy of
    the project and its own torchrun; machine 0 holds rank 0 and alone writes."""
    nodes = [_copy(data_workspace, tmp_path / f"node{i}", 1) for i in range(2)]
    before = [_tree(ws) for ws in nodes]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"PYTHONPATH": str(REPO)}
    procs = []
    for rank, ws in enumerate(nodes):
        cmd = (
            f"{sys.executable} -m torch.distributed.run --nnodes 2 --nproc-per-node 1 "
            f"--node-rank {rank} --master-addr 127.0.0.1 --master-port {port} "
            f"--log-dir {tmp_path / f'logs{rank}'} -m stages.train rnn_cell_deep"
        )
        procs.append(
            subprocess.Popen(
                cmd.split(), cwd=ws, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
        )
    try:
        outs = [p.communicate(timeout=180)[0].decode() for p in procs]
    finally:  # a hang fails the test; SIGTERM has each torchrun stop its rank first
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "train@rnn_cell_deep epoch 2" in outs[0] and "epoch" not in outs[1]
    assert _tree(nodes[1]) == before[1], "machine 1 writes nothing"
    timing = json.loads((nodes[0] / "metrics/timing/train_rnn_cell_deep.json").read_text())
    assert timing["train_processes"] == 2
    assert (nodes[0] / "models/rnn_cell_deep/checkpoint.pt").exists()


def _wait_in_group(ready: str):
    with distributed.joined(torch.device("cpu")) as world:
        (Path(ready) / f"rank-{world.rank}").touch()
        time.sleep(300)


@pytest.mark.slow
def test_ranks_end_with_their_launcher(tmp_path):
    """kill -9 of the launching process (the stage) leaves no rank running on. What kill -9
    cannot let it remove, its folder of the ranks' error files, goes to a TMPDIR of the
    test's (before, one rnnflow-ranks-* folder in /tmp per run of this test)."""
    code = "from rnnflow.training import distributed; "
    code += "from tests.training.test_ddp import _wait_in_group as f; "
    code += f"distributed.launch(2, f, {str(tmp_path)!r}, name='t')"
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = os.environ | {"TMPDIR": str(temp)}
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    # kill it once both ranks are in the group (a loaded machine may take many seconds to
    # import torch in a fresh rank; until its first line runs, a rank cannot end with anyone)
    deadline = time.monotonic() + 180
    while len(list(tmp_path.glob("rank-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    ranks = _ranks(launcher)
    assert len(ranks) == 2
    launcher.kill()
    launcher.wait()
    gone_by = time.monotonic() + 10
    while any(_alive(r) for r in ranks) and time.monotonic() < gone_by:
        time.sleep(0.1)
    assert not any(_alive(r) for r in ranks)
    assert [p.name[:14] for p in temp.iterdir()] == ["rnnflow-ranks-"]
