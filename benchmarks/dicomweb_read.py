"""The node as a DICOMweb source against Orthanc's DICOMweb plugin, in one run, as ratios (node / Orthanc).

One study of ``--instances`` synthetic CR images (16-bit, ``--size`` px square, Explicit VR Little Endian)
is held by the node (spooled and recorded through the store, SQLite, its HTTP service under uvicorn in its
own spawned process, as ``serve`` runs it) and uploaded to Orthanc (Debian package, DICOMweb plugin). The
same client (httpx, one connection, the body read to the end) then times, alternating between the two,
``--repeat`` times each, the median:

* ``retrieve study``: WADO-RS ``multipart/related; type="application/dicom"; transfer-syntax=*``;
* ``series metadata``: WADO-RS ``.../metadata`` (what OHIF reads first);
* ``frame``: one frame, ``transfer-syntax=*`` (what OHIF's image loader asks for);
* ``search studies``: QIDO-RS by PatientID (among ``--studies`` other small studies the node holds).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/dicomweb_read.py [--instances 20] [--size 1024] [--studies 200] [--repeat 7]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx

ROOT_UID = "1.2.826.0.1.3680043.10.1431.66"


def serve_node(data_dir: str, db: str, port: int) -> None:
    """The node's HTTP service in a spawned process (as dicom_node.web.server.http_main does)."""
    import uvicorn

    from dicom_node.settings import Settings, StorageSettings
    from dicom_node.store import open_store
    from dicom_node.web.app import create_app

    settings = replace(Settings(), storage=replace(StorageSettings(), data_dir=Path(data_dir)))
    store = open_store(f"sqlite:///{db}")
    uvicorn.run(create_app(settings, store), host="127.0.0.1", port=port, log_level="warning", access_log=False, lifespan="off")


def wait_http(url: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(url, timeout=2)
            return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise TimeoutError(url)


def timed(client: httpx.Client, url: str, accept: str, repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        with client.stream("GET", url, headers={"Accept": accept}) as answer:
            assert answer.status_code == 200, (url, answer.status_code, answer.read()[:300])
            for _chunk in answer.iter_bytes():
                pass
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=20)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()

    from dicom_node.api import auth
    from dicom_node.settings import Settings, StorageSettings
    from dicom_node.store import open_store
    from tests.support.corpus import synthetic_cr
    from tests.support.held_studies import part10, receive
    from tests.support.net import free_port
    from tests.support.orthanc import DICOMWEB_PLUGIN, Orthanc

    work = Path(tempfile.mkdtemp(prefix="dicomweb-read-"))
    settings = replace(Settings(), storage=replace(StorageSettings(), data_dir=work / "data"))
    store = open_store(f"sqlite:///{work / 'state.db'}")
    store.add_api_user(auth.new_user("bench", "viewer", auth.generate_password()))
    token = auth.new_secret(auth.TOKEN_PREFIX)
    store.add_api_token("bench", "bench", auth.secret_hash(token), store.get_api_user("bench").created_at)
    study = f"{ROOT_UID}.1"
    files = []
    for i in range(args.instances):
        ds = synthetic_cr(study, f"{study}.2.{i + 1}", rows=args.size, columns=args.size, seed=i)
        ds.PatientID = "BENCH-1"
        receive(store, settings, ds)
        files.append(part10(ds))
    for j in range(args.studies):
        other = f"{ROOT_UID}.{j + 2}"
        ds = synthetic_cr(other, f"{other}.2.1", rows=16, columns=16, seed=j)
        ds.PatientID = f"OTHER-{j}"
        receive(store, settings, ds)
    store.close()
    series = f"{study}.1"
    sop = f"{study}.2.1"

    port = free_port()
    node = multiprocessing.get_context("spawn").Process(target=serve_node, args=(str(work / "data"), str(work / "state.db"), port), daemon=True)
    node.start()
    pacs = Orthanc(workdir=work / "orthanc", plugins=(DICOMWEB_PLUGIN,)).start()
    try:
        for data in files:
            pacs.request("POST", "/instances", data)
        wait_http(f"http://127.0.0.1:{port}/healthz")
        bases = {"node": f"http://127.0.0.1:{port}/dicomweb", "orthanc": f"{pacs.url}/dicom-web"}
        clients = {"node": httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=300), "orthanc": httpx.Client(timeout=300)}
        cases: list[tuple[str, str, str]] = [
            ("retrieve study", f"/studies/{study}", 'multipart/related; type="application/dicom"; transfer-syntax=*'),
            ("series metadata", f"/studies/{study}/series/{series}/metadata", "application/dicom+json"),
            ("frame", f"/studies/{study}/series/{series}/instances/{sop}/frames/1", "multipart/related; type=application/octet-stream; transfer-syntax=*"),
            ("search studies", "/studies?PatientID=BENCH-1", "application/dicom+json"),
        ]
        results: dict[str, dict[str, float]] = {}
        for name, path, accept in cases:
            for who in ("node", "orthanc"):  # warm: the node's header cache, Orthanc's
                timed(clients[who], bases[who] + path, accept, 1)
            runs: dict[str, list[float]] = {"node": [], "orthanc": []}
            for _ in range(args.repeat):
                for who in ("node", "orthanc"):
                    runs[who] += timed(clients[who], bases[who] + path, accept, 1)
            results[name] = {who: statistics.median(times) for who, times in runs.items()}
        mb = sum(len(f) for f in files) / 1e6
        load: Any = os.getloadavg()
        print(f"one study of {args.instances} CR of {args.size}x{args.size} px ({mb:.1f} MB), {args.studies} other studies, "
              f"median of {args.repeat}; load average {load[0]:.1f} on {os.cpu_count()} CPUs")  # fmt: skip
        print(f"{'request':<18}{'node ms':>10}{'Orthanc ms':>12}{'node/Orthanc':>14}")
        for name, row in results.items():
            print(f"{name:<18}{row['node'] * 1000:>10.1f}{row['orthanc'] * 1000:>12.1f}{row['node'] / row['orthanc']:>14.2f}")
        study_s = results["retrieve study"]
        print(f"retrieve study throughput: node {mb / study_s['node']:.0f} MB/s, Orthanc {mb / study_s['orthanc']:.0f} MB/s")
    finally:
        pacs.stop()
        node.terminate()
        node.join(10)


if __name__ == "__main__":
    main()
