"""The stage server: DVC stages run in a warm process that has torch and MLflow imported.

Every DVC stage is a process of its own (`python -m stages.X`). Importing torch costs ~2 s
and MLflow's tracking store ~3 s on 2 cores; a forced `dvc repro` starts 37 stage processes,
so imports used to take more time than most stages' work. The fix is the one Gradle's daemon
and Bazel's server use: one process imports the libraries once and forks a child per stage.

How a stage runs (`stages/__init__.py` calls `hand_over` before anything heavy is imported):
- The process DVC started (the client) connects to the server's Unix socket and sends its
  argv, environment, working directory and standard streams (file descriptors).
- The server forks a supervisor, which forks the stage child. The child takes the client's
  environment, directory, streams and argv, forgets any rnnflow/stages module (each stage
  imports the project's code from the checkout it runs in: a queued experiment's copy has its
  own), runs the stage module as `__main__` and exits with its status.
- The supervisor forwards the client's signals (Ctrl-C, SIGTERM) to the child's process
  group, kills the group if the client dies, and sends back the exit status, with which the
  client exits. DVC sees one process per stage with its command line, deps and outs as before.
- No server yet (first stage, or after it idled out): the client starts one in the
  background and runs the stage itself, cold. The server preloads, then serves until
  RNNFLOW_STAGE_SERVER_IDLE seconds (default 120) pass without a stage.

The server belongs to one interpreter, PYTHONPATH and set of installed packages (the socket's
name hashes them, and this file): `make install` with other packages starts a new one. Forking
after these imports is what PyTorch's DataLoader workers do: the libraries start no Python
thread (checked) and never touch the GPU; their native pools (OpenBLAS, jemalloc) are
fork-aware.
RNNFLOW_STAGE_SERVER=0 runs every stage cold, in its own process (the old way).
`python -m rnnflow.runtime.stageserver status|stop` shows or stops this interpreter's server.

Standard library only: the client side runs before torch is imported.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

ENABLED = "RNNFLOW_STAGE_SERVER"  # "0": every stage runs cold in its own process
IDLE = "RNNFLOW_STAGE_SERVER_IDLE"  # seconds without a stage before the server exits
CHILD = "RNNFLOW_STAGE_CHILD"  # set in a stage child: it must not hand over again
T0 = "RNNFLOW_STAGE_T0"  # when the client started (epoch seconds), for the timeline
# What a stage imports that costs time; rnnflow's own modules are never preloaded.
PRELOAD = (
    "numpy",
    "yaml",
    "pydantic",
    "tqdm",
    "psutil",
    "tokenizers",
    "torch",
    "torch._dynamo",  # imported by every torch.optim optimizer's constructor: ~2 s
    "torch.nn.parallel",
    "torch.onnx",
    "torch.utils.data",
    "onnx",
    "onnxruntime",
    "matplotlib.pyplot",
    "mlflow",
    "mlflow.onnx",
    "mlflow.pyfunc",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.model_registry.sqlalchemy_store",
    "alembic.command",
    "git",  # GitPython: MLflow tags runs with the source commit
)
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
_MAX_MESSAGE = 1 << 20


def process_start_time() -> float:
    """When this process started (epoch seconds, to a clock tick, 10 ms, on Linux): its
    start in ticks since boot against the boot clock now. (/proc/stat's btime would add up
    to a second of error: it is whole seconds.)"""
    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(stat[19])  # field 22, starttime, in clock ticks since boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def with_this_python(env: dict[str, str]) -> dict[str, str]:
    """`env` with this interpreter's folder first on PATH: the `python3 -m stages.X` of
    dvc.yaml then runs in this environment (a venv, or an image's Python)."""
    folder = str(Path(sys.executable).parent)
    return env | {"PATH": os.pathsep.join(p for p in (folder, env.get("PATH", "")) if p)}


def socket_path() -> Path:
    """This interpreter's server socket: one per interpreter, package set and server code."""
    site = Path(sysconfig.get_paths()["purelib"])
    key = "|".join(
        [
            os.path.realpath(sys.executable),
            os.environ.get("PYTHONPATH", ""),
            str(site.stat().st_mtime_ns) if site.exists() else "",
            hashlib.sha256(Path(__file__).read_bytes()).hexdigest(),
        ]
    )
    folder = Path(os.environ.get("TMPDIR", "/tmp"))
    digest = hashlib.sha256(f"{key}|{folder}".encode()).hexdigest()[:16]
    path = folder / f"rnnflow-stages-{os.getuid()}-{digest}.sock"
    if len(os.fsencode(path)) < _SUN_PATH_MAX:
        return path
    # A long TMPDIR: a Unix socket's path holds at most 107 bytes, so the socket goes to a
    # private folder of this user's under /tmp, still one per TMPDIR (it is in the digest).
    return _private_folder(Path("/tmp") / f"rnnflow-{os.getuid()}") / f"stages-{digest}.sock"


_SUN_PATH_MAX = 108  # sockaddr_un.sun_path on Linux, the terminating NUL included


def _private_folder(folder: Path) -> Path:
    """folder, created 0700 if missing; refused unless this user owns it and nobody else
    may enter it (another user could otherwise stand in for the server)."""
    with contextlib.suppress(FileExistsError):
        folder.mkdir(mode=0o700)
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{folder}: not a private folder of this user's; remove it")
    return folder


# ------------------------------------------------------------------------------ the client


def hand_over(module: str) -> None:
    """Run `python -m module` (this process's argv) in the warm server and exit with the
    stage's status. Returns only if the stage should run here, cold: the server is off, this
    is already a stage child, or no server answers (one is then started for later stages)."""
    if os.environ.get(ENABLED, "1") == "0" or os.environ.get(CHILD):
        return
    os.environ.setdefault(T0, f"{process_start_time():.3f}")
    try:
        path = socket_path()
    except OSError:
        return  # no safe place for the socket: run cold
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        _start_server(path)
        return
    with conn:
        umask = os.umask(0o022)
        os.umask(umask)
        request = {
            "module": module,
            "argv": sys.argv[1:],
            "cwd": os.getcwd(),
            "env": dict(os.environ),
            "umask": umask,
        }
        try:
            socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
            started = _read_message(conn)
        except OSError:
            started = None
        if started is None or "pid" not in started:
            return  # the server went away before starting the stage: run it here
        sys.exit(_wait_for_stage(conn))


def _wait_for_stage(conn: socket.socket) -> int:
    """Forward our signals to the stage until its status arrives; return our exit code."""

    def forward(signum, _frame):
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps({"signal": signum}).encode() + b"\n")

    for signum in FORWARDED:
        signal.signal(signum, forward)
    status = _read_message(conn)
    if status is None:
        print("stage server: the stage's supervisor went away", file=sys.stderr)
        return 1
    if "signal" in status:  # died of a signal: do the same, as a cold stage would
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), status["signal"])
        return 128 + status["signal"]
    return int(status["exit"])


