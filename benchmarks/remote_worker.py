"""A remote analyze worker (over HTTP: WADO-RS in, STOW-RS out) against a local one, end to end, one run.

    .venv/bin/python benchmarks/remote_worker.py [--studies 10] [--tasks anatomy_grounding] [--rounds 1]

One node (``serve`` with its HTTP service, a private Redis, SQLite), a deliver worker beside it and
DCMTK storescp as the PACS. Each round runs the same measurement twice: with a local analyze worker
(shared ``data_dir``: reads the spool, writes results), then with a remote one (its own empty
``data_dir``, no database, only the broker URL, the API URL and a worker token). Each side first
analyses one warm-up study (model loading is not in the figures), then N single-image studies
(RG1 subsampled, new UIDs each) are pushed at once. Per study the state store holds the time each
stage was entered: "analysis" is analyzing -> analyzed (for the remote worker: claim, WADO-RS,
engine, writer, result JSON, STOW-RS, complete), "stable -> done" ends when the PACS acknowledged
the last result. Prints p50 of both and the throughput per side, and remote / local as ratios.
The HTTP hops are on loopback here: a real network adds its transfer time (a study's images once in,
its result objects once out).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.api import auth
from dicom_node.store.base import RemoteNode
from tests.support.dcmtk import StoreScp
from tests.support.net import free_port
from tests.support.redis import RedisServer
from tests.support.remote_workers import RemoteWorker
from tests.support.workers import NodeSite, make_chest_studies, storescu


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--tasks", default="anatomy_grounding", help="engine tasks (default APM only: the transfers weigh most)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=1, help="local then remote, this many times (the ratio of each round is printed)")
    parser.add_argument("--timeout", type=float, default=1800)
    return parser.parse_args()


def measure(site: NodeSite, root: Path, label: str, count: int, timeout: float) -> dict[str, float]:
    """Warm up with one study, then push ``count`` at once; figures of those ``count``."""
    before = {s.study_instance_uid for s in site.studies()}
    warm = make_chest_studies(root / f"{label}-warm", 1)
    storescu(site.port, site.ae_title, warm)
    site.wait_for(lambda s: len(s) == len(before) + 1 and all(x.state in ("done", "failed") for x in s), 900, f"the {label} warm-up study")
    known = {s.study_instance_uid for s in site.studies()}
    files = make_chest_studies(root / label, count)
    storescu(site.port, site.ae_title, files)
    studies = site.wait_for(lambda s: len(s) == len(known) + count and all(x.state in ("done", "failed") for x in s), timeout, f"the {label} studies")
    mine = [s for s in studies if s.study_instance_uid not in known]
    done = [s for s in mine if s.state == "done"]
    analysis = [(s.state_times["analyzed"] - s.state_times["analyzing"]).total_seconds() for s in done]
    total = [(s.state_times["done"] - s.state_times["stable"]).total_seconds() for s in done]
    span = (max(s.state_times["done"] for s in done) - min(s.state_times["stable"] for s in done)).total_seconds()
    return {"analysis_p50": statistics.median(analysis), "total_p50": statistics.median(total), "per_minute": len(done) / span * 60,
            "failed": float(len(mine) - len(done))}  # fmt: skip


def main() -> int:
    args = parse_args()
    root = Path(tempfile.mkdtemp(prefix="anatomix-remote-bench-"))
    redis = RedisServer(root / "redis").start()
    http_port = free_port()
    site = NodeSite(root / "node", broker_url=redis.url, overrides={
        "model": {"tasks": args.tasks.split(","), "max_new_tokens": args.max_new_tokens}, "queue": {"lease_s": 60.0}, "http": {"port": http_port}})  # fmt: skip
    pacs = StoreScp(root / "pacs" / "in", ae_title="PACS").start()
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", "PACS", "127.0.0.1", pacs.port, role="destination", profile="full", default_destination=True))
    secret = auth.new_secret(auth.WORKER_TOKEN_PREFIX)
    store = site.store()
    store.add_worker_token("bench", auth.secret_hash(secret), datetime.now(UTC))
    store.close()
    token_file = root / "worker.token"
    token_file.write_text(secret)
    os.chmod(token_file, 0o600)
    rows: list[tuple[dict[str, float], dict[str, float]]] = []
    try:
        site.serve()
        site.worker("deliver", name="worker-deliver")
        for round_ in range(args.rounds):
            local = site.worker("analyze", name=f"worker-local-{round_}")
            local_figures = measure(site, root, f"local-{round_}", args.studies, args.timeout)
            site.kill(local, sig=15)
            remote = RemoteWorker(root / f"worker-host-{round_}", f"http://127.0.0.1:{http_port}", token_file, redis.url,
                                  model={"max_new_tokens": args.max_new_tokens}).start(name=f"remote-{round_}")  # fmt: skip
            try:
                remote_figures = measure(site, root, f"remote-{round_}", args.studies, args.timeout)
            finally:
                remote.stop()
            rows.append((local_figures, remote_figures))
    finally:
        site.stop()
        pacs.stop()
        redis.stop()
    load = os.getloadavg()
    print(f"\nAnatomiX Node: remote analyze worker (HTTP, loopback) against a local one; {args.studies} single-image studies pushed at once "
          f"per side, tasks {args.tasks}, tiny demo weights, profile full, storescp as the PACS")  # fmt: skip
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}; load average at the end "
          f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")  # fmt: skip
    print(f"{'round':>5} {'side':>7} {'analysis p50 s':>15} {'stable->done p50 s':>19} {'studies/min':>12} {'failed':>7}")
    for index, (local_figures, remote_figures) in enumerate(rows):
        for side, figures in (("local", local_figures), ("remote", remote_figures)):
            print(f"{index:>5} {side:>7} {figures['analysis_p50']:>15.2f} {figures['total_p50']:>19.2f} {figures['per_minute']:>12.1f} "
                  f"{int(figures['failed']):>7}")  # fmt: skip
        print(f"{index:>5} {'ratio':>7} {remote_figures['analysis_p50'] / local_figures['analysis_p50']:>14.2f}x "
              f"{remote_figures['total_p50'] / local_figures['total_p50']:>18.2f}x {remote_figures['per_minute'] / local_figures['per_minute']:>11.2f}x"
              "   (remote / local)")  # fmt: skip
    return 1 if any(f["failed"] for row in rows for f in row) else 0


if __name__ == "__main__":
    sys.exit(main())
