"""APM-side benchmark: preprocessing, APM latency per backend and batch size, retrieval lookup.

Run alone:  .venv/bin/python benchmarks/apm_bench.py --size tiny --batch 1 4
            .venv/bin/python benchmarks/apm_bench.py --size full --device cuda --backends torch onnxruntime tensorrt
``benchmarks/engine.py`` calls :func:`bench_apm` and merges the rows into its table.
Prints a table; never asserts timings. The ratio column compares each backend with ``torch`` at the
same batch size on the same device (the peer).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.apm import APMConfig, build_apm
from inference.backends import BackendUnavailableError, make_apm_runner
from inference.demo_apm import (
    initialise_backbone,
    initialise_spatial_queries,
    initialise_transformer,
    synthetic_chest_radiograph,
)
from inference.preprocess import images_to_tensor, prepare_array
from inference.retrieval import RegionIndex, RetrievalDB


@dataclass
class BenchRow:
    stage: str
    backend: str
    device: str
    batch: int
    ms_per_batch: float
    ms_per_image: float
    images_per_s: float
    vs_torch: float | None = None
    note: str = ""


def device_label(device: str) -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.device(device))
    return f"{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def time_call(fn, repeats: int, warmup: int, sync: bool) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    if sync:
        torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        samples.append(time.perf_counter() - start)
    return float(np.median(samples))


def demo_module(size: str) -> torch.nn.Module:
    """Full or tiny APM with demo-style weights (no box fit: timing does not depend on it)."""
    config = APMConfig.full() if size == "full" else APMConfig.tiny()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build_apm(config)
        with torch.no_grad():
            initialise_backbone(module)
            initialise_transformer(module)
            initialise_spatial_queries(module)
    return module


def bench_preprocess(repeats: int = 3) -> BenchRow:
    image = synthetic_chest_radiograph(2500, 2048, seed=0)
    seconds = time_call(lambda: prepare_array(image), repeats, 1, sync=False)
    return BenchRow("preprocess 2500x2048", "numpy+torch", device_label("cpu"), 1, seconds * 1e3, seconds * 1e3, 1 / seconds)


def bench_retrieval(sentences: int = 60_000, batch: int = 8, repeats: int = 5) -> BenchRow:
    rng = np.random.default_rng(0)
    regions = []
    for index in range(36):
        count = sentences if index == 11 else 2_000
        matrix = rng.standard_normal((count, 16)).astype(np.float32)
        matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
        regions.append(RegionIndex(f"region {index:02d}", tuple(f"s{j}" for j in range(count)), np.ascontiguousarray(matrix)))
    db = RetrievalDB(regions)
    tokens = torch.randn(batch, 36, 16)
    seconds = time_call(lambda: db.lookup(tokens), repeats, 1, sync=False)
    return BenchRow(
        "retrieval",
        "numpy",
        device_label("cpu"),
        batch,
        seconds * 1e3,
        seconds * 1e3 / batch,
        batch / seconds,
        note=f"one region {sentences:,} sentences, others 2,000",
    )


def bench_apm(
    size: str = "tiny",
    device: str = "cpu",
    backends: tuple[str, ...] = ("torch", "onnxruntime"),
    batch_sizes: tuple[int, ...] = (1, 4),
    repeats: int = 3,
    warmup: int = 1,
    dtype: torch.dtype | None = None,
    cache_dir: Path | None = None,
) -> list[BenchRow]:
    """Median APM latency per backend and batch size. Backends that cannot run here are reported
    with a note instead of a time."""
    module = demo_module(size)
    cache = cache_dir or Path(tempfile.mkdtemp(prefix="apm-bench-"))
    images = [prepare_array(synthetic_chest_radiograph(1200, 1000, seed=i)) for i in range(max(batch_sizes))]
    rows: list[BenchRow] = []
    torch_ms: dict[int, float] = {}
    label = device_label(device)
    for backend in backends:
        try:
            runner = make_apm_runner(backend, module, device=device, cache_dir=cache, dtype=dtype)
        except (BackendUnavailableError, RuntimeError, ValueError) as exc:
            rows.append(BenchRow(f"APM {size}", backend, label, 0, float("nan"), float("nan"), float("nan"), note=str(exc)[:90]))
            continue
        for batch in batch_sizes:
            tensor = images_to_tensor(images[:batch], device=device)
            seconds = time_call(lambda runner=runner, tensor=tensor: runner.run(tensor), repeats, warmup, sync=device.startswith("cuda"))
            ms = seconds * 1e3
            if backend == "torch":
                torch_ms[batch] = ms
            ratio = torch_ms[batch] / ms if batch in torch_ms else None
            precision = "fp32" if not device.startswith("cuda") or backend == "onnxruntime" else ("bf16 autocast" if backend == "torch" else "fp16")
            rows.append(BenchRow(f"APM {size}", backend, label, batch, ms, ms / batch, batch / seconds, ratio, precision))
    return rows


def print_table(rows: list[BenchRow]) -> None:
    header = f"{'stage':<22}{'backend':<13}{'batch':>6}{'ms/batch':>11}{'ms/image':>10}{'img/s':>9}{'x torch':>9}  note"
    print(header)
    print("-" * len(header))
    for row in rows:
        ratio = f"{row.vs_torch:.2f}" if row.vs_torch is not None else "-"
        print(f"{row.stage:<22}{row.backend:<13}{row.batch:>6}{row.ms_per_batch:>11.1f}{row.ms_per_image:>10.1f}{row.images_per_s:>9.2f}{ratio:>9}  {row.note}")
    devices = OrderedDict((row.device, None) for row in rows)
    print(f"devices: {', '.join(devices)}; torch {torch.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"])
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch and onnxruntime (0: library default). On a shared, oversubscribed host 1 thread avoids OpenMP spin-wait collapse.",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    rows = [bench_preprocess(), bench_retrieval()]
    rows += bench_apm(args.size, args.device, tuple(args.backends), tuple(args.batch), args.repeats)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


__all__ = ["BenchRow", "bench_apm", "bench_preprocess", "bench_retrieval", "print_table"]
