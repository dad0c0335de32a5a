"""The warm stage server runs a stage as the stage's own process would: argv, environment,
directory, streams, exit status, signals, the checkout's own code, and death with its client."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import REPO

PROBE = '''"""A stage that reports how it ran."""
import json, os, sys, time
from rnnflow import marker

if __name__ == "__main__":
    args = sys.argv[1:]
    print(json.dumps({"argv": args, "cwd": os.getcwd(), "pid": os.getpid(),
                      "child": os.environ.get("RNNFLOW_STAGE_CHILD"), "marker": marker.VALUE,
                      "probe": os.environ.get("PROBE"), "torch": "torch" in sys.modules}))
    sys.stdout.flush()
    print("to stderr", file=sys.stderr)
    if args and args[0] == "sleep":
        open("started", "w").close()
        time.sleep(60)
    if args and args[0] == "raise":
        raise ValueError("boom")
    sys.exit(int(args[0]) if args and args[0].isdigit() else 0)
'''


def checkout(root: Path, marker: str) -> Path:
    """A minimal project: the real stages/ and src/rnnflow, plus a probe stage and a module
    whose value differs per checkout."""
    shutil.copytree(REPO / "stages", root / "stages", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(
        REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    (root / "stages/probe.py").write_text(PROBE)
    (root / "src/rnnflow/marker.py").write_text(f"VALUE = {marker!r}\n")
    return root


@pytest.fixture
def server_env(tmp_path):
    """A private server (its socket under a private TMPDIR), stopped afterwards."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = _server_env(tmp)
    yield env
    subprocess.run(
        [sys.executable, "-m", "rnnflow.runtime.stageserver", "stop"], env=env, cwd=REPO / "src"
    )


