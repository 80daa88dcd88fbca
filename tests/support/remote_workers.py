"""An analyze worker "on another host" for tests: its own config, an empty data directory of its own,
no database it could reach, the node's broker, API URL and a worker token, in its own process group.

Also :class:`HttpStallRelay`, a TCP relay in front of the node's HTTP port that holds the first
request whose bytes contain a marker (e.g. the STOW-RS of result objects) after passing a little of
its body: the worker is then mid-upload. ``release()`` drops that connection (the node sees a body
that never ends) and lets every later byte through untouched.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from dicom_node.cli.processes import node_command
from tests.support.workers import DEMO_WEIGHTS_CACHE, REPO, _toml_value

#: A database URL nothing listens on: any attempt of the worker to use a database fails loudly.
NO_DATABASE = "postgresql://nobody@127.0.0.1:9/no-database-on-a-remote-worker?connect_timeout=1"


def tiny_demo_model_dir() -> Path:
    """The session's tiny demo weights (generated once), as a model directory a remote worker loads."""
    from inference.demo_weights import ensure_demo_weights

    return ensure_demo_weights(DEMO_WEIGHTS_CACHE, size="tiny")


@dataclass
class RemoteWorker:
    root: Path
    api_url: str
    token_file: Path
    broker_url: str
    model: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "remote-worker.log"

    def start(self, name: str = "remote-gpu") -> RemoteWorker:
        self.root.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        sections = {
            "storage": {"data_dir": str(self.data_dir)},
            "database": {"url": NO_DATABASE},
            "model": {"dir": str(tiny_demo_model_dir()), "max_new_tokens": 24, **self.model},
            "http": {"port": 0},
        }
        config = self.root / "anatomix-node.toml"
        config.write_text("".join(f"[{s}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()) + "\n" for s, values in sections.items()))
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANATOMIX_") or k.startswith("ANATOMIX_TEST")}
        argv = node_command("worker", "--queues", "analyze", "--name", name, "--config", str(config), "--broker-url", self.broker_url,
                            "--api-url", self.api_url, "--token-file", str(self.token_file))  # fmt: skip
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(argv, cwd=REPO, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the worker and its pool child (its own process group)."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, sig)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


class HttpStallRelay:
    """Relays a TCP port to ``upstream_port``; holds the first request that contains ``marker``."""

    def __init__(self, upstream_port: int, marker: bytes, pass_body_bytes: int = 64 * 1024, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.marker, self.pass_body_bytes = marker, pass_body_bytes
        self.listener = socket.create_server((host, 0))
        self.port = int(self.listener.getsockname()[1])
        self.stalled = threading.Event()
        self.released = threading.Event()
        self._held = False
        self._closed = False
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, name="http-stall-relay", daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self._closed = True
        self.released.set()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            threading.Thread(target=self._pump_requests, args=(client, upstream), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client), daemon=True).start()

    def _take_the_hold(self) -> bool:
        with self._lock:
            if self._held:
                return False
            self._held = True
            return True

    def _pump_requests(self, client: socket.socket, upstream: socket.socket) -> None:
        seen, holding, passed = b"", False, 0
        try:
            while True:
                data = client.recv(16384)
                if not data:
                    break
                if not holding:
                    seen = (seen + data)[-(len(self.marker) + 16384) :]
                    holding = self.marker in seen and self._take_the_hold()
                else:
                    passed += len(data)
                upstream.sendall(data)
                if holding and passed >= self.pass_body_bytes:
                    # The request head and some of its body went through: hold the rest for good.
                    self.stalled.set()
                    self.released.wait()
                    break  # the held request never ends: both sides are dropped
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                target.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)


def wait_for(check, timeout: float, what: str, logs) -> object:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")
        time.sleep(0.3)
