"""Stage train@VARIANT: one training loop for every variant, with early stopping and resume."""

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from rnnflow import checkpoint, plots, runtime, tracking
from rnnflow.atomic import write_json
from rnnflow.batching import PackedSplit, make_loader
from rnnflow.config import Params
from rnnflow.models import ModelConfig, RNNClassifier, count_parameters
from rnnflow.paths import DATA_REPORTS, PACKED, TOKENIZER_DIR, metrics_file
from rnnflow.paths import checkpoint as checkpoint_path
from rnnflow.text import file_hash, load_tokenizer
from rnnflow.vocab import labels_path, load_labels

RESUME_DIR = Path(".rnnflow/resume")


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


def run_epoch(model, loader, device, optimizer=None, clip_norm=None, desc="") -> EpochResult:
    """One pass over `loader`; trains when an optimizer is given, else only evaluates."""
    training = optimizer is not None
    model.train(training)
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    total_loss, correct, seen, tokens, norms = 0.0, 0, 0, 0, []
    start = time.perf_counter()
    with torch.set_grad_enabled(training):
        for x, lengths, y in tqdm(loader, desc=desc, leave=False, disable=None):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            logits = model(x, lengths)  # a fresh (zero) hidden state for every batch
            loss = loss_fn(logits, y)
            if training:
                optimizer.zero_grad(set_to_none=True)
                (loss / len(y)).backward()
                norms.append(float(nn.utils.clip_grad_norm_(model.parameters(), clip_norm)))
                optimizer.step()
            total_loss += float(loss.detach())
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            tokens += int(lengths.sum())
    return EpochResult(
        loss=total_loss / seen,
        accuracy=correct / seen,
        tokens=tokens,
        seconds=time.perf_counter() - start,
        grad_norm_mean=float(np.mean(norms)) if norms else math.nan,
        grad_norm_max=float(np.max(norms)) if norms else math.nan,
        clipped_share=float(np.mean(np.array(norms) > clip_norm)) if norms else math.nan,
    )


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


