"""Real node processes for pipeline tests: a config file, ``anatomix-node serve`` and ``worker`` subprocesses.

:class:`NodeSite` writes one ``anatomix-node.toml`` (small quiet period, short leases, tiny demo
weights, few tokens) and starts the processes a site would run. Logs go to files in the site's
folder and are printed when a test fails (``site.logs()``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node.cli.processes import node_command
from dicom_node.settings import Settings, load_settings
from dicom_node.store import open_store
from dicom_node.store.base import RemoteNode, Store, StudyRecord
from tests.support.net import free_port, wait_for_port

REPO = Path(__file__).resolve().parents[2]
#: Where the tiny demo weights are generated once for the whole test session (shared by sites).
DEMO_WEIGHTS_CACHE = Path(os.environ.get("ANATOMIX_TEST_DEMO_CACHE", "/tmp/anatomix-test-demo-weights"))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


@dataclass
class NodeSite:
    """One node installation in ``root``: config, data dir, and the processes started for it."""

    root: Path
    database_url: str = ""
    broker_url: str = ""
    ae_title: str = "NODE"
    port: int = field(default_factory=free_port)
    demo_weights: bool = True
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path = self.root / "anatomix-node.toml"
        sections: dict[str, dict[str, Any]] = {
            "node": {"ae_title": self.ae_title, "port": self.port, "bind_address": "127.0.0.1"},
            "storage": {"data_dir": str(self.root / "data"), "min_free_bytes": 0},
            "database": {"url": self.database_url},
            "queue": {"broker_url": self.broker_url, "lease_s": 6.0, "dispatch_interval_s": 0.5},
            "assembly": {"quiet_period_s": 1.0, "hard_cap_s": 60.0, "poll_interval_s": 0.2},
            "model": {"demo_weights": self.demo_weights, "max_new_tokens": 24},
            "delivery": {"max_attempts": 30, "backoff_base_s": 0.5, "backoff_max_s": 2.0, "timeout_s": 10.0},
            "http": {"port": 0},  # no operations API in these sites
        }
        for name, values in self.overrides.items():
            sections.setdefault(name, {}).update(values)
        lines = []
        for name, values in sections.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
            lines.append("")
        self.config_path.write_text("\n".join(lines))
        self.settings: Settings = load_settings(self.config_path, env={})
        # Tiny demo weights are generated once per test session, then linked into each site.
        models = self.settings.storage.data_dir / "models"
        models.parent.mkdir(parents=True, exist_ok=True)
        DEMO_WEIGHTS_CACHE.mkdir(parents=True, exist_ok=True)
        if not models.exists():
            models.symlink_to(DEMO_WEIGHTS_CACHE, target_is_directory=True)

    # ---- state -----------------------------------------------------------------------------------
    def store(self) -> Store:
        return open_store(self.settings.database_url)

    def add_remote(self, node: RemoteNode) -> None:
        store = self.store()
        try:
            store.add_remote_node(node)
        finally:
            store.close()

    def studies(self) -> list[StudyRecord]:
        store = self.store()
        try:
            return store.list_studies()
        finally:
            store.close()

    def wait_for(self, predicate: Callable[[list[StudyRecord]], bool], timeout: float, what: str) -> list[StudyRecord]:
        deadline = time.monotonic() + timeout
        studies: list[StudyRecord] = []
        while time.monotonic() < deadline:
            studies = self.studies()
            if predicate(studies):
                return studies
            self.check_alive()
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; studies: "
                             f"{[(s.study_instance_uid[-12:], s.version, s.state, s.error) for s in studies]}\n{self.logs()}")  # fmt: skip

    # ---- processes -------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env = {k: v for k, v in env.items() if not k.startswith("ANATOMIX_") or k.startswith("ANATOMIX_TEST")}
        process = subprocess.Popen(
            node_command(*argv, "--config", str(self.config_path)),
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        process.log_name = name  # type: ignore[attr-defined]
        self.processes.append(process)
        return process

    def serve(self) -> subprocess.Popen:
        process = self._spawn("serve", ["serve"])
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise AssertionError(f"serve exited with {process.returncode}\n{self.logs()}")
            try:
                wait_for_port(self.port, timeout=0.5)
                return process
            except TimeoutError:
                continue
        raise AssertionError(f"serve did not listen on {self.port} within 60 s\n{self.logs()}")

    def worker(self, queues: str = "analyze,deliver", name: str | None = None) -> subprocess.Popen:
        argv = ["worker", "--queues", queues]
        if name:
            argv += ["--name", name]
        return self._spawn(name or f"worker-{queues.replace(',', '+')}-{len(self.processes)}", argv)

    def check_alive(self) -> None:
        for process in self.processes:
            if getattr(process, "expected_exit", False):
                continue
            if process.poll() is not None and process.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                raise AssertionError(f"{process.log_name} exited with {process.returncode}\n{self.logs()}")  # type: ignore[attr-defined]

    def kill(self, process: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        """Signal the process and its children (its own session), e.g. SIGKILL mid-inference."""
        process.expected_exit = True  # type: ignore[attr-defined]
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            pass
        process.wait(timeout=30)

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.expected_exit = True  # type: ignore[attr-defined]
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        # Leftovers of a killed group (e.g. an embedded worker of a killed serve).
        for process in self.processes:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def logs(self, tail: int = 4000) -> str:
        parts = []
        for path in sorted(self.root.glob("*.log")):
            text = path.read_text(errors="replace")
            parts.append(f"----- {path.name} -----\n{text[-tail:]}")
        return "\n".join(parts)


def make_chest_studies(folder: Path, count: int, shrink: int = 4, source: Path | None = None) -> list[Path]:
    """``count`` single-image studies made from the real chest CR RG1, each with new UIDs.

    The pixels are subsampled by ``shrink`` (RG1 is 1955x1841, 7 MB) so that sending many studies is
    quick; the model sees a 1024x1024 letterbox either way.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    template = pydicom.dcmread(source or get_testdata_file("RG1_UNCR.dcm"))
    pixels = template.pixel_array[::shrink, ::shrink].copy()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        ds = template.copy()
        ds.Rows, ds.Columns = pixels.shape
        ds.PixelData = pixels.tobytes()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.AccessionNumber = f"ACC{index:04d}"
        path = folder / f"study-{index:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, called_ae: str, files: list[Path], calling_ae: str = "MODALITY") -> None:
    """Send files with DCMTK's storescu (one association), raising with its output on failure."""
    done = subprocess.run(
        ["storescu", "-aet", calling_ae, "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)],
        env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"storescu failed ({done.returncode}): {done.stderr[-2000:]}")
