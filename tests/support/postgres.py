"""A real PostgreSQL for tests: a fresh, uniquely named database per test, dropped afterwards.

The server is the one on 127.0.0.1:5432 (or ``ANATOMIX_TEST_POSTGRES_URL``, an admin URL) when it
answers; otherwise a private server is started with ``initdb``/``pg_ctl`` from the PostgreSQL
package on a free port (as the ``postgres`` user when the tests run as root, since PostgreSQL
refuses to run as root). If neither works the tests FAIL with the reason: never a silent skip.

Use in a test module::

    from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from tests.support.net import free_port

DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@dataclass
class PostgresServer:
    """A server we may create databases on. ``data_dir`` is set when we started it ourselves."""

    host: str
    port: int
    user: str = "postgres"
    data_dir: Path | None = None
    run_as: str | None = None

    def url(self, database: str) -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    def admin(self) -> psycopg.Connection:
        return psycopg.connect(self.url("postgres"), autocommit=True, connect_timeout=5)

    def create_database(self) -> str:
        """Create a uniquely named empty database; return its URL."""
        name = f"anatomix_test_{uuid.uuid4().hex[:12]}"
        with self.admin() as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        name = url.rsplit("/", 1)[1]
        with self.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        if self.data_dir is not None:
            _run_pg(self, ["pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop"], check=False)


def server_from_url(admin_url: str) -> PostgresServer | None:
    """The server at admin_url if it accepts connections, else None."""
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            info = conn.info
            return PostgresServer(host=info.host, port=int(info.port), user=info.user)
    except psycopg.OperationalError:
        return None


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    if candidates:
        return Path(candidates[-1]).parent
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def start_private_server(workdir: Path) -> PostgresServer:
    """initdb + pg_ctl start on a free loopback port under workdir; raise RuntimeError saying why not."""
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        raise RuntimeError("initdb not found: install the Debian package postgresql")
    run_as = None
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root: use its own system user
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no 'postgres' user to run a private server as") from None
        run_as = "postgres"
        _allow_traversal(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir, socket_dir = workdir / "pgdata", workdir / "sockets"
    socket_dir.mkdir(exist_ok=True)
    if run_as:
        shutil.chown(workdir, run_as)
        shutil.chown(socket_dir, run_as)
    server = PostgresServer(host="127.0.0.1", port=free_port(), data_dir=data_dir, run_as=run_as)
    _run_pg(server, [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"])
    log = workdir / "postgres.log"
    for attempt in range(3):  # another test may grab the free port between free_port() and bind()
        options = f"-p {server.port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        try:
            _run_pg(server, [str(bin_dir / "pg_ctl"), "-D", str(data_dir), "-o", options, "-l", str(log), "-w", "-t", "60", "start"])
            return server
        except RuntimeError as exc:
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else "(no log)"
            if "already in use" not in tail or attempt == 2:
                raise RuntimeError(f"{exc}; server log: {tail}") from None
            server.port = free_port()
    raise AssertionError("unreachable")


def _allow_traversal(path: Path) -> None:
    """Let the postgres user walk into pytest's temp dirs (pytest-of-root is 0700): add o+x only."""
    for parent in [path, *path.parents]:
        if parent == Path("/tmp") or parent == Path("/"):
            break
        if parent.exists():
            parent.chmod(parent.stat().st_mode | 0o011)


def _run_pg(server: PostgresServer, argv: list[str], check: bool = True) -> None:
    if server.run_as:
        argv = ["runuser", "-u", server.run_as, "--", *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip() or result.stdout.strip()}")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    admin_url = os.environ.get("ANATOMIX_TEST_POSTGRES_URL", DEFAULT_ADMIN_URL)
    server = server_from_url(admin_url)
    if server is not None:
        yield server
        return
    try:
        server = start_private_server(tmp_path_factory.mktemp("postgres"))
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        pytest.fail(
            f"PostgreSQL tests need a server: {admin_url} does not answer and a private one could not be started "
            f"({exc}). Start PostgreSQL or set ANATOMIX_TEST_POSTGRES_URL."
        )
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a fresh, empty database (dropped after the test)."""
    url = postgres_server.create_database()
    try:
        yield url
    finally:
        postgres_server.drop_database(url)
