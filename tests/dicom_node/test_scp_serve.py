"""The ``serve`` command as a user runs it: start-up line, overrides, port in use, clean SIGTERM."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.support.dcmtk import echoscu
from tests.support.net import free_port
from tests.support.node import NODE_COMMAND, REPO_ROOT, NodeProcess


def test_port_in_use_is_one_clear_line_and_non_zero_exit(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node")
    node.write_config()
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", node.port))
        blocker.listen()
        result = subprocess.run(
            [*NODE_COMMAND, "serve", "--config", str(node.config_path)],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("anatomix-node:")]
    assert len(error_lines) == 1
    assert f"cannot listen on 127.0.0.1:{node.port}" in error_lines[0] and "--port" in error_lines[0]


def test_overrides_start_up_line_and_clean_shutdown(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", scp_processes=2)
    node.add_source("modality", "MODALITY")
    node.write_config()
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    process = subprocess.Popen(
        [*NODE_COMMAND, "serve", "--config", str(node.config_path), "--port", str(port), "--ae-title", "OTHER_AE"],
        cwd=REPO_ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        text = ""
        while "AnatomiX node listening" not in text and time.monotonic() < deadline:
            time.sleep(0.1)
            text = (tmp_path / "serve.log").read_text()
        assert f"AE OTHER_AE, port {port}, 2 SCP process(es), store SQLite" in text
        assert echoscu(port, "MODALITY", "OTHER_AE").returncode == 0
        assert echoscu(port, "MODALITY", "ANATOMIX").returncode != 0  # the configured title is overridden
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        text = (tmp_path / "serve.log").read_text()
        assert "AnatomiX node stopped" in text
        assert "Traceback" not in text and " failed" not in text, text[-3000:]
        with socket.socket() as probe:  # every SCP process is gone: nothing listens on the port
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
            probe.bind(("127.0.0.1", port))
            probe.listen()
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def scp_children(node: NodeProcess) -> set[int]:
    """PIDs of the live SCP processes, from the supervisor's "started" log lines."""
    started = {int(pid) for pid in re.findall(r"SCP process \d+ started \(pid (\d+)\)", node.log_text())}
    return {pid for pid in started if _alive(pid)}


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie; a process reaped between two reads is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "zombie" not in status.lower()


def test_a_killed_scp_process_is_restarted(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "node", scp_processes=2)
    node.add_source("modality", "MODALITY")
    node.start()
    try:
        before = scp_children(node)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            after = scp_children(node)
            if len(after) == 2 and victim not in after:
                break
            time.sleep(0.2)
        assert len(after) == 2 and victim not in after
        assert f"(pid {victim}) exited with status signal SIGKILL; restarting" in node.log_text()
        for _ in range(4):  # both processes accept again
            assert echoscu(node.port, "MODALITY", "ANATOMIX").returncode == 0
    finally:
        node.stop()


def test_serve_accepts_a_private_storage_class_and_the_test_process_stays_unpatched(tmp_path: Path) -> None:
    """The negotiation patch is serve's step: the real node accepts and stores a vendor-private
    class, while this process (which imported and built nothing of the SCP's) negotiates as plain
    pynetdicom."""
    from pynetdicom import AE, _config

    from dicom_node.net import negotiation
    from tests.support.corpus import synthetic_cr

    assert not negotiation.is_installed() and _config.UNRESTRICTED_STORAGE_SERVICE is False
    study = "1.2.826.0.1.3680043.8.498.77"
    ds = synthetic_cr(study, study + ".1.1", sop_class_uid="1.3.12.2.1107.5.9.1")  # Siemens CSA Non-Image
    ds.Modality = "OT"
    path = tmp_path / "private.dcm"
    ds.save_as(path, enforce_file_format=True)
    node = NodeProcess(tmp_path / "node")
    node.add_source("modality", "MODALITY")
    node.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context("1.3.12.2.1107.5.9.1", ["1.2.840.10008.1.2.1"])
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        assoc = ae.associate("127.0.0.1", node.port, ae_title="ANATOMIX")
        assert assoc.is_established
        try:
            assert [str(cx.abstract_syntax) for cx in assoc.accepted_contexts] == ["1.3.12.2.1107.5.9.1"]
            assert assoc.send_c_store(ds).Status == 0x0000
        finally:
            assoc.release()
        assert len(node.spooled_files()) == 1
    finally:
        node.stop()
    assert not negotiation.is_installed()
