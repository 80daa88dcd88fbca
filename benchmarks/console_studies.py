"""Server time of the web console's studies page with 100,000 studies in PostgreSQL.

Fills a fresh database (COPY: studies, four state-history rows and one instance each, the instances pointing at 1,000
real header-only Part 10 files), then serves
the console in-process (the API application with the console mounted, FastAPI's TestClient, a real
login) and times GET /console/studies: the newest page, a page filtered by state, a page filtered
by source, a UID-prefix search and a page deep in the keyset (the 1,000th page's link). Target:
under 300 ms each (issue 11). "first" is the first request of a page (no study header cached).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/console_studies.py [--studies 100000] [--repeat 15]

The server is ANATOMIX_BENCH_POSTGRES_URL (an admin URL, default postgresql://postgres@127.0.0.1:5432/postgres)
when it answers, else a private one started with initdb/pg_ctl (tests.support.postgres).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

STATES = ("done", "done", "done", "done", "failed", "delivering", "queued")


HEADER_FILES = 1000


def write_headers(spool: Path) -> None:
    """HEADER_FILES small Part 10 files (patient ID, accession, date, description, no pixels) that the
    instances point at round-robin: the page reads one header per row, as it does from a real spool."""
    import pydicom
    from pydicom.dataset import FileMetaDataset

    (spool / "bench").mkdir(parents=True, exist_ok=True)
    for i in range(HEADER_FILES):
        ds = pydicom.Dataset()
        ds.PatientID, ds.AccessionNumber, ds.StudyDate, ds.StudyDescription = f"P{i:06d}", f"ACC{i:06d}", "20261130", "CHEST PA"
        ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", f"1.2.826.0.1.3680043.10.1431.9.{i}"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.save_as(spool / "bench" / f"{i}.dcm", enforce_file_format=True)


def fill(url: str, count: int) -> None:
    import psycopg

    now = datetime.now(UTC)
    with psycopg.connect(url) as conn:
        with conn.cursor() as cur:
            with cur.copy(
                "COPY studies (study_instance_uid, version, state, source_ae, created_at, updated_at, last_received_at, error, source_node) FROM STDIN"
            ) as copy:
                for i in range(count):
                    at = now - timedelta(seconds=30 * (count - i))
                    state = STATES[i % len(STATES)]
                    copy.write_row((f"1.2.826.0.1.3680043.10.1431.{i}", 1, state, f"MOD{i % 20}", at, at + timedelta(seconds=20), at,
                                    "pacs: 0/6 sent" if state == "failed" else None, f"modality{i % 20}"))  # fmt: skip
            with cur.copy("COPY study_state_history (study_instance_uid, version, state, entered_at) FROM STDIN") as copy:
                for i in range(count):
                    at = now - timedelta(seconds=30 * (count - i))
                    for step, state in enumerate(("receiving", "stable", "analyzing", STATES[i % len(STATES)])):
                        copy.write_row((f"1.2.826.0.1.3680043.10.1431.{i}", 1, state, at + timedelta(seconds=5 * step)))
            with cur.copy(
                "COPY instances (sop_instance_uid, sop_class_uid, study_instance_uid, series_instance_uid, transfer_syntax_uid, path, size, "
                "sha256, calling_ae, received_at, study_version, state) FROM STDIN"
            ) as copy:
                for i in range(count):
                    at = now - timedelta(seconds=30 * (count - i))
                    copy.write_row((f"1.2.826.0.1.3680043.10.1431.{i}.1.1", "1.2.840.10008.5.1.4.1.1.1", f"1.2.826.0.1.3680043.10.1431.{i}",
                                    f"1.2.826.0.1.3680043.10.1431.{i}.1", "1.2.840.10008.1.2.1", f"bench/{i % HEADER_FILES}.dcm", 1000, f"{i:064x}",
                                    f"MOD{i % 20}", at, 1, "analyzed"))  # fmt: skip
        conn.execute("ANALYZE")
        conn.commit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    from fastapi.testclient import TestClient

    from dicom_node.api import auth
    from dicom_node.console import views
    from dicom_node.settings import DatabaseSettings, Settings, StorageSettings
    from dicom_node.store import open_store
    from dicom_node.web.app import create_app
    from tests.support.postgres import server_from_url, start_private_server

    admin_url = os.environ.get("ANATOMIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    workdir = Path(tempfile.mkdtemp(prefix="anatomix-console-bench-"))
    server = server_from_url(admin_url) or start_private_server(workdir / "pg")
    url = server.create_database()
    try:
        store = open_store(url)  # migrates
        started = time.monotonic()
        fill(url, args.studies)
        print(f"{args.studies} studies in PostgreSQL (COPY) in {time.monotonic() - started:.1f} s")
        settings = replace(Settings(), storage=replace(StorageSettings(), data_dir=workdir / "data"), database=DatabaseSettings(url=url))
        write_headers(settings.storage.spool_dir)
        password = auth.generate_password()
        store.add_api_user(auth.new_user("bench", "viewer", password))
        client = TestClient(create_app(settings, store))
        assert client.post("/api/auth/login", json={"username": "bench", "password": password}).status_code == 200

        # The 1,000th page: follow the keyset of the study that ends page 999 (50 rows a page).
        import psycopg

        with psycopg.connect(url) as conn:
            deep_at, deep_uid = conn.execute(
                "SELECT created_at, study_instance_uid FROM studies ORDER BY created_at DESC, study_instance_uid DESC OFFSET %s LIMIT 1",
                (999 * 50 - 1,),
            ).fetchone()
        cases = {
            "newest page": "/console/studies",
            "state=failed": "/console/studies?state=failed",
            "source=modality7": "/console/studies?source=modality7",
            "uid prefix": "/console/studies?uid=1.2.826.0.1.3680043.10.1431.4242",
            "page 1000 (keyset)": "/console/studies?" + urlencode({"before": f"{deep_at.isoformat()}|{deep_uid}"}),
            "self-update fragment": "/console/studies/rows",
        }
        print(f"{'page':<24} {'first ms':>9} {'median ms':>10} {'max ms':>8}  rows   (first: no header cached yet)")
        for name, path in cases.items():
            views._HEADERS.clear()
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                response = client.get(path)
                times.append((time.perf_counter() - t0) * 1000)
                assert response.status_code == 200, response.text[:500]
            rows = response.text.count("<tr data-study=")
            print(f"{name:<24} {times[0]:>9.1f} {statistics.median(times):>10.1f} {max(times):>8.1f}  {rows}")
        store.close()
    finally:
        server.drop_database(url)
        server.stop()


if __name__ == "__main__":
    main()
