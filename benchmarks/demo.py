"""The demo's speed: ``anatomix-node demo`` from a fresh state, and one analysis as ``serve --demo-weights`` runs it.

    .venv/bin/python benchmarks/demo.py                 # both parts
    .venv/bin/python benchmarks/demo.py --skip-demo     # the engine part only
    .venv/bin/python benchmarks/demo.py --skip-engine   # the demo part only

1. ``anatomix-node demo`` with an empty cache (``XDG_CACHE_HOME`` in a new temporary folder), so the
   tiny demo weights are generated as on a fresh clone (the virtual environment that ``make demo``
   installs first is not included): wall time of the command and the stage lines it prints.
2. The engine as ``serve --demo-weights`` runs it: tiny demo weights, the default tasks (report,
   anatomy grounding, abnormality detection), ``max_new_tokens`` 350, CPU, on the real chest CR RG1
   and synthetic chests: tokens generated and seconds per image, with the repetition-loop stop on
   and off (off = what every analysis cost before: the random LM never writes end-of-turn).

Prints markdown; numbers are for the machine it ran on (give its load with them).
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import torch
from pydicom.data import get_testdata_file

from inference.demo_apm import synthetic_chest_radiograph
from inference.demo_weights import ensure_demo_weights
from inference.engine import Engine, EngineOptions
from inference.preprocess import prepare_array, prepare_dataset

SERVE_TASKS = ("report", "anatomy_grounding", "abnormality_detection")


def time_demo() -> None:
    with tempfile.TemporaryDirectory(prefix="anatomix-demo-bench-") as folder:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ANATOMIX_")} | {"XDG_CACHE_HOME": str(Path(folder) / "cache")}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "dicom_node.cli.main", "demo", "--out", str(Path(folder) / "out")], env=env, capture_output=True, text=True, timeout=600
        )
        wall = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if "s]" in line or line.strip().startswith(("stages:", "engine:", "Total"))]
    print(f"## `anatomix-node demo`, fresh weights cache: {wall:.1f} s wall (exit {done.returncode}), load average {os.getloadavg()[0]:.1f}\n")
    print("```\n" + "\n".join(lines) + "\n```\n")


def time_engine(images: int) -> None:
    with tempfile.TemporaryDirectory(prefix="anatomix-demo-weights-") as folder:
        model_dir = ensure_demo_weights(Path(folder), "tiny")
        inputs = [("RG1 (real chest CR)", prepare_dataset(pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))))]
        for seed in range(images - 1):
            inputs.append(
                (f"synthetic chest {seed}", prepare_array(synthetic_chest_radiograph(1100, 900, seed=seed), f"1.2.826.0.1.3680043.10.1431.77.{seed}"))
            )
        print(f"## One analysis as `serve --demo-weights` runs it (max_new_tokens 350, CPU, {torch.get_num_threads()} threads)\n")
        print("| image | loop stop | tokens (report / abnormality detection) | decode s | analysis s |")
        print("|---|---|---|---:|---:|")
        for stop_on_loop in (True, False):
            engine = Engine.load(model_dir, EngineOptions(max_new_tokens=350, stop_on_loop=stop_on_loop))
            engine.analyze([inputs[0][1]], ["report"])  # warm-up
            for name, image in inputs:
                (result,) = engine.analyze([image], SERVE_TASKS)
                tokens = " / ".join(str(answer.generated_tokens) for answer in result.answers)
                on = "on" if stop_on_loop else "off"
                print(f"| {name} | {on} | {tokens} | {result.timings['decode']:.1f} | {result.timings['total']:.1f} |", flush=True)
    print(f"\n{platform.processor() or platform.machine()}, load average {os.getloadavg()[0]:.1f} at the end")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-demo", action="store_true", help="only the engine part")
    parser.add_argument("--skip-engine", action="store_true", help="only the demo part")
    parser.add_argument("--images", type=int, default=3, help="RG1 plus this many minus one synthetic chests")
    args = parser.parse_args()
    if not args.skip_demo:
        time_demo()
    if not args.skip_engine:
        time_engine(args.images)


if __name__ == "__main__":
    main()
