"""Stage compare: one leaderboard across variants (markdown, PNG, JSON), logged to MLflow."""

from pathlib import Path

import numpy as np

from rnnflow.core import plots
from rnnflow.core.atomic import read_json, write_json, write_text
from rnnflow.core.config import Params
from rnnflow.core.paths import REPORTS, bundle_dir, metrics_file
from rnnflow.runtime import timeline
from rnnflow.tracking import runs

COLUMNS = (
    ("variant", "variant", "{}"),
    ("test_accuracy", "test acc", "{:.4f}"),
    ("test_macro_f1", "macro-F1", "{:.4f}"),
    ("best_val_acc", "val acc", "{:.4f}"),
    ("parameters", "params", "{:,}"),
    ("epochs_run", "epochs", "{}"),
    ("train_seconds", "train s", "{:.1f}"),
    ("train_tokens_per_second", "train tok/s", "{:,.0f}"),
    ("latency_ms_batch1_p50", "latency b=1 ms", "{:.2f}"),
    ("onnx_max_abs_diff", "ONNX max abs diff", "{:.1e}"),
    ("onnx_parity", "ONNX parity", "{}"),
    ("int8_accuracy_drop", "int8 acc drop", "{:+.4f}"),
    ("int8_size_kb", "int8 KB (fp32)", "{}"),
    ("grad_decay_per_step", "dL/dh decay/step", "{}"),
)


def leaderboard_rows(variants: list[str]) -> list[dict]:
    """One row per variant from its train/eval/validate metrics, best test accuracy first."""
    rows = []
    gradients = {v: read_json(metrics_file("gradients", v)) for v in variants}
    for v in variants:
        train = read_json(metrics_file("train", v))
        evaluation = read_json(metrics_file("eval", v))
        parity = read_json(metrics_file("validate", v))
        int8 = parity["int8"]
        timing = read_json(metrics_file("timing", f"train_{v}")) | read_json(
            metrics_file("timing", f"eval_{v}")
        )
        rows.append(
            {
                "variant": v,
                "test_accuracy": evaluation["accuracy"],
                "test_macro_f1": evaluation["macro_f1"],
                "best_val_acc": train["best_val_acc"],
                "majority_baseline_val_acc": train["majority_baseline_val_acc"],
                "parameters": train["parameters"],
                "epochs_run": train["epochs_run"],
                "train_seconds": timing["train_seconds"],
                "train_tokens_per_second": timing["train_tokens_per_second"],
                "latency_ms_batch1_p50": timing["latency_ms_batch1_p50"],
                "onnx_max_abs_diff": parity["max_abs_diff"],
                "onnx_parity": "pass" if parity["passed"] else "FAIL",
                "int8_accuracy_drop": int8["accuracy_drop"],
                "int8_size_kb": f"{int8['size_kb']:.0f} ({int8['fp32_size_kb']:.0f})",
                "grad_decay_per_step": _decay(gradients[v]),
            }
        )
    return sorted(rows, key=lambda r: (-r["test_accuracy"], r["variant"]))


def _decay(report: dict) -> str:
    """'0.71 (init 0.64)': dL/dh_t's factor per step back in time, trained and at init."""
    trained, init = report.get("decay_per_step"), report.get("decay_per_step_init")
    if trained is None:
        return "-"
    return f"{trained:.3f}" + (f" (init {init:.3f})" if init is not None else "")


def plot_gradients(variants: list[str], path: Path) -> None:
    """log10 ||dL/dh_t|| against steps before the end, all variants: trained solid, init
    dashed (the top layer)."""
    fig, ax = plots.subplots(figsize=(8, 5))
    for i, v in enumerate(variants):
        series = read_json(metrics_file("gradients", v))["series"]
        k = [r["steps_before_end"] for r in series]
        color = f"C{i}"
        trained = [r["log10_grad_norm"] for r in series]
        init = [r["log10_grad_norm_init"] for r in series]
        ax.plot(k, [np.nan if y is None else y for y in trained], color=color, label=v)
        ax.plot(k, [np.nan if y is None else y for y in init], color=color, ls="--", lw=0.8)
    ax.set(
        xlabel="steps before the end of the sequence (k = T - 1 - t)",
        ylabel="mean log10 ||dL/dh_t||",
        title="Gradient flow back through time (solid: trained, dashed: at init)",
    )
    ax.legend()
    fig.tight_layout()
    plots.save(fig, path)


def to_markdown(rows: list[dict]) -> str:
    """The leaderboard as a markdown table."""
    lines = [
        "| " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(fmt.format(row[key]) for key, _, fmt in COLUMNS) + " |")
    baseline = rows[0]["majority_baseline_val_acc"] if rows else float("nan")
    lines.append(f"\nMajority-class baseline (val): {baseline:.4f}")
    return "\n".join(lines) + "\n"


