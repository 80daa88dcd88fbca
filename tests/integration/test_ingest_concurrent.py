"""Several SCP processes on one port, several senders at once, on SQLite and on PostgreSQL.

Four DCMTK storescu processes each push their own share of one study (and one share twice, from
two senders at the same time) into a node running four SCP processes. Every instance must be
recorded exactly once with exactly one spooled file, whichever process received it; the processes
must actually share the work; the audit has one summary per association.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.corpus import write_synthetic_set
from tests.support.dcmtk import dcmtk, dcmtk_env
from tests.support.node import NodeProcess
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

STUDY = "1.2.826.0.1.3680043.8.498.50"


def push_concurrently(port: int, shares: list[list[Path]]) -> list[int]:
    processes = [
        subprocess.Popen(
            [dcmtk("storescu"), "-aet", "MODALITY", "-aec", "ANATOMIX", "--max-pdu", "131072", "127.0.0.1", str(port), *map(str, share)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
    ]
    return [p.wait(timeout=300) for p in processes]


def run_concurrent_ingest(node: NodeProcess, files: list[Path]) -> None:
    node.add_source("modality", "MODALITY")
    node.start()
    try:
        shares = [files[i::4] for i in range(4)]
        shares.append(shares[0])  # the same instances from a fifth sender at the same time
        assert push_concurrently(node.port, shares) == [0] * 5
        store = node.open_store()
        try:
            instances = store.list_instances(STUDY)
            assert len(instances) == len(files)
            assert len({i.sop_instance_uid for i in instances}) == len(files)
            assert len(node.spooled_files()) == len(files)
            assert node.temp_files() == []
            assert store.get_study(STUDY).instance_count == len(files)
            # The summary row is written once the release has been answered: a sender may exit
            # before its SCP thread has recorded it, so wait (bounded) for all five.
            deadline = time.monotonic() + 30
            summaries = store.list_audit_events("association_released", limit=100)
            while len(summaries) < 5 and time.monotonic() < deadline:
                time.sleep(0.1)
                summaries = store.list_audit_events("association_released", limit=100)
            assert len(summaries) == 5
            assert sum(e.detail["received"] + e.detail["duplicates"] for e in summaries) == len(files) + len(shares[0])
        finally:
            store.close()
        # The work was spread: more than one SCP process logged a finished association.
        pids = set(re.findall(r"\[(\d+)\] dicom_node\.net\.scp: association from MODALITY", node.log_text()))
        assert len(pids) >= 2, f"all associations went to one process: {pids}"
    finally:
        node.stop()


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_synthetic_set(tmp_path_factory.mktemp("set"), 80, study_uid=STUDY)


def test_four_processes_sqlite(tmp_path: Path, files: list[Path]) -> None:
    run_concurrent_ingest(NodeProcess(tmp_path / "node", scp_processes=4), files)


def test_four_processes_postgresql(tmp_path: Path, files: list[Path], postgres_url: str) -> None:
    run_concurrent_ingest(NodeProcess(tmp_path / "node", scp_processes=4, database_url=postgres_url), files)
