"""What an admin's ``serve`` log holds: a real node (embedded mode, tiny demo weights) runs for a
while, receives one pushed chest CR, analyses it and delivers the results to a local PACS stand-in,
then stops on SIGTERM. Prints the log's lines counted by logger and level, and the lines that are
not in the node's format (banners, tracebacks).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/admin_log.py --seconds 120 [--keep DIR]
"""

from __future__ import annotations

import argparse
import re
import signal
import tempfile
import time
from collections import Counter
from pathlib import Path

from dicom_node.demo import DEMO_PACS_AE, DemoPacs
from dicom_node.store.base import RemoteNode
from tests.support.workers import NodeSite, make_chest_studies

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (?P<level>[A-Z]+)\s+\[\d+\] (?P<logger>[^:]+): ")


def count_lines(text: str) -> tuple[Counter, list[str]]:
    """(logger, level) -> lines; and the lines not in the node's log format."""
    counts: Counter = Counter()
    other = []
    for line in text.splitlines():
        match = LINE.match(line)
        if match:
            counts[(match["logger"], match["level"])] += 1
        elif line.strip():
            other.append(line)
    return counts, other


def run_session(root: Path, seconds: float) -> str:
    """Serve for ``seconds`` with one push; return the serve log."""
    site = NodeSite(root, ae_title="ANATOMIX")
    pacs = DemoPacs(root / "pacs").start()
    site.add_remote(RemoteNode("pacs", DEMO_PACS_AE, "127.0.0.1", pacs.port, role="both", profile="full"))
    started = time.monotonic()
    serve = site.serve()
    try:
        [study] = make_chest_studies(root / "in", 1)
        status = pacs.push(study, site.port)
        assert status == 0, f"C-STORE status 0x{status:04X}"
        site.wait_for(lambda studies: bool(studies) and studies[0].state in ("done", "failed"), 150, "the study to finish")
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
        site.stop()
        pacs.stop()
    return (root / "serve.log").read_text(errors="replace")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="anatomix-admin-log-"))
    text = run_session(root, args.seconds)
    counts, other = count_lines(text)
    print(f"{sum(counts.values()) + len(other)} lines in {root / 'serve.log'} ({args.seconds:.0f} s, one push)")
    for (logger, level), count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{count:5d}  {level:<8} {logger}")
    if other:
        print(f"{len(other):5d}  lines not in the log format:")
        for line in other[:20]:
            print(f"       {line[:150]}")


if __name__ == "__main__":
    main()
