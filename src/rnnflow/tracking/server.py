"""A team tracking server on real parts: PostgreSQL (Debian's package) and `mlflow server`.

    make server        # python -m rnnflow.tracking.server start: PostgreSQL + MLflow,
                       # on 127.0.0.1:5000
    make server-stop   # python -m rnnflow.tracking.server stop

PostgreSQL keeps MLflow's runs and registry (initdb into .rnnflow/server/pg, loopback only,
trust auth for the local user `postgres`); `mlflow server` proxies artifacts to
.rnnflow/server/artifacts, so clients need nothing but MLFLOW_TRACKING_URI. Both run in the
background; a second start reuses the data. PostgreSQL refuses to run as root, so as root its
commands run as the `postgres` user (runuser). Tests start the same classes on free ports,
and ScoringServer (`mlflow models serve`) for the served model.
"""

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

from rnnflow.core.cliargs import CliParser, fixed_port, non_empty
from rnnflow.core.errors import RnnflowError, run_cli

SERVER_DIR = Path(".rnnflow/server")
PG_USER = "postgres"
DATABASE = "mlflow"
# Where the cluster goes when running as root and the postgres user cannot reach
# .rnnflow/server/pg (e.g. a clone under /root): a link in .rnnflow/server points there.
PG_FALLBACK = Path("/var/lib/rnnflow")


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for tests and for parallel servers)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def pg_bin(name: str) -> str:
    """A PostgreSQL program: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    if found := shutil.which(name):
        return found
    versions = sorted(
        Path("/usr/lib/postgresql").glob(f"*/bin/{name}"),
        key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0,
    )
    if versions:
        return str(versions[-1])
    raise RnnflowError(
        f"PostgreSQL's {name} not found: install Debian's postgresql package "
        "(apt-get install -y postgresql; make test does it for you)"
    )


def _as_pg_user(cmd: list[str]) -> list[str]:
    return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def _run(cmd: list[str], what: str, timeout: float = 120) -> str:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        raise RnnflowError(f"{what}: no answer in {timeout:.0f} s") from err
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise RnnflowError(f"{what} failed: {detail[-1] if detail else proc.returncode}")
    return proc.stdout


@dataclass
class Postgres:
    """One PostgreSQL cluster in `data`, listening on 127.0.0.1:`port` only."""

    data: Path
    port: int

    @property
    def uri(self) -> str:
        return self.database_uri(DATABASE)

    def database_uri(self, name: str, driver: str = "postgresql") -> str:
        """SQLAlchemy URL of database `name` (MLflow's, or the search's `optuna`)."""
        return f"{driver}://{PG_USER}@127.0.0.1:{self.port}/{name}"

    @property
    def log(self) -> Path:
        return self.data / "server.log"

    def _reachable_by_pg_user(self, path: Path) -> bool:
        if os.geteuid() != 0:
            return True
        # An absolute path: a relative one would be looked up from our working directory,
        # which the child inherits, so the ancestors the postgres user cannot enter (e.g.
        # /root, or pytest's 0700 temp root) would go unchecked.
        probe = (path if path.exists() else path.parent).resolve()
        check = ["runuser", "-u", PG_USER, "--", "test", "-x", str(probe)]
        return subprocess.run(check).returncode == 0

    def init(self) -> None:
        """initdb once; later calls find PG_VERSION and keep the data."""
        if (self.data / "PG_VERSION").exists():
            return
        self.data.parent.mkdir(parents=True, exist_ok=True)
        if not self._reachable_by_pg_user(self.data.parent):
            real = PG_FALLBACK / hashlib.sha256(str(self.data.resolve()).encode()).hexdigest()[:12]
            real.mkdir(parents=True, exist_ok=True)
            PG_FALLBACK.chmod(0o755)
            if self.data.is_symlink():
                self.data.unlink()
            self.data.symlink_to(real)
            print(f"server: {self.data} -> {real} (the postgres user cannot reach this folder)")
        self.data.mkdir(mode=0o700, exist_ok=True)
        if os.geteuid() == 0:
            shutil.chown(self.data.resolve(), PG_USER, PG_USER)
        _run(
            _as_pg_user(
                [
                    pg_bin("initdb"),
                    "-D",
                    str(self.data.resolve()),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ]
            ),
            f"initdb {self.data}",
        )

    def running(self) -> bool:
        status = subprocess.run(
            _as_pg_user([pg_bin("pg_ctl"), "-D", str(self.data.resolve()), "status"]),
            capture_output=True,
        )
        return status.returncode == 0

    def start(self) -> None:
        """Start (initdb first if needed), wait until it accepts connections, create the db."""
        self.init()
        if not self.running():
            if port_in_use(self.port):
                raise RnnflowError(f"PostgreSQL: 127.0.0.1:{self.port} is already in use")
            options = f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories=''"
            _run(
                _as_pg_user(
                    [
                        pg_bin("pg_ctl"),
                        "-D",
                        str(self.data.resolve()),
                        "-l",
                        str(self.log.resolve()),
                        "-w",
                        "-t",
                        "60",
                        "-o",
                        options,
                        "start",
                    ]
                ),
                f"PostgreSQL start (log: {self.log})",
            )
        self.ensure_database(DATABASE)

    def ensure_database(self, name: str) -> None:
        """Create database `name` in the running cluster unless it exists (MLflow's, or the
        search's `optuna`)."""
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                conn = psycopg.connect(
                    host="127.0.0.1",
                    port=self.port,
                    user=PG_USER,
                    dbname="postgres",
                    autocommit=True,
                )
                break
            except psycopg.OperationalError as err:
                if time.monotonic() > deadline:
                    raise RnnflowError(f"PostgreSQL on 127.0.0.1:{self.port}: {err}") from err
                time.sleep(0.3)
        with conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE DATABASE {name}")

    def stop(self) -> None:
        if (self.data / "PG_VERSION").exists() and self.running():
            _run(
                _as_pg_user(
                    [pg_bin("pg_ctl"), "-D", str(self.data.resolve()), "-m", "fast", "-w", "stop"]
                ),
                "PostgreSQL stop",
            )


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1:`port` with a database backend and proxied artifacts."""

    backend: str
    artifacts: Path
    port: int
    log: Path
    workers: int = 2

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        return answers(f"{self.uri}/health")

    def start(self, timeout: float = 180) -> int:
        """Start in the background (own process group) and wait until /health answers."""
        self.artifacts.mkdir(parents=True, exist_ok=True)
        cmd = [
            *("-m", "mlflow", "server", "--backend-store-uri", self.backend),
            *("--serve-artifacts", "--artifacts-destination", self.artifacts.resolve().as_uri()),
            *("--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers)),
        ]
        return start_background("mlflow server", cmd, self.port, self.healthy, self.log, timeout)


@dataclass
class ScoringServer:
    """`mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1:`port`: MLflow's
    own scoring server (uvicorn), in this environment."""

    model_uri: str
    port: int
    log: Path
    tracking_uri: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def healthy(self) -> bool:
        return answers(f"{self.url}/ping")

    def start(self, timeout: float = 120) -> int:
        cmd = [
            *("-m", "mlflow", "models", "serve", "-m", self.model_uri, "--env-manager", "local"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
        ]
        env = {"MLFLOW_TRACKING_URI": self.tracking_uri} if self.tracking_uri else {}
        return start_background(
            "mlflow models serve", cmd, self.port, self.healthy, self.log, timeout, env
        )


def answers(url: str) -> bool:
    """Whether a GET of `url` answers 200 within 2 s."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start_background(
    what: str,
    python_args: list[str],
    port: int,
    ready: Callable[[], bool],
    log_path: Path,
    timeout: float,
    env: dict[str, str] | None = None,
) -> int:
    """Run `python ARGS` in its own process group, output to `log_path`, and wait until
    `ready()`; return its pid. One error with the log's tail if it dies or times out."""
    if port_in_use(port):
        raise RnnflowError(f"{what}: 127.0.0.1:{port} is already in use")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, *python_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=os.environ | (env or {}),
        )
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_group(proc.pid)
            tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
            raise RnnflowError(
                f"{what} did not start on 127.0.0.1:{port} (log {log_path}): " + " | ".join(tail)
            )
        time.sleep(0.3)
    return proc.pid


def stop_group(pid: int, grace: float = 15) -> None:
    """SIGTERM a process group, then SIGKILL what is left after `grace` seconds. A leader
    that is our own child is reaped as it exits (a zombie would keep the group alive)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            with suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            if not _alive(pid):
                return  # only zombies of other parents are left: nothing runs
            time.sleep(0.2)


def _alive(group: int) -> bool:
    """Whether any process of the group still runs (zombies don't)."""
    import psutil

    for proc in psutil.process_iter(["pid"]):
        with suppress(psutil.Error):
            if os.getpgid(proc.pid) == group and proc.status() != psutil.STATUS_ZOMBIE:
                return True
    return False


@dataclass
class TeamServer:
    """The pair, with its ports and the MLflow pid in `dir`/state.json."""

    dir: Path = SERVER_DIR
    port: int = 5000
    pg_port: int = 5433

    @property
    def postgres(self) -> Postgres:
        return Postgres(self.dir / "pg", self.pg_port)

    @property
    def mlflow(self) -> MlflowServer:
        return MlflowServer(
            self.postgres.uri, self.dir / "artifacts", self.port, self.dir / "mlflow.log"
        )

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    def start(self) -> str:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        if self.mlflow.healthy():
            return self.mlflow.uri
        pid = self.mlflow.start()
        self.state_file.write_text(json.dumps(asdict(self) | {"dir": str(self.dir), "pid": pid}))
        return self.mlflow.uri

    @classmethod
    def from_state(cls, directory: Path = SERVER_DIR) -> tuple["TeamServer", int | None]:
        state_file = directory / "state.json"
        if not state_file.exists():
            return cls(directory), None
        state = json.loads(state_file.read_text())
        return cls(Path(state["dir"]), state["port"], state["pg_port"]), state.get("pid")

    def stop(self, pid: int | None) -> None:
        if pid:
            stop_group(pid)
        self.state_file.unlink(missing_ok=True)
        self.postgres.stop()


def main(argv: list[str] | None = None) -> None:
    parser = CliParser(prog="python -m rnnflow.tracking.server", description=__doc__.split("\n")[0])
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--dir", type=non_empty, default=str(SERVER_DIR))
    # string defaults go through `type` too: a bad RNNFLOW_SERVER_PORT is refused by name
    env = {name: os.environ.get(name) for name in ("RNNFLOW_SERVER_PORT", "RNNFLOW_PG_PORT")}
    parser.add_argument("--port", type=fixed_port, default=env["RNNFLOW_SERVER_PORT"] or "5000")
    parser.add_argument("--pg-port", type=fixed_port, default=env["RNNFLOW_PG_PORT"] or "5433")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    args.dir = Path(args.dir)
    if args.action == "start":
        uri = TeamServer(args.dir, args.port, args.pg_port).start()
        print(
            f"server: MLflow at {uri} (PostgreSQL on 127.0.0.1:{args.pg_port}, data in {args.dir})"
        )
        print(f"server: export MLFLOW_TRACKING_URI={uri}")
        return
    server, pid = TeamServer.from_state(args.dir)
    if args.action == "stop":
        server.stop(pid)
        print("server: stopped")
    else:
        up = server.mlflow.healthy()
        print(
            f"server: MLflow {server.mlflow.uri} {'up' if up else 'down'}; "
            f"PostgreSQL {'up' if server.postgres.running() else 'down'}"
        )
        if not up:
            sys.exit(1)


if __name__ == "__main__":
    run_cli(main, "server")