def plot_leaderboard(rows: list[dict], path: Path) -> None:
    """Bar chart: test accuracy and macro-F1 per variant, and training time."""
    names = [r["variant"] for r in rows]
    x = np.arange(len(rows))
    fig, (ax1, ax2) = plots.subplots(1, 2, figsize=(11, 4))
    ax1.bar(x - 0.2, [r["test_accuracy"] for r in rows], 0.4, label="test accuracy")
    ax1.bar(x + 0.2, [r["test_macro_f1"] for r in rows], 0.4, label="macro-F1")
    ax1.axhline(rows[0]["majority_baseline_val_acc"], color="k", ls="--", label="majority")
    ax1.set_xticks(x, names, rotation=30)
    ax1.set(ylim=(0, 1), title="Quality (test split)")
    ax1.legend(loc="lower right")
    ax2.bar(x, [r["train_seconds"] for r in rows], color="tab:orange")
    ax2.set_xticks(x, names, rotation=30)
    ax2.set(ylabel="seconds", title="Training time")
    fig.tight_layout()
    plots.save(fig, path)


def compare(params: Params) -> list[dict]:
    """Write reports/leaderboard.{md,json,png}; log them to MLflow in a `leaderboard` run and
    crown the champion (see _log_leaderboard)."""
    variants = list(params.model.variants)
    rows = leaderboard_rows(variants)
    md = to_markdown(rows)
    write_text(REPORTS / "leaderboard.md", md)
    write_json(REPORTS / "leaderboard.json", rows)
    plot_leaderboard(rows, REPORTS / "leaderboard.png")
    plot_gradients(variants, REPORTS / "gradients.png")
    with timeline.tracking():
        _log_leaderboard(rows, _run_ids(variants))
    return rows


def _run_ids(variants: list[str]) -> dict[str, str | None]:
    return {v: read_json(bundle_dir(v) / "bundle.json").get("mlflow_run_id") for v in variants}


def ui_links(params: Params, base: str = "http://127.0.0.1:5000") -> list[str]:
    """Where the MLflow UI (`make ui`, or the tracking server) shows this comparison."""
    import mlflow

    uri = runs.configure()
    base = uri.rstrip("/") if uri.startswith("http") else base
    with timeline.tracking():
        experiment_id = mlflow.get_experiment_by_name(runs.EXPERIMENT).experiment_id
    run_ids = [r for r in _run_ids(list(params.model.variants)).values() if r]
    return [
        f"MLflow runs table: {runs.runs_url(base, experiment_id)}",
        f"MLflow compare page: {runs.compare_url(base, experiment_id, run_ids)}",
    ]


def _log_leaderboard(rows: list[dict], run_ids: dict[str, str | None]) -> None:
    """A `leaderboard` run with each variant's test accuracy as a metric, nested under the run
    that groups every experiment of the same baseline commit. Each variant's run gets its
    parity report (validate@VARIANT writes files only) and gradient decay. The variants' runs
    stay top-level (so the runs table shows their metrics without expanding anything) and
    point at their leaderboard with the tag `rnnflow.leaderboard`; the board names them in
    `rnnflow.run.V`.
    The best variant whose raw-text model passed the parity gate gets the `champion` alias."""
    import mlflow

    runs.configure()
    origin = runs.Origin.current()
    group = runs.experiments_group(origin)
    tags = {"rnnflow.kind": "leaderboard", "mlflow.parentRunId": group}
    with runs.stage_run("compare", run_name=origin.run_name("leaderboard"), tags=tags) as run:
        for name in ("leaderboard.md", "leaderboard.json", "leaderboard.png", "gradients.png"):
            mlflow.log_artifact(str(REPORTS / name))
        best = rows[0]
        mlflow.log_metrics(
            {"best_test_accuracy": best["test_accuracy"]}
            | {f"test_accuracy.{r['variant']}": r["test_accuracy"] for r in rows}
        )
        mlflow.set_tag("rnnflow.best_variant", best["variant"])
        client = mlflow.MlflowClient()
        for variant, run_id in run_ids.items():
            if runs.run_exists(run_id):
                client.set_tag(run_id, "rnnflow.leaderboard", run.info.run_id)
                mlflow.set_tag(f"rnnflow.run.{variant}", run_id)
                runs.log_parity(run_id, read_json(metrics_file("validate", variant)))
                flow = read_json(metrics_file("gradients", variant))
                for key in ("decay_per_step", "decay_per_step_init"):
                    if flow.get(key) is not None:
                        client.log_metric(run_id, f"grad_{key}", flow[key])
        champion = crown_champion(rows, run_ids)
        if champion:
            mlflow.set_tags(
                {"rnnflow.champion": champion[0], "rnnflow.champion_version": champion[1]}
            )


def crown_champion(rows: list[dict], run_ids: dict[str, str | None]) -> tuple[str, str] | None:
    """Point `models:/rnnflow@champion` at the highest test accuracy among the variants whose
    registered raw-text model passed parity; (variant, version), or None if none qualifies."""
    import mlflow

    client = mlflow.MlflowClient()
    for row in rows:  # best test accuracy first
        version = runs.text_model_version(run_ids.get(row["variant"]))
        if version is None:
            continue
        tags = client.get_model_version(runs.REGISTERED_MODEL, version).tags
        if tags.get("parity_passed") == "true":
            runs.point_alias(runs.CHAMPION, version)
            return row["variant"], version
    return None
