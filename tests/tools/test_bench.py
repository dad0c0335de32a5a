"""The bench runs end to end and reports every number it promises (no speed is asserted)."""

import rnnflow.tools.bench as bench

from ..conftest import small_params, write_params


def test_bench_reports_every_measurement(workspace, monkeypatch):
    monkeypatch.setattr(bench, "ROUNDS", 1)
    monkeypatch.setattr(bench, "BATCHES_PER_ROUND", 2)
    monkeypatch.setattr(bench, "DENORMAL_EPOCHS", 2)
    raw = small_params()
    raw["model"]["variants"] = {"rnn": {}, "rnn_cell": {}, "lstm": {}}
    sections = ("matmul", "train", "denormals", "clip", "latency")
    results = bench.run_bench(write_params(workspace, raw), sections, ())
    assert results["matmul_limit_gflops"] > 1
    assert set(results["variants"]) == set(results["latency"]) == {"rnn", "rnn_cell", "lstm"}
    assert set(results["denormals"]) == set(results["clip"]) == set(results["variants"])
    for r in results["variants"].values():
        assert r["train_tokens_per_s"] > 0 and r["before_tokens_per_s"] > 0
        assert r["speedup_vs_before"] == r["train_tokens_per_s"] / r["before_tokens_per_s"]
        assert r["speedup_vs_nn"] == r["train_tokens_per_s"] / r["nn_tokens_per_s"]
        assert r["train_gflops"] == r["train_tokens_per_s"] * r["train_flops_per_token"] / 1e9
        limit = results["matmul_limit_gflops"]
        assert r["share_of_matmul_limit"] == r["train_gflops"] / limit
        assert "gpu_busy_share" not in r  # CUDA only
        # the builtin data are read by characters: each variant also trains with its bag
        assert r["bag_tokens_per_s"] > 0 and r["bag_ops_tokens_per_s"] > 0
        assert r["bag_kernel_speedup"] == r["bag_tokens_per_s"] / r["bag_ops_tokens_per_s"]
    for r in results["denormals"].values():
        assert len(r["ieee_tokens_per_s"]) == len(r["flushed_tokens_per_s"]) == r["epochs"] == 2
        assert r["speedup"] == r["flushed_late_tokens_per_s"] / r["ieee_late_tokens_per_s"] > 0
        assert r["flushed_denormal_moments"] == 0
        assert r["weights_max_abs_diff"] == 0.0  # flushing changed no weight's bits
    for r in results["clip"].values():
        assert r["now_us"] > 0 and r["speedup"] == r["stock_us"] / r["now_us"]
    for rows in results["latency"].values():
        for b in ("batch1", "batch64"):
            lat = rows[b]
            assert 0 < lat["onnxruntime_ms"]["p50"] <= lat["onnxruntime_ms"]["p95"]
    pad = results["padding"]
    assert pad["bucketed"]["pad_fraction"] < pad["global_max"]["pad_fraction"]
    assert results["peak_rss_mb"] > 50 and results["machine"]["cpu_count"] >= 1
    md = bench.to_markdown(results)
    assert md.count("\n| rnn") == 10 and "fp32 matmul limit" in md  # 5 tables x rnn, rnn_cell
    assert "the bag's kernel" in md


def test_flops_per_token_count_every_recurrent_matmul():
    from rnnflow.model.network import ModelConfig

    gru = ModelConfig("gru", 50, 4, 64, 128, 1, 0.0, "tanh", False)
    # forward: 3 gates x 2 FLOPs x 128 x (64 + 128); training: 3x the forward
    assert bench.train_flops_per_token(gru) == 3 * 2 * 3 * 128 * (64 + 128)
    deep = ModelConfig("rnn_deep", 50, 4, 64, 128, 2, 0.0, "tanh", True)
    per_direction = 2 * 128 * (64 + 128) + 2 * 128 * (256 + 128)
    assert bench.train_flops_per_token(deep) == 3 * 2 * per_direction


def test_size_curve_runs_each_stage_in_its_own_process(workspace):
    raw = small_params()
    results = bench.bench_size(write_params(workspace, raw), (300, 600))
    for size in ("300", "600"):
        for stage in ("prepare", "tokenize", "pack", "train"):
            assert results[size][stage]["seconds"] > 0
            assert results[size][stage]["peak_rss_mb"] > 20
    assert results["600"]["train_tokens"] > results["300"]["train_tokens"] > 0


def test_generated_corpus_is_seeded_and_labelled(tmp_path):
    bench.generate_corpus(tmp_path / "a.csv", 120, seed=3)
    bench.generate_corpus(tmp_path / "b.csv", 120, seed=3)
    text = (tmp_path / "a.csv").read_text()
    assert text == (tmp_path / "b.csv").read_text()
    rows = text.splitlines()
    assert rows[0] == "text,label" and len(rows) == 121
    assert {r.rsplit(",", 1)[1] for r in rows[1:]} == {"c0", "c1", "c2", "c3"}
    assert all(5 <= len(r.rsplit(",", 1)[0].split()) <= 15 for r in rows[1:])


def test_tutorial_reference_reads_the_last_padded_step():
    """The reference really is the tutorial's way: padding steps do change its output."""
    import torch

    from rnnflow.model.network import ModelConfig

    cfg = ModelConfig("rnn", 20, 3, 8, 16, 1, 0.0, "tanh", False)
    model = bench.TutorialModel(cfg).eval()
    tokens = torch.tensor([[5, 6, 7, 0, 0]])
    with torch.no_grad():
        padded = model(tokens, torch.tensor([3]))
        exact = model(tokens[:, :3], torch.tensor([3]))
    assert not torch.allclose(padded, exact)


def test_ddp_bench_measures_one_and_two_processes(workspace):
    from rnnflow.runtime import host
    from rnnflow.tools import scaling

    params = write_params(workspace, small_params())
    results = scaling.measure(params, ["rnn_cell"], 2, steps=3, rounds=1, repeats=1)
    rates = results["rnn_cell"]["tokens_per_s"]
    assert list(rates) == [
        "1 process",
        f"1 process, {host.threads_per_rank(2)} thread(s)",
        "2 processes",
    ]
    assert all(rate > 0 for rate in rates.values())
    assert all(len(r) == 1 for r in results["rnn_cell"]["rounds"].values())
    report = {"variants": results, "settings": {"steps": 3, "rounds": 1, "batch_size": 64}}
    report["machine"] = {"cpu_count": 2, "device": "cpu", "torch": "x", "python": "y"}
    table = scaling.to_markdown(report).splitlines()
    assert table[0].startswith("| variant | 1 process | 1 process, ")
    assert table[2].startswith("| rnn_cell |") and table[2].count("x |") == 2
