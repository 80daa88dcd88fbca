"""Engine benchmark: per-stage timings and decode speed against the bandwidth bound and plain ``generate``.

    .venv/bin/python benchmarks/engine.py                       # CPU, tiny demo weights
    .venv/bin/python benchmarks/engine.py --device cuda --size full --batch-sizes 1,8,16 --compile
    .venv/bin/python benchmarks/engine.py --device cpu --size full   # the CPU run: benchmarks/engine_cpu.py

Stages: preprocess (DICOM-free synthetic radiographs through ``prepare_array``), APM, retrieval,
prefill (one prompt), decode tokens/s at each batch size (a fixed number of steps, no early stop)
for our static-cache loop and for ``transformers``' ``generate`` on the same decoder and the same
prompt embeddings, and the memory-bandwidth bound: (decoder weight bytes + KV bytes read per step)
/ HBM bandwidth. Prints a markdown table; numbers are for the machine it ran on.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.demo_apm import synthetic_chest_radiograph
from inference.demo_weights import ensure_demo_weights
from inference.engine import Engine, EngineOptions
from inference.lm.decoding import DecodeStep, DecodeStrategy, KVCache, generate_greedy, prefill
from inference.preprocess import images_to_tensor, prepare_array
from inference.prompt import build_prompt_text, encode_prompt
from inference.tasks import REPORT_INSTRUCTION

#: Peak HBM bandwidth (GB/s) by device name fragment, for the bound column.
HBM_GBPS = {"H100 SXM": 3350.0, "H100 80GB HBM3": 3350.0, "H100 PCIe": 2000.0, "H100": 3350.0, "H200": 4800.0, "A100": 2039.0}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, work, repeats: int = 3) -> float:
    """Median seconds of ``work()`` over ``repeats`` runs after one warm-up."""
    work()
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        work()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def device_bandwidth(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "given"
    if device.type != "cuda":
        return None, "n/a on CPU"
    name = torch.cuda.get_device_name(device)
    for fragment, gbps in HBM_GBPS.items():
        if fragment in name:
            return gbps, name
    return None, name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="model directory (default: demo weights of --size, generated once)")
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", default="1,4", help="comma-separated decode batch sizes")
    parser.add_argument("--decode-tokens", type=int, default=64, help="decode steps measured per batch size")
    parser.add_argument("--output-tokens", type=int, default=300, help="answer length assumed for images/hour")
    parser.add_argument("--compile", action="store_true", help="CUDA: also measure the torch.compile'd decode step")
    parser.add_argument("--bandwidth-gbps", type=float, help="HBM bandwidth for the bound (default: by GPU name)")
    parser.add_argument("--threads", type=int, help="CPU threads for torch (default: 1 for the tiny batch table, the affinity mask for the CPU run)")
    parser.add_argument("--cpu-precisions", help="CPU run (engine_cpu.py) with these precisions, e.g. bf16,int8 (the default with --size full)")
    parser.add_argument("--apm-repeats", type=int, default=2, help="CPU run: APM timings (median, after one warm-up)")
    parser.add_argument("--onnx", action="store_true", help="CPU run at tiny size: also time the onnxruntime APM")
    parser.add_argument(
        "--generate-prompt", type=int, default=1, help="CPU run: prompt tokens given to plain generate (1: its slow bf16 prefill does not blur the step time)"
    )
    parser.add_argument("--quality-images", type=int, default=0, help="CPU run, small weights: quality of bf16/int8 against fp32 over N images")
    parser.add_argument("--server-cores", type=int, default=32, help="CPU run: cores of the projected server")
    parser.add_argument("--server-bandwidth-gbps", type=float, default=100.0, help="CPU run: copy bandwidth assumed for the projected server")
    parser.add_argument("--continuous", type=int, default=0, metavar="N", help="also run the continuous batcher over N images at each --batch-sizes slot count")
    parser.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "anatomix-bench")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cpu" and (args.size == "full" or args.cpu_precisions):
        from benchmarks.engine_cpu import run_cpu

        if args.decode_tokens == 64 and args.size == "full":
            args.decode_tokens = 16  # a full-size step takes a second or more on a small CPU
        run_cpu(args)
        return
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    model_dir = args.model_dir or ensure_demo_weights(args.cache_dir, args.size)
    engine = Engine.load(model_dir, EngineOptions(device=args.device, max_new_tokens=args.decode_tokens, stop_at_end_of_turn=False))
    lm, decoder = engine.lm, engine.lm.decoder
    info = lm.info()
    rows: list[tuple[str, str]] = []

    # ---- preprocess, APM, retrieval ----------------------------------------------------------------
    radiograph = synthetic_chest_radiograph(2500, 2048, seed=0)
    rows.append(("preprocess (2500x2048 -> 1024, 1 image)", f"{timed(device, lambda: prepare_array(radiograph)) * 1e3:.1f} ms"))
    image = prepare_array(radiograph)
    pixels = images_to_tensor([image], device=device)
    apm_s = timed(device, lambda: engine.apm_runner.run(pixels))
    rows.append((f"APM ({engine.identity.backend}, batch 1)", f"{apm_s * 1e3:.1f} ms"))
    with torch.inference_mode():
        outputs = engine.apm_runner.run(pixels)
    tokens = outputs["anatomy_tokens"].float().cpu()
    rows.append(("retrieval (36 regions, batch 1)", f"{timed(device, lambda: engine.retrieval.lookup(tokens)) * 1e3:.2f} ms"))

    # ---- one prompt ------------------------------------------------------------------------------
    from inference.apm.model import boxes_to_xyxy_model

    boxes = boxes_to_xyxy_model(outputs["boxes"].float().cpu())[0].tolist()
    sentences = engine.retrieval.lookup(tokens)[0]
    encoded = encode_prompt(engine.tokenizer, build_prompt_text(REPORT_INSTRUCTION, boxes, sentences), engine.token_ids)
    with torch.inference_mode():
        embeds = lm.embed_prompt(torch.tensor([encoded.input_ids]), outputs["memory"], outputs["anatomy_tokens"].float())[0]
    length = embeds.shape[0]
    cache = KVCache.allocate(decoder, 1, length + 8)
    with torch.inference_mode():
        prefill_s = timed(device, lambda: prefill(decoder, embeds[None], cache))
    rows.append((f"prefill ({length} tokens, 1 prompt)", f"{prefill_s * 1e3:.1f} ms ({length / prefill_s:,.0f} tokens/s)"))

    # ---- decode ------------------------------------------------------------------------------------
    bandwidth, bandwidth_source = device_bandwidth(device, args.bandwidth_gbps)
    kv_bytes_per_token = 2 * info.num_layers * decoder.config.num_key_value_heads * decoder.config.head_dim * embeds.element_size()
    steps = {"ours": DecodeStep.build(DecodeStrategy.BATCHED)}
    if device.type == "cpu":
        steps["ours, row by row (CPU default)"] = DecodeStep.build(DecodeStrategy.ROW_BY_ROW)
    if args.compile and device.type == "cuda":
        steps["ours, compiled (CUDA graphs)"] = DecodeStep.build(DecodeStrategy.COMPILED)
    decode_table = []
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [embeds] * batch
        for name, step in steps.items():
            generate_greedy(decoder, prompts, 4, decode_step=step, injection=None)  # warm-up / compile
            generation = generate_greedy(decoder, prompts, args.decode_tokens, decode_step=step, injection=None)
            step_s = generation.decode_s / max(generation.decode_steps, 1)
            decode_table.append((batch, name, step_s))
        with torch.inference_mode():
            inputs = embeds[None].expand(batch, -1, -1).contiguous()
            mask = torch.ones(batch, length, dtype=torch.long, device=device)

            def hf(n: int, inputs=inputs, mask=mask) -> None:
                decoder.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

            hf(2)
            sync(device)
            start = time.perf_counter()
            hf(1)
            sync(device)
            first = time.perf_counter() - start
            start = time.perf_counter()
            hf(args.decode_tokens)
            sync(device)
            hf_step = (time.perf_counter() - start - first) / max(args.decode_tokens - 1, 1)
        decode_table.append((batch, "transformers generate", hf_step))

    print(f"\n## AnatomiX engine benchmark ({args.size} {'demo ' if engine.identity.demo else ''}weights, {device}, {info.dtype})\n")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}; bandwidth bound from {bandwidth_source}")
    print(f"decoder weight bytes read per step: {info.decode_weight_bytes / 1e9:.3f} GB; KV per token {kv_bytes_per_token / 1e3:.1f} KB\n")
    print("| stage | time |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    print("\n| batch | decode | ms/step | tokens/s (all rows) | vs generate | % of bandwidth bound | images/h at", args.output_tokens, "tokens |")
    print("|---|---|---|---|---|---|---|")
    hf_by_batch = {b: s for b, n, s in decode_table if n == "transformers generate"}
    for batch, name, step_s in decode_table:
        tokens_s = batch / step_s
        bound = ""
        if bandwidth:
            bytes_step = info.decode_weight_bytes + kv_bytes_per_token * (length + args.decode_tokens) * batch
            bound = f"{100 * (bytes_step / (bandwidth * 1e9)) / step_s:.0f}%"
        per_image = apm_s + prefill_s + args.output_tokens * step_s / batch
        print(f"| {batch} | {name} | {step_s * 1e3:.2f} | {tokens_s:,.0f} | {hf_by_batch[batch] / step_s:.2f}x | {bound or 'n/a'} | {3600 / per_image:,.0f} |")
    if args.continuous:
        continuous_table(engine, device, [int(b) for b in args.batch_sizes.split(",")], args.continuous)


def continuous_table(engine: Engine, device: torch.device, slot_counts: list[int], images_per_run: int) -> None:
    """The worker's ContinuousBatcher (APM, prompts, prefill, join/leave decode) over ``images_per_run``
    images at each slot count: throughput against per-image latency."""
    from inference.batching import ContinuousBatcher

    images = [prepare_array(synthetic_chest_radiograph(900 + 7 * i, 800, seed=i)) for i in range(images_per_run)]
    print("\n| slots | images | images/s | latency p50 s | latency max s | decode rows max |\n|---|---|---|---|---|---|")
    for slots in slot_counts:
        batcher = ContinuousBatcher(engine, ["report"], slots=slots)
        sync(device)
        start = time.perf_counter()
        for index, image in enumerate(images):
            batcher.submit(index, image)
        results = batcher.drain()
        sync(device)
        wall = time.perf_counter() - start
        latency = sorted(result.timings["total"] for _, result in results)
        print(f"| {slots} | {len(results)} | {len(results) / wall:.2f} | {statistics.median(latency):.2f} | {latency[-1]:.2f} |"
              f" {batcher.peak_rows} |")  # fmt: skip


if __name__ == "__main__":
    main()
