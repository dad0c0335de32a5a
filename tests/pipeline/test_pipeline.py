"""End to end: `dvc repro` of the whole pipeline in a fresh copy of the repository (slow)."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

from rnnflow.runtime.timeline import RECORDS
from rnnflow.shipping.predict import Predictor
from rnnflow.tracking import runs
from rnnflow.tracking.server import MlflowServer, ScoringServer, free_port, stop_group

from ..conftest import (
    REPO,
    VARIANTS,
    browser_text,
    end_queue_workers,
    make_repo_copy,
    run,
    small_params,
    tracking_at,
)

pytestmark = pytest.mark.slow


def _run(cmd, cwd, check=True, env=None):
    # the copy uses its own default store, ./mlflow.db, and a remote under a private HOME
    home = cwd.parent / "home"
    if not (home / ".gitconfig").exists():  # dvc exp run commits: git needs an identity
        home.mkdir(exist_ok=True)
        (home / ".gitconfig").write_text("[user]\n\tname = rnnflow tests\n\temail = t@t\n")
    env = {"MLFLOW_TRACKING_URI": None, "HOME": str(home)} | (env or {})
    return run(cmd, cwd, env=env, check=check)


def _records(repo_copy: Path) -> Path:
    """Where the first full run's stages record their timeline (and the files they wrote)."""
    return repo_copy.parent / "timeline"


@pytest.fixture(scope="module")
def repo_copy(tmp_path_factory) -> Path:
    """A git repository holding the tracked files of this one, with small params (lr 0.01:
    two epochs of the cosine schedule at lr 0.002, the old default, left these tiny models
    at chance)."""
    raw = small_params(data={"max_per_class": 60}, train={"lr": 0.01})
    return make_repo_copy(tmp_path_factory.mktemp("clone") / "rnnflow", raw)


def test_full_pipeline_from_a_fresh_copy(repo_copy):
    out = _run("dvc repro", repo_copy, env={RECORDS: str(_records(repo_copy))}).stdout
    for variant in VARIANTS:
        assert f"Running stage 'validate@{variant}'" in out
        parity = json.loads((repo_copy / f"metrics/validate/{variant}.json").read_text())
        assert parity["passed"] and parity["max_abs_diff"] <= 1e-5
        for name in ("model.onnx", "tokenizer.json", "labels.json", "bundle.json"):
            assert (repo_copy / f"models/{variant}/{name}").is_file()
    board = json.loads((repo_copy / "reports/leaderboard.json").read_text())
    assert sorted(r["variant"] for r in board) == sorted(VARIANTS)
    assert all(r["test_accuracy"] > r["majority_baseline_val_acc"] for r in board)

    # nothing changed -> nothing runs
    again = _run("dvc repro", repo_copy).stdout
    assert "Running stage" not in again

    # metrics and plots are visible to dvc
    shown = _run("dvc metrics show --json", repo_copy).stdout
    assert "metrics/eval/gru.json" in shown and "metrics/train/rnn_cell.json" in shown
    _run("dvc plots show -o plots_html", repo_copy)
    assert (repo_copy / "plots_html/index.html").is_file()

    # predict from the bundle, as a user would
    pred = _run(
        f"{sys.executable} -m rnnflow.shipping.cli predict --model models/gru Tremblay", repo_copy
    )
    assert json.loads(pred.stdout)["text"] == "Tremblay"


