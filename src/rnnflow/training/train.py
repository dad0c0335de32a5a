"""Stage train@VARIANT: one training loop for every variant, on one process or several.

Read it top to bottom: one epoch (`run_epoch`), what trains (`Trainer`: model, optimizer,
batches), the state a run carries from epoch to epoch (`TrainState`), the loop (`fit`, which
knows nothing of files or MLflow), the one place that persists (`Ledger`), and
`train_variant`, which puts them together. With `train.processes` N > 1, or under torchrun,
every rank runs the same loop on its share of each batch (see rnnflow.distributed); rank 0
alone persists.
"""

import copy
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from rnnflow.core import plots
from rnnflow.core.atomic import write_json
from rnnflow.core.config import Params, TrainParams
from rnnflow.core.errors import RnnflowError
from rnnflow.core.paths import DATA_REPORTS, PACKED, TOKENIZER_DIR, metrics_file
from rnnflow.core.paths import checkpoint as checkpoint_path
from rnnflow.data.batching import PackedSplit, make_loader
from rnnflow.data.text import file_hash, load_tokenizer
from rnnflow.data.vocab import labels_path, load_labels
from rnnflow.model import checkpoint, fused
from rnnflow.model.network import ModelConfig, RNNClassifier, count_parameters
from rnnflow.runtime import host, timeline
from rnnflow.tracking import runs
from rnnflow.training import distributed, graphs
from rnnflow.training.distributed import SINGLE, World

RESUME_DIR = Path(".rnnflow/resume")


# ---------------------------------------------------------------------------- one epoch


@dataclass
class EpochResult:
    """Loss and accuracy over one pass, with the real-token count and time it took."""

    loss: float
    accuracy: float
    tokens: int
    seconds: float
    grad_norm_mean: float = math.nan
    grad_norm_max: float = math.nan
    clipped_share: float = math.nan  # steps whose pre-clip norm exceeded clip_norm


def make_optimizer(parameters, settings: TrainParams) -> torch.optim.AdamW:
    """AdamW at train.lr: Adam with train.weight_decay decoupled from the gradient's moments
    (Loshchilov and Hutter 2019), so every weight shrinks by lr * weight_decay of itself a
    step, the rows of rarely seen n-grams too, where Adam's L2 term would be scaled by each
    weight's own gradient history; weight_decay 0 is Adam. fused: one kernel for all
    parameters instead of a dozen small ops per tensor."""
    return torch.optim.AdamW(
        parameters, lr=settings.lr, weight_decay=settings.weight_decay, fused=True
    )


def clip_gradients(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """nn.utils.clip_grad_norm_, to the bit: the gradients' total norm, and every gradient
    scaled by max_norm / (norm + 1e-6) where that is below 1. Where it is not (after the
    first epochs, 90-100% of the steps), clip_grad_norm_ still multiplies every gradient
    by the clamped 1.0, a read and a write of each (the n-gram table's 4 MB): skipped here
    on the CPU, where the coefficient is at hand. On a GPU, reading it would wait for the
    device, so there it always multiplies."""
    norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None], foreach=True)
    coef = max_norm / (norm + 1e-6)  # clip_grads_with_norm_'s own, so the test is exact
    if norm.device.type != "cpu" or not bool(coef >= 1.0):  # NaN multiplies, as torch's
        nn.utils.clip_grads_with_norm_(params, max_norm, norm, foreach=True)
    return norm


