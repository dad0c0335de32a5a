"""A bounded load test of the served raw-text model: `make loadtest`.

Starts MLflow's own scoring server (`mlflow models serve -m models:/rnnflow@champion
--env-manager local`) on a free loopback port, then runs one phase per concurrency level
(8, 16, 32 clients by default; `--seconds` split between them). Each client keeps one
connection and sends, in a seeded mix, single texts and batches of test-split texts.
Writes reports/serve.json: per phase the requests and texts per second, p50/p99 latency per
request kind, the errors, and the server's memory (RSS of its process tree) after warm-up and
after each phase. Stops the server at the end, whatever happens.
"""

import argparse
import http.client
import json
import os
import threading
import time
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import psutil

from rnnflow.core.atomic import write_json
from rnnflow.core.cliargs import CliParser, non_empty, positive_float
from rnnflow.core.errors import RnnflowError, run_cli
from rnnflow.core.paths import REPORTS, split_file
from rnnflow.tracking.server import ScoringServer, free_port, stop_group

FALLBACK_TEXTS = ["Nakamura", "O'Brien", "Tremblay", "Virtanen", "Okafor", "Rossi", "Novak"]


@dataclass
class Phase:
    """What one concurrency level measured."""

    clients: int
    seconds: float
    requests: int = 0
    texts: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    requests_per_second: float = 0.0
    texts_per_second: float = 0.0
    server_rss_mb: float = 0.0


def load_texts(limit: int = 2000) -> list[str]:
    """Test-split texts when the pipeline has run, else a few built-in names."""
    path = split_file("test")
    if not path.is_file():
        return FALLBACK_TEXTS
    with path.open(encoding="utf-8") as fh:
        texts = [json.loads(line)["text"] for line, _ in zip(fh, range(limit), strict=False)]
    return texts or FALLBACK_TEXTS


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        with suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total / 2**20


