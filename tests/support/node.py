"""Our node as a real subprocess (``python -m dicom_node.cli.main serve``) on a free port with a temp config.

The node runs in its own session (process group), so a test can SIGKILL the supervisor and every
SCP child at once, as a power cut or an OOM kill would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.store import open_store
from dicom_node.store.base import RemoteNode, Store
from tests.support.net import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
READY_LINE = "AnatomiX node listening"
#: The console script's entry point (``python -m dicom_node.cli.main`` would load the CLI module twice,
#: as __main__ and as dicom_node.cli.main, and its UserError would escape as a traceback).
NODE_COMMAND = [sys.executable, "-c", "import sys; from dicom_node.cli.main import main; sys.exit(main())"]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class NodeProcess:
    """One ``anatomix-node serve``. ``settings`` adds/overrides TOML keys per section."""

    workdir: Path
    ae_title: str = "ANATOMIX"
    scp_processes: int = 1
    database_url: str = ""
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        return self.workdir / "var"

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def log_path(self) -> Path:
        return self.workdir / "node.log"

    @property
    def config_path(self) -> Path:
        return self.workdir / "anatomix-node.toml"

    @property
    def url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'anatomix.db').resolve()}"

    def write_config(self) -> Path:
        sections: dict[str, dict[str, Any]] = {
            "node": {"ae_title": self.ae_title, "port": self.port, "bind_address": "127.0.0.1", "scp_processes": self.scp_processes},
            "storage": {"data_dir": str(self.data_dir), "min_free_bytes": 0},
            "database": {"url": self.url},
            "assembly": {"quiet_period_s": 2.0, "poll_interval_s": 0.5},
            "http": {"port": 0},  # no operations API unless a test asks for one (tests.support.api)
        }
        for section, values in self.settings.items():
            sections.setdefault(section, {}).update(values)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text("\n".join(lines))
        return self.config_path

    def open_store(self) -> Store:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        return open_store(self.url)

    def add_source(self, name: str, ae_title: str, **options: Any) -> None:
        store = self.open_store()
        try:
            store.add_remote_node(RemoteNode(name=name, ae_title=ae_title, host="127.0.0.1", port=104, role="source", **options))
        finally:
            store.close()

    def start(self, timeout: float = 60) -> NodeProcess:
        self.write_config()
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [*NODE_COMMAND, "serve", "--config", str(self.config_path)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        )
        start_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"node exited with {self.process.returncode} at start-up:\n{self.log_text()[-3000:]}")
            if READY_LINE in self.log_text()[start_offset:]:
                return self
            time.sleep(0.1)
        raise TimeoutError(f"node did not start in {timeout:.0f} s:\n{self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM (clean shutdown); SIGKILL the group if it does not stop in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        code = self.process.returncode
        self._kill_group()
        self.process = None
        return code

    def kill(self) -> None:
        """SIGKILL the whole node (supervisor and SCP children) at once."""
        if self.process is None:
            return
        self._kill_group()
        self.process.wait(timeout=30)

    def _kill_group(self) -> None:
        assert self.process is not None
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def spooled_files(self) -> list[Path]:
        return sorted(p for p in self.spool_dir.rglob("*.dcm"))

    def temp_files(self) -> list[Path]:
        return sorted((self.spool_dir / ".tmp").glob("*")) if (self.spool_dir / ".tmp").exists() else []


def send_part10_raw(port: int, path: Path, calling: str, called: str = "ANATOMIX", timeout: float = 30) -> int | None:
    """C-STORE a Part 10 file's data set bytes exactly as they are (no parse, no re-encode).

    pynetdicom's chunked mode streams the bytes after the File Meta, whose SOP Class/Instance and
    Transfer Syntax become the request's; so damaged data sets reach the SCP unchanged. Returns the
    DIMSE status, or None when no response came (association aborted, node gone).
    """
    from pynetdicom import AE, _config
    from pynetdicom.dsutils import split_dataset

    meta, _ = split_dataset(path)
    ae = AE(ae_title=calling)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # module-wide switch: tests send from one thread at a time
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=called)
        if not assoc.is_established:
            return None
        try:
            status = assoc.send_c_store(path)
        finally:
            if assoc.is_established:
                assoc.release()
        return int(status.Status) if "Status" in status else None
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
