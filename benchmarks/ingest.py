"""Ingest benchmark: the same image set sent to our node and to DCMTK storescp, 1 and 4 senders.

    .venv/bin/python benchmarks/ingest.py [--large 40] [--small 300] [--senders 1,4] [--processes 4]

The set: ``--large`` DX-sized images (3000x3000, 16 bit, ~18 MB each) and ``--small`` ones
(256x256, 16 bit), all distinct, explicit VR little endian, generated once and cached. Senders are
DCMTK ``storescu`` processes (TCP_NODELAY=1, 128 KB PDU), the set split evenly between them, each
sending its share over one association. Receivers: ``storescp --max-pdu 131072 +xa -od DIR`` and
``anatomix-node serve`` with a fresh spool and SQLite database per run (so nothing is a duplicate).
Note what each receiver does per instance: storescp writes the file; the node writes it, fsyncs
it, renames it, fsyncs the directory and commits a SQLite transaction (synchronous=FULL) before
it answers.

Prints images/s, MB/s and the ratio ours/storescp per sender count. ``--postgres ADMIN_URL`` adds
runs of the node on PostgreSQL (one fresh database per run, dropped afterwards).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian  # noqa: E402

from tests.support.dcmtk import StoreScp, dcmtk, dcmtk_env  # noqa: E402
from tests.support.node import NodeProcess  # noqa: E402

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass(frozen=True)
class Run:
    receiver: str
    senders: int
    images: int
    megabytes: float
    seconds: float
    failures: int

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def make_image(path: Path, study_uid: str, index: int, size: int, rng: np.random.Generator) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPInstanceUID = f"{study_uid}.{index}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = DX_FOR_PRESENTATION, f"{study_uid}.{index}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, f"{study_uid}.0"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.PatientName, ds.PatientID = "Bench^Ingest", "BENCH-1"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 14, 13, 0
    ds.PixelData = rng.integers(0, 1 << 14, size=(size, size), dtype=np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)


def build_set(directory: Path, large: int, small: int) -> list[Path]:
    """The benchmark images, interleaved large/small so every sender gets a similar mix."""
    marker = directory / f"set-{large}-{small}.done"
    large_paths = [directory / f"large_{i:03d}.dcm" for i in range(large)]
    small_paths = [directory / f"small_{i:04d}.dcm" for i in range(small)]
    if not marker.exists():
        directory.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(7)
        study_uid = f"1.2.826.0.1.3680043.8.498.41.{large}.{small}"  # + ".N" stays well under 64 characters
        for i, path in enumerate(large_paths):
            make_image(path, study_uid, i + 1, 3000, rng)
        for i, path in enumerate(small_paths):
            make_image(path, study_uid, large + i + 1, 256, rng)
        marker.touch()
    ordered: list[Path] = []
    step = max(1, small // max(1, large))
    small_iter = iter(small_paths)
    for path in large_paths:
        ordered.append(path)
        ordered += [p for _, p in zip(range(step), small_iter)]
    ordered += list(small_iter)
    return ordered


def send_concurrently(port: int, called: str, files: list[Path], senders: int) -> tuple[float, int]:
    """Run ``senders`` storescu processes over disjoint shares; (seconds, failed sender count)."""
    shares = [files[i::senders] for i in range(senders)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [dcmtk("storescu"), "-aet", "BENCH", "-aec", called, "--max-pdu", "131072", "127.0.0.1", str(port), *map(str, share)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for share in shares
    ]
    failures = 0
    for process in processes:
        _, stderr = process.communicate(timeout=3600)
        if process.returncode != 0 or b"E: " in stderr:
            failures += 1
    return time.perf_counter() - started, failures


def run_storescp(files: list[Path], senders: int, workdir: Path) -> float:
    output = workdir / "storescp-out"
    scp = StoreScp(output).start()
    try:
        seconds, failures = send_concurrently(scp.port, scp.ae_title, files, senders)
    finally:
        scp.stop()
        received = len(list(output.iterdir()))
        shutil.rmtree(output, ignore_errors=True)
    if failures or received != len(files):
        print(f"  storescp run: {failures} sender(s) failed, {received}/{len(files)} received", file=sys.stderr)
    return seconds


def fresh_postgres_database(admin_url: str) -> str:
    """Create an empty database for one run on the server of ``admin_url``; return its URL."""
    import psycopg

    name = f"anatomix_bench_{os.getpid()}_{int(time.time() * 1000)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return admin_url.rsplit("/", 1)[0] + "/" + name


def drop_postgres_database(admin_url: str, url: str) -> None:
    import psycopg

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')


def run_node(files: list[Path], senders: int, processes: int, workdir: Path, postgres_admin_url: str = "") -> float:
    node_dir = workdir / f"node-{processes}-{senders}"
    shutil.rmtree(node_dir, ignore_errors=True)
    database_url = fresh_postgres_database(postgres_admin_url) if postgres_admin_url else ""
    node = NodeProcess(
        node_dir,
        scp_processes=processes,
        database_url=database_url,
        settings={"assembly": {"quiet_period_s": 600.0, "hard_cap_s": 3600.0}},
    )
    node.add_source("bench", "BENCH")
    node.start()
    try:
        seconds, failures = send_concurrently(node.port, node.ae_title, files, senders)
        received = len(node.spooled_files())
    finally:
        node.stop()
        shutil.rmtree(node_dir, ignore_errors=True)
        if database_url:
            drop_postgres_database(postgres_admin_url, database_url)
    if failures or received != len(files):
        print(f"  node run: {failures} sender(s) failed, {received}/{len(files)} spooled", file=sys.stderr)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--large", type=int, default=40)
    parser.add_argument("--small", type=int, default=300)
    parser.add_argument("--senders", default="1,4")
    parser.add_argument("--processes", default="1,4", help="node.scp_processes values to run (comma separated)")
    parser.add_argument(
        "--postgres",
        default="",
        metavar="ADMIN_URL",
        help="also run the node on PostgreSQL (a fresh database per run), e.g. postgresql://postgres@127.0.0.1:5432/postgres",
    )
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "anatomix-bench-ingest")
    args = parser.parse_args()
    if args.workdir.resolve() == REPO_ROOT:
        parser.error("--workdir must not be the repository")
    files = build_set(args.workdir / "set", args.large, args.small)
    megabytes = sum(p.stat().st_size for p in files) / 1e6
    print(f"set: {args.large} large (3000x3000x16 bit) + {args.small} small (256x256x16 bit) = {len(files)} images, {megabytes:.0f} MB")
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")

    runs: list[Run] = []
    for senders in [int(s) for s in args.senders.split(",")]:
        seconds = run_storescp(files, senders, args.workdir)
        runs.append(Run("DCMTK storescp", senders, len(files), megabytes, seconds, 0))
        for processes in [int(p) for p in args.processes.split(",")]:
            seconds = run_node(files, senders, processes, args.workdir)
            label = f"anatomix-node ({processes} SCP process{'es' if processes > 1 else ''}"
            runs.append(Run(f"{label}, SQLite)", senders, len(files), megabytes, seconds, 0))
            if args.postgres:
                seconds = run_node(files, senders, processes, args.workdir, args.postgres)
                runs.append(Run(f"{label}, PostgreSQL)", senders, len(files), megabytes, seconds, 0))

    print()
    print("| receiver | senders | images/s | MB/s | ratio ours/storescp |")
    print("|---|---:|---:|---:|---:|")
    for run in runs:
        reference = next(r for r in runs if r.senders == run.senders and r.receiver == "DCMTK storescp")
        ratio = "" if run is reference else f"{run.images_per_s / reference.images_per_s:.2f}"
        print(f"| {run.receiver} | {run.senders} | {run.images_per_s:.1f} | {run.mb_per_s:.0f} | {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
