"""State-store throughput: record_instance (the SCP's per-instance commit) on SQLite and PostgreSQL.

Each of P processes records N instances (10 studies, interleaved) through its own connection,
as the SCP processes do; then one process reads the study list like the assembly loop does.
Prints a table of instances/s. PostgreSQL: ANATOMIX_BENCH_POSTGRES_URL (an admin URL; a scratch
database is created and dropped), default postgresql://postgres@127.0.0.1:5432/postgres.

    .venv/bin/python benchmarks/store.py [--instances 400] [--processes 1 4]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import psycopg

from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord


def record_batch(url: str, worker: int, count: int, start: multiprocessing.Event) -> None:
    store = open_store(url, migrate=False)
    start.wait()
    for n in range(count):
        study = f"1.2.826.0.1.3680043.10.1431.99.{n % 10}"
        store.record_instance(InstanceRecord(
            sop_instance_uid=f"{study}.{worker}.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid=study,
            series_instance_uid=study + ".1", transfer_syntax_uid="1.2.840.10008.1.2.1", path=f"{worker}/{n}.dcm",
            size=1000, sha256=f"{worker:032x}{n:032x}", calling_ae="BENCH", received_at=datetime.now(UTC),
        ))  # fmt: skip
    store.close()


def measure(url: str, processes: int, instances: int) -> tuple[float, float]:
    """(instances/s recording, milliseconds for one list_studies) on a freshly migrated database."""
    open_store(url).close()
    context = multiprocessing.get_context("fork")
    start = context.Event()
    workers = [context.Process(target=record_batch, args=(url, w, instances // processes, start)) for w in range(processes)]
    for worker in workers:
        worker.start()
    time.sleep(1.0)  # let every worker connect first
    began = time.perf_counter()
    start.set()
    for worker in workers:
        worker.join()
    elapsed = time.perf_counter() - began
    if any(w.exitcode != 0 for w in workers):
        raise SystemExit(f"a worker failed on {url}")
    store = open_store(url, migrate=False)
    store.ping()  # connect first: time the query, not the connection
    t0 = time.perf_counter()
    store.list_studies()
    listing_ms = (time.perf_counter() - t0) * 1000
    store.close()
    return (instances // processes) * processes / elapsed, listing_ms


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=400)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    admin_url = os.environ.get("ANATOMIX_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes in args.processes:
            url = f"sqlite:///{Path(tmp) / f'bench-{processes}.db'}"
            rows.append(("SQLite (WAL, synchronous=FULL)", processes, *measure(url, processes, args.instances)))
            url = f"sqlite:///{Path(tmp) / f'bench-{processes}-normal.db'}?synchronous=normal"
            rows.append(("SQLite (WAL, synchronous=NORMAL)", processes, *measure(url, processes, args.instances)))
            name = f"anatomix_bench_{uuid.uuid4().hex[:8]}"
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{name}"')
            try:
                pg_url = admin_url.rsplit("/", 1)[0] + "/" + name
                rows.append(("PostgreSQL", processes, *measure(pg_url, processes, args.instances)))
            finally:
                with psycopg.connect(admin_url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"record_instance, {args.instances} instances in 10 studies, {os.cpu_count()} CPUs")
    print(f"{'backend':32} {'processes':>9} {'instances/s':>12} {'list_studies ms':>16}")
    for backend, processes, rate, listing_ms in rows:
        print(f"{backend:32} {processes:>9} {rate:>12.0f} {listing_ms:>16.1f}")


if __name__ == "__main__":
    main()
