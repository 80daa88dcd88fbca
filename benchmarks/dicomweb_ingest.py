"""DICOMweb ingest benchmark: STOW-RS into the node against C-STORE into the node, and against
Orthanc's STOW-RS (its DICOMweb plugin), the same image set in one run.

    .venv/bin/python benchmarks/dicomweb_ingest.py [--large 10] [--small 200] [--batch 25] [--repeat 2] [--postgres ADMIN_URL]

The set is ``benchmarks/ingest.py``'s (DX 3000x3000x16 bit ~18 MB, and 256x256x16 bit, distinct,
explicit VR little endian). One sender each time, one study:

* C-STORE into the node: DCMTK ``storescu`` over one association (128 KB PDU);
* STOW-RS into the node: ``httpx`` posting ``--batch`` instances per request, the body streamed
  from the files (chunked, 1 MiB reads), with a source token; the node spools each part to a
  temporary file, checks it, fsyncs and renames it, records it, then answers;
* STOW-RS into Orthanc: the same requests to ``/dicom-web/studies`` (Debian orthanc-dicomweb).

Each receiver starts fresh per run (empty spool and database; Orthanc with empty storage), so
nothing is a duplicate. Prints images/s, MB/s and the ratios (the median of ``--repeat`` runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

import httpx  # noqa: E402
from ingest import build_set, drop_postgres_database, fresh_postgres_database, send_concurrently  # noqa: E402

from dicom_node.ops.source_tokens import create_source_token  # noqa: E402
from tests.support.api import api_node, http_url, wait_for_http  # noqa: E402
from tests.support.orthanc import Orthanc  # noqa: E402

BOUNDARY = "anatomix-bench-boundary"
CONTENT_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def multipart_stream(files: list[Path], chunk: int = 1024 * 1024) -> Iterator[bytes]:
    """The files as one multipart/related body, read as it is sent (never whole in memory)."""
    for path in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        with open(path, "rb") as handle:
            while block := handle.read(chunk):
                yield block
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def stow(url: str, files: list[Path], batch: int, headers: dict[str, str]) -> tuple[float, int]:
    """Post the files in batches; (seconds, instances not stored)."""
    failed = 0
    with httpx.Client(timeout=600, headers={"Content-Type": CONTENT_TYPE, "Accept": "application/dicom+json", **headers}) as client:
        started = time.perf_counter()
        for at in range(0, len(files), batch):
            share = files[at : at + batch]
            response = client.post(url, content=multipart_stream(share))
            if response.status_code != 200:
                body = response.json() if response.headers.get("content-type", "").endswith("json") else {}
                failed += len(body.get("00081198", {}).get("Value", [])) or len(share)
                print(f"  {url}: HTTP {response.status_code} {response.text[:300]}", file=sys.stderr)
        return time.perf_counter() - started, failed


def run_node(files: list[Path], workdir: Path, via: str, batch: int, postgres_admin_url: str) -> float:
    node_dir = workdir / f"node-{via}"
    shutil.rmtree(node_dir, ignore_errors=True)
    database_url = fresh_postgres_database(postgres_admin_url) if postgres_admin_url else ""
    node = api_node(node_dir, database_url=database_url, settings={"assembly": {"quiet_period_s": 600.0, "hard_cap_s": 3600.0}})
    node.write_config()
    node.add_source("bench", "BENCH")
    store = node.open_store()
    try:
        token, _ = create_source_token(store, "bench", "benchmark")
    finally:
        store.close()
    node.start()
    try:
        if via == "stow":
            wait_for_http(node)
            seconds, failures = stow(http_url(node) + "/dicomweb/studies", files, batch, {"Authorization": f"Bearer {token}"})
        else:
            seconds, failures = send_concurrently(node.port, node.ae_title, files, 1)
        received = len(node.spooled_files())
    finally:
        node.stop()
        shutil.rmtree(node_dir, ignore_errors=True)
        if database_url:
            drop_postgres_database(postgres_admin_url, database_url)
    if failures or received != len(files):
        print(f"  node {via} run: {failures} failed, {received}/{len(files)} spooled", file=sys.stderr)
    return seconds


def run_orthanc(files: list[Path], workdir: Path, batch: int) -> float:
    directory = workdir / "orthanc"
    shutil.rmtree(directory, ignore_errors=True)
    orthanc = Orthanc(directory).start()
    try:
        seconds, failures = stow(orthanc.url + "/dicom-web/studies", files, batch, {})
        received = len(orthanc.get("/instances"))
    finally:
        orthanc.stop()
        shutil.rmtree(directory, ignore_errors=True)
    if failures or received != len(files):
        print(f"  Orthanc STOW-RS run: {failures} failed, {received}/{len(files)} stored", file=sys.stderr)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=10)
    parser.add_argument("--small", type=int, default=200)
    parser.add_argument("--batch", type=int, default=25, help="instances per STOW-RS request")
    parser.add_argument("--repeat", type=int, default=2, help="runs per receiver; the median is reported")
    parser.add_argument("--postgres", default="", metavar="ADMIN_URL", help="run the node on PostgreSQL (a fresh database per run)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "anatomix-bench-dicomweb")
    args = parser.parse_args()
    if args.workdir.resolve() == REPO_ROOT:
        parser.error("--workdir must not be the repository")
    files = build_set(args.workdir / "set", args.large, args.small)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    store_name = "PostgreSQL" if args.postgres else "SQLite"
    print(f"set: {args.large} large (3000x3000x16 bit) + {args.small} small (256x256x16 bit) = {len(files)} images, {megabytes:.0f} MB")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}, Python {platform.python_version()}")
    print(f"one sender, STOW-RS batches of {args.batch}, node on {store_name}, median of {args.repeat} run(s)")

    receivers = {
        f"anatomix-node C-STORE (storescu, {store_name})": lambda: run_node(files, args.workdir, "cstore", args.batch, args.postgres),
        f"anatomix-node STOW-RS ({store_name})": lambda: run_node(files, args.workdir, "stow", args.batch, args.postgres),
        "Orthanc 1.10 STOW-RS (DICOMweb plugin)": lambda: run_orthanc(files, args.workdir, args.batch),
    }
    seconds: dict[str, float] = {}
    for name, run in receivers.items():
        times = [run() for _ in range(args.repeat)]
        seconds[name] = statistics.median(times)
        print(f"  {name}: {', '.join(f'{t:.2f}' for t in times)} s")

    names = list(receivers)
    cstore, node_stow, orthanc_stow = (seconds[n] for n in names)
    print()
    print("| receiver | images/s | MB/s |")
    print("|---|---:|---:|")
    for name in names:
        print(f"| {name} | {len(files) / seconds[name]:.1f} | {megabytes / seconds[name]:.0f} |")
    print()
    print(f"STOW-RS / C-STORE into the node (throughput ratio): {cstore / node_stow:.2f}")
    print(f"node STOW-RS / Orthanc STOW-RS (throughput ratio): {orthanc_stow / node_stow:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