def _read_message(conn: socket.socket) -> dict | None:
    """One JSON line from `conn`, or None at end of stream."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = conn.recv(4096)
        if not chunk or len(data) > _MAX_MESSAGE:
            return None
        data += chunk
    return json.loads(data)


def _start_server(path: Path) -> None:
    """Start a server in the background, detached, unless one is starting already."""
    if _locked(path):
        return
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DVC_", "RNNFLOW_STAGE")) or k == IDLE  # the server reads IDLE
    }
    subprocess.Popen(
        [sys.executable, "-m", "rnnflow.runtime.stageserver", "serve"],
        cwd=str(Path(__file__).resolve().parents[2]),  # src/: this checkout's rnnflow
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _locked(path: Path) -> bool:
    """Whether a server holds (or is starting with) the lock of `path`."""
    lock = Path(f"{path}.lock")
    try:
        with open(lock, "rb") as fh:  # not created here: a server removes it when it exits
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    except FileNotFoundError:
        return not os.access(lock.parent, os.W_OK)  # no server could create it: start none
    except OSError:
        return True


def _hold(lock: Path):
    """The lock file `lock`, open and flock-ed by this process, or None when another process
    holds it. A server removes its lock file as it exits, so the file opened may be one just
    removed (its lock then free, but no longer the one others see): then the new one."""
    while True:
        fh = open(lock, "a")  # noqa: SIM115 - held by the caller
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.close()
            return None
        with contextlib.suppress(FileNotFoundError):
            if os.path.samestat(os.fstat(fh.fileno()), lock.stat()):
                return fh
        fh.close()


def _release(lock, path: Path) -> None:
    """Remove the socket and the lock file (still ours: held), then let go of the lock."""
    with contextlib.suppress(OSError):
        if path.is_socket():
            path.unlink()
    with contextlib.suppress(OSError):
        Path(lock.name).unlink()
    lock.close()


# ------------------------------------------------------------------------------ the server


def serve(idle_seconds: float) -> int:
    """Preload, then fork a supervised child per connection until idle for idle_seconds;
    the socket and the lock file go with the server."""
    path, server = socket_path(), os.getpid()
    lock = _hold(Path(f"{path}.lock"))
    if lock is None:
        return 0  # another server owns this socket
    try:
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        return _serve(path, lock, idle_seconds)
    finally:
        if os.getpid() == server:  # not in a forked supervisor
            _release(lock, path)


def _serve(path: Path, lock, idle_seconds: float) -> int:
    os.chdir("/")  # hold no checkout's directory
    base_path = sys.path[1:]  # [0] is src/ of the checkout that started us; then PYTHONPATH
    for name in PRELOAD:
        __import__(name)
    import matplotlib

    matplotlib.use("Agg")
    _warm_mlflow()
    import threading

    if threading.active_count() > 1:
        return 1  # a preloaded library started a Python thread: forking would be unsafe
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(16)
    listener.settimeout(1.0)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped automatically
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    supervisors: set[int] = set()
    last = time.monotonic()
    while True:
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            supervisors = {pid for pid in supervisors if _alive(pid)}
            if not supervisors and time.monotonic() - last > idle_seconds:
                return 0
            continue
        last = time.monotonic()
        pid = os.fork()
        if pid == 0:
            listener.close()
            lock.close()
            _supervise(conn, base_path)  # never returns
        supervisors.add(pid)
        conn.close()


def _warm_mlflow() -> None:
    """MLflow checks a logged model's stated requirements against the installed packages:
    its first check maps every installed distribution to its modules (~1 s, then cached in
    the process). The server's packages are fixed (the socket is keyed on them), so it maps
    them once for every stage it forks."""
    try:
        from mlflow.utils import requirements_utils

        requirements_utils._init_packages_to_modules_map()
    except Exception:  # a private helper of MLflow's: without it, each stage pays once
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _supervise(conn: socket.socket, base_path: list[str]) -> None:
    """In the forked supervisor: start the stage child, relay signals, report its status."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        message, fds, _, _ = socket.recv_fds(conn, _MAX_MESSAGE, 3)
        while not message.endswith(b"\n"):
            chunk = conn.recv(_MAX_MESSAGE)
            if not chunk:
                os._exit(1)
            message += chunk
        request = json.loads(message)
    except (OSError, ValueError):
        os._exit(1)
    child = os.fork()
    if child == 0:
        conn.close()
        _run_stage(request, fds, base_path)  # never returns
    for fd in fds:
        os.close(fd)
    conn.sendall(json.dumps({"pid": child}).encode() + b"\n")
    conn.setblocking(False)
    buffer = b""
    while True:
        pid, status = _poll_child(child)
        if pid:
            break
        try:
            chunk = conn.recv(4096)
        except BlockingIOError:
            time.sleep(0.02)
            continue
        except OSError:
            chunk = b""
        if not chunk:  # the client died: its stage dies with it
            _kill_group(child, signal.SIGKILL)
            status = os.waitpid(child, 0)[1]
            break
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            with contextlib.suppress(ValueError, KeyError):
                _kill_group(child, int(json.loads(line)["signal"]))
    if os.WIFSIGNALED(status):
        reply = {"signal": os.WTERMSIG(status)}
    else:
        reply = {"exit": os.waitstatus_to_exitcode(status)}
    with contextlib.suppress(OSError):
        conn.setblocking(True)
        conn.sendall(json.dumps(reply).encode() + b"\n")
    os._exit(0)


