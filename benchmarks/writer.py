"""Time building the result bundle for the real RG1 chest CR: 36 regions + 10 findings, and its size.

Prints the median of several runs per object kind (each built alone) and for the whole bundle as the
pipeline builds it (``build_bundle``, one object after another) and writes it (Part 10 bytes, where the
SEG's deflate happens), the bytes of each object and the total, plus the SEG against a naive highdicom
build (boolean (1, rows, columns, segments) masks) as the reference point.

    .venv/bin/python benchmarks/writer.py [--runs 7] [--findings 10]

Then, per receiver kind (JPEG-LS, Deflate only, RLE only, uncompressed only), the bytes of the default
``full`` profile as delivery sends it, for 0, 1 and 10 findings, and the time to encode it for that
receiver (decompress, BINARY SEG, palette SC, deflate).
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import highdicom as hd
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, JPEGBaseline8Bit, JPEGLSLossless, RLELossless
from pynetdicom.presentation import build_context

from dicom_node.pipeline.delivery import _in_an_accepted_syntax
from dicom_node.settings import DEFAULT_PROFILES
from sr_writer import bundle as bundle_module
from sr_writer.bundle import SEND_ORDER, build_bundle
from sr_writer.context import make_context
from sr_writer.kos import build_kos
from sr_writer.seg import segment_description
from tests.support.results import make_result, rg1_source

UID_ROOT = "1.2.826.0.1.3680043.10.1431."


def median_seconds(function: Callable[[], object], runs: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) over ``runs`` calls after one warm-up call.

    CPU time is reported too because the shared development machine is often oversubscribed (other
    jobs inflate wall time several-fold); on an idle machine wall ~= CPU for the single-threaded kinds.
    """
    function()  # warm-up: imports, highdicom's IOD tables, pixel decoding caches
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        function()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def naive_seg(ctx) -> None:
    """The straightforward highdicom SEG: a boolean (1, rows, columns, segments) array."""
    annotations = ctx.boxed
    masks = np.zeros((1, ctx.rows, ctx.columns, len(annotations)), dtype=bool)
    for s, a in enumerate(annotations):
        masks[0, int(a.box.y1) : int(np.ceil(a.box.y2)), int(a.box.x1) : int(np.ceil(a.box.x2)), s] = True
    algorithm = hd.AlgorithmIdentificationSequence(name="AnatomiX", family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence"), version="0")
    hd.seg.Segmentation(
        source_images=[ctx.source], pixel_array=masks, segmentation_type="BINARY",
        segment_descriptions=[segment_description(n, a, algorithm) for n, a in enumerate(annotations, start=1)],
        series_instance_uid=hd.UID(), series_number=1, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="x", manufacturer_model_name="x", software_versions="0", device_serial_number="0",
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--findings", type=int, default=10)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    warnings.simplefilter("ignore")  # RG1's single-component referring physician name warns on every SC
    source = rg1_source()
    result = make_result(source, n_findings=args.findings)
    ctx = make_context(source, result, uid_root=UID_ROOT, analysis_version=1)
    boxes = len(ctx.boxed)

    rows: list[tuple[str, tuple[float, float]]] = []
    built = {}
    for kind in [k for k in SEND_ORDER if k != "kos"]:
        builder = bundle_module._BUILDERS[kind]
        rows.append((kind, median_seconds(lambda b=builder, kind=kind: built.__setitem__(kind, b(ctx)), args.runs)))
    rows.append(("kos", median_seconds(lambda: build_kos(ctx, list(built.values())), args.runs)))
    sequential = (sum(w for _, (w, _) in rows), sum(c for _, (_, c) in rows))
    total = median_seconds(lambda: build_bundle(source, result, SEND_ORDER, uid_root=UID_ROOT, analysis_version=1), args.runs)
    naive = median_seconds(lambda: naive_seg(ctx), args.runs)
    sizes = {kind: len(part10(ds)) for kind, ds in built.items()}
    sizes["kos"] = len(part10(build_kos(ctx, list(built.values()))))
    written = median_seconds(lambda: [part10(o.dataset) for o in build_bundle(source, result, SEND_ORDER, uid_root=UID_ROOT, analysis_version=1)], args.runs)
    seg_seconds = dict(rows)["seg"]
    load_after = os.getloadavg()[0]

    print(f"sr_writer bundle for RG1 ({source.Rows}x{source.Columns}, MONOCHROME1): 36 regions + {args.findings} findings = {boxes} boxes")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {load_before:.2f} before / {load_after:.2f} after; median of {args.runs} runs")
    print()
    print(f"| {'object':<28} | {'wall s':>8} | {'CPU s':>8} | {'bytes':>10} |")
    print(f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|{'-' * 12}|")
    for kind, (wall, cpu) in rows:
        print(f"| {kind:<28} | {wall:>8.3f} | {cpu:>8.3f} | {sizes[kind]:>10,} |")
    print(f"| {'sum of objects (one thread)':<28} | {sequential[0]:>8.3f} | {sequential[1]:>8.3f} | {sum(sizes.values()):>10,} |")
    print(f"| {'build_bundle (all kinds)':<28} | {total[0]:>8.3f} | {total[1]:>8.3f} | {'':>10} |")
    print(f"| {'build_bundle + write bytes':<28} | {written[0]:>8.3f} | {written[1]:>8.3f} | {sum(sizes.values()):>10,} |")
    print()
    print(
        f"SEG: ours {seg_seconds[0]:.3f} s wall / {seg_seconds[1]:.3f} s CPU vs naive highdicom boolean masks "
        f"{naive[0]:.3f} s / {naive[1]:.3f} s (ratio {naive[1] / seg_seconds[1]:.2f}x CPU)"
    )
    print(
        f"target: whole bundle built and written < 1.0 s -> wall {written[0]:.3f} s ({'met' if written[0] < 1.0 else 'NOT met'}), "
        f"CPU {written[1]:.3f} s ({'met' if written[1] < 1.0 else 'NOT met'})"
    )
    total_bytes = sum(sizes.values())
    print(f"target: all objects < 2 MB -> {total_bytes:,} bytes ({'met' if total_bytes < 2_000_000 else 'NOT met'})")
    print()
    receiver_table(source, args.runs)


#: Receiver kinds: the transfer syntaxes a destination accepts for SEG and SC (uncompressed always).
RECEIVER_KINDS = {
    "JPEG-LS + JPEG (e.g. Orthanc, dcm4chee)": (JPEGLSLossless, JPEGBaseline8Bit, DeflatedExplicitVRLittleEndian),
    "Deflate only (storescp +xd)": (DeflatedExplicitVRLittleEndian,),
    # The node proposes no RLE context (the SEG and SC fit uncompressed): such a receiver is sent what
    # an uncompressed-only one gets.
    "RLE only (storescp +xr)": (RLELossless,),
    "uncompressed only (storescp defaults)": (),
}


def receiver_table(source, runs: int) -> None:
    """Bytes and encode time of the default ``full`` profile per receiver kind, as delivery sends it
    (``delivery._in_an_accepted_syntax``: own syntax, else Deflate, else uncompressed; the SEG as a BINARY
    SEG where neither JPEG-LS nor Deflate was accepted, the SC as PALETTE COLOR wherever JPEG was not)."""
    print(f"Default profile {DEFAULT_PROFILES['full']} per receiver kind (bytes on the wire = Part 10 bytes the receiver writes):")
    print()
    print(f"| {'findings':>8} | {'receiver kind':<40} | {'SEG bytes':>11} | {'SC bytes':>11} | {'bundle bytes':>12} | {'encode s':>8} |")
    print(f"|{'-' * 10}|{'-' * 42}|{'-' * 13}|{'-' * 13}|{'-' * 14}|{'-' * 10}|")
    for findings in (0, 1, 10):
        objects = build_bundle(source, make_result(source, n_findings=findings), DEFAULT_PROFILES["full"], uid_root=UID_ROOT, analysis_version=1)
        for name, accepted in RECEIVER_KINDS.items():
            assoc = SimpleNamespace(accepted_contexts=[build_context(o.sop_class_uid, [uid]) for o in objects for uid in (*accepted, ExplicitVRLittleEndian)])

            def encode(objects=objects, assoc=assoc) -> dict[str, int]:
                return {o.kind: len(part10(_in_an_accepted_syntax(assoc, o.dataset, o.sop_class_uid))) for o in objects}  # type: ignore[arg-type]

            seconds = median_seconds(encode, max(1, runs // 3))[0]
            sent = encode()
            print(f"| {findings:>8} | {name:<40} | {sent.get('seg', 0):>11,} | {sent['sc']:>11,} | {sum(sent.values()):>12,} | {seconds:>8.3f} |")


def part10(dataset) -> bytes:
    """The object as the node writes it (Part 10 file bytes, in the object's own transfer syntax)."""
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


if __name__ == "__main__":
    main()