def run_epoch(
    model,
    loader,
    device,
    optimizer=None,
    clip_norm=None,
    desc="",
    world: World = SINGLE,
    precision: str = "fp32",
    label_smoothing: float = 0.0,
    lr_at: Callable[[int], float] | None = None,
) -> EpochResult:
    """One pass over `loader`; trains when an optimizer is given, else only evaluates.
    precision bf16 (CUDA) computes the forward pass under bf16 autocast; the weights, their
    gradients and Adam's moments stay fp32, and so does everything exported.

    On several ranks a training step is the step of the whole batch: each rank computes
    its rows and scales its loss so that DDP's average of the ranks' gradients is the
    gradient of the batch mean. Evaluation gives whole batches to ranks in turn. Per-batch
    sums are added across ranks, then in batch order, so the result is the same however
    many ranks compute it.

    Training minimises the cross-entropy against labels smoothed by `label_smoothing`; the
    loss reported is always the plain cross-entropy, so runs stay comparable. `lr_at(i)`,
    when given, sets the learning rate before batch i's step (a schedule).
    """
    training = optimizer is not None
    model.train(training)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    # Per batch: loss and correct answers stay on the device until the epoch ends (no step
    # waits for the GPU); examples and real tokens are known on the host.
    on_device = torch.zeros((len(loader), 2), dtype=torch.float64, device=device)
    on_host = np.zeros((len(loader), 2))
    params, norms = list(model.parameters()), []
    start = time.perf_counter()
    with torch.set_grad_enabled(training):
        for i, (x, lengths, y) in enumerate(tqdm(loader, desc=desc, leave=False, disable=None)):
            if not training and not world.owns(i):
                continue
            batch_size, counted = len(y), True
            if training and world.size > 1:
                x, lengths, y, counted = _my_rows(x, lengths, y, world)
            on_host[i] = len(y), int(lengths.sum())
            x, lengths, y = (t.to(device, non_blocking=True) for t in (x, lengths, y))
            bf16 = precision == "bf16"
            with torch.autocast(device.type, torch.bfloat16, enabled=bf16, cache_enabled=False):
                logits = model(x, lengths)  # a fresh (zero) hidden state for every batch
            loss = loss_fn(logits.float(), y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                if label_smoothing:
                    smooth = F.cross_entropy(
                        logits.float(), y, reduction="sum", label_smoothing=label_smoothing
                    )
                else:
                    smooth = loss
                objective = smooth / (batch_size / world.size)  # = mean over len(y) on one rank
                (objective if counted else objective * 0.0).backward()
                norms.append(clip_gradients(params, clip_norm))
                if lr_at is not None:
                    for group in optimizer.param_groups:
                        group["lr"] = lr_at(i)
                optimizer.step()
            if counted:
                on_device[i, 0] = loss.detach()
                on_device[i, 1] = (logits.argmax(1) == y).sum()
            else:
                on_host[i] = 0
    sums = np.concatenate([on_device.cpu().numpy(), on_host], axis=1)
    norms = torch.stack(norms).cpu().numpy() if norms else np.array([])
    total_loss, correct, seen, tokens = 0.0, 0, 0, 0
    for batch_loss, batch_correct, batch_seen, batch_tokens in world.sum(sums).tolist():
        total_loss += batch_loss  # in batch order, as one process adds them
        correct, seen, tokens = correct + batch_correct, seen + batch_seen, tokens + batch_tokens
    return EpochResult(
        loss=total_loss / seen,
        accuracy=correct / seen,
        tokens=int(tokens),
        seconds=time.perf_counter() - start,
        grad_norm_mean=float(np.mean(norms)) if len(norms) else math.nan,
        grad_norm_max=float(np.max(norms)) if len(norms) else math.nan,
        clipped_share=float(np.mean(norms > clip_norm)) if len(norms) else math.nan,
    )


def _my_rows(x, lengths, y, world: World):
    """This rank's rows of a padded batch, padded to their own longest. A batch with fewer
    rows than ranks leaves some ranks none: they compute one row with weight zero, so they
    still take part in the gradient average (and count nothing)."""
    rows = world.rows(len(y))
    counted = rows.stop > rows.start
    if not counted:
        rows = slice(0, 1)
    lengths = lengths[rows]
    return x[rows, : int(lengths.max())], lengths, y[rows], counted


# ------------------------------------------------------------------------ what it trains


@dataclass
class Trainer:
    """The model, optimizer and batches of one variant on one rank. `model` is what trains
    (wrapped in DistributedDataParallel on several ranks); `module` is the model itself."""

    variant: str
    cfg: ModelConfig
    labels: list[str]
    train: PackedSplit
    val: PackedSplit
    module: RNNClassifier
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: object
    val_loader: object
    device: torch.device
    world: World
    settings: TrainParams

    @classmethod
    def build(cls, params: Params, variant: str, packed_dir: Path, device, world: World):
        """Seeded model (the same on every rank), AdamW, and the bucketed loaders."""
        if params.train.precision == "bf16" and device.type != "cuda":
            raise RnnflowError(
                f"params.yaml: train.precision: bf16 needs a CUDA device (this run is on "
                f"{device.type}); use fp32"
            )
        labels = load_labels(labels_path())
        cfg = ModelConfig.of(
            variant,
            params.variant(variant),
            load_tokenizer(TOKENIZER_DIR / "tokenizer.json").get_vocab_size(),
            len(labels),
        )
        train, val = (PackedSplit.load(packed_dir / f"{s}.npz") for s in ("train", "val"))
        module = RNNClassifier(cfg).to(device)
        fused.warm_up(module, device)  # a first build of the CPU kernel is not training time
        optimizer = make_optimizer(module.parameters(), params.train)
        batch, pool = params.pack.batch_size, params.pack.bucket_pool
        return cls(
            variant=variant,
            cfg=cfg,
            labels=labels,
            train=train,
            val=val,
            module=module,
            model=module,
            optimizer=optimizer,
            train_loader=make_loader(train, batch, pool, shuffle=True, seed=params.seed),
            val_loader=make_loader(val, batch, pool, shuffle=False, seed=0),
            device=device,
            world=world,
            settings=params.train,
        )

    def start(self, state: "TrainState", seed: int) -> None:
        """Load a resumed state, give each rank its own dropout stream, wrap for DDP, or
        (one process on CUDA) for CUDA-graph replay of the training steps."""
        if state.model_state is not None:
            self.module.load_state_dict(state.model_state)
            self.optimizer.load_state_dict(state.optimizer_state)
            host.set_rng_state(state.rng[self.world.rank])
        elif self.world.rank > 0:
            host.seed_rank(seed, self.world.rank)
        if self.world.size > 1:
            from torch.nn.parallel import DistributedDataParallel

            cuda = self.device.type == "cuda"
            self.model = DistributedDataParallel(
                self.module, device_ids=[self.device.index] if cuda else None
            )
        elif self.settings.cuda_graphs and graphs.graphable(self.module, self.device, 1):
            self.model = graphs.GraphedSteps(self.module)


# ------------------------------------------------------------------- state and the loop


@dataclass
class Best:
    """The epoch with the lowest validation loss so far, with copies of its weights."""

    epoch: int
    val_loss: float
    val_acc: float
    model_state: dict
    optimizer_state: dict


@dataclass
class TrainState:
    """What a run carries from one epoch to the next, and all a resumed run needs."""

    epoch: int = 0  # the last completed epoch
    history: list[dict] = field(default_factory=list)  # one row per epoch, as logged
    best: Best | None = None
    bad_epochs: int = 0  # epochs since the best
    seconds: float = 0.0  # training time, summed over epochs
    tokens: int = 0  # real tokens trained on, all ranks
    # After `epoch`: the weights and optimizer (live, persisted at once) and each rank's RNG.
    model_state: dict | None = None
    optimizer_state: dict | None = None
    rng: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain containers, loadable by torch.load(weights_only=True)."""
        return vars(self) | {"best": vars(self.best) if self.best else None}

    @classmethod
    def from_dict(cls, raw: dict) -> "TrainState":
        fields = {k: raw[k] for k in cls.__dataclass_fields__ if k in raw}
        if fields.get("best"):
            fields["best"] = Best(**fields["best"])
        return cls(**fields)


def learning_rate(settings: TrainParams, step: int, total: int) -> float:
    """The learning rate at training step `step` (0-based) of `total`: train.lr throughout
    (constant), or (cosine) a linear warm-up over the first train.warmup share of the steps,
    then a cosine decay to 0 at the last planned step (early stopping may end sooner)."""
    if settings.schedule == "constant":
        return settings.lr
    warm = max(1, round(settings.warmup * total))
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def epoch_schedule(settings: TrainParams, first: int, total: int) -> Callable | None:
    """run_epoch's lr_at for the epoch whose first step is `first`; None when constant."""
    if settings.schedule == "constant":
        return None
    return lambda i: learning_rate(settings, first + i, total)


def fit(trainer: Trainer, state: TrainState, on_epoch: Callable) -> TrainState:
    """Train from `state` until train.epochs, or until train.patience epochs pass without a
    lower validation loss; after every epoch call on_epoch(state, training result). The
    learning rate is a function of the step alone, so a resumed run follows the same one."""
    settings = trainer.settings
    steps = len(trainer.train_loader)
    with fused.denormals_flushed(trainer.device):  # Adam's decaying moments, at full speed
        for epoch in range(state.epoch + 1, settings.epochs + 1):
            if state.bad_epochs >= settings.patience:
                break
            trainer.train_loader.batch_sampler.set_epoch(epoch)
            schedule = epoch_schedule(settings, (epoch - 1) * steps, steps * settings.epochs)
            tr = run_epoch(
                trainer.model,
                trainer.train_loader,
                trainer.device,
                trainer.optimizer,
                settings.clip_norm,
                desc=f"{trainer.variant} epoch {epoch}",
                world=trainer.world,
                precision=settings.precision,
                label_smoothing=settings.label_smoothing,
                lr_at=schedule,
            )
            va = run_epoch(trainer.module, trainer.val_loader, trainer.device, world=trainer.world)
            state = _next_state(state, epoch, tr, va, trainer)
            on_epoch(state, tr)
    return state


def _next_state(
    state: TrainState, epoch: int, tr: EpochResult, va: EpochResult, trainer: Trainer
) -> TrainState:
    row = {
        "epoch": epoch,
        "train_loss": tr.loss,
        "train_acc": tr.accuracy,
        "val_loss": va.loss,
        "val_acc": va.accuracy,
        "grad_norm_mean": tr.grad_norm_mean,
        "grad_norm_max": tr.grad_norm_max,
        "clipped_share": tr.clipped_share,
    }
    weights, moments = trainer.module.state_dict(), trainer.optimizer.state_dict()
    improved = state.best is None or va.loss < state.best.val_loss
    return TrainState(
        epoch=epoch,
        history=[*state.history, row],
        # state_dict() holds live tensors that later steps change: the best is a copy.
        best=Best(epoch, va.loss, va.accuracy, copy.deepcopy(weights), copy.deepcopy(moments))
        if improved
        else state.best,
        bad_epochs=0 if improved else state.bad_epochs + 1,
        seconds=state.seconds + tr.seconds,
        tokens=state.tokens + tr.tokens,
        model_state=weights,
        optimizer_state=moments,
        rng=trainer.world.gather(host.rng_state()),
    )


# ------------------------------------------------------------ the one place that persists


class Ledger:
    """What train@VARIANT keeps, written by rank 0 alone: after every epoch the resume state
    (atomically, under .rnnflow/resume/) and the epoch's MLflow metrics; at the end the best
    checkpoint, the metrics, timing and history files and the run's artifacts. On the other
    ranks it writes nothing and only receives rank 0's resume state."""

    def __init__(self, params: Params, trainer: Trainer, packed_dir: Path):
        self.params, self.trainer, self.variant = params, trainer, trainer.variant
        self.writes = trainer.world.leader
        self.run_params = {
            "model": trainer.cfg.to_dict(),
            "train": params.train.model_dump(),
            "pack": params.pack.model_dump(),
            "seed": params.seed,
        }
        self.key = {
            "params": self.run_params,
            "vocab_hash": file_hash(TOKENIZER_DIR / "tokenizer.json"),
            "data": file_hash(packed_dir / "train.npz"),
            "world_size": trainer.world.size,
        }
        self.resume_path = RESUME_DIR / f"{self.variant}.pt"
        self.run = None

    def resume(self) -> TrainState:
        """The last complete epoch of an interrupted run with the same key, else a new state."""
        saved = _saved_state(self.resume_path, self.key) if self.writes else None
        saved = self.trainer.world.broadcast(saved)
        if saved is None:
            return TrainState()
        if self.writes:
            print(f"train@{self.variant}: resuming after epoch {saved['epoch']}")
        return TrainState.from_dict(saved)

    @contextmanager
    def tracked(self, state: TrainState) -> Iterator[None]:
        """The variant's MLflow run around training (FAILED if training raises)."""
        if not self.writes:
            yield
            return
        import mlflow

        with timeline.tracking():
            runs.configure()
            stale = runs.fail_dead_runs(self.variant)
            tags = _run_tags(self.params, self.variant, self.key, stale, state)
            name = runs.Origin.current().run_name(self.variant)
        with runs.stage_run("train", run_name=name, tags=tags) as self.run:
            with timeline.tracking():
                mlflow.log_params(
                    runs.flatten(self.run_params)
                    | {"model.parameters": count_parameters(self.trainer.module)}
                    | {"world_size": self.trainer.world.size}
                )
                for past in state.history:
                    metrics = {k: v for k, v in past.items() if k != "epoch"}
                    mlflow.log_metrics(metrics, past["epoch"])
            yield

    def epoch_done(self, state: TrainState, tr: EpochResult) -> None:
        """Save the resume state, then log the epoch: a store failure loses no epoch."""
        if not self.writes:
            return
        import mlflow

        row = state.history[-1]
        print(
            f"train@{self.variant} epoch {state.epoch}: train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:.3f} | val loss {row['val_loss']:.4f} "
            f"acc {row['val_acc']:.3f} | {tr.tokens / tr.seconds:,.0f} tok/s"
        )
        with timeline.tracking():
            checkpoint.save(self.resume_path, {"key": self.key} | state.to_dict())
            mlflow.log_metrics(
                {k: v for k, v in row.items() if k != "epoch"}
                | {"tokens_per_second": tr.tokens / tr.seconds},
                step=state.epoch,
            )

    def finish(self, state: TrainState) -> dict:
        """Write the best checkpoint and the metrics; return them (nothing on other ranks)."""
        if not self.writes:
            return {}
        import mlflow

        best, trainer = state.best, self.trainer
        checkpoint.save(
            checkpoint_path(self.variant),
            {
                "model_state": best.model_state,
                "optimizer_state": best.optimizer_state,
                "epoch": best.epoch,
                "model_config": trainer.cfg.to_dict(),
                "params": self.run_params,
                "vocab_hash": self.key["vocab_hash"],
                "labels": trainer.labels,
                "mlflow_run_id": self.run.info.run_id,
            },
        )
        metrics = {
            "best_epoch": best.epoch,
            "best_val_loss": best.val_loss,
            "best_val_acc": best.val_acc,
            "epochs_run": len(state.history),
            "majority_baseline_val_acc": majority_baseline(trainer.train, trainer.val),
            "parameters": count_parameters(trainer.module),
        }
        timing = {
            "train_seconds": state.seconds,
            "train_tokens_per_second": state.tokens / state.seconds,
            "train_processes": trainer.world.size,
        }
        write_json(metrics_file("train", self.variant), metrics)
        write_json(metrics_file("timing", f"train_{self.variant}"), timing)
        write_json(metrics_file("history", self.variant), state.history)
        with timeline.tracking():
            mlflow.log_metrics(metrics | timing)
            _log_train_artifacts(trainer.module, state.history, self.variant)
        return metrics | timing

    def done(self) -> None:
        """The run ended well: its resume state is no longer needed."""
        if self.writes:
            self.resume_path.unlink(missing_ok=True)


def _saved_state(path: Path, key: dict | None) -> dict | None:
    """The resume file's state if it belongs to a run with the same key (any key: None)."""
    if not path.exists():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        path.unlink()  # a state we cannot read is no state: start over
        return None
    return saved if key is None or saved.get("key") == key else None


def _run_tags(params: Params, variant: str, key: dict, stale: list[str], state) -> dict:
    tags = {
        "rnnflow.variant": variant,
        "rnnflow.commit": runs.git_commit(),
        "rnnflow.data_source": params.data.source,
        "rnnflow.dataset": key["data"],
        "rnnflow.vocab_hash": key["vocab_hash"],
    }
    if stale:
        tags["rnnflow.replaces_failed_runs"] = ",".join(stale)
    if state.epoch:
        tags["rnnflow.resumed_from_epoch"] = str(state.epoch)
    return tags


# ----------------------------------------------------------------------------- the stage


def train_variant(params: Params, variant: str, packed_dir: Path = PACKED) -> dict:
    """Train one variant; write its best checkpoint, metrics and history; log to MLflow.

    After every epoch the whole training state is saved atomically under .rnnflow/resume/;
    a killed run started again with the same params, data and number of processes
    continues from there (with one process, to the same metrics).
    """
    if params.train.processes > 1 and not distributed.launched():
        return _launch(params, variant, packed_dir)
    device = host.setup(params.seed)
    with distributed.joined(device) as world:
        # a function of its own: the DDP model must be freed inside the block (see joined)
        return _train_in(world, device, params, variant, packed_dir)


def _train_in(world: World, device, params: Params, variant: str, packed_dir: Path) -> dict:
    if device.type == "cpu" and world.size == 1:
        host.warn_if_crowded(f"train@{variant}")
    trainer = Trainer.build(params, variant, packed_dir, device, world)
    ledger = Ledger(params, trainer, packed_dir)
    state = ledger.resume()
    trainer.start(state, params.seed)
    with ledger.tracked(state):
        state = fit(trainer, state, on_epoch=ledger.epoch_done)
        result = ledger.finish(state)
    ledger.done()
    return result


def train_in_memory(
    params: Params, variant: str, on_epoch: Callable, packed_dir: Path = PACKED
) -> TrainState:
    """Train one variant on one process with no files and no tracking of its own: the same
    seeded model, loop and early stopping as train@VARIANT, for callers that keep their
    own record (the search's trials). on_epoch(state, training result) after every epoch
    may raise to stop the run (a pruned trial)."""
    device = host.setup(params.seed)
    trainer = Trainer.build(params, variant, packed_dir, device, SINGLE)
    state = TrainState()
    trainer.start(state, params.seed)
    return fit(trainer, state, on_epoch)


def _launch(params: Params, variant: str, packed_dir: Path) -> dict:
    """train.processes local ranks, each running train_variant; rank 0's result."""
    name = f"train@{variant}"
    gpus = torch.cuda.device_count() if host.device().type == "cuda" else 0
    if gpus and params.train.processes > gpus:
        raise RnnflowError(
            f"params.yaml: train.processes: {params.train.processes} processes need as many "
            f"GPUs, this machine has {gpus} (or set RNNFLOW_DEVICE=cpu)"
        )
    try:
        return distributed.launch(
            params.train.processes, train_variant, params, variant, packed_dir, name=name
        )
    except RnnflowError as err:
        resume = RESUME_DIR / f"{variant}.pt"
        epoch = (_saved_state(resume, key=None) or {}).get("epoch")
        hint = (
            f"the run is kept after epoch {epoch} ({resume}): rerun to resume from there"
            if epoch
            else "no epoch was completed: a rerun starts over"
        )
        raise RnnflowError(f"{err}; the other ranks were stopped; {hint}") from None


def majority_baseline(train: PackedSplit, val: PackedSplit) -> float:
    """Validation accuracy of always predicting the most frequent training class."""
    majority = np.bincount(train.labels).argmax()
    return float((val.labels == majority).mean())


def plot_history(history: list[dict], variant: str, path: Path) -> None:
    """Loss and accuracy curves of one variant."""
    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plots.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["train_loss"] for h in history], label="train")
    ax1.plot(epochs, [h["val_loss"] for h in history], label="val")
    ax2.plot(epochs, [h["train_acc"] for h in history], label="train")
    ax2.plot(epochs, [h["val_acc"] for h in history], label="val")
    ax1.set(xlabel="epoch", ylabel="loss", title=f"{variant}: loss")
    ax2.set(xlabel="epoch", ylabel="accuracy", title=f"{variant}: accuracy")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    plots.save(fig, path)


def _log_train_artifacts(model: RNNClassifier, history: list[dict], variant: str) -> None:
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        summary = Path(tmp) / "model_summary.txt"
        summary.write_text(f"{model}\n\ntrainable parameters: {count_parameters(model):,}\n")
        plot_history(history, variant, Path(tmp) / "curves.png")
        mlflow.log_artifact(str(summary))
        mlflow.log_artifact(str(Path(tmp) / "curves.png"))
    mlflow.log_artifact(str(checkpoint_path(variant)), "checkpoint")
    mlflow.log_artifact("params.yaml")
    for report in ("prepare.json", "pack.json"):
        if (DATA_REPORTS / report).exists():
            mlflow.log_artifact(str(DATA_REPORTS / report), "data_reports")