def _server_env(tmpdir: Path) -> dict:
    """This environment with the stage server on, idling 60 s, its socket under tmpdir."""
    env = os.environ | {
        "TMPDIR": str(tmpdir),
        "RNNFLOW_STAGE_SERVER": "1",
        "RNNFLOW_STAGE_SERVER_IDLE": "60",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    env.pop("RNNFLOW_STAGE_CHILD", None)
    return env


def probe(cwd: Path, env: dict, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "stages.probe", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


def warm(cwd: Path, env: dict) -> None:
    """Run once cold (it starts the server), then wait until the server answers."""
    import json

    probe(cwd, env)
    for _ in range(200):
        out = probe(cwd, env)
        if json.loads(out.stdout.splitlines()[0])["child"] == "1":
            return
        time.sleep(0.2)
    pytest.fail("the stage server never came up")


def test_a_stage_runs_in_the_server_as_it_would_alone(tmp_path, server_env):
    import json

    a = checkout(tmp_path / "a", "checkout a")
    warm(a, server_env)
    out = probe(a, server_env | {"PROBE": "x y"}, "0", "--flag", "é")
    report = json.loads(out.stdout.splitlines()[0])
    assert out.returncode == 0 and report["child"] == "1"
    assert report["argv"] == ["0", "--flag", "é"] and report["cwd"] == str(a)
    assert report["probe"] == "x y" and report["marker"] == "checkout a"
    assert report["torch"]  # preloaded: the stage found torch imported already
    assert out.stderr.strip() == "to stderr"
    # exit statuses as Python gives them: a code, sys.exit, an uncaught exception
    assert probe(a, server_env, "3").returncode == 3
    raised = probe(a, server_env, "raise")
    assert raised.returncode == 1 and "ValueError: boom" in raised.stderr

    # another checkout served by the same server runs its own code, not the first one's
    b = checkout(tmp_path / "b", "checkout b")
    report = json.loads(probe(b, server_env).stdout.splitlines()[0])
    assert report["child"] == "1" and report["marker"] == "checkout b" and report["cwd"] == str(b)


def test_signals_reach_the_stage_and_it_dies_with_its_client(tmp_path, server_env):
    import json

    a = checkout(tmp_path / "a", "a")
    warm(a, server_env)

    def start():
        (a / "started").unlink(missing_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "stages.probe", "sleep"],
            cwd=a,
            env=server_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(300):
            if (a / "started").exists():
                break
            time.sleep(0.05)
        return proc, json.loads(proc.stdout.readline())["pid"]

    proc, stage = start()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == -signal.SIGTERM  # the stage died of it; so did we
    _gone(stage)

    proc, stage = start()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) == -signal.SIGINT  # an uncaught KeyboardInterrupt, as alone
    assert "KeyboardInterrupt" in proc.stderr.read()
    _gone(stage)

    proc, stage = start()
    proc.kill()  # the client dies without a word: its stage must not train on
    proc.wait(timeout=20)
    _gone(stage)


def _gone(pid: int) -> None:
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    pytest.fail(f"stage process {pid} still runs")


def test_off_means_every_stage_runs_in_its_own_process(tmp_path, server_env):
    import json

    a = checkout(tmp_path / "a", "a")
    off = server_env | {"RNNFLOW_STAGE_SERVER": "0"}
    out = probe(a, off, "4")
    assert out.returncode == 4 and json.loads(out.stdout.splitlines()[0])["child"] is None
    status = subprocess.run(
        [sys.executable, "-m", "rnnflow.runtime.stageserver", "status"],
        env=off,
        cwd=a / "src",
        capture_output=True,
        text=True,
    )
    assert "not running" in status.stdout  # and none was started


def test_a_server_leaves_nothing_behind(tmp_path):
    """Its socket and its lock file go with it, whether it idles out (after
    RNNFLOW_STAGE_SERVER_IDLE seconds) or is stopped. Each interpreter and package set gets
    a server of its own, so lock files left behind piled up in /tmp, one per venv and
    install."""
    tmp = tmp_path / "tmpdir"
    tmp.mkdir()
    env = _server_env(tmp) | {"RNNFLOW_STAGE_SERVER_IDLE": "5"}
    status = [sys.executable, "-m", "rnnflow.runtime.stageserver", "status"]
    stop = [*status[:-1], "stop"]

    def server(command: list[str]) -> bytes:
        return subprocess.run(command, env=env, cwd=REPO / "src", capture_output=True).stdout

    # in TMPDIR, or under /tmp/rnnflow-UID/ when TMPDIR's path is too long for a socket
    socket = Path(server(status).decode().split("(")[-1].rstrip(")\n"))
    files = [socket, Path(f"{socket}.lock")]

    def left() -> list[Path]:
        return [f for f in files if f.exists()]

    a = checkout(tmp_path / "a", "a")
    warm(a, env)  # served: the socket and the lock file are there
    assert left() == files
    for _ in range(300):  # idle for 5 s, then gone
        if not left():
            break
        time.sleep(0.2)
    assert left() == []
    warm(a, env | {"RNNFLOW_STAGE_SERVER_IDLE": "60"})
    assert b"stage server stopped" in server(stop) and left() == []
    assert b"not running" in server(status) and left() == []  # asking creates nothing


def test_a_long_tmpdir_still_gets_a_server(tmp_path):
    """A Unix socket's path holds at most 107 bytes: under a longer TMPDIR the socket moves
    to a private folder under /tmp, one per TMPDIR, and stages are still served warm."""
    import json

    long = tmp_path / ("t" * 60) / ("m" * 60)
    long.mkdir(parents=True)
    env = _server_env(long)
    status = [sys.executable, "-m", "rnnflow.runtime.stageserver", "status"]
    where = subprocess.run(status, env=env, cwd=REPO / "src", capture_output=True, text=True)
    path = where.stdout.split("(")[-1].rstrip(")\n")
    assert len(os.fsencode(path)) < 108 and path.startswith(f"/tmp/rnnflow-{os.getuid()}/")
    assert os.stat(Path(path).parent).st_mode & 0o777 == 0o700
    other = subprocess.run(
        status,
        env=env | {"TMPDIR": str(long.parent)},
        cwd=REPO / "src",
        capture_output=True,
        text=True,
    )
    assert path not in other.stdout  # another TMPDIR, another server
    try:
        a = checkout(tmp_path / "a", "long")
        warm(a, env)
        report = json.loads(probe(a, env).stdout.splitlines()[0])
        assert report["child"] == "1" and report["marker"] == "long"
    finally:
        subprocess.run(status[:-1] + ["stop"], env=env, cwd=REPO / "src")
