"""The bench runs end to end and reports every number it promises (no speed is asserted)."""

import rnnflow.bench as bench

from .conftest import small_params, write_params


def test_bench_reports_every_measurement(workspace, monkeypatch):
    monkeypatch.setattr(bench, "REPEATS", 1)
    monkeypatch.setattr(bench, "BATCHES_PER_REPEAT", 2)
    raw = small_params()
    raw["model"]["variants"] = {"rnn": {}, "rnn_cell": {}, "lstm": {}}
    results = bench.run_bench(write_params(workspace, raw))
    assert set(results["variants"]) == {"rnn", "rnn_cell", "lstm"}
    for r in results["variants"].values():
        assert r["train_tokens_per_s"] > 0 and r["reference_tokens_per_s"] > 0
        assert r["speedup_vs_reference"] == r["train_tokens_per_s"] / r["reference_tokens_per_s"]
        for b in ("batch1", "batch64"):
            lat = r["latency"][b]
            assert 0 < lat["onnxruntime_ms"]["p50"] <= lat["onnxruntime_ms"]["p95"]
    assert set(results["cell_vs_module_time_ratio"]) == {"rnn_cell/rnn"}
    pad = results["padding"]
    assert pad["bucketed"]["pad_fraction"] < pad["global_max"]["pad_fraction"]
    assert results["peak_rss_mb"] > 50 and results["machine"]["cpu_count"] >= 1
    md = bench.to_markdown(results)
    assert md.count("\n| ") == 3 and "time ratio rnn_cell/rnn" in md


def test_tutorial_reference_reads_the_last_padded_step():
    """The reference really is the tutorial's way: padding steps do change its output."""
    import torch

    from rnnflow.models import ModelConfig

    cfg = ModelConfig("rnn", 20, 3, 8, 16, 1, 0.0, "tanh", False)
    model = bench.TutorialModel(cfg).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        padded = model(tokens, torch.tensor([3]))
        exact = model(tokens[:, :3], torch.tensor([3]))
    assert not torch.allclose(padded, exact)


def test_ddp_bench_measures_one_and_two_processes(workspace):
    from rnnflow import runtime, scaling

    params = write_params(workspace, small_params())
    results = scaling.measure(params, ["rnn_cell"], 2, steps=3, rounds=1, repeats=1)
    rates = results["rnn_cell"]["tokens_per_s"]
    assert list(rates) == [
        "1 process",
        f"1 process, {runtime.threads_per_rank(2)} thread(s)",
        "2 processes",
    ]
    assert all(rate > 0 for rate in rates.values())
    assert all(len(r) == 1 for r in results["rnn_cell"]["rounds"].values())
    report = {"variants": results, "settings": {"steps": 3, "rounds": 1, "batch_size": 64}}
    report["machine"] = {"cpu_count": 2, "device": "cpu", "torch": "x", "python": "y"}
    table = scaling.to_markdown(report).splitlines()
    assert table[0].startswith("| variant | 1 process | 1 process, ")
    assert table[2].startswith("| rnn_cell |") and table[2].count("x |") == 2
