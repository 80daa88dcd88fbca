"""The engine on a CPU against this machine's memory-bandwidth limit (``benchmarks/engine.py --device cpu``).

    .venv/bin/python benchmarks/engine.py --device cpu --size full      # full-size demo weights (13 GB, generated once)
    .venv/bin/python benchmarks/engine.py --device cpu --cpu-precisions bf16,int8,fp32   # tiny, seconds

In one process, one model at a time: the machine's bandwidth (a 1 GiB copy, read + write bytes over
the time; a read-only sum beside it), then per CPU precision (bf16 first, each later one teacher-forced
along bf16's greedy tokens, which gives its quality cost for free): load time and resident memory,
APM (torch, onnxruntime), prefill of one report prompt, decode tokens/s, as a percentage of the
batch-1 bound (bandwidth / bytes read per token: weights + KV cache), then plain ``transformers``
``generate`` on the same bf16 weights as an ordinary ``Gemma3ForCausalLM`` (nn.Linear, no engine
code) over the first ``--generate-prompt`` prompt tokens. Prints markdown; never asserts timings.
The machine is shared: every figure comes with the load average it was measured at.
"""

from __future__ import annotations

import gc
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from inference.apm.model import boxes_to_xyxy_model
from inference.backends import make_apm_runner
from inference.demo_apm import synthetic_chest_radiograph
from inference.demo_weights import ensure_demo_weights
from inference.engine import Engine, EngineOptions
from inference.lm.cpu_precision import cpu_threads
from inference.lm.precision_check import divergence, greedy_trace
from inference.lm.prepared import map_prepared_lm, prepared_path
from inference.preprocess import images_to_tensor, prepare_array
from inference.prompt import build_prompt_text, encode_prompt
from inference.tasks import REPORT_INSTRUCTION

GB = 1e9


def load_average() -> str:
    return "load {:.1f}/{:.1f}/{:.1f}".format(*os.getloadavg())


def memory() -> dict[str, float]:
    """This process's resident memory in GB: anonymous, file-backed (mapped weights), peak."""
    fields = {}
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("RssAnon", "RssFile", "VmHWM"):
                fields[name] = int(value.split()[0]) * 1024 / GB
    return fields


