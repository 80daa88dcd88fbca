"""The AnatomiX engine: prepared images -> APM -> retrieval -> LM tasks -> one AnalysisResult each.

Loaded once per worker process (``Engine.load``), then ``analyze`` runs a batch of images through a
configurable task list. Every stage is timed; problems that do not stop the analysis (malformed
model text, a task with nothing to ask) become warnings in the result.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from inference.apm.checkpoint import APMLoadReport, CheckpointError, load_apm
from inference.apm.model import boxes_to_xyxy_model
from inference.lm.config import LMConfigError
from inference.lm.cpu_precision import check_precision
from inference.lm.decoding import DecodeStep, DecodeStrategy, Generation, KVCache, LoopCheck, TokenInjection, generate_greedy, synchronize
from inference.lm.loader import LMCheckpointError, LMLoadReport, load_lm
from inference.lm.model import AnatomixLM
from inference.lm.prepared import load_cpu_lm
from inference.model_dir import ModelDir, ModelDirError, device_uid_from_digest
from inference.parsing import parse_grounded_answer, postprocess_answer, split_report, strip_tags
from inference.preprocess import Letterbox, PreparedImage, images_to_tensor, prepare_dataset
from inference.prompt import EMPTY_SYSTEM_PROMPT, PromptError, build_prompt_text, encode_prompt
from inference.result import (
    CHEXPERT_LABELS,
    REGION_NAMES,
    AnalysisResult,
    Box,
    Finding,
    ModelIdentity,
    Region,
    Report,
    TaskAnswer,
    has_repetition_loop,
)
from inference.retrieval import RetrievalDB, RetrievalDBError
from inference.tasks import DEFAULT_LM_REGION, LM_TASKS, NO_ABNORMALITY_ANSWER, TaskRequest, boxes_for, instruction_for, region_name
from inference.tokens import TokenIds, TokenizerError, load_tokenizer

log = logging.getLogger(__name__)

#: Seconds between two progress lines while a task decodes (a task that ends sooner logs only its end).
PROGRESS_INTERVAL_S = 5.0


class ModelLoadError(RuntimeError):
    """The model directory cannot be loaded; the message says which file and what to do."""


@dataclass(frozen=True)
class EngineOptions:
    backend: str = "torch"
    device: str = "cpu"
    max_new_tokens: int = 350
    #: Stop at <end_of_turn>/<eos> (fast); False decodes max_new_tokens like the reference.
    stop_at_end_of_turn: bool = True
    #: System prompt text: empty as in the paper's evaluation (``model.system_prompt`` picks it).
    system_prompt: str = EMPTY_SYSTEM_PROMPT
    #: Stop decoding a sequence once its answer falls into a repetition loop (the rule of
    #: ``inference.result.has_repetition_loop``, checked every ``LOOP_CHECK_TOKENS`` tokens); False
    #: decodes on to a stop token or max_new_tokens.
    stop_on_loop: bool = True
    #: How decode steps run; None picks by device: row by row on the CPU (each image's result
    #: independent of its batch), batched on CUDA. ``COMPILED``: CUDA graphs (torch.compile).
    decode: DecodeStrategy | None = None
    #: How the decoder's weights are held on a CPU (:mod:`inference.lm.cpu_precision`): ``fp32``
    #: (exact), ``bf16`` or ``int8`` (weight-only). Never applies on CUDA (bf16 there, always).
    cpu_precision: str = "fp32"
    #: CPU threads for torch (and the onnxruntime APM, which follows torch): None leaves torch's
    #: setting alone; a worker passes :func:`inference.lm.cpu_precision.cpu_threads` (its affinity).
    cpu_threads: int | None = None

    def decode_strategy(self) -> DecodeStrategy:
        return self.decode or DecodeStrategy.for_device(torch.device(self.device))


@dataclass
class _ImageState:
    """What the tasks have produced so far for one image."""

    findings: list[Finding] = dataclasses.field(default_factory=list)
    answers: list[TaskAnswer] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    report: Report | None = None
    finding_boxes_model: list[tuple[float, ...]] = dataclasses.field(default_factory=list)


@dataclass
class _Batch:
    """The images of one ``analyze`` call, what the APM saw in them and what tasks found so far
    (index = row)."""

    images: Sequence[PreparedImage]
    perception: _Perception
    states: list[_ImageState]


@dataclass
class _Perception:
    """The APM's view of a batch of images, per image (index = row)."""

    boxes_model: np.ndarray  # [B, 36, 4] int, model frame
    sentences: list[list[str]]
    memory: torch.Tensor  # [B, 1024, d_model]
    anatomy_tokens: torch.Tensor  # [B, 36, token_dim]
    labels: list[dict[str, float]]