def _poll_child(child: int) -> tuple[int, int]:
    try:
        return os.waitpid(child, os.WNOHANG)
    except ChildProcessError:
        return child, 0


def _kill_group(child: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child, signum)


def _run_stage(request: dict, fds: list[int], base_path: list[str]) -> None:
    """In the stage child: become the client's process (streams, directory, environment,
    argv), run the stage module as __main__, and exit with its status."""
    os.setpgid(0, 0)  # a group of its own: signals reach the stage and what it starts
    for signum in FORWARDED:
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # KeyboardInterrupt, as usual
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    os.chdir(request["cwd"])
    os.umask(request["umask"])
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ[CHILD] = "1"
    time.tzset()  # TZ may differ from the server's
    sys.path[:] = [request["cwd"], *base_path]  # as `python -m` in cwd (same PYTHONPATH)
    for name in [m for m in sys.modules if m.split(".")[0] in ("rnnflow", "stages")]:
        del sys.modules[name]
    # The streams' objects now write to the client's descriptors: buffer as Python would.
    sys.stdout.reconfigure(line_buffering=os.isatty(1))
    import traceback

    code, interrupted = 0, False
    try:
        import runpy

        sys.argv = [request["module"], *request["argv"]]
        runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
    except SystemExit as done:
        code = _exit_code(done.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        import atexit
        import threading

        threading._shutdown()  # what the interpreter does at exit: stop thread pools, join
        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
    if interrupted:  # as Python does after an uncaught KeyboardInterrupt: die of SIGINT
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code)