def cpu_flags() -> str:
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
        text = info.read()
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    matrix = [f for f in flags if f.startswith(("amx", "avx512_bf16", "avx512_vnni", "avx512f", "avx2"))]
    return f"{model}; flags {' '.join(sorted(matrix)) or 'none of amx/avx512/avx2'}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def measure_bandwidth(gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """(copy GB/s counting read + write bytes, read-only GB/s of a sum), best of ``repeats``."""
    n = int(gib * (1 << 30))
    source = torch.ones(n // 4, dtype=torch.float32)
    target = torch.empty_like(source)
    copy_best = read_best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        target.copy_(source)
        copy_best = max(copy_best, 2 * n / (time.perf_counter() - start) / GB)
        start = time.perf_counter()
        source.sum()
        read_best = max(read_best, n / (time.perf_counter() - start) / GB)
    del source, target
    return copy_best, read_best


def median_seconds(work, repeats: int) -> float:
    work()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def run_cpu(args) -> None:
    threads = args.threads or cpu_threads()
    torch.set_num_threads(threads)
    size = args.size
    model_dir = args.model_dir or ensure_demo_weights(args.cache_dir, size)
    precisions = [p for p in (args.cpu_precisions or ("bf16,int8" if size == "full" else "bf16,int8,fp32")).split(",") if p]
    precisions = [p for p in ("fp32", "bf16", "int8") if p in precisions]  # the first is the quality reference
    steps = args.decode_tokens
    lines: list[str] = []

    def note(text: str) -> None:
        lines.append(text)
        print(text, flush=True)

    note(f"\n## AnatomiX engine on the CPU ({size} demo weights, {threads} threads from the affinity mask)\n")
    note(f"- machine: {cpu_flags()}; torch {torch.__version__}")
    copy_gbps, read_gbps = measure_bandwidth()
    bandwidth = args.bandwidth_gbps or copy_gbps
    note(f"- memory bandwidth: {copy_gbps:.1f} GB/s copy (read + write bytes), {read_gbps:.1f} GB/s read-only sum ({load_average()})")

    radiograph = prepare_array(synthetic_chest_radiograph(2500, 2048, seed=0))
    pixels = images_to_tensor([radiograph])
    reference = None
    decode_rate: dict[str, float] = {}
    stage: dict[str, float] = {}
    rows = []
    for precision in precisions:
        gc.collect()
        start = time.perf_counter()
        engine = Engine.load(model_dir, EngineOptions(cpu_precision=precision, cpu_threads=threads))
        load_s = time.perf_counter() - start
        held = memory()
        info = engine.lm.info()
        note(
            f"- {precision}: loaded in {load_s:.1f} s; resident {held['RssAnon']:.2f} GB private + {held['RssFile']:.2f} GB mapped"
            f" file pages; decoder bytes read per token {info.decode_weight_bytes / GB:.3f} GB ({load_average()})"
        )
        if "apm_torch" not in stage:
            stage["apm_torch"] = median_seconds(lambda engine=engine: engine.apm_runner.run(pixels), args.apm_repeats)
            note(f"- APM torch fp32, 1 image 1024x1024: {stage['apm_torch']:.2f} s ({load_average()})")
            if size == "full" or args.onnx:
                onnx = make_apm_runner("onnxruntime", engine.apm_runner.module, "cpu", engine.model_dir.root / ".engine-cache")
                stage["apm_onnx"] = median_seconds(lambda onnx=onnx: onnx.run(pixels), args.apm_repeats)
                ort_boxes = boxes_to_xyxy_model(onnx.run(pixels)["boxes"])
                torch_boxes = boxes_to_xyxy_model(engine.apm_runner.run(pixels)["boxes"])
                box_px = int(abs(ort_boxes.astype(int) - torch_boxes.astype(int)).max())
                note(f"- APM onnxruntime fp32: {stage['apm_onnx']:.2f} s; largest box difference against torch {box_px} px of 1024 ({load_average()})")
                del onnx
        with torch.inference_mode():
            outputs = engine.apm_runner.run(pixels)
            boxes = boxes_to_xyxy_model(outputs["boxes"].float())[0].tolist()
            sentences = engine.retrieval.lookup(outputs["anatomy_tokens"].float())[0]
            ids = torch.tensor([encode_prompt(engine.tokenizer, build_prompt_text(REPORT_INSTRUCTION, boxes, sentences), engine.token_ids).input_ids])
            embeds = engine.lm.embed_prompt(ids, outputs["memory"], outputs["anatomy_tokens"].float())[0]
        length = embeds.shape[0]
        trace = greedy_trace(engine.lm.decoder, embeds, steps, forced=None if reference is None else reference.tokens)
        step_s = trace.decode_s / max(steps - 1, 1)
        kv_bytes = 2 * info.num_layers * engine.lm.decoder.config.num_key_value_heads * engine.lm.decoder.config.head_dim * embeds.element_size()
        bytes_step = info.decode_weight_bytes + kv_bytes * (length + steps // 2)
        bound = bandwidth * GB / bytes_step
        decode_rate[precision] = 1 / step_s
        quality = "reference"
        if reference is not None:
            cost = divergence(reference, trace)
            first = "none" if cost.first_divergent is None else str(cost.first_divergent)
            spread = f"(logit range {cost.reference_logit_range:.1f})"
            quality = f"first divergent step {first} of {cost.steps}, max logit diff {cost.max_logit_diff:.3f} {spread}"
        else:
            reference = trace
        rows.append((precision, trace.prefill_s, length, step_s, bound, quality, load_average()))
        share = f"{100 / step_s / bound:.0f} % of the bandwidth bound {bound:.2f} tokens/s"
        speed = f"prefill {length} tokens {trace.prefill_s:.1f} s; decode {1 / step_s:.2f} tokens/s = {share}"
        note(f"- {precision}: {speed}; vs {precisions[0]}: {quality} ({load_average()})")
        stage.setdefault("prefill", trace.prefill_s)
        stage[f"prefill_{precision}"] = trace.prefill_s
        del engine, trace, outputs
        gc.collect()

    generate_rate = plain_generate_rate(model_dir, embeds, args.generate_prompt, max(steps // 2, 4))
    if generate_rate:
        plain = f"plain Gemma3ForCausalLM, bf16 nn.Linear, same weights mapped, {args.generate_prompt}-token prompt"
        note(f"- transformers generate ({plain}): {generate_rate:.2f} tokens/s ({load_average()})")
    peak = memory()["VmHWM"]
    note(f"- peak RSS of this process (all of the above, one model at a time): {peak:.2f} GB")

    print(
        f"\n| precision | prefill | decode tokens/s | % of bandwidth bound | vs generate | quality vs {precisions[0]} | load |\n|---|---|---|---|---|---|---|"
    )
    for precision, prefill_s, length, step_s, bound, quality, load in rows:
        ratio = f"{(1 / step_s) / generate_rate:.2f}x" if generate_rate else "n/a"
        share = f"{100 / step_s / bound:.0f} % of {bound:.2f}"
        print(f"| {precision} | {prefill_s:.1f} s ({length} tokens) | {1 / step_s:.2f} | {share} | {ratio} | {quality} | {load} |")
    if args.quality_images:
        quality_table(model_dir, args.quality_images, steps)
    best = max(decode_rate, key=decode_rate.get)
    apm = min(stage.get("apm_onnx", 1e9), stage["apm_torch"])
    prefill_best = stage[f"prefill_{best}"]
    report_s = apm + prefill_best + args.output_tokens / decode_rate[best]
    parts = f"APM {apm:.1f} s + prefill {prefill_best:.1f} s + decode {args.output_tokens / decode_rate[best]:.1f} s"
    print(f"\none report ({args.output_tokens} tokens, {best}): {parts} = {report_s:.0f} s")
    cores_ratio = args.server_cores / threads
    bw_ratio = args.server_bandwidth_gbps / bandwidth
    projected = apm / cores_ratio + prefill_best / cores_ratio + args.output_tokens / (decode_rate[best] * bw_ratio)
    print(
        f"PROJECTION, not measured: a {args.server_cores}-core server with {args.server_bandwidth_gbps:.0f} GB/s copy bandwidth:"
        f" APM and prefill scaled by cores (x{cores_ratio:.0f}), decode by bandwidth (x{bw_ratio:.1f}): {projected:.0f} s per report"
    )


def plain_generate_rate(model_dir: Path, embeds: torch.Tensor, prompt_tokens: int, steps: int) -> float | None:
    """Tokens/s of ``generate`` on the bf16 weights as a plain ``Gemma3ForCausalLM`` (nn.Linear layers),
    mapped from the prepared bf16 file: (time for 1 + steps tokens - time for 1) / steps."""
    from inference.model_dir import ModelDir
    from inference.tokens import TokenIds, load_tokenizer

    directory = ModelDir.open(Path(model_dir))
    path = prepared_path(directory.root / ".engine-cache", "bf16", directory.weights_digest())
    if not path.is_file():
        return None
    token_ids = TokenIds.from_tokenizer(load_tokenizer(directory.base))
    lm, _ = map_prepared_lm(directory.base, directory.lm, token_ids, "fp32", path)  # "fp32": keep nn.Linear as saved (bf16)
    decoder = lm.decoder
    inputs = embeds[None, :prompt_tokens].to(torch.bfloat16)
    mask = torch.ones(1, inputs.shape[1], dtype=torch.long)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.inference_mode():
            decoder.generate(inputs_embeds=inputs, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    run(1)  # warm-up: pages the mapped weights in
    first = run(1)
    total = run(1 + steps)
    return steps / max(total - first, 1e-9)


def quality_table(model_dir: Path, images: int, steps: int) -> None:
    """Small weights only (all three precisions held at once): per image, bf16 and int8 teacher-forced
    along fp32's greedy tokens; the first divergent step and the largest logit difference before it."""
    engines = {p: Engine.load(model_dir, EngineOptions(cpu_precision=p)) for p in ("fp32", "bf16", "int8")}
    reference_engine = engines["fp32"]
    print("\n| image | fp32 first tokens | bf16: first divergent step, max logit diff | int8: first divergent step, max logit diff |\n|---|---|---|---|")
    for seed in range(images):
        pixels = images_to_tensor([prepare_array(synthetic_chest_radiograph(700 + 37 * seed, 600 + 23 * seed, seed=seed))])
        with torch.inference_mode():
            outputs = reference_engine.apm_runner.run(pixels)
            boxes = boxes_to_xyxy_model(outputs["boxes"])[0].tolist()
            sentences = reference_engine.retrieval.lookup(outputs["anatomy_tokens"])[0]
            text = build_prompt_text(REPORT_INSTRUCTION, boxes, sentences)
            ids = torch.tensor([encode_prompt(reference_engine.tokenizer, text, reference_engine.token_ids).input_ids])
        traces = {}
        for precision, engine in engines.items():
            embeds = engine.lm.embed_prompt(ids, outputs["memory"], outputs["anatomy_tokens"])[0]
            traces[precision] = greedy_trace(engine.lm.decoder, embeds, steps, forced=traces["fp32"].tokens if precision != "fp32" else None)
        cells = []
        for precision in ("bf16", "int8"):
            cost = divergence(traces["fp32"], traces[precision])
            cells.append(f"{'none' if cost.first_divergent is None else cost.first_divergent}, {cost.max_logit_diff:.3f}")
        print(f"| {seed} | {traces['fp32'].tokens[:4]} | {cells[0]} | {cells[1]} |")
