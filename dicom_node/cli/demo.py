"""``anatomix-node demo``: the whole loop once, on one machine, in a few minutes, with nothing to set up.

Embedded defaults (SQLite, filesystem broker), tiny demo weights (generated once, cached in the demo's
data folder), a real chest CR (NEMA WG04 ``RG1_UNCR`` from pydicom-data). The demo plays the PACS:
an in-process pynetdicom AE ``DEMO_PACS`` pushes the image to the node by C-STORE and receives the
results on its own Storage SCP; the node runs as ``anatomix-node serve`` (which starts its worker).
It then writes what came back, a PNG preview of the burned-in overlay (the Secondary Capture), and
prints what was found, where the files are and how long each stage took.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import Comprehensive3DSRStorage, SecondaryCaptureImageStorage, SegmentationStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from dicom_node.cli.processes import node_command
from dicom_node.ops.errors import UserError
from dicom_node.settings import Settings, load_settings
from dicom_node.store.base import RemoteNode
from sr_writer.identity import DEMO_MARK

DEMO_PACS_AE = "DEMO_PACS"
NODE_AE = "ANATOMIX"
SOURCE_FILE = "RG1_UNCR.dcm"
STAGES = ("receiving", "stable", "queued", "analyzing", "analyzed", "delivering", "done")


@dataclass
class DemoPacs:
    """The demo's stand-in PACS: a Storage SCP on a free loopback port that keeps what it receives."""

    folder: Path
    received: list[Path] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> DemoPacs:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=DEMO_PACS_AE)
        ae.supported_contexts = AllStoragePresentationContexts
        for uid in (Comprehensive3DSRStorage, SegmentationStorage):
            ae.add_supported_context(uid)
        ae.add_supported_context(Verification)
        self.server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = self.server.server_address[1]
        return self

    def _on_store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        name = f"{str(ds.get('Modality', 'OT')).lower()}-{ds.SOPInstanceUID}.dcm"
        path = self.folder / name
        ds.save_as(path, enforce_file_format=True)
        with self._lock:
            self.received.append(path)
        return 0x0000

    def push(self, path: Path, port: int) -> int:
        """C-STORE one file to the node; returns the DIMSE status."""
        ds = pydicom.dcmread(path)
        ae = AE(ae_title=DEMO_PACS_AE)
        ae.add_requested_context(ds.SOPClassUID, [str(ds.file_meta.TransferSyntaxUID)])
        assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
        if not assoc.is_established:
            raise UserError(f"the node did not accept an association on port {port}; see the node log")
        try:
            status = assoc.send_c_store(ds)
            return int(status.Status) if status and "Status" in status else -1
        finally:
            assoc.release()

    def stop(self) -> None:
        self.server.shutdown()


def free_loopback_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_demo_config(folder: Path, port: int, max_new_tokens: int) -> Path:
    config = folder / "anatomix-node.toml"
    config.write_text(
        f"""# Written by `anatomix-node demo`: embedded defaults, tiny demo weights.
[node]
ae_title = "{NODE_AE}"
port = {port}
bind_address = "127.0.0.1"

[storage]
data_dir = "node-data"
min_free_bytes = 0

[queue]
lease_s = 20.0
dispatch_interval_s = 0.5

[assembly]
quiet_period_s = 1.0
poll_interval_s = 0.2

[model]
demo_weights = true
max_new_tokens = {max_new_tokens}

[delivery]
backoff_base_s = 0.5
backoff_max_s = 4.0
"""
    )
    return config


