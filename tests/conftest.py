"""Shared fixtures: a small workspace with the data half of the pipeline already run."""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml

from rnnflow.core.config import Params
from rnnflow.data.pack import pack
from rnnflow.data.prepare import prepare
from rnnflow.data.vocab import fit_vocabulary

REPO = Path(__file__).resolve().parents[1]
VARIANTS = ("rnn", "rnn_deep", "rnn_cell", "rnn_cell_deep", "lstm", "gru")


def small_params(**overrides) -> dict:
    """params.yaml content for fast tests: the real file with a small data cap and few epochs."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["data"]["max_per_class"] = 40
    raw["train"]["epochs"] = 2
    raw["model"]["defaults"] |= {"embedding_dim": 16, "hidden_size": 24}
    # a test split of 60-90 texts: one changed answer is 1.1-1.7% of its accuracy
    raw["parity"]["int8_max_drop"] = 0.05
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


@pytest.fixture(autouse=True)
def restored_import_path():
    """sys.path as it was before each test. Loading a raw-text MLflow model puts its code
    folder (a partial copy of the rnnflow package) first on sys.path, where the processes a
    later test spawns (DDP ranks) would find it instead of the real package."""
    saved = sys.path[:]
    yield
    sys.path[:] = saved


@pytest.fixture(scope="session")
def data_workspace(tmp_path_factory) -> Path:
    """A directory where prepare, tokenize and pack have run on a small builtin sample."""
    return data_stages(tmp_path_factory.mktemp("workspace"), small_params())


def data_stages(ws: Path, raw: dict) -> Path:
    """Write `raw` as params.yaml in `ws` and run prepare, tokenize and pack there."""
    params = write_params(ws, raw)
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


def run(cmd: str, cwd: Path, env: dict | None = None, check: bool = True, **kw):
    """Run a shell command with the venv's programs first on PATH; fail with its output.
    `env` adds variables to ours; a None value removes one."""
    proc = subprocess.run(
        cmd, cwd=cwd, env=_with_venv(env), capture_output=True, text=True, shell=True, **kw
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def _with_venv(env: dict | None) -> dict:
    """Our environment with the venv's programs first on PATH, plus `env` (None removes)."""
    merged = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    return {k: v for k, v in (merged | (env or {})).items() if v is not None}


def start_queue(repo: Path, env: dict | None = None, workers: int = 2) -> None:
    """`dvc queue start -j N` with its output in a file, not a pipe: the workers it leaves
    running inherit its output, and a pipe would keep us waiting until the last one exits.
    Seen in CI: a celery worker logged "done" after its queue drained and never exited."""
    log = repo / ".dvc/tmp/queue-start.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        status = subprocess.run(
            f"dvc queue start -j {workers}",
            cwd=repo,
            env=_with_venv(env),
            shell=True,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=120,
        ).returncode
    assert status == 0, f"dvc queue start failed ({status}):\n{log.read_text()}"


def end_queue_workers(repo: Path, grace: float = 30) -> list[int]:
    """After the queue of `repo` drained: give its DVC workers `grace` seconds to exit, then
    SIGKILL those that did not (see start_queue); return the pids that had to be killed.
    The workers are those of the pid files and every `dvc queue start` or `dvc exp
    queue-worker` process working in `repo`: a later `dvc queue start` rewrites the pid
    files, and a worker of an earlier one that outlived its queue (seen in CI) is in none."""
    pids = set(_queue_processes(repo))
    for path in (repo / ".dvc/tmp/exps/celery").glob("dvc-exp-worker-*.pid"):
        try:
            pids.add(int(path.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            continue
    deadline = time.monotonic() + grace
    alive = [pid for pid in pids if _running(pid)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.5)
        alive = [pid for pid in alive if _running(pid)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


def _queue_processes(repo: Path) -> list[int]:
    """The pids of DVC's queue processes (`dvc queue start`, `dvc exp queue-worker`) whose
    working directory is `repo`."""
    where = str(repo.resolve())
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "cwd"]):
        args = " ".join(proc.info["cmdline"] or ())  # None where it cannot be read
        if (" queue-worker " in args or " queue start" in args) and proc.info["cwd"] == where:
            found.append(proc.info["pid"])
    return found


def _running(pid: int) -> bool:
    """A live process (not a zombie) with this pid."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def make_repo_copy(dest: Path, raw_params: dict) -> Path:
    """A git repository at `dest` holding this one's tracked files (no dvc.lock), with
    `raw_params` as params.yaml, committed."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in files:
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    (dest / "dvc.lock").unlink(missing_ok=True)
    (dest / "params.yaml").write_text(yaml.safe_dump(raw_params, sort_keys=False))
    run("git init -q && git add -A && git -c user.name=t -c user.email=t@t commit -qm init", dest)
    return dest


@contextmanager
def tracking_at(uri: str):
    """Point MLflow's fluent API at `uri` for a block. mlflow.set_tracking_uri also writes
    MLFLOW_TRACKING_URI into os.environ, so both are put back afterwards."""
    import mlflow

    before_env, before = os.environ.get("MLFLOW_TRACKING_URI"), mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before)
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",  # we run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # loopback only: no calls home
    "--disable-component-update",
    "--disable-sync",
    "--window-size=2400,1400",  # the runs table renders only the columns in view
)


@contextmanager
def chromium_env():
    """Chromium's environment, with TMPDIR a short folder of its own, removed afterwards.
    Chromium puts its profile lock's socket in an org.chromium.Chromium.* folder there and
    leaves it behind; a Unix socket's path holds at most 107 bytes, too few for pytest's
    tmp_path."""
    folder = tempfile.mkdtemp(prefix="rnnflow-chromium-")
    try:
        yield os.environ | {"TMPDIR": folder}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def browser_text(url: str, profile: Path, budget_ms: int = 20000) -> str:
    """The visible text of `url` after headless Chromium has run its scripts for `budget_ms`
    of virtual time (React pages fetch their data first)."""
    import html
    import re

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium missing: `make test` installs Debian's chromium (make system-deps)")
    flags = [*CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}"]
    with chromium_env() as env:
        out = subprocess.run(
            [chromium, *flags, "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    dom = re.sub(r"<(script|style)[^>]*>.*?</\1>", " ", out.stdout, flags=re.S)
    return html.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", dom)))
