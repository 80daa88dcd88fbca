"""Continuous batching: images from many studies decoded together over one static KV cache.

An :class:`Engine` analyses a list of images task by task. A worker serving a queue wants more: the
GPU decodes at batch 1 as slowly as at batch 16 (it is bound by reading the weights), so it should
keep many sequences in flight, let a finished one leave and a waiting one join at once, and never
rebuild the cache or recompile the step as the batch changes. :class:`ContinuousBatcher` does that:

* ``submit(key, image)`` queues an image; the APM runs over up to ``slots`` waiting images at a time
  (batched on a GPU), then each image's tasks run in order, one sequence per (image, task).
* ``step()`` admits ready sequences into free cache rows (prefill writes that row), runs one decode
  step over the fixed ``[slots]`` batch, and retires sequences that hit a stop token,
  ``max_new_tokens`` or a repetition loop (the engine's loop check, at the same lengths as in
  ``generate_greedy``, so a sequence ends where it ends when analysed alone). An image whose last task finished comes back from ``step()`` as
  ``(key, AnalysisResult)``.

The cache has ``slots`` rows and a fixed length; idle rows decode a pad token at position 0 (their
output is ignored), so the step's shapes never change. The engine's decode strategy says how a step
runs: row by row (the CPU default, ``DecodeStrategy.ROW_BY_ROW``) over active rows only
(:func:`decode_rows_one_by_one`), which makes each image's tokens identical to the same image analysed
alone; batched or compiled (GPU) over every row, which agrees with them up to rounding.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch

from inference.engine import Engine, _ImageState, _Perception
from inference.lm.decoding import DecodeStrategy, KVCache, TokenInjection, decode_rows_one_by_one, loop_check_due, prefill, round_up
from inference.preprocess import PreparedImage, images_to_tensor
from inference.tasks import TaskRequest

log = logging.getLogger(__name__)

#: Cache length is rounded up to this (and grows only when a longer prompt arrives with no row busy).
CACHE_MULTIPLE = 512


@dataclass
class _Image:
    key: Hashable
    image: PreparedImage
    perception: _Perception
    row: int  # this image's row in ``perception``
    state: _ImageState = field(default_factory=_ImageState)
    next_task: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)  # when it was submitted


@dataclass
class _Sequence:
    image: _Image
    request: TaskRequest
    instruction: str
    embeds: torch.Tensor  # [L, H]
    injected: torch.Tensor  # [37, H]
    tokens: list[int] = field(default_factory=list)


class ContinuousBatcher:
    """Decodes up to ``slots`` sequences at once over one static KV cache (see the module doc)."""

    def __init__(self, engine: Engine, tasks: Sequence[str | TaskRequest], slots: int) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        self.engine = engine
        self.requests = [TaskRequest.parse(task) for task in tasks]
        self.slots = slots
        self.device = engine.device
        self.max_new_tokens = engine.options.max_new_tokens
        self.stop_ids = frozenset(engine.token_ids.stop_ids if engine.options.stop_at_end_of_turn else ())
        self.loop_check = engine.loop_check
        self._waiting: deque[tuple[Hashable, PreparedImage, float]] = deque()
        self._ready: deque[_Sequence] = deque()
        self._rows: list[_Sequence | None] = [None] * slots
        self._images_in_flight = 0
        self._cache: KVCache | None = None
        self._tokens = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._positions = torch.zeros(slots, dtype=torch.long, device=self.device)
        self._injection: TokenInjection | None = None
        self._step = engine.decode_step
        self._row_by_row = self._step.strategy is DecodeStrategy.ROW_BY_ROW
        #: Largest number of rows decoded together so far (for tests and benchmarks).
        self.peak_rows = 0
        self.steps = 0
        #: Sequences retired because they looped (for tests and benchmarks).
        self.loops_stopped = 0
        self._progress_at = time.perf_counter()
        self._progress_tokens = 0

    # ---- intake ----------------------------------------------------------------------------------
    def submit(self, key: Hashable, image: PreparedImage) -> None:
        """Queue one image; its result comes back from :meth:`step` under ``key``."""
        self._waiting.append((key, image, time.perf_counter()))

    @property
    def images_in_flight(self) -> int:
        """Images submitted and not yet returned (waiting for the APM, or in their tasks)."""
        return len(self._waiting) + self._images_in_flight

    @property
    def idle(self) -> bool:
        return self.images_in_flight == 0

    @property
    def active_rows(self) -> int:
        return sum(row is not None for row in self._rows)

    # ---- one round ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, object]]:
        """Admit, decode one token for every active row, retire; returns the images that finished."""
        finished: list[tuple[Hashable, object]] = []
        self._perceive_waiting(finished)
        self._admit(finished)
        active = [index for index, row in enumerate(self._rows) if row is not None]
        if not active:
            self._progress_at, self._progress_tokens = time.perf_counter(), 0  # the rate counts decoding time only
            return finished
        self.peak_rows = max(self.peak_rows, len(active))
        clock = time.perf_counter()
        if not self._row_by_row:
            logits = self._step(self.engine.lm.decoder, self._tokens.clone(), self._positions.clone(), self._cache, self._injection)
            next_tokens = logits.argmax(dim=-1)
        else:  # only the active rows, each alone: results independent of the batch
            index = torch.tensor(active, device=self.device)
            logits = decode_rows_one_by_one(
                self.engine.lm.decoder,
                self._tokens[index],
                self._positions[index],
                _RowSubset(self._cache, active),
                TokenInjection(self._injection.slot_of, self._injection.vectors[index]),
            )
            next_tokens = torch.zeros_like(self._tokens)
            next_tokens[index] = logits.argmax(dim=-1)
        self.steps += 1
        values = next_tokens.tolist()
        elapsed = time.perf_counter() - clock
        for slot in active:
            sequence = self._rows[slot]
            timings = sequence.image.timings
            timings["decode"] = timings.get("decode", 0.0) + elapsed
            timings["decode_rows_max"] = max(timings.get("decode_rows_max", 0.0), float(len(active)))
            self._advance(slot, sequence, values[slot], finished)
        idle = torch.tensor([row is None for row in self._rows], device=self.device)
        self._tokens.copy_(next_tokens.masked_fill(idle, self.engine.token_ids.pad))
        self._positions.add_(1).masked_fill_(idle, 0)  # idle rows decode a pad at position 0
        self._progress_tokens += len(active)
        self._log_progress()
        return finished

    def _log_progress(self) -> None:
        """An INFO line at most every ``engine.progress_interval_s`` seconds while sequences decode."""
        now = time.perf_counter()
        elapsed = now - self._progress_at
        if elapsed < self.engine.progress_interval_s:
            return
        tasks = Counter(row.request.task for row in self._rows if row is not None)
        if tasks:
            in_flight = ", ".join(f"{task} x{count}" for task, count in sorted(tasks.items()))
            log.info(
                "decoding %d sequence(s) (%s), %d image(s) waiting: %d tokens in the last %.1f s (%.1f tokens/s)",
                sum(tasks.values()), in_flight, len(self._waiting), self._progress_tokens, elapsed, self._progress_tokens / elapsed,
            )  # fmt: skip
        self._progress_at, self._progress_tokens = now, 0

    def drain(self) -> list[tuple[Hashable, object]]:
        """Run until every submitted image has its result."""
        out: list[tuple[Hashable, object]] = []
        while not self.idle:
            out += self.step()
        return out

    # ---- stages ------------------------------------------------------------------------------------
    def _perceive_waiting(self, finished: list) -> None:
        """APM over waiting images while rows are free (a GPU runs them as one batch)."""
        free = self.slots - self.active_rows - len(self._ready)
        if free <= 0 or not self._waiting:
            return
        batch = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        timings: dict[str, float] = {}
        clock = time.perf_counter()
        pixels = images_to_tensor([image for _, image, _ in batch], device=self.device)
        timings["preprocess"] = time.perf_counter() - clock
        perception = self.engine._perceive(pixels, timings)
        for row, (key, image, submitted) in enumerate(batch):
            item = _Image(key, image, perception, row, timings={**timings, "batch_size": float(len(batch))}, started=submitted)
            self._images_in_flight += 1
            self._next_sequence(item, finished)

    def _next_sequence(self, item: _Image, finished: list) -> None:
        """Queue the image's next LM task, or return its result when no task is left."""
        while item.next_task < len(self.requests):
            request = self.requests[item.next_task]
            item.next_task += 1
            if not request.uses_lm:
                continue
            clock = time.perf_counter()
            sequence = self.engine._sequence_for(request, item.perception, item.row, item.state)
            item.timings["prompt"] = item.timings.get("prompt", 0.0) + time.perf_counter() - clock
            if sequence is not None:
                self._ready.append(_Sequence(item, request, *sequence))
                return
        self._images_in_flight -= 1
        timings = dict(item.timings)
        timings["total"] = time.perf_counter() - item.started  # from submit: waiting included
        finished.append((item.key, self.engine._result(item.image, item.row, item.perception, item.state, timings)))

    def _admit(self, finished: list) -> None:
        """Prefill ready sequences into free rows (a row's stale K/V is overwritten before it is seen)."""
        while self._ready and None in self._rows:
            sequence = self._ready[0]
            length = int(sequence.embeds.shape[0])
            if not self._ensure_cache(length):
                return  # a longer prompt waits for the busy rows to finish
            self._ready.popleft()
            slot = self._rows.index(None)
            clock = time.perf_counter()
            logits = prefill(self.engine.lm.decoder, sequence.embeds[None].to(self.device), self._cache.rows(slot, slot + 1))
            first = int(logits.argmax(dim=-1)[0])
            sequence.image.timings["prefill"] = sequence.image.timings.get("prefill", 0.0) + time.perf_counter() - clock
            self._injection.vectors[slot] = sequence.injected.to(self._injection.vectors.dtype)
            self._rows[slot] = sequence
            self._tokens[slot] = first
            self._positions[slot] = length
            self._advance(slot, sequence, first, finished)

    def _advance(self, slot: int, sequence: _Sequence, token: int, finished: list) -> None:
        """Record ``token`` for the sequence in ``slot``; retire it when it stops."""
        stop, looped = token in self.stop_ids, False
        if not stop:
            sequence.tokens.append(token)
            looped = self.loop_check is not None and loop_check_due(len(sequence.tokens)) and self.loop_check(sequence.tokens)
            self.loops_stopped += looped
        if stop or looped or len(sequence.tokens) >= self.max_new_tokens:
            self._rows[slot] = None
            image = sequence.image
            log.debug("%s: %d tokens%s", sequence.request.task, len(sequence.tokens), ", stopped in a repetition loop" if looped else "")
            image.timings["decode_tokens"] = image.timings.get("decode_tokens", 0.0) + len(sequence.tokens)
            self.engine._take_answer(sequence.request, sequence.instruction, sequence.tokens, image.image.letterbox, image.state)
            self._next_sequence(image, finished)

    def _ensure_cache(self, prompt_length: int) -> bool:
        needed = round_up(prompt_length + self.max_new_tokens, CACHE_MULTIPLE)
        if self._cache is not None and self._cache.max_len >= needed:
            return True
        if self._cache is not None and self.active_rows:
            return False
        decoder = self.engine.lm.decoder
        self._cache = KVCache.allocate(decoder, self.slots, needed)
        if self._step.static_cache:
            self._cache.mark_static()
        hidden = decoder.config.hidden_size
        vectors = torch.zeros(self.slots, 37, hidden, dtype=decoder.model.embed_tokens.weight.dtype, device=self.device)
        self._injection = TokenInjection(self.engine.lm.injection_slots(), vectors)
        return True


class _RowSubset(KVCache):
    """The cache rows of the active slots, for the row-by-row CPU step (views, so writes land)."""

    def __init__(self, cache: KVCache, slots: list[int]) -> None:
        self._cache, self._slots = cache, slots
        super().__init__(cache.keys, cache.values)

    @property
    def batch(self) -> int:
        return len(self._slots)

    def rows(self, start: int, stop: int) -> KVCache:
        slot = self._slots[start]
        return self._cache.rows(slot, slot + stop - start)