def _exit_code(code) -> int:
    """What sys.exit(code) makes the process exit with."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr)
    return 1


# ---------------------------------------------------------------------------- the command


def main(argv: list[str] | None = None) -> int:
    """`serve` (started by the first stage), `status`, `stop`."""
    args = sys.argv[1:] if argv is None else argv
    command = args[0] if args else "status"
    try:
        path = socket_path()
    except OSError as err:
        print(f"python -m rnnflow.runtime.stageserver: error: {err}", file=sys.stderr)
        return 1
    if command == "serve":
        return serve(float(os.environ.get(IDLE, "120")))
    if command not in ("status", "stop") or len(args) > 1:
        print(
            f"python -m rnnflow.runtime.stageserver: error: expected status or stop, got "
            f"{' '.join(args)!r}",
            file=sys.stderr,
        )
        return 2
    running = _locked(path)
    if command == "status":
        print(f"stage server {'running' if running else 'not running'} ({path})")
        return 0
    if running:
        pid = _server_pid(path)
        if pid:
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if not _locked(path):
                    break
                time.sleep(0.1)
        print(f"stage server stopped ({path})")
    return 0


def server_pid() -> int | None:
    """The pid of this interpreter's server, while one runs (or starts), else None."""
    try:
        path = socket_path()
    except OSError:
        return None
    return _server_pid(path) if _locked(path) else None


def _server_pid(path: Path) -> int | None:
    """The server's pid, which it writes into the lock file it holds."""
    try:
        return int(Path(f"{path}.lock").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


if __name__ == "__main__":
    sys.exit(main())
