"""Session fixtures: a real embedded PostgreSQL and real Prefect servers, never mocks.

- `stack`: embedded PostgreSQL + a Prefect server on database `prefect`, once per session,
  with Prefect's own repair services (cancellation cleanup, late runs) off so that the
  maintenance flows have to do the work. Every test talks to it unless it asks for more.
- `fresh_server`: a factory for an isolated Prefect server on a new database of the same
  PostgreSQL, for tests that count everything in a database.
- `sqlite_server`: a Prefect server on SQLite (Prefect's default backend).
- `use_server(server)`: points the Prefect client and the maintenance settings at a server.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Before Prefect is imported: keep this session's Prefect home and settings to itself.
_SESSION_DIR = Path(tempfile.mkdtemp(prefix="maintenance-tests-"))
os.environ["PREFECT_HOME"] = str(_SESSION_DIR / "client-home")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("XDG_RUNTIME_DIR", str(_SESSION_DIR / "runtime"))
for _name in (
    "MAINTENANCE_DATABASE_URL",
    "PREFECT_API_DATABASE_CONNECTION_URL",
    "PREFECT_SERVER_DATABASE_CONNECTION_URL",
    "PREFECT_API_URL",
):
    os.environ.pop(_name, None)

import pytest  # noqa: E402
from prefect.logging.handlers import APILogWorker  # noqa: E402

from localstack.client import pointed_at  # noqa: E402
from localstack.prefect_versions import venv_python  # noqa: E402
from localstack.stack import PrefectServer, Stack, free_port  # noqa: E402


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    stack = Stack(state_dir=_SESSION_DIR / "stack", port=free_port()).up()
    try:
        yield stack
    finally:
        stack.down()


@contextmanager
def use_server(api_url: str, database_url: str | None) -> Iterator[None]:
    """Point the Prefect client at `api_url` and the maintenance settings at `database_url`."""
    with pointed_at(api_url, database_url):
        try:
            yield
        finally:
            # Send the test's queued flow-run logs while this server still answers;
            # otherwise Prefect's log sender retries a stopped server at exit.
            _drain_logs()


def _drain_logs() -> None:
    """Block until Prefect's log sender has sent what it holds. In a thread of its own,
    because with an event loop running in this thread `drain_all` would return a coroutine."""
    drainer = threading.Thread(target=APILogWorker.drain_all, kwargs={"timeout": 10})
    drainer.start()
    drainer.join(timeout=15)


@pytest.fixture(autouse=True)
def _default_server(request) -> Iterator[None]:
    """Every test talks to the session stack unless it does not need one at all."""
    if "no_stack" in request.keywords:
        yield
        return
    stack = request.getfixturevalue("stack")
    with use_server(stack.api_url, stack.database_url):
        yield


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "no_stack: the test needs no Prefect server")


def pytest_unconfigure(config) -> None:
    """The session's servers and PostgreSQL have stopped: their files go too (about 1 GB a
    process), unless MAINTENANCE_KEEP_TEST_FILES asks to keep them for a post-mortem."""
    if not os.environ.get("MAINTENANCE_KEEP_TEST_FILES"):
        shutil.rmtree(_SESSION_DIR, ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items) -> None:
    """How two test processes (`-n 2 --dist loadgroup`) share the suite: each module stays
    in one process, so that its module-wide server starts once, except that each version of
    a test parametrized by server version (the support matrix) is a group of its own."""
    for item in items:
        group = item.module.__name__
        version = getattr(item, "callspec", None) and item.callspec.params.get("versioned")
        if version:
            group = f"{group}[{version}]"
        item.add_marker(pytest.mark.xdist_group(group))


class ServerFactory:
    """Starts isolated Prefect servers, each on a new database of the session PostgreSQL."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.started: list[tuple[PrefectServer, str]] = []

    def __call__(
        self,
        *,
        services_on: bool = False,
        extra_env: dict[str, str] | None = None,
        version: str | None = None,
    ) -> PrefectServer:
        """A server of this project's Prefect, or of another supported `version` (its own venv)."""
        database = f"prefect_{uuid.uuid4().hex[:10]}"
        self.stack.postgres.create_database(database)
        server = PrefectServer(
            home=_SESSION_DIR / database,
            database_url=self.stack.postgres.url(database),
            port=free_port(),
            services_on=services_on,
            extra_env=extra_env or {},
            **({"python": str(venv_python(version))} if version else {}),
        ).start()
        self.started.append((server, database))
        return server

    def close(self) -> None:
        for server, database in self.started:
            server.stop()
            self.stack.postgres.drop_database(database)
        self.started.clear()


@pytest.fixture
def fresh_server(stack: Stack) -> Iterator[ServerFactory]:
    """Factory: isolated Prefect servers on new databases; stopped and dropped after the test."""
    factory = ServerFactory(stack)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def module_server_factory(stack: Stack) -> Iterator[ServerFactory]:
    """The same, shared by the tests of one module (a server costs about 10 s to start)."""
    factory = ServerFactory(stack)
    yield factory
    factory.close()


@contextmanager
def serving(server: PrefectServer) -> Iterator[PrefectServer]:
    with use_server(server.api_url, server.database_url):
        yield server


@pytest.fixture(scope="module")
def module_server(module_server_factory) -> PrefectServer:
    """One isolated Prefect server (PostgreSQL) for the tests of a module."""
    return module_server_factory()


@pytest.fixture
def on_module_server(module_server) -> Iterator[PrefectServer]:
    """The test talks to its module's server."""
    with serving(module_server) as server:
        yield server


@pytest.fixture
def on_fresh_server(fresh_server) -> Iterator[PrefectServer]:
    """The test talks to its own isolated Prefect server (PostgreSQL)."""
    with serving(fresh_server()) as server:
        yield server


@pytest.fixture(scope="session")
def sqlite_server() -> Iterator[PrefectServer]:
    home = _SESSION_DIR / "sqlite-server"
    home.mkdir(parents=True, exist_ok=True)
    server = PrefectServer(
        home=home, database_url=f"sqlite+aiosqlite:///{home / 'prefect.db'}", port=free_port()
    ).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def on_sqlite_server(sqlite_server: PrefectServer) -> Iterator[PrefectServer]:
    """The test talks to the SQLite-backed Prefect server."""
    with serving(sqlite_server) as server:
        yield server