def _resume_state(path: Path, key: dict) -> dict | None:
    """The last complete epoch of an interrupted run with the same key, if there is one."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        path.unlink()  # a state we cannot read is no state: start over
        return None
    return state if state.get("key") == key else None


def _run_tags(params: Params, variant: str, key: dict, stale: list[str], resumed) -> dict:
    tags = {
        "rnnflow.variant": variant,
        "rnnflow.commit": tracking.git_commit(),
        "rnnflow.data_source": params.data.source,
        "rnnflow.dataset": key["data"],
        "rnnflow.vocab_hash": key["vocab_hash"],
    }
    if stale:
        tags["rnnflow.replaces_failed_runs"] = ",".join(stale)
    if resumed:
        tags["rnnflow.resumed_from_epoch"] = str(resumed["epoch"])
    return tags


def train_variant(params: Params, variant: str, packed_dir: Path = PACKED) -> dict:
    """Train one variant; write its best checkpoint, metrics and history; log to MLflow.

    After every epoch the whole training state (weights, optimizer, RNG, history, best
    weights so far) is saved atomically under .rnnflow/resume/; a killed run started again
    with the same params and data continues from there and ends with the same metrics.
    """
    device = runtime.setup(params.seed)
    classes = load_labels(labels_path())
    tokenizer_file = TOKENIZER_DIR / "tokenizer.json"
    cfg = ModelConfig.of(
        variant,
        params.variant(variant),
        load_tokenizer(tokenizer_file).get_vocab_size(),
        len(classes),
    )
    train, val = (PackedSplit.load(packed_dir / f"{s}.npz") for s in ("train", "val"))
    model = RNNClassifier(cfg).to(device)
    optimizer = torch.optim.Adam(
        model.parameters(), lr=params.train.lr, weight_decay=params.train.weight_decay
    )
    batch, pool = params.pack.batch_size, params.pack.bucket_pool
    train_loader = make_loader(train, batch, pool, shuffle=True, seed=params.seed)
    val_loader = make_loader(val, batch, pool, shuffle=False, seed=0)

    run_params = {
        "model": cfg.to_dict(),
        "train": params.train.model_dump(),
        "pack": params.pack.model_dump(),
        "seed": params.seed,
    }
    key = {
        "params": run_params,
        "vocab_hash": file_hash(tokenizer_file),
        "data": file_hash(packed_dir / "train.npz"),
    }
    resume_path = RESUME_DIR / f"{variant}.pt"
    resumed = _resume_state(resume_path, key)
    state = resumed or {
        "epoch": 0,
        "history": [],
        "best": None,
        "bad_epochs": 0,
        "seconds": 0.0,
        "tokens": 0,
    }
    if resumed:
        model.load_state_dict(resumed["model_state"])
        optimizer.load_state_dict(resumed["optimizer_state"])
        runtime.set_rng_state(resumed["rng"])
        print(f"train@{variant}: resuming after epoch {resumed['epoch']}")

    tracking.configure()
    tags = _run_tags(params, variant, key, tracking.fail_dead_runs(variant), resumed)
    name = tracking.Origin.current().run_name(variant)
    with tracking.stage_run("train", run_name=name, tags=tags) as run:
        import mlflow

        mlflow.log_params(
            tracking.flatten(run_params) | {"model.parameters": count_parameters(model)}
        )
        for past in state["history"]:
            mlflow.log_metrics({k: v for k, v in past.items() if k != "epoch"}, step=past["epoch"])
        for epoch in range(state["epoch"] + 1, params.train.epochs + 1):
            if state["bad_epochs"] >= params.train.patience:
                break
            train_loader.batch_sampler.set_epoch(epoch)
            tr = run_epoch(
                model,
                train_loader,
                device,
                optimizer,
                params.train.clip_norm,
                desc=f"{variant} epoch {epoch}",
            )
            va = run_epoch(model, val_loader, device)
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
            print(
                f"train@{variant} epoch {epoch}: train loss {tr.loss:.4f} "
                f"acc {tr.accuracy:.3f} | val loss {va.loss:.4f} acc {va.accuracy:.3f} | "
                f"{tr.tokens / tr.seconds:,.0f} tok/s"
            )
            improved = state["best"] is None or va.loss < state["best"]["val_loss"]
            state = {
                "key": key,
                "epoch": epoch,
                "model_state": model.state_dict(),
                "optimizer_state": optimizer.state_dict(),
                "rng": runtime.rng_state(),
                "history": [*state["history"], row],
                # state_dict() holds live tensors that later steps change: copy the best.
                "best": copy.deepcopy(
                    {
                        "epoch": epoch,
                        "val_loss": va.loss,
                        "val_acc": va.accuracy,
                        "model_state": model.state_dict(),
                        "optimizer_state": optimizer.state_dict(),
                    }
                )
                if improved
                else state["best"],
                "bad_epochs": 0 if improved else state["bad_epochs"] + 1,
                "seconds": state["seconds"] + tr.seconds,
                "tokens": state["tokens"] + tr.tokens,
            }
            checkpoint.save(resume_path, state)  # saved before logging: a store failure
            mlflow.log_metrics(  # below loses no epoch, the rerun resumes after this one
                {k: v for k, v in row.items() if k != "epoch"}
                | {"tokens_per_second": tr.tokens / tr.seconds},
                step=epoch,
            )

        best, history = state["best"], state["history"]
        checkpoint.save(
            checkpoint_path(variant),
            {
                "model_state": best["model_state"],
                "optimizer_state": best["optimizer_state"],
                "epoch": best["epoch"],
                "model_config": cfg.to_dict(),
                "params": run_params,
                "vocab_hash": key["vocab_hash"],
                "labels": classes,
                "mlflow_run_id": run.info.run_id,
            },
        )
        metrics = {
            "best_epoch": best["epoch"],
            "best_val_loss": best["val_loss"],
            "best_val_acc": best["val_acc"],
            "epochs_run": len(history),
            "majority_baseline_val_acc": majority_baseline(train, val),
            "parameters": count_parameters(model),
        }
        timing = {
            "train_seconds": state["seconds"],
            "train_tokens_per_second": state["tokens"] / state["seconds"],
        }
        write_json(metrics_file("train", variant), metrics)
        write_json(metrics_file("timing", f"train_{variant}"), timing)
        write_json(metrics_file("history", variant), history)
        mlflow.log_metrics(metrics | timing)
        _log_train_artifacts(model, history, variant)
    resume_path.unlink(missing_ok=True)
    return metrics | timing


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