def _client(port, texts, deadline, seed, batch_share, batch_size, out, lock) -> None:
    """One client: one keep-alive connection, requests until the deadline."""
    rng = np.random.default_rng(seed)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    local: dict[str, list[float]] = {"single": [], "batch": []}
    errors, samples, n_texts = 0, [], 0
    while time.monotonic() < deadline:
        kind = "batch" if rng.random() < batch_share else "single"
        n = batch_size if kind == "batch" else 1
        body = json.dumps({"inputs": [texts[i] for i in rng.integers(len(texts), size=n)]})
        start = time.perf_counter()
        try:
            conn.request("POST", "/invocations", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            payload = resp.read()
            ok = resp.status == 200 and len(json.loads(payload)["predictions"]) == n
            problem = f"HTTP {resp.status}: {payload[:200]!r}"
        except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
            ok, problem = False, f"{type(err).__name__}: {err}"
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        if ok:
            local[kind].append((time.perf_counter() - start) * 1e3)
            n_texts += n
        else:
            errors += 1
            samples.append(problem)
    conn.close()
    with lock:
        for kind, values in local.items():
            out["latencies"][kind].extend(values)
        out["errors"] += errors
        out["samples"].extend(samples[:3])
        out["texts"] += n_texts


def run_phase(port: int, texts: list[str], clients: int, seconds: float, seed: int, **mix) -> Phase:
    """`clients` threads for `seconds`; latencies are of successful requests only."""
    out = {"latencies": {"single": [], "batch": []}, "errors": 0, "samples": [], "texts": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(
            target=_client, args=(port, texts, deadline, seed + i, *mix.values(), out, lock)
        )
        for i in range(clients)
    ]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    phase = Phase(clients, round(elapsed, 2), errors=out["errors"], texts=out["texts"])
    phase.error_samples = out["samples"][:5]
    for kind, values in out["latencies"].items():
        if values:
            phase.latency_ms[kind] = {
                "count": len(values),
                "p50": round(float(np.percentile(values, 50)), 2),
                "p99": round(float(np.percentile(values, 99)), 2),
            }
    phase.requests = sum(v["count"] for v in phase.latency_ms.values()) + phase.errors
    phase.requests_per_second = round(phase.requests / elapsed, 1)
    phase.texts_per_second = round(phase.texts / elapsed, 1)
    return phase


def load_test(
    model_uri: str,
    seconds: float = 60,
    levels: tuple[int, ...] = (8, 16, 32),
    batch_share: float = 0.2,
    batch_size: int = 32,
    seed: int = 0,
    out: Path = REPORTS / "serve.json",
) -> dict:
    """Serve `model_uri`, load it level by level, write and return the report."""
    port = free_port()
    server = ScoringServer(model_uri, port, REPORTS / "serve.log")
    pid = server.start()
    try:
        texts = load_texts()
        warm = run_phase(port, texts, 2, 2.0, seed, batch_share=0.5, batch_size=batch_size)
        if warm.errors:
            raise RnnflowError(f"{server.url}: warm-up failed: {warm.error_samples[0]}")
        rss_start = rss_mb(pid)
        phases = []
        for i, clients in enumerate(levels):
            phase = run_phase(
                port,
                texts,
                clients,
                seconds / len(levels),
                seed + 1000 * (i + 1),
                batch_share=batch_share,
                batch_size=batch_size,
            )
            phase.server_rss_mb = round(rss_mb(pid), 1)
            phases.append(phase)
    finally:
        stop_group(pid)
    report = {
        "model_uri": model_uri,
        "seconds": seconds,
        "mix": {"batch_share": batch_share, "batch_size": batch_size},
        "server": f"mlflow models serve --env-manager local (uvicorn), pid {pid}",
        "cpu_count": os.cpu_count(),
        "requests": sum(p.requests for p in phases),
        "errors": sum(p.errors for p in phases),
        "server_rss_mb_after_warmup": round(rss_start, 1),
        "server_rss_mb_end": phases[-1].server_rss_mb,
        "server_rss_growth_mb": round(phases[-1].server_rss_mb - rss_start, 1),
        "phases": [asdict(p) for p in phases],
    }
    write_json(out, report)
    return report


def to_markdown(report: dict) -> str:
    lines = [
        "| clients | requests/s | texts/s | single p50 / p99 ms | batch p50 / p99 ms | errors "
        "| server RSS MB |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in report["phases"]:
        lat = {k: f"{v['p50']:.1f} / {v['p99']:.1f}" for k, v in p["latency_ms"].items()}
        lines.append(
            f"| {p['clients']} | {p['requests_per_second']:,.0f} | {p['texts_per_second']:,.0f} "
            f"| {lat.get('single', '-')} | {lat.get('batch', '-')} | {p['errors']} "
            f"| {p['server_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def client_levels(text: str) -> tuple[int, ...]:
    """--clients: concurrency levels, e.g. 8,16,32 (each 1-256)."""
    try:
        levels = tuple(int(c) for c in text.split(","))
    except ValueError:
        levels = ()
    if not levels or min(levels) < 1 or max(levels) > 256:
        raise argparse.ArgumentTypeError(f"expected client counts 1-256 like 8,16,32, got {text!r}")
    return levels


def load_seconds(text: str) -> float:
    """--seconds: the whole test's length, bounded (a load test stops by itself)."""
    seconds = positive_float(text)
    if seconds > 3600:
        raise argparse.ArgumentTypeError(f"expected at most 3600 seconds, got {text!r}")
    return seconds


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m rnnflow.tools.loadtest", description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", type=non_empty, default="models:/rnnflow@champion")
    parser.add_argument("--seconds", type=load_seconds, default=60, help="all phases together")
    parser.add_argument(
        "--clients", type=client_levels, default="8,16,32", help="concurrency levels, in order"
    )
    parser.add_argument("--out", type=non_empty, default=str(REPORTS / "serve.json"))
    args = parser.parse_args(argv)
    run_cli(lambda: report_load_test(args), "loadtest")


def report_load_test(args) -> None:
    """Run the load test, print its table; fail if any request failed."""
    args.out = Path(args.out)
    report = load_test(args.model_uri, args.seconds, args.clients, out=args.out)
    print(to_markdown(report))
    print(
        f"{report['requests']} requests, {report['errors']} errors; server RSS "
        f"{report['server_rss_mb_after_warmup']:.0f} -> {report['server_rss_mb_end']:.0f} MB"
    )
    if report["errors"]:
        raise RnnflowError(f"{report['errors']} requests failed; see {args.out}")


if __name__ == "__main__":
    main()