def test_every_stage_writes_exactly_its_declared_outputs(repo_copy):
    """dvc.yaml and src/rnnflow/core/paths.py say the same: in the real run above, every file
    a stage wrote is one of its declared outputs (or inside one), and every declared output
    was written by its stage. Only the resume state under .rnnflow/ is no output (and files
    outside the project: temporary files for MLflow's artifacts)."""
    from dvc.repo import Repo

    _needs_pipeline(repo_copy)
    with Repo(str(repo_copy)) as repo:
        declared = {
            stage.name: {str(repo_copy / out.def_path) for out in stage.outs}
            for stage in repo.index.stages
        }
    records = [json.loads(p.read_text()) for p in _records(repo_copy).glob("*.json")]
    assert sorted(r["stage"] for r in records) == sorted(declared)
    for record in records:
        outs = declared[record["stage"]]
        written = [
            w
            for w in record["written"]
            if w.startswith(f"{repo_copy}/") and not w.startswith(f"{repo_copy}/.rnnflow/")
        ]

        def inside(path: str, out: str) -> bool:
            return path == out or path.startswith(out + "/")

        stray = [w for w in written if not any(inside(w, o) for o in outs)]
        assert stray == [], f"{record['stage']} wrote undeclared outputs"
        unwritten = [o for o in outs if not any(inside(w, o) for w in written)]
        assert unwritten == [], f"{record['stage']} did not write declared outputs"


def _needs_pipeline(repo_copy: Path) -> None:
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the full run above")


def _champion(repo_copy: Path):
    with tracking_at(f"sqlite:///{repo_copy}/mlflow.db"):
        return mlflow.MlflowClient().get_model_version_by_alias("rnnflow", "champion")


def _post(url: str, body: bytes | str, content_type: str = "application/json"):
    import requests

    return requests.post(
        f"{url}/invocations", data=body, headers={"Content-Type": content_type}, timeout=60
    )


BAD_REQUESTS = [  # (what, body, a fragment of the 4xx message)
    ("a non-string entry", {"inputs": ["Nakamura", 3]}, "Expected type str"),
    ("an empty string", {"inputs": ["Nakamura", " "]}, "inputs[1] is empty"),
    ("an empty list", {"inputs": []}, "inputs is empty"),
    ("a string, not a list", {"inputs": "Nakamura"}, "Expected list"),
    ("no inputs key", {"texts": ["Nakamura"]}, "'inputs' key"),
    ("a 10 MB string", {"inputs": ["x" * 10_000_000]}, "at most 10000"),
    ("10,000 texts", {"inputs": ["Smith"] * 10_000}, "at most 1000 per request"),
]


