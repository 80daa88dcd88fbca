"""A private Redis (``redis-server`` from the Debian package) on a free loopback port, per test module.

Private, so that a test which restarts Redis cannot disturb any other test. No persistence
(``--save "" --appendonly no``): a restart loses every queued message, which is exactly the fault the
pipeline must survive. If ``redis-server`` is missing the fixture FAILS with how to install it.

Use in a test module::

    from tests.support.redis import redis_server  # noqa: F401 (fixture)
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from tests.support.net import free_port, wait_for_port
from tests.support.processes import stop_process


@dataclass
class RedisServer:
    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: apt-get install redis-server (needed for the production-mode tests)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = open(self.workdir / "redis.log", "ab")
        self.process = subprocess.Popen(
            [binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--protected-mode", "yes"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        wait_for_port(self.port, timeout=20)
        self.client().ping()
        return self

    def stop(self) -> None:
        stop_process(self.process, timeout=10)
        self.process = None

    def restart(self) -> None:
        """Stop and start on the same port: everything queued is gone."""
        self.stop()
        self.start()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    try:
        yield server
    finally:
        server.stop()
