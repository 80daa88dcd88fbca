"""End-to-end throughput: N single-image chest studies pushed at once, results stored in a real PACS.

    .venv/bin/python benchmarks/e2e.py [--studies 50] [--mode embedded|redis] [--workers 1] [--profile sr-only]
                                       [--batch-sizes 1,4,8] [--batch-wait-ms 50]

A real node (``anatomix-node serve`` + workers, tiny demo weights) and a real Orthanc as the PACS.
DCMTK storescu pushes the studies (RG1 subsampled, new UIDs each) on one association. Per study the
state store holds the time each stage was entered; "stable -> done" ends when the PACS acknowledged
the last result instance (C-STORE success). Prints p50/p95 per stage and studies per minute.

``--batch-sizes 1,4,8`` runs the whole measurement once per ``model.max_batch`` (a fresh node each
time) and ends with one table: throughput against the latency of a study as the batch grows.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dicom_node.store.base import RemoteNode
from tests.support.orthanc import Orthanc
from tests.support.workers import NodeSite, make_chest_studies, storescu

STAGES = (
    ("stable", "queued", "dispatch"),
    ("queued", "analyzing", "wait for a worker"),
    ("analyzing", "analyzed", "analysis (engine + writer)"),
    ("analyzed", "delivering", "wait for delivery"),
    ("delivering", "done", "C-STORE to PACS"),
    ("stable", "done", "stable -> acknowledged by PACS"),
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def main() -> int:
    args = parse_args()
    rows = []
    for max_batch in [int(v) for v in args.batch_sizes.split(",")]:
        rows.append(run_once(args, max_batch))
    if len(rows) > 1:
        print(f"\n{'max_batch':>9} {'studies/min':>12} {'analysis p50 s':>15} {'analysis p95 s':>15} {'stable->done p50 s':>19} {'failed':>7}")
        for row in rows:
            print(f"{row['max_batch']:>9} {row['per_minute']:>12.1f} {row['analysis_p50']:>15.2f} {row['analysis_p95']:>15.2f} "
                  f"{row['total_p50']:>19.2f} {row['failed']:>7}")  # fmt: skip
    return 1 if any(row["failed"] for row in rows) else 0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--mode", choices=("embedded", "redis"), default="embedded")
    parser.add_argument("--workers", type=int, default=1, help="analyze workers (redis mode)")
    parser.add_argument("--profile", default="full", help="output profile sent to the PACS")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument(
        "--tasks", default="report,anatomy_grounding,abnormality_detection", help="engine tasks (anatomy_grounding alone: APM only, no language model)"
    )
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--batch-sizes", default="1", help="model.max_batch values, one run each (e.g. 1,4,8)")
    parser.add_argument("--batch-wait-ms", type=int, default=50, help="model.batch_wait_ms")
    return parser.parse_args()


def run_once(args: argparse.Namespace, max_batch: int) -> dict:

    root = Path(tempfile.mkdtemp(prefix="anatomix-e2e-"))
    redis = None
    broker = ""
    if args.mode == "redis":
        from tests.support.redis import RedisServer

        redis = RedisServer(root / "redis").start()
        broker = redis.url
    site = NodeSite(
        root / "site",
        broker_url=broker,
        overrides={
            "model": {"max_new_tokens": args.max_new_tokens, "tasks": args.tasks.split(","), "max_batch": max_batch, "batch_wait_ms": args.batch_wait_ms},
            "queue": {"lease_s": 60.0},
        },
    )
    orthanc = Orthanc(root / "orthanc").start()
    site.add_remote(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
    site.add_remote(RemoteNode("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port, role="destination",
                               profile=args.profile, default_destination=True))  # fmt: skip
    files = make_chest_studies(root / "studies", args.studies)
    try:
        site.serve()
        if redis is not None:
            for index in range(args.workers):
                site.worker("analyze", name=f"worker-analyze-{index}")
            site.worker("deliver", name="worker-deliver")
        # Warm-up: one study so model loading is not in the figures.
        warm = make_chest_studies(root / "warm", 1)
        storescu(site.port, site.ae_title, warm)
        site.wait_for(lambda s: len(s) == 1 and s[0].state in ("done", "failed"), 600, "the warm-up study")
        warm_uid = site.studies()[0].study_instance_uid
        pushed = time.monotonic()
        storescu(site.port, site.ae_title, files)
        push_s = time.monotonic() - pushed
        studies = site.wait_for(lambda s: len(s) == args.studies + 1 and all(x.state in ("done", "failed") for x in s), args.timeout, "all studies")
    finally:
        site.stop()
        orthanc.stop()
        if redis is not None:
            redis.stop()
    studies = [s for s in studies if s.study_instance_uid != warm_uid]
    failed = [s for s in studies if s.state != "done"]
    done = [s for s in studies if s.state == "done"]
    first = min(s.state_times["stable"] for s in done)
    last = max(s.state_times["done"] for s in done)
    per_minute = len(done) / max(1e-9, (last - first).total_seconds()) * 60

    print(f"\nAnatomiX Node end-to-end: {args.studies} single-image studies pushed at once ({args.mode}, "
          f"{args.workers if redis else 1} analyze worker(s), profile {args.profile}, tiny demo weights, "
          f"tasks {args.tasks}, max_new_tokens {args.max_new_tokens}, max_batch {max_batch})")  # fmt: skip
    print(f"machine: {platform.machine()}, {platform.system()}, python {platform.python_version()}; push by storescu: {push_s:.1f} s")
    print(f"{'stage':<34} {'p50 s':>8} {'p95 s':>8} {'max s':>8}")
    for start, end, label in STAGES:
        values = [(s.state_times[end] - s.state_times[start]).total_seconds() for s in done if start in s.state_times and end in s.state_times]
        if values:
            print(f"{label:<34} {statistics.median(values):>8.2f} {percentile(values, 95):>8.2f} {max(values):>8.2f}")
    print(f"{'throughput':<34} {per_minute:>8.1f} studies/minute ({len(done)} done, {len(failed)} failed)")
    analysis = [(s.state_times["analyzed"] - s.state_times["analyzing"]).total_seconds() for s in done
                if "analyzing" in s.state_times and "analyzed" in s.state_times]  # fmt: skip
    total = [(s.state_times["done"] - s.state_times["stable"]).total_seconds() for s in done]
    return {
        "max_batch": max_batch,
        "per_minute": per_minute,
        "analysis_p50": statistics.median(analysis) if analysis else float("nan"),
        "analysis_p95": percentile(analysis, 95) if analysis else float("nan"),
        "total_p50": statistics.median(total) if total else float("nan"),
        "failed": len(failed),
    }


if __name__ == "__main__":
    sys.exit(main())