def test_champion_is_served_by_mlflow_and_answers_bad_requests_with_4xx(repo_copy, tmp_path):
    _needs_pipeline(repo_copy)
    champion = _champion(repo_copy)
    board = json.loads((repo_copy / "reports/leaderboard.json").read_text())
    assert champion.tags["variant"] == board[0]["variant"]  # best test accuracy, parity passed
    assert champion.tags["parity_passed"] == "true"
    server = ScoringServer(
        "models:/rnnflow@champion",
        free_port(),
        tmp_path / "serve.log",
        tracking_uri=f"sqlite:///{repo_copy}/mlflow.db",
    )
    pid = server.start()
    try:
        texts = ["Nakamura", "O'Brien"]
        resp = _post(server.url, json.dumps({"inputs": texts}))
        assert resp.status_code == 200, resp.text
        got = resp.json()["predictions"]
        want = Predictor(repo_copy / "models" / champion.tags["variant"]).predict(texts)
        assert [g["label"] for g in got] == [w["label"] for w in want]
        for g, w in zip(got, want, strict=True):
            assert g["probabilities"] == pytest.approx(w["probabilities"], abs=1e-6)
            assert sum(g["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
            assert g["label"] == max(g["probabilities"], key=g["probabilities"].get)

        for what, body, fragment in BAD_REQUESTS:
            resp = _post(server.url, json.dumps(body))
            assert 400 <= resp.status_code < 500, (what, resp.status_code, resp.text[:300])
            assert fragment in resp.json()["message"], (what, resp.text[:300])
        resp = _post(server.url, "{not json")
        assert resp.status_code == 400 and "valid JSON" in resp.json()["message"]
        assert _post(server.url, "Nakamura", "text/plain").status_code == 415
        # still alive and right after all that
        assert _post(server.url, json.dumps({"inputs": texts})).json()["predictions"] == got
    finally:
        stop_group(pid)


def test_mlflow_ui_shows_every_variant_and_its_accuracy_in_a_real_browser(repo_copy, tmp_path):
    _needs_pipeline(repo_copy)
    rows = json.loads((repo_copy / "reports/leaderboard.json").read_text())
    board = {r["variant"]: r for r in rows}
    with tracking_at(f"sqlite:///{repo_copy}/mlflow.db"):
        experiment_id = mlflow.get_experiment_by_name("rnnflow").experiment_id
    run_ids = [
        json.loads((repo_copy / f"models/{v}/bundle.json").read_text())["mlflow_run_id"]
        for v in VARIANTS
    ]
    server = MlflowServer(
        f"sqlite:///{repo_copy}/mlflow.db",
        tmp_path / "artifacts",
        free_port(),
        tmp_path / "ui.log",
        1,
    )
    pid = server.start()
    try:
        runs_page = browser_text(runs.runs_url(server.uri, experiment_id), tmp_path / "p1")
        compare_page = browser_text(
            runs.compare_url(server.uri, experiment_id, run_ids), tmp_path / "p2"
        )
    finally:
        stop_group(pid)
    # the runs table: no GenAI overview, the variants' runs with their test accuracy column
    assert "Traces 0" not in runs_page and "test_accuracy" in runs_page
    for variant, row in board.items():
        assert f" {variant} " in runs_page, variant
        assert repr(row["test_accuracy"]) in runs_page, (variant, row["test_accuracy"])
    # the compare page: the six runs side by side with their metrics, rounded to 3 places.
    # Its metrics table renders only its first ~18 rows (alphabetical) without scrolling, so
    # the accuracy checked there is the best validation accuracy, near the top.
    assert "Comparing 6 Runs" in compare_page
    assert f"Run Name: {' '.join(VARIANTS)}" in compare_page
    val_acc = " ".join(f"{round(board[v]['best_val_acc'], 3):g}" for v in VARIANTS)
    assert "best_val_acc best_val_loss" in compare_page and val_acc in compare_page


def readme_blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of one language, in order."""
    import re

    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


# How the README's bash blocks are run: as written, one after another in one bash session,
# except for three things a script cannot do the way a person at a terminal does:
README_RULES = r"""
set -euo pipefail
wait_queue() {   # after `dvc queue start`: a person watches `dvc queue status`; we poll it
  for _ in $(seq 600); do
    status=$(dvc queue status 2>&1) || true
    if ! grep -q Queued <<<"$status" && grep -q "0 active" <<<"$status"; then
      echo "$status"; return 0
    fi
    sleep 1
  done
  echo "queue did not finish" >&2; return 1
}
serve_bg() {     # `make serve` holds its terminal: start it in the background, wait for it
  setsid make serve > "$1" 2>&1 < /dev/null &
  SERVE_PID=$!
  for _ in $(seq 240); do curl -sf 127.0.0.1:5001/ping > /dev/null && return 0; sleep 0.5; done
  cat "$1" >&2; return 1
}
demo_bg() {      # `make demo` too: in the background until its page answers, then stopped
  local port=$(grep -o 'DEMO_PORT=[0-9]*' <<<"$1" | cut -d= -f2)
  setsid bash -c "$1" > demo.log 2>&1 < /dev/null &
  local pid=$!
  for _ in $(seq 240); do
    if curl -sf "127.0.0.1:${port:-8000}/" | grep -q 'rnnflow in the browser'; then
      curl -sf "127.0.0.1:${port:-8000}/bundle/labels.json" | grep -q labels
      kill -- -"$pid"; wait "$pid" || true; return 0
    fi
    sleep 0.5
  done
  cat demo.log >&2; kill -- -"$pid"; return 1
}
"""


def readme_script(text: str) -> str:
    """README's bash blocks as one script, with the rules above applied line by line."""
    lines = [README_RULES]
    for block in readme_blocks(text, "bash"):
        serving = False
        for line in block.splitlines():
            command = line.split(" #")[0].strip()
            if command == "make test":
                lines.append(f": skipped, this test is part of it: {line!r}")
            elif command.startswith("make demo"):
                lines.append(f"demo_bg {shlex.quote(command)}")
            elif command == "make serve":
                lines.append("serve_bg serve.log")
                serving = True
            else:
                lines.append(line)
                if "dvc queue start" in command:
                    lines.append("wait_queue")
        if serving:
            lines.append('kill -- -"$SERVE_PID"; wait "$SERVE_PID" || true')
    return "\n".join(lines) + "\n"


def _check_load_report(report: dict) -> None:
    """`make loadtest`'s reports/serve.json: every level ran, no errors, sane latencies, no
    memory growth worth the name in a short run."""
    assert report["errors"] == 0 and report["requests"] > 50
    assert [p["clients"] for p in report["phases"]] == [8, 16, 32]
    for phase in report["phases"]:
        for kind in ("single", "batch"):
            lat = phase["latency_ms"][kind]
            assert 0 < lat["p50"] <= lat["p99"] < 30_000
        assert phase["texts_per_second"] > phase["requests_per_second"] > 0
    assert report["server_rss_growth_mb"] < 50


def manual(root: Path) -> str:
    """The README, then every page of the manual in the site's order (docs/mkdocs.yml)."""
    nav = yaml.safe_load((root / "docs/mkdocs.yml").read_text())["nav"]
    pages = [root / "docs/pages" / next(iter(entry.values())) for entry in nav]
    return "\n".join(p.read_text() for p in [root / "README.md", *pages])


def test_every_readme_command_works_as_written(repo_copy):
    """The README and the manual's pages from top to bottom in a fresh copy: `make run`,
    activating the venv, the DVC commands, a queued sweep, the team server with a queue,
    push/clone/pull, predict, the Python examples, serving and the load test (its report
    checked), the GPU check's CPU smoke run. The long sweep kept as a record (a text block)
    is queued as written, counted and removed unrun."""
    _needs_pipeline(repo_copy)
    venv = REPO / ".venv"
    if not (repo_copy / ".venv").exists():
        (repo_copy / ".venv").symlink_to(venv)
    if run("make -q install", repo_copy, check=False).returncode != 0:
        pytest.skip(".venv is older than pyproject.toml here; `make install` first")
    home = repo_copy.parent / "home"
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if str(venv) not in p)
    env = {"MLFLOW_TRACKING_URI": None, "HOME": str(home), "PATH": path, "VIRTUAL_ENV": None}
    env["LOADTEST_SECONDS"] = "9"  # `make loadtest` reads it (3 s per level); README: 60
    readme = manual(repo_copy)
    script = repo_copy / "readme.sh"
    script.write_text(readme_script(readme))
    logs = repo_copy.parent / "readme.out", repo_copy.parent / "readme.err"
    try:
        # files, not pipes: the queue workers and servers it starts inherit them, and a pipe
        # would keep this test waiting for the last of them to exit
        with logs[0].open("w") as stdout, logs[1].open("w") as stderr:
            proc = subprocess.run(
                ["bash", "-x", str(script)],
                cwd=repo_copy,
                env={k: v for k, v in (os.environ | env).items() if v is not None},
                stdout=stdout,
                stderr=stderr,
                timeout=1500,
            )
        assert proc.returncode == 0, logs[1].read_text()[-4000:]
        out = logs[0].read_text()
        assert "Data and pipelines are up to date." in out
        assert out.count("Success") >= 4  # two queued sweeps of two experiments each
        assert '"predictions": [{"label": ' in out  # curl against `make serve`
        _check_load_report(json.loads((repo_copy / "reports/serve.json").read_text()))
        for block in readme_blocks(readme, "python"):
            py = subprocess.run(
                [str(venv / "bin/python"), "-c", block],
                cwd=repo_copy,
                capture_output=True,
                text=True,
                env={k: v for k, v in (os.environ | env).items() if v is not None},
            )
            assert py.returncode == 0, (block, py.stderr[-2000:])

        # the record of the big sweep: queued as written, 13 experiments, removed unrun. A
        # worker of the sweeps above can outlive its drained queue (docs "Experiments") and
        # would start one of them (seen in CI: 12 queued, 1 running): end those first.
        end_queue_workers(repo_copy, grace=10)
        (record,) = [b for b in readme_blocks(readme, "text") if "dvc exp run --queue $T" in b]
        queue = [ln for ln in record.splitlines() if ln.startswith(("T=", "dvc exp run"))]
        _run(" && ".join(queue), repo_copy)
        assert _run("dvc queue status", repo_copy).stdout.count("Queued") == 13
        _run("dvc queue remove --queued", repo_copy)
    finally:
        run("make server-stop", repo_copy, env=env, check=False)
        end_queue_workers(repo_copy, grace=10)


def test_two_full_runs_give_identical_metrics(repo_copy):
    """A forced rerun of whole chains, data stages included, gives byte-identical metrics.
    Two variants (a cell loop, a gated RNN) keep it inside the CI budget; every variant's
    training is deterministic by test_train and the stages do not differ per variant."""
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the full run above")
    names = [f"metrics/{k}/{v}.json" for k in ("train", "eval", "validate") for v in TWO]
    names += ["data/reports/prepare.json", "data/reports/pack.json"]
    first = {name: (repo_copy / name).read_bytes() for name in names}
    out = _run("dvc repro --force " + " ".join(f"validate@{v}" for v in TWO), repo_copy).stdout
    assert "Running stage 'prepare'" in out and "Running stage 'train@gru'" in out
    assert {name: (repo_copy / name).read_bytes() for name in names} == first
    # A checkpoint names its MLflow run, so the retrained ones differ: bring the rest of the
    # pipeline (gradients@, compare) up to date for the tests below.
    _run("dvc repro", repo_copy)
    assert "Data and pipelines are up to date" in _run("dvc status", repo_copy).stdout


TWO = ("rnn_cell_deep", "gru")


def test_push_then_a_fresh_clone_pulls_everything(repo_copy, tmp_path):
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the full run above")
    _run("git add dvc.lock && (git diff --cached --quiet || git commit -qm results)", repo_copy)
    remote = repo_copy.parent / "home/.local/share/rnnflow/dvc-remote"  # the default remote
    assert str(remote) in _run("dvc remote list", repo_copy).stdout
    _run("dvc push", repo_copy)
    assert remote.is_dir() and any(remote.rglob("*"))

    clone = repo_copy.parent / "fresh-clone"
    _run(f"git clone -q {repo_copy} {clone}", repo_copy.parent)
    _run("dvc pull", clone)
    assert "Data and pipelines are up to date" in _run("dvc status", clone).stdout
    for name in ("models/gru/model.onnx", "data/packed/train.npz", "metrics/eval/lstm.json"):
        assert (clone / name).read_bytes() == (repo_copy / name).read_bytes(), name


def _runs(store: Path, query: str) -> list:
    with tracking_at(f"sqlite:///{store}"):
        return mlflow.search_runs(
            experiment_names=["rnnflow"], filter_string=query, output_format="list"
        )


def test_repro_exp_run_and_temp_record_in_the_project_store(repo_copy):
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the full run above")
    head = _run("git rev-parse HEAD", repo_copy).stdout.strip()
    # learning rates no other test uses: a configuration that ran before (e.g. in the README
    # test's queues) is restored from DVC's run-cache, with no new run
    _run("dvc exp run -n ws-lr -S train.lr=0.0111 train@gru", repo_copy)
    _run("dvc exp run --temp -n temp-lr -S train.lr=0.0057 train@gru", repo_copy)
    _run("git checkout params.yaml dvc.lock && dvc checkout -q", repo_copy)
    assert not list((repo_copy / ".dvc/tmp").rglob("mlflow.db")), "a store in a temp workspace"

    store = repo_copy / "mlflow.db"
    plain = _runs(store, "tags.`rnnflow.dvc_exp` = 'workspace' and tags.`rnnflow.variant` = 'gru'")
    assert plain and all(r.info.status == "FINISHED" for r in plain)
    hashes = {r.data.tags["rnnflow.params_hash"] for r in plain}
    for name in ("ws-lr", "temp-lr"):
        (run_,) = _runs(store, f"tags.`rnnflow.dvc_exp` = '{name}'")
        assert run_.info.status == "FINISHED" and run_.info.run_name == f"gru@{name}"
        assert run_.data.tags["rnnflow.baseline_commit"] == head
        assert run_.data.tags["rnnflow.params_hash"] not in hashes
        assert run_.data.params["train.lr"] in ("0.0111", "0.0057")
    assert not _runs(store, "attributes.status != 'FINISHED'")


def test_param_change_reruns_only_what_depends_on_it(repo_copy):
    if not (repo_copy / "dvc.lock").exists():
        pytest.skip("needs the full run above")
    params = yaml.safe_load((repo_copy / "params.yaml").read_text())
    params["tokenize"]["min_freq"] = 3
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run("dvc repro pack", repo_copy).stdout
    assert "Running stage 'tokenize'" in out and "Running stage 'pack'" in out
    assert "Running stage 'prepare'" not in out
    status = _run("dvc status --json", repo_copy).stdout
    assert "train@lstm" in status and "prepare" not in json.loads(status)
    _run("git checkout params.yaml && dvc repro pack", repo_copy)

    # an experiment with word-level tokens runs the data half
    exp = _run("dvc exp run pack -S tokenize.level=word", repo_copy).stdout
    assert "Running stage 'tokenize'" in exp


def test_gradients_stage_follows_training_not_export(repo_copy):
    _needs_pipeline(repo_copy)
    _run("git checkout params.yaml dvc.lock && dvc checkout -q", repo_copy)

    def set_param(section: str, key: str, value) -> None:
        params = yaml.safe_load((repo_copy / "params.yaml").read_text())
        params[section][key] = value
        (repo_copy / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    set_param("export", "opset", 18)
    status = json.loads(_run("dvc status --json", repo_copy).stdout)
    assert "export@gru" in status and not any(s.startswith("gradients@") for s in status)

    _run("git checkout params.yaml", repo_copy)
    set_param("train", "lr", 0.0123)  # not run before: no run-cache restore
    out = _run("dvc repro gradients@gru", repo_copy).stdout
    assert "Running stage 'train@gru'" in out and "Running stage 'gradients@gru'" in out
    assert "export@gru" not in out
    _run("git checkout params.yaml dvc.lock && dvc checkout -q", repo_copy)


def test_stages_run_where_only_python3_is_on_path(repo_copy, tmp_path):
    """Stock Debian and Ubuntu have `python3` and no `python`: `.venv/bin/dvc repro` without
    an activated venv still runs the stages (dvc.yaml says python3; the stage re-executes
    itself with the project's .venv)."""
    _needs_pipeline(repo_copy)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    base = Path(getattr(sys, "_base_executable", sys.executable)).resolve()
    (bin_dir / "python3").symlink_to(base)  # an interpreter without the project's packages
    (bin_dir / "git").symlink_to(shutil.which("git"))
    assert shutil.which("python", path=str(bin_dir)) is None
    venv = repo_copy / ".venv"
    linked = not venv.exists()
    if linked:  # what `make install` creates (the README test may have linked it already)
        venv.symlink_to(Path(sys.executable).parents[1])
    try:
        out = run(
            f"{Path(sys.executable).parent / 'dvc'} repro -f prepare tokenize",
            repo_copy,
            env={"PATH": str(bin_dir), "MLFLOW_TRACKING_URI": None},
        )
    finally:
        if linked:
            venv.unlink()
    assert "Running stage 'prepare'" in out.stdout and "Running stage 'tokenize'" in out.stdout
    assert "prepare: " in out.stdout and "tokenize: " in out.stdout  # the stages' summaries