def link_weights_cache(settings: Settings) -> None:
    """Keep the generated demo weights in the user's cache, so a second demo need not generate them."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "anatomix-node" / "demo-models"
    models = settings.storage.data_dir / "models"
    try:
        cache.mkdir(parents=True, exist_ok=True)
        models.parent.mkdir(parents=True, exist_ok=True)
        if not models.exists():
            models.symlink_to(cache, target_is_directory=True)
    except OSError:
        pass  # no writable home: the weights are generated inside the demo folder instead


def register_demo_pacs(settings: Settings, pacs_port: int) -> None:
    from dicom_node.store import open_store

    store = open_store(settings.database_url)
    try:
        if store.get_remote_node("demo-pacs") is not None:
            store.remove_remote_node("demo-pacs")
        store.add_remote_node(RemoteNode("demo-pacs", DEMO_PACS_AE, "127.0.0.1", pacs_port, role="both", profile="full", complete_on_release=True))
    finally:
        store.close()


def wait_for_study(settings: Settings, study_uid: str, pacs: DemoPacs, node: subprocess.Popen, deadline: float, started: float):
    """Poll the state store, print each stage as it is reached; return the final StudyRecord."""
    from dicom_node.store import open_store

    store = open_store(settings.database_url)
    seen: set[str] = set()
    try:
        while time.monotonic() < deadline:
            study = store.get_study(study_uid)
            if study is not None:
                for stage in STAGES + ("failed",):
                    if stage in study.state_times and stage not in seen:
                        seen.add(stage)
                        print(f"  [{time.monotonic() - started:6.1f} s] {stage}", flush=True)
                if study.state in ("done", "failed"):
                    return study
            if node.poll() is not None:
                raise UserError(f"the node stopped unexpectedly (status {node.returncode}); see {settings.storage.data_dir.parent / 'node.log'}")
            time.sleep(0.3)
    finally:
        store.close()
    raise UserError(f"the demo did not finish within its time limit; see {settings.storage.data_dir.parent / 'node.log'}")


def write_preview(received: list[Path], out: Path) -> Path | None:
    """PNG of the burned-in Secondary Capture (the overlay as any viewer would show it)."""
    from PIL import Image

    for path in received:
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID == SecondaryCaptureImageStorage:
            image = Image.fromarray(ds.pixel_array)
            image.thumbnail((1024, 1024))
            target = out / "preview.png"
            image.save(target)
            return target
    return None


def stage_seconds(study) -> list[tuple[str, float]]:
    times = study.state_times
    rows = []
    for first, second in zip(STAGES, STAGES[1:]):
        if first in times and second in times:
            rows.append((f"{first} -> {second}", (times[second] - times[first]).total_seconds()))
    return rows


def print_summary(settings: Settings, study, out: Path, received: list[Path], preview: Path | None, started: float) -> None:
    from dicom_node.store import open_store
    from inference.result import AnalysisResult

    store = open_store(settings.database_url)
    try:
        analyses = store.list_analyses(study.study_instance_uid, study.version)
    finally:
        store.close()
    print(f"\nStudy {study.study_instance_uid}: {study.state}" + (f" ({study.error})" if study.error else ""))
    for record in analyses:
        if record.result_json is None:
            print(f"  image {record.sop_instance_uid}: failed: {record.error}")
            continue
        result = AnalysisResult.from_json(record.result_json)
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        print(f"  model: {result.model.name} {result.model.version}" + (f"  [{DEMO_MARK}]" if result.model.demo else ""))
        print(f"  {len(result.regions)} anatomical regions located, {len(result.findings)} grounded findings")
        for finding in result.findings[:8]:
            print(f"    - {finding.label}: {finding.text[:90]} ({len(finding.boxes)} box(es))")
        if result.report is not None:
            print(f"  impression: {result.report.impression[:160] or '(empty)'}")
        stages = [k for k in ("preprocess", "apm", "retrieval", "prompt", "prefill", "decode", "total") if k in result.timings]
        if stages:
            tokens = result.timings.get("decode_tokens")
            print("  engine: " + ", ".join(f"{k} {result.timings[k]:.2f} s" for k in stages)
                  + (f" ({tokens:.0f} tokens generated)" if tokens else ""))  # fmt: skip
    print("  stages: " + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in stage_seconds(study)))
    print(f"\nFiles in {out}:")
    for path in sorted(received):
        print(f"  {path.relative_to(out)}")
    if preview:
        print(f"  {preview.relative_to(out)}  <- open this to see the boxes")
    print(f"  result.json, node.log\nTotal {time.monotonic() - started:.1f} s")


def run_demo(out: Path | None, max_new_tokens: int = 48, timeout_s: float = 170.0) -> int:
    started = time.monotonic()
    temporary = out is None
    out = (out or Path(tempfile.mkdtemp(prefix="anatomix-demo-"))).resolve()
    out.mkdir(parents=True, exist_ok=True)
    source = Path(get_testdata_file(SOURCE_FILE))
    port = free_loopback_port()
    config = write_demo_config(out, port, max_new_tokens)
    settings = load_settings(config, env={})
    link_weights_cache(settings)
    pacs = DemoPacs(out / "received").start()
    register_demo_pacs(settings, pacs.port)
    print(f"AnatomiX demo: node {NODE_AE} on 127.0.0.1:{port}, demo PACS {DEMO_PACS_AE} on 127.0.0.1:{pacs.port}, output {out}")
    log = open(out / "node.log", "ab")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANATOMIX_")}
    node = subprocess.Popen(node_command("serve", "--config", str(config)), stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)  # fmt: skip
    try:
        _wait_for_node(port, node, started + 60)
        header = pydicom.dcmread(source, stop_before_pixels=True)
        study_uid = str(header.StudyInstanceUID)
        print(f"  pushing {SOURCE_FILE} (real chest CR, {header.Columns} x {header.Rows} pixels, width x height) by C-STORE ...", flush=True)
        status = pacs.push(source, port)
        if status != 0:
            raise UserError(f"the node answered C-STORE with status 0x{status:04X}; see {out / 'node.log'}")
        study = wait_for_study(settings, study_uid, pacs, node, started + timeout_s, started)
        if study.state == "done":
            _wait_for_files(pacs, len(settings.output.profile("full")), started + timeout_s)
        preview = write_preview(pacs.received, out)
        print_summary(settings, study, out, pacs.received, preview, started)
        return 0 if study.state == "done" and preview is not None else 1
    finally:
        _stop(node)
        pacs.stop()
        log.close()
        _tidy(out, settings.storage.data_dir, temporary)


def _folder_mb(folder: Path) -> float:
    """Size of the files in ``folder`` (not behind symlinks: the demo weights cache is shared)."""
    total = 0
    for root, _, files in os.walk(folder):  # does not follow directory symlinks
        total += sum(os.lstat(os.path.join(root, name)).st_size for name in files)
    return total / 1e6


def _tidy(out: Path, node_data: Path, temporary: bool) -> None:
    """The node's own working data (spool copy, database, broker files) is of no use after the demo:
    in a temporary folder it is removed; the results, preview and log stay, and we say where."""
    if temporary and node_data.is_dir():
        shutil.rmtree(node_data, ignore_errors=True)
        print(f"Removed the demo node's working data; the results stay in {out} ({_folder_mb(out):.1f} MB): delete it when done")
    else:
        print(f"Everything, the node's working data in {node_data} too, stays in {out} ({_folder_mb(out):.1f} MB)")


def _wait_for_node(port: int, node: subprocess.Popen, deadline: float) -> None:
    import socket

    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise UserError(f"the node exited at start (status {node.returncode}); see node.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.2)
    raise UserError("the node did not start listening within 60 s; see node.log")


def _wait_for_files(pacs: DemoPacs, count: int, deadline: float) -> None:
    while time.monotonic() < deadline and len(pacs.received) < count:
        time.sleep(0.1)


def _stop(node: subprocess.Popen) -> None:
    """SIGTERM to serve only (as systemd's KillMode=mixed does): it stops its workers in order; the
    process group is killed only if that takes too long."""
    if node.poll() is None:
        node.send_signal(signal.SIGTERM)
        try:
            node.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)
            node.wait()