class Engine:
    """One loaded model. Not thread-safe: one engine per worker process."""

    def __init__(
        self,
        model_dir: ModelDir,
        apm_runner,
        apm_report: APMLoadReport,
        retrieval: RetrievalDB,
        lm: AnatomixLM,
        lm_report: LMLoadReport,
        tokenizer,
        token_ids: TokenIds,
        identity: ModelIdentity,
        options: EngineOptions,
    ) -> None:
        self.model_dir = model_dir
        self.apm_runner = apm_runner
        self.apm_report = apm_report
        self.retrieval = retrieval
        self.lm = lm
        self.lm_report = lm_report
        self.tokenizer = tokenizer
        self.token_ids = token_ids
        self._identity = identity
        self.options = options
        self.device = torch.device(options.device)
        #: The last KV cache, reused on CUDA when the next batch has the same shape (keeps CUDA graphs).
        self._cache: KVCache | None = None
        #: Built once: a compiled step keeps its graphs as long as the engine lives.
        self.decode_step = DecodeStep.build(options.decode_strategy())
        #: Seconds between progress lines while a task decodes.
        self.progress_interval_s = PROGRESS_INTERVAL_S

    # ---- loading -------------------------------------------------------------------------------
    @classmethod
    def load(cls, model_dir: Path, options: EngineOptions | None = None, cache_dir: Path | None = None) -> Engine:
        """Load every part from ``model_dir``; raise :class:`ModelLoadError` saying what is wrong.

        ``cache_dir``: where a compiling APM backend keeps its engines (default: in ``model_dir``)."""
        from inference.backends import make_apm_runner

        options = options or EngineOptions()
        backend, device = options.backend, options.device
        try:
            check_precision(options.cpu_precision)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
        torch_device = torch.device(device)
        if torch_device.type == "cuda" and not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r} requested but CUDA is not available here: use device cpu")
        if torch_device.type == "cpu" and options.cpu_threads:
            torch.set_num_threads(options.cpu_threads)  # before the APM runner: onnxruntime follows it
        try:
            directory = ModelDir.open(Path(model_dir))
            tokenizer = load_tokenizer(directory.base)
            token_ids = TokenIds.from_tokenizer(tokenizer)
            apm, apm_report = load_apm(directory.apm, device=torch_device)
            try:
                runner = make_apm_runner(backend, apm, torch_device, cache_dir or directory.root / ".engine-cache")
            except (ValueError, ImportError, RuntimeError) as exc:  # unknown backend, TensorRT not installed
                raise ModelLoadError(f"APM backend {backend!r} cannot be used: {exc}") from exc
            retrieval = RetrievalDB.load(directory.retrieval_db)
            if torch_device.type == "cuda":
                lm, lm_report = load_lm(directory.base, directory.lm, token_ids, device=torch_device, dtype=torch.bfloat16)
            else:
                lm, lm_report = load_cpu_lm(
                    directory.base,
                    directory.lm,
                    token_ids,
                    options.cpu_precision,
                    cache_dir or directory.root / ".engine-cache",
                    directory.weights_digest(),
                )
        except (ModelDirError, TokenizerError, CheckpointError, LMCheckpointError, LMConfigError, RetrievalDBError) as exc:
            raise ModelLoadError(f"cannot load the model from {model_dir}: {exc}") from exc
        _check_dimensions(apm_report, retrieval, lm)
        digest = directory.weights_digest()
        identity = ModelIdentity(
            name=directory.name,
            version=directory.version,
            weights_digest=digest,
            device_uid=device_uid_from_digest(digest),
            demo=directory.demo,
            backend=backend,
            device=str(torch_device),
        )
        log.info("AnatomiX loaded (%s, demo=%s): LM %s", directory.version, directory.demo, lm_report.summary())
        return cls(directory, runner, apm_report, retrieval, lm, lm_report, tokenizer, token_ids, identity, options)

    @property
    def identity(self) -> ModelIdentity:
        return self._identity

    # ---- analysis ------------------------------------------------------------------------------
    def analyze_dataset(self, ds, tasks: Sequence[str | TaskRequest]) -> AnalysisResult:
        """Preprocess one pydicom dataset and analyse it (convenience for one image)."""
        start = time.perf_counter()
        image = prepare_dataset(ds)
        prepared_s = time.perf_counter() - start
        (result,) = self.analyze([image], tasks)
        timings = dict(result.timings)
        timings["preprocess"] = timings.get("preprocess", 0.0) + prepared_s
        timings["total"] = timings.get("total", 0.0) + prepared_s
        return dataclasses.replace(result, timings=timings)

    @torch.inference_mode()
    def analyze(self, images: Sequence[PreparedImage], tasks: Sequence[str | TaskRequest]) -> list[AnalysisResult]:
        """Analyse a batch: APM and retrieval once per image, then each task batched over the images."""
        requests = [TaskRequest.parse(task) for task in tasks]
        if not images:
            return []
        timings: dict[str, float] = {"batch_size": float(len(images))}
        clock = time.perf_counter()
        pixels = images_to_tensor(images, device=self.device)
        timings["preprocess"] = time.perf_counter() - clock

        perception = self._perceive(pixels, timings)
        states = [_ImageState() for _ in images]
        for key in ("prompt", "prefill", "decode", "decode_tokens"):
            timings[key] = 0.0
        batch = _Batch(images, perception, states)
        for request in requests:
            if request.uses_lm:
                self._run_task(request, batch, timings)
        if timings["decode"] > 0:
            timings["decode_tokens_per_s"] = timings["decode_tokens"] / timings["decode"]
        timings["total"] = time.perf_counter() - clock

        return [self._result(image, index, perception, states[index], dict(timings)) for index, image in enumerate(images)]

    # ---- stages shared by analyze() and the continuous batcher ----------------------------------------
    def _perceive(self, pixels: torch.Tensor, timings: dict[str, float]) -> _Perception:
        """APM + retrieval + image labels for a batch of images ``[B, 1, 1024, 1024]``."""
        outputs = self._timed(timings, "apm", lambda: self._run_apm(pixels))
        anatomy_tokens = outputs["anatomy_tokens"].float()
        sentences = self._timed(timings, "retrieval", lambda: self.retrieval.lookup(anatomy_tokens.cpu()))
        logits = outputs["image_logits"].float().cpu().tolist()
        # sigmoid per value in Python doubles: a vectorised kernel rounds tail elements differently,
        # which would make a label depend on how many images share the batch
        labels = [dict(zip(CHEXPERT_LABELS, (_sigmoid(v) for v in row))) for row in logits]
        return _Perception(
            boxes_model=boxes_to_xyxy_model(outputs["boxes"].float().cpu()),  # [B, 36, 4] int, model frame
            sentences=sentences,
            memory=outputs["memory"],
            anatomy_tokens=anatomy_tokens,
            labels=labels,
        )

    def _sequence_for(self, request: TaskRequest, perception: _Perception, index: int, state: _ImageState):
        """(instruction, prompt embeds [L, H], injected vectors [37, H]) for one image and task, or
        None when the task has nothing to ask of this image (a warning says why)."""
        instruction = instruction_for(request, perception.labels[index], state.finding_boxes_model)
        if instruction is None:
            state.warnings.append(f"{request.task}: skipped, nothing to ask ({LM_TASKS[request.task].skipped_because})")
            return None
        text = build_prompt_text(instruction, perception.boxes_model[index].tolist(), perception.sentences[index], self.options.system_prompt)
        try:
            encoded = encode_prompt(self.tokenizer, text, self.token_ids)
        except PromptError as exc:  # e.g. an argument that itself contains <obj_i>: this task, this image
            state.warnings.append(f"{request.task}: skipped, {exc}")
            return None
        ids = torch.tensor([encoded.input_ids])
        prompt = self.lm.embed_prompt(ids, perception.memory[index : index + 1], perception.anatomy_tokens[index : index + 1])
        return instruction, prompt[0], self.lm.injected_vectors(ids, prompt)[0]

    @property
    def loop_check(self) -> LoopCheck | None:
        """What decoding stops a looping sequence by (None when ``stop_on_loop`` is off)."""
        return loop_check_for(self.tokenizer) if self.options.stop_on_loop else None

    def _take_answer(self, request: TaskRequest, instruction: str, tokens: list[int], letterbox: Letterbox, state: _ImageState) -> None:
        text = answer_text(self.tokenizer, tokens)
        state.answers.append(TaskAnswer(request.task, instruction, text, len(tokens)))
        self._read_answer(request, text, letterbox, state)

    def _result(self, image: PreparedImage, index: int, perception: _Perception, state: _ImageState, timings: dict[str, float]) -> AnalysisResult:
        regions = tuple(
            Region(
                index=r,
                name=REGION_NAMES[r],
                box=_source_box(image.letterbox, perception.boxes_model[index][r]),
                retrieved_sentence=perception.sentences[index][r],
            )
            for r in range(len(REGION_NAMES))
        )
        return AnalysisResult(
            sop_instance_uid=image.sop_instance_uid or "",
            rows=image.letterbox.source_rows,
            columns=image.letterbox.source_columns,
            regions=regions,
            findings=tuple(state.findings),
            report=state.report,
            model=self._identity,
            image_labels=perception.labels[index],
            answers=tuple(state.answers),
            timings=timings,
            warnings=tuple(state.warnings),
        ).with_text_checks()  # degenerate model text (loops, U+FFFD, empty) flagged in the warnings

    # ---- one LM task over the batch ----------------------------------------------------------------
    def _run_task(self, request: TaskRequest, batch: _Batch, timings: dict[str, float]) -> None:
        rows, instructions, embeds, injected = [], [], [], []
        clock = time.perf_counter()
        for index, state in enumerate(batch.states):
            sequence = self._sequence_for(request, batch.perception, index, state)
            if sequence is None:
                continue
            rows.append(index)
            instructions.append(sequence[0])
            embeds.append(sequence[1])
            injected.append(sequence[2])
        timings["prompt"] += time.perf_counter() - clock
        if not rows:
            return
        stop_ids = self.token_ids.stop_ids if self.options.stop_at_end_of_turn else ()
        on_gpu = self.device.type == "cuda"
        progress = DecodeProgress(request.task, len(rows), self.progress_interval_s)
        generation: Generation = generate_greedy(
            self.lm.decoder,
            embeds,
            self.options.max_new_tokens,
            stop_ids=stop_ids,
            decode_step=self.decode_step,
            cache_multiple=512 if on_gpu else 256,
            cache=self._cache if on_gpu else None,
            injection=TokenInjection(self.lm.injection_slots(), torch.stack(injected)),
            loop_check=self.loop_check,
            progress=progress,
        )
        progress.finished(generation.new_tokens, generation.decode_s, generation.loops_stopped)
        if on_gpu:
            self._cache = generation.cache
        timings["prefill"] += generation.prefill_s
        timings["decode"] += generation.decode_s
        timings["decode_tokens"] += float(generation.new_tokens)
        for index, instruction, tokens in zip(rows, instructions, generation.tokens):
            self._take_answer(request, instruction, tokens, batch.images[index].letterbox, batch.states[index])

    def _read_answer(self, request: TaskRequest, text: str, letterbox: Letterbox, state: _ImageState) -> None:
        flags = LM_TASKS[request.task]
        kind = flags.answer
        if kind == "report":
            findings, impression = split_report(text)
            state.report = Report(findings=findings, impression=impression, raw_text=text)
            return
        if kind == "boxes":
            parsed = parse_grounded_answer(text, letterbox)
            state.warnings += [f"{request.task}: {warning}" for warning in parsed.warnings]
            if not parsed.boxes and text.strip() != NO_ABNORMALITY_ANSWER:
                state.warnings.append(f"{request.task}: the answer holds no usable box")
            region = region_name(request.argument or DEFAULT_LM_REGION) if flags.region_answer else None
            groups: list[tuple[str, list]] = []
            for box in parsed.boxes:
                if groups and groups[-1][0] == box.label:
                    groups[-1][1].append(box)
                else:
                    groups.append((box.label, [box]))
            for label, group in groups:
                name = region or label or request.argument or request.task
                state.findings.append(
                    Finding(
                        index=len(state.findings),
                        label=name,
                        text=strip_tags(text) if region else (label or name),
                        boxes=tuple(Box(*b.box_source) for b in group),
                        task=request.task,
                        region_indices=(REGION_NAMES.index(region),) if region else (),
                    )
                )
                state.finding_boxes_model += [b.box_model for b in group]
            return
        if flags.labels_asked_boxes:
            asked = boxes_for(request, state.finding_boxes_model)
            source = [_source_box(letterbox, box) for box in asked]
            label = text.splitlines()[0].strip() if text else ""
            if not label:
                state.warnings.append(f"{request.task}: empty answer")
                return
            state.findings.append(
                Finding(
                    index=len(state.findings),
                    label=label,
                    text=strip_tags(text),
                    boxes=tuple(box for box in source if box is not None),
                    task=request.task,
                )
            )

    def _run_apm(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The APM on a batch. On CPU image by image: BLAS kernels depend on the batch size, and one
        image's result must not depend on which other images share its batch (batching buys little
        on CPU). On a GPU the batch runs at once."""
        if self.device.type == "cuda" or pixels.shape[0] == 1:
            return self.apm_runner.run(pixels)
        parts = [self.apm_runner.run(pixels[i : i + 1]) for i in range(pixels.shape[0])]
        return {key: torch.cat([part[key] for part in parts], dim=0) for key in parts[0]}

    def _timed(self, timings: dict[str, float], stage: str, work):
        start = time.perf_counter()
        value = work()
        synchronize(self.device)  # queued GPU work counts in its stage; nothing to wait for on the CPU
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - start
        return value


def answer_text(tokenizer, tokens: Sequence[int]) -> str:
    """An answer as the result records it: the tokens decoded without special tokens, cleaned up."""
    return postprocess_answer(tokenizer.decode(list(tokens), skip_special_tokens=True))


def loop_check_for(tokenizer) -> LoopCheck:
    """Whether an answer so far is a repetition loop, by the rule that flags model text unusable
    (:func:`inference.result.has_repetition_loop`), applied to the text the result would record."""

    def loops(tokens: Sequence[int]) -> bool:
        return has_repetition_loop(answer_text(tokenizer, tokens))

    return loops


class DecodeProgress:
    """INFO lines while one task decodes over a batch of images: at most one every ``interval_s``
    seconds (tokens so far, images still decoding, rate), then one when the task ends."""

    def __init__(self, task: str, images: int, interval_s: float = PROGRESS_INTERVAL_S) -> None:
        self.task, self.images, self.interval_s = task, images, interval_s
        self.started: tuple[float, int] | None = None  # (time, tokens) at the first call, after prefill
        self.last = 0.0

    def __call__(self, tokens: int, active: int) -> None:
        now = time.perf_counter()
        if self.started is None:
            self.started, self.last = (now, tokens), now
            return
        if now - self.last < self.interval_s:
            return
        self.last = now
        rate = (tokens - self.started[1]) / max(now - self.started[0], 1e-9)
        log.info("%s: %d tokens so far for %d image(s), %d still decoding, %.1f tokens/s", self.task, tokens, self.images, active, rate)

    def finished(self, tokens: int, decode_s: float, loops: int) -> None:
        rate = tokens / decode_s if decode_s > 0 else 0.0
        stopped = f", {loops} stopped in a repetition loop" if loops else ""
        log.info("%s: %d tokens for %d image(s) in %.1f s (%.1f tokens/s)%s", self.task, tokens, self.images, decode_s, rate, stopped)


def _source_box(letterbox: Letterbox, box_model) -> Box | None:
    """A model-frame box in source pixels, clipped; None when nothing of it lies inside the image."""
    x1, y1, x2, y2 = letterbox.clip(letterbox.to_source([float(v) for v in box_model]))
    box = Box(x1, y1, x2, y2)
    return None if box.is_degenerate() else box


def _sigmoid(value: float) -> float:
    """Logistic function in doubles, without overflow for large negative logits."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)


def _check_dimensions(apm_report: APMLoadReport, retrieval: RetrievalDB, lm: AnatomixLM) -> None:
    """The three files must belong together: APM widths = projector inputs = retrieval vector size."""
    config = apm_report.config
    image_in = lm.image_projectionhead.proj[0].in_features
    token_in = lm.obj_projectionhead.proj[0].in_features
    problems = []
    if image_in != config.d_model:
        problems.append(f"lm.pt image projector takes {image_in}-d features, the APM gives {config.d_model}-d")
    if token_in != config.token_dim:
        problems.append(f"lm.pt object projector takes {token_in}-d tokens, the APM gives {config.token_dim}-d")
    if retrieval.token_dim != config.token_dim:
        problems.append(f"retrieval DB vectors are {retrieval.token_dim}-d, the APM's anatomy tokens {config.token_dim}-d")
    if problems:
        raise ModelLoadError("model files do not belong together: " + "; ".join(problems))
