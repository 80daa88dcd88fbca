"""``anatomix-node demo``: the whole loop once, on one machine, in a few minutes, with nothing to set up.

Embedded defaults (SQLite, filesystem broker), tiny demo weights (generated once, cached in the demo's
data folder), a real chest CR (NEMA WG04 ``RG1_UNCR`` from pydicom-data). The demo plays the PACS:
an in-process pynetdicom AE ``DEMO_PACS`` pushes the image to the node by C-STORE and receives the
results on its own Storage SCP; the node runs as ``anatomix-node serve`` (which starts its worker).
It then writes what came back and a PNG preview, and prints what was found, where the files are and
how long each stage took; while the worker analyses, its progress lines are echoed from the node's log.

The preview: demo weights find nothing (their language model is random, and a looping answer is cut
short), so the burned-in Secondary Capture, which draws findings and the anatomy they are grounded to,
holds no box. ``preview.png`` is drawn instead from the source and the result
(:func:`dicom_node.ops.preview.render_demo_preview`): the 36 anatomy regions where the demo model's
built-in prior puts them, each labelled, under a banner that says they are a prior, not a detection.
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
from inference.result import AnalysisResult
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


#: Lines of the node's log echoed while the demo waits: the worker's model loading and decode progress.
ECHOED_LOGGERS = (" inference.engine: ", " dicom_node.pipeline.worker_report: ")


class LogEcho:
    """Prints the new lines of the node's log that come from :data:`ECHOED_LOGGERS`, without their prefix."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, ""

    def poll(self, started: float) -> None:
        try:
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                chunk = log.read()
        except OSError:
            return
        self.offset += len(chunk)
        text = self.partial + chunk.decode("utf-8", errors="replace")
        *lines, self.partial = text.split("\n")
        for line in lines:
            for logger in ECHOED_LOGGERS:
                if logger in line:
                    print(f"  [{time.monotonic() - started:6.1f} s]     {line.split(logger, 1)[1]}", flush=True)


def wait_for_study(settings: Settings, study_uid: str, pacs: DemoPacs, node: subprocess.Popen, deadline: float, started: float):
    """Poll the state store, print each stage as it is reached (and the worker's progress lines from
    the node's log); return the final StudyRecord."""
    from dicom_node.store import open_store

    store = open_store(settings.database_url)
    seen: set[str] = set()
    echo = LogEcho(settings.storage.data_dir.parent / "node.log")
    try:
        while time.monotonic() < deadline:
            echo.poll(started)
            study = store.get_study(study_uid)
            if study is not None:
                for stage in STAGES + ("failed",):
                    if stage in study.state_times and stage not in seen:
                        seen.add(stage)
                        print(f"  [{time.monotonic() - started:6.1f} s] {stage}", flush=True)
                if study.state in ("done", "failed"):
                    echo.poll(started)
                    return study
            if node.poll() is not None:
                raise UserError(f"the node stopped unexpectedly (status {node.returncode}); see {settings.storage.data_dir.parent / 'node.log'}")
            time.sleep(0.3)
    finally:
        store.close()
    raise UserError(f"the demo did not finish within its time limit; see {settings.storage.data_dir.parent / 'node.log'}")


def write_preview(received: list[Path], out: Path, source: Path, result: AnalysisResult | None) -> Path | None:
    """``preview.png``: for a demo result, the anatomy boxes of the demo prior drawn on the source
    (:func:`dicom_node.ops.preview.render_demo_preview`); otherwise the burned-in Secondary Capture
    as any viewer would show it."""
    from PIL import Image

    from dicom_node.ops.preview import render_demo_preview

    target = out / "preview.png"
    if result is not None and result.model.demo:
        render_demo_preview(pydicom.dcmread(source), result).save(target)
        return target
    for path in received:
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID == SecondaryCaptureImageStorage:
            image = Image.fromarray(ds.pixel_array)
            image.thumbnail((1024, 1024))
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


def load_results(settings: Settings, study) -> list[tuple[str, AnalysisResult | None, str | None]]:
    """(SOP Instance UID, result or None, error) per analysed image of the study's version."""
    from dicom_node.store import open_store

    store = open_store(settings.database_url)
    try:
        analyses = store.list_analyses(study.study_instance_uid, study.version)
    finally:
        store.close()
    return [(r.sop_instance_uid, AnalysisResult.from_json(r.result_json) if r.result_json else None, r.error) for r in analyses]


def print_summary(study, out: Path, received: list[Path], results, preview: Path | None, started: float) -> None:
    print(f"\nStudy {study.study_instance_uid}: {study.state}" + (f" ({study.error})" if study.error else ""))
    for sop_instance_uid, result, error in results:
        if result is None:
            print(f"  image {sop_instance_uid}: failed: {error}")
            continue
        (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
        print(f"  model: {result.model.name} {result.model.version}" + (f"  [{DEMO_MARK}]" if result.model.demo else ""))
        prior = " (where the demo model's built-in prior puts them: not a detection)" if result.model.demo else ""
        print(f"  {len(result.regions)} anatomical regions located{prior}, {len(result.findings)} grounded findings")
        for finding in result.findings[:8]:
            print(f"    - {'DEMO: ' if result.model.demo else ''}{finding.label}: {finding.text[:90]} ({len(finding.boxes)} box(es))")
        if result.answers:
            meaningless = " (random demo weights: meaningless)" if result.model.demo else ""
            print(f"  language model answers{meaningless}: " + ", ".join(f"{a.task} {a.generated_tokens} tokens" for a in result.answers))
        for warning in result.warnings:
            print(f"    ! {warning}")
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
    demo = any(result is not None and result.model.demo for _, result, _ in results)
    if preview and demo:
        print(f"  {preview.relative_to(out)}  <- open this to see the boxes: the anatomy regions of the demo prior, labelled")
        print("      (the burned-in SC sent to the PACS draws findings and their anatomy only; demo weights find none)")
    elif preview:
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
        results = load_results(settings, study)
        result = next((r for _, r, _ in results if r is not None), None)
        preview = write_preview(pacs.received, out, source, result)
        print_summary(study, out, pacs.received, results, preview, started)
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
    """Until the node answers a C-ECHO from the demo PACS (a registered source). A bare TCP probe
    would be logged by the node as a connection closed before association (a WARNING: a port
    scan looks the same); connection refusals while the node starts are not worth a log line here."""
    import logging

    ae = AE(ae_title=DEMO_PACS_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    pynetdicom_log = logging.getLogger("pynetdicom")
    level = pynetdicom_log.level
    pynetdicom_log.setLevel(logging.CRITICAL)
    try:
        while time.monotonic() < deadline:
            if node.poll() is not None:
                raise UserError(f"the node exited at start (status {node.returncode}); see node.log")
            assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AE)
            if assoc.is_established:
                try:
                    status = assoc.send_c_echo()
                finally:
                    assoc.release()
                if status and status.get("Status") == 0x0000:
                    return
            time.sleep(0.2)
    finally:
        pynetdicom_log.setLevel(level)
    raise UserError("the node did not answer a C-ECHO within 60 s; see node.log")


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
