"""A short real ``serve`` session for log checks: one pushed chest CR, analysed with tiny demo
weights and delivered to a local PACS stand-in, then SIGTERM. Used by the admin-log test and by
``benchmarks/admin_log.py`` (the 2-minute session)."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from pathlib import Path

from dicom_node.cli.demo import DEMO_PACS_AE, DemoPacs
from dicom_node.store.base import RemoteNode
from tests.support.workers import NodeSite, make_chest_studies

#: One line of the node's log format (dicom_node.logging_setup.LOG_FORMAT).
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+)\s+\[\d+\] (?P<logger>[^:]+): ")


def count_lines(text: str) -> tuple[Counter, list[str]]:
    """(logger, level) -> number of lines; and the non-empty lines not in the node's log format."""
    counts: Counter = Counter()
    other = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            counts[(match["logger"], match["level"])] += 1
        elif line.strip():
            other.append(line)
    return counts, other


def run_session(root: Path, seconds: float) -> tuple[str, int, str]:
    """Serve for ``seconds`` (at least until the study is finished) with one push.

    Returns (serve log, serve's exit status, the study's final state)."""
    site = NodeSite(root, ae_title="ANATOMIX")
    pacs = DemoPacs(root / "pacs").start()
    site.add_remote(RemoteNode("pacs", DEMO_PACS_AE, "127.0.0.1", pacs.port, role="both", profile="full"))
    started = time.monotonic()
    serve = site.serve()
    try:
        [study] = make_chest_studies(root / "in", 1)
        status = pacs.push(study, site.port)
        assert status == 0, f"C-STORE status 0x{status:04X}"
        [record] = site.wait_for(lambda studies: bool(studies) and studies[0].state in ("done", "failed"), 150, "the study to finish")
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finally:
        serve.send_signal(signal.SIGTERM)  # as systemd (KillMode=mixed) stops it
        serve.wait(timeout=60)
        site.stop()
        pacs.stop()
    return (root / "serve.log").read_text(errors="replace"), serve.returncode, record.state
