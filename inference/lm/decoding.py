"""Greedy decoding with a static KV cache, gpt-fast style, over ``transformers``' Gemma-3 layers.

The cache is allocated once per call (``[B, kv_heads, max_len, head_dim]`` per layer) and a token at
position ``p`` lives in slot ``p`` of its row: no left padding, each row keeps its own positions, so a
row computes exactly what it would compute alone. Prefill runs one image at a time (a 2.6k-token
prompt already fills a GPU) and writes that row of the cache; every decode step then advances all rows
together with static shapes (``decode_one_token``), which is what lets it be captured as a CUDA graph
by ``torch.compile(mode="reduce-overhead")`` when enabled.

Generated ``<obj_i>`` and ``<image>`` tokens are fed back as the reference feeds them: its forward
runs again over the whole sequence at every step and writes the projected vectors over every such
position, so a generated ``<obj_i>`` becomes region i's projected anatomy token and a generated
``<image>`` the first projected image vector (:class:`TokenInjection`). Every decode path (eager,
row by row, compiled) swaps them in inside :func:`decode_one_token`, with static shapes.

We call the Gemma-3 modules (projections, q/k norms, RoPE, MLP, RMSNorms, head) from ``transformers``
and do only the attention ourselves, on the static cache with an explicit causal + sliding-window
mask (``q - k < sliding_window`` on local layers), the same rule as ``transformers``' masks.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import Gemma3ForCausalLM
from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

#: Decode steps between checks whether every row has stopped.
STOP_CHECK_INTERVAL = 8
#: A sequence is checked for a repetition loop each time it has generated a multiple of this many tokens.
LOOP_CHECK_TOKENS = 8
#: Row-by-row (CPU) steps attend over the row's positions rounded up to this many slots.
ROW_KV_MULTIPLE = 256


@dataclass(frozen=True)
class TokenInjection:
    """What a generated token is embedded as when it is an injected one.

    ``slot_of``: ``[V]`` long, the vector slot of each token id (-1: the plain embedding);
    ``vectors``: ``[B, S, H]`` in the decoder dtype, per row the vectors written into its prompt
    (slots 0-35 the ``<obj_i>`` vectors, slot 36 the first ``<image>`` vector).
    """

    slot_of: torch.Tensor
    vectors: torch.Tensor

    def rows(self, start: int, stop: int) -> TokenInjection:
        return TokenInjection(self.slot_of, self.vectors[start:stop])


def embed_generated(decoder: Gemma3ForCausalLM, tokens: torch.Tensor, injection: TokenInjection | None) -> torch.Tensor:
    """tokens ``[B]`` -> ``[B, 1, H]``: the scaled token embedding, or the row's injected vector for
    ``<obj_i>``/``<image>`` (no rescale, as in the prompt). Static shapes: a gather and a select."""
    embeds = decoder.model.embed_tokens(tokens[:, None])
    if injection is None:
        return embeds
    slots = injection.slot_of[tokens]  # [B]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    chosen = injection.vectors[rows, slots.clamp(min=0)].to(embeds.dtype)  # [B, H]
    return torch.where((slots >= 0)[:, None, None], chosen[:, None, :], embeds)


@dataclass
class KVCache:
    """Per-layer key/value tensors ``[B, kv_heads, max_len, head_dim]``, zero-initialised."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(cls, decoder: Gemma3ForCausalLM, batch: int, max_len: int) -> KVCache:
        config = decoder.config
        weight = decoder.model.embed_tokens.weight  # the activation dtype (an int8 lm_head holds int8)
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        keys = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(config.num_hidden_layers)]
        values = [torch.zeros(shape, dtype=weight.dtype, device=weight.device) for _ in range(config.num_hidden_layers)]
        return cls(keys, values)

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def zero_(self) -> None:
        """Clear for reuse (stale NaNs would leak through masked slots: 0 * NaN is NaN)."""
        for tensor in (*self.keys, *self.values):
            tensor.zero_()

    def rows(self, start: int, stop: int) -> KVCache:
        """A view on rows ``start:stop`` (writes go to this cache)."""
        return KVCache([k[start:stop] for k in self.keys], [v[start:stop] for v in self.values])

    def mark_static(self) -> None:
        """Tell dynamo the cache tensors keep their addresses (no copies into CUDA graphs)."""
        for tensor in (*self.keys, *self.values):
            torch._dynamo.mark_static_address(tensor)


def attention_mask(positions: torch.Tensor, max_len: int, window: int | None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Additive mask ``[B, 1, T, max_len]`` (0 visible, -inf hidden): slot ``s`` is visible from
    position ``p`` iff ``s <= p`` and (local layers) ``p - s < window``. positions: ``[B, T]`` long.

    Built once per layer type and step in the compute dtype, so SDPA does not convert a boolean mask
    in every layer."""
    slots = torch.arange(max_len, device=positions.device)
    query = positions[:, None, :, None]
    visible = slots <= query
    if window is not None:
        visible = visible & (query - slots < window)
    return torch.zeros(visible.shape, dtype=dtype, device=positions.device).masked_fill_(~visible, float("-inf"))


def forward_hidden(decoder: Gemma3ForCausalLM, hidden: torch.Tensor, positions: torch.Tensor, cache: KVCache, kv_len: int | None = None) -> torch.Tensor:
    """Run every decoder layer on ``hidden [B, T, H]`` at ``positions [B, T]``, writing K/V into the
    cache slots given by the positions; returns the final-norm hidden states ``[B, T, H]``.

    ``kv_len`` limits attention to the first slots (prefill knows nothing lies beyond the prompt);
    decode steps attend over the whole static cache so their shapes never change."""
    kv_len = kv_len or cache.max_len
    config = decoder.config
    model = decoder.model
    layer_types = config.layer_types
    if layer_types is None:  # Gemma 3 configs always list them (sliding or full attention per layer)
        raise ValueError("the decoder's config has no layer_types")
    batch, steps, _ = hidden.shape
    rows = torch.arange(batch, device=hidden.device)[:, None].expand(batch, steps)
    masks = {
        layer_type: attention_mask(positions, kv_len, config.sliding_window if layer_type == "sliding_attention" else None, hidden.dtype)
        for layer_type in set(layer_types)
    }
    rope = {layer_type: model.rotary_emb(hidden, positions, layer_type) for layer_type in set(layer_types)}
    for index, layer in enumerate(model.layers[: config.num_hidden_layers]):
        layer_type = layer_types[index]
        residual = hidden
        normed = layer.input_layernorm(hidden)
        attn = layer.self_attn
        shape = (batch, steps, -1, attn.head_dim)
        query = attn.q_norm(attn.q_proj(normed).view(shape).transpose(1, 2))
        key = attn.k_norm(attn.k_proj(normed).view(shape).transpose(1, 2))
        value = attn.v_proj(normed).view(shape).transpose(1, 2)
        cos, sin = rope[layer_type]
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        # slot = position; advanced indices [B, T] around a slice give a [B, T, kv, hd] target
        cache.keys[index][rows, :, positions] = key.transpose(1, 2)
        cache.values[index][rows, :, positions] = value.transpose(1, 2)
        out = F.scaled_dot_product_attention(
            query,
            cache.keys[index][:, :, :kv_len],
            cache.values[index][:, :, :kv_len],
            attn_mask=masks[layer_type],
            scale=attn.scaling,
            enable_gqa=True,
        )
        out = attn.o_proj(out.transpose(1, 2).reshape(batch, steps, -1))
        hidden = residual + layer.post_attention_layernorm(out)
        residual = hidden
        hidden = residual + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(hidden)))
    return model.norm(hidden)


def logits_from_hidden(decoder: Gemma3ForCausalLM, hidden: torch.Tensor) -> torch.Tensor:
    """``lm_head`` (+ final soft-capping when the config has one); ``[..., H]`` -> ``[..., V]`` fp32."""
    logits = decoder.lm_head(hidden)
    cap = decoder.config.final_logit_softcapping
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits.float()


def prefill(decoder: Gemma3ForCausalLM, embeds: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """One prompt ``[1, L, H]`` into a one-row cache view; returns the last position's logits ``[1, V]``."""
    positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
    hidden = forward_hidden(decoder, embeds, positions, cache, kv_len=embeds.shape[1])
    return logits_from_hidden(decoder, hidden[:, -1])


def decode_one_token(
    decoder: Gemma3ForCausalLM,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    cache: KVCache,
    injection: TokenInjection | None = None,
    kv_len: int | None = None,
) -> torch.Tensor:
    """One step for every row: tokens ``[B]`` at positions ``[B]`` -> logits ``[B, V]`` (static shapes).
    ``injection`` swaps generated ``<obj_i>``/``<image>`` tokens for the row's injected vectors;
    ``kv_len`` (eager CPU only) attends over the first slots instead of the whole cache."""
    embeds = embed_generated(decoder, tokens, injection)
    hidden = forward_hidden(decoder, embeds, positions[:, None], cache, kv_len=kv_len)
    return logits_from_hidden(decoder, hidden[:, 0])


def decode_rows_one_by_one(
    decoder: Gemma3ForCausalLM, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, injection: TokenInjection | None = None
) -> torch.Tensor:
    """:func:`decode_one_token` run as B single-row steps.

    CPU BLAS picks different kernels (and summation orders) for 1, 2-3 and 4+ rows, so a batched step
    is only equal to single calls up to rounding. On CPU, where batching buys little, this keeps each
    image's result bit-identical whatever else is in the batch. Each row attends over its own
    positions rounded up to :data:`ROW_KV_MULTIPLE` slots, so its result does not depend on the
    cache's length either (a continuous batch sizes the cache for every sequence it may hold).
    """
    rows = [
        decode_one_token(
            decoder,
            tokens[row : row + 1],
            positions[row : row + 1],
            cache.rows(row, row + 1),
            None if injection is None else injection.rows(row, row + 1),
            kv_len=min(cache.max_len, round_up(int(positions[row]) + 1, ROW_KV_MULTIPLE)),
        )
        for row in range(tokens.shape[0])
    ]
    return torch.cat(rows, dim=0)


class DecodeStrategy(enum.Enum):
    """How a decode step advances the rows; chosen once, explicitly (:meth:`for_device`)."""

    #: Every row in one eager step (:func:`decode_one_token`): a GPU without compilation.
    BATCHED = "batched"
    #: Every row in one step compiled into CUDA graphs (:func:`compile_decode_step`); the cache
    #: tensors must keep their addresses (``KVCache.mark_static``).
    COMPILED = "compiled"
    #: B single-row steps (:func:`decode_rows_one_by_one`): each row's result independent of the
    #: batch (the CPU choice, where batching buys little).
    ROW_BY_ROW = "row_by_row"

    @classmethod
    def for_device(cls, device: torch.device, compile_decode: bool = False) -> DecodeStrategy:
        if device.type == "cuda":
            return cls.COMPILED if compile_decode else cls.BATCHED
        return cls.ROW_BY_ROW


@dataclass(frozen=True)
class DecodeStep:
    """A decode step and the strategy it implements (build one with :meth:`build`, once per
    engine: a compiled step keeps its graphs for as long as the object lives)."""

    strategy: DecodeStrategy
    run: Callable[..., torch.Tensor]

    @classmethod
    def build(cls, strategy: DecodeStrategy) -> DecodeStep:
        if strategy is DecodeStrategy.COMPILED:
            return cls(strategy, compile_decode_step())
        if strategy is DecodeStrategy.ROW_BY_ROW:
            return cls(strategy, decode_rows_one_by_one)
        return cls(strategy, decode_one_token)

    @property
    def static_cache(self) -> bool:
        """Whether the cache it runs over must keep its tensors' addresses (CUDA graphs)."""
        return self.strategy is DecodeStrategy.COMPILED

    def __call__(
        self,
        decoder: Gemma3ForCausalLM,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        injection: TokenInjection | None = None,
    ) -> torch.Tensor:
        return self.run(decoder, tokens, positions, cache, injection)


@dataclass
class Generation:
    """Greedy output per row (prompt excluded; stop token excluded) and where the time went."""

    tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    #: Decode steps run for the whole batch (tokens per row <= steps + 1).
    decode_steps: int
    cache: KVCache | None = None
    #: Rows whose decoding the loop check stopped.
    loops_stopped: int = 0

    @property
    def new_tokens(self) -> int:
        return sum(len(row) for row in self.tokens)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


#: Tells whether a sequence's tokens so far (prompt excluded) have fallen into a repetition loop.
LoopCheck = Callable[[Sequence[int]], bool]
#: Told the tokens generated so far over all rows and the rows still decoding, at every check.
ProgressReport = Callable[[int, int], None]


def loop_check_due(generated: int) -> bool:
    """Whether a sequence is checked for a loop once it holds ``generated`` tokens: every
    :data:`LOOP_CHECK_TOKENS` tokens, counted per sequence, so where it stops never depends on which
    other sequences share its batch or when it joined it."""
    return generated > 0 and generated % LOOP_CHECK_TOKENS == 0


class _Rows:
    """The rows' tokens on the host, read from the device at each check, cut where each row stops:
    before its first stop id, or at the first due loop check that says it loops."""

    def __init__(self, batch: int, stop_ids: Sequence[int], loop_check: LoopCheck | None) -> None:
        self.tokens: list[list[int]] = [[] for _ in range(batch)]
        self.stopped = [False] * batch
        self.loops = 0
        self._stop_set = set(stop_ids)
        self._loop_check = loop_check
        self._read = 0

    def read(self, columns: list[torch.Tensor]) -> None:
        """Take the columns (one ``[B]`` token tensor per step) not read yet (one device sync)."""
        if self._read == len(columns):
            return
        new = torch.stack(columns[self._read :], dim=1).tolist()
        self._read = len(columns)
        for row, values in enumerate(new):
            kept = self.tokens[row]
            for value in values:
                if self.stopped[row]:
                    break
                if value in self._stop_set:
                    self.stopped[row] = True
                    break
                kept.append(value)
                if self._loop_check is not None and loop_check_due(len(kept)) and self._loop_check(kept):
                    self.stopped[row] = True
                    self.loops += 1

    @property
    def active(self) -> int:
        return self.stopped.count(False)


@torch.inference_mode()
def generate_greedy(
    decoder: Gemma3ForCausalLM,
    prompts: Sequence[torch.Tensor],
    max_new_tokens: int,
    stop_ids: Sequence[int] = (),
    decode_step: DecodeStep | None = None,
    cache_multiple: int = 256,
    cache: KVCache | None = None,
    *,
    injection: TokenInjection | None,
    loop_check: LoopCheck | None = None,
    progress: ProgressReport | None = None,
) -> Generation:
    """Greedy decoding for a batch of prompt embeddings (each ``[L_b, H]``, lengths may differ).

    Rows stop at the first id in ``stop_ids`` (empty: always ``max_new_tokens``, like the reference),
    and, given a ``loop_check``, at the first :func:`loop_check_due` length where it says the row
    loops (its tokens end there). ``decode_step`` (default: :attr:`DecodeStrategy.BATCHED`, eager) says
    how each step runs: compiled, or row by row for batch-independent results on CPU; the cache length
    is rounded up to ``cache_multiple`` so compiled graphs are reused across calls. A ``cache`` of
    exactly that shape is reused (zeroed) instead of allocating one: a compiled step keeps its CUDA
    graph only while the cache tensors keep their addresses. ``Generation.cache`` returns the one used.
    ``injection`` (one row per prompt) embeds generated ``<obj_i>``/``<image>`` as the reference does.
    It has no default: an AnatomiX prompt needs its injection (without it a generated ``<obj_i>`` or
    ``<image>`` is fed back as a plain token embedding and the text drifts from the reference's);
    ``injection=None`` says on purpose that the decoder runs alone (tests and benchmarks of decoding).
    ``progress`` is called at every check with the tokens kept so far and the rows still decoding.
    """
    device = decoder.model.embed_tokens.weight.device
    batch = len(prompts)
    lengths = [int(p.shape[0]) for p in prompts]
    max_len = round_up(max(lengths) + max_new_tokens, cache_multiple)
    if cache is not None and cache.batch == batch and cache.max_len == max_len:
        cache.zero_()
    else:
        cache = KVCache.allocate(decoder, batch, max_len)
    step = decode_step or DecodeStep.build(DecodeStrategy.BATCHED)
    if step.static_cache:
        cache.mark_static()

    synchronize(device)
    start = time.perf_counter()
    first = torch.empty(batch, dtype=torch.long, device=device)
    for row, embeds in enumerate(prompts):
        logits = prefill(decoder, embeds[None].to(device), cache.rows(row, row + 1))
        first[row] = logits.argmax(dim=-1)[0]
    synchronize(device)
    prefill_s = time.perf_counter() - start

    rows = _Rows(batch, stop_ids, loop_check)
    checks = bool(stop_ids) or loop_check is not None or progress is not None
    out = [first]
    tokens = first
    positions = torch.tensor(lengths, dtype=torch.long, device=device)
    steps = 0
    start = time.perf_counter()
    while steps < max_new_tokens - 1:
        # reading the tokens costs a device->host sync: do it every few steps (rows that stopped
        # meanwhile decode a few ignored tokens, which is cheaper than stalling the GPU every step)
        if checks and steps % STOP_CHECK_INTERVAL == 0:
            rows.read(out)
            if progress is not None:
                progress(sum(map(len, rows.tokens)), rows.active)
            if not rows.active:
                break
        logits = step(decoder, tokens.clone(), positions.clone(), cache, injection)
        tokens = logits.argmax(dim=-1)
        out.append(tokens)
        positions = positions + 1
        steps += 1
    synchronize(device)
    decode_s = time.perf_counter() - start
    rows.read(out)
    return Generation(tokens=rows.tokens, prefill_s=prefill_s, decode_s=decode_s, decode_steps=steps, cache=cache, loops_stopped=rows.loops)


def compile_decode_step() -> Callable[..., torch.Tensor]:
    """``decode_one_token`` compiled for CUDA graphs (static shapes, static cache addresses).

    ``fullgraph=True``: a graph break (a Python-side value read, an unsupported op after a library
    upgrade) is an error when the step first runs, never a silent fall back to eager pieces; the CPU
    test that compiles this step (tests/inference/test_lm.py) fails on one."""
    return torch.compile(decode_one_token, mode="reduce-overhead", fullgraph=True, dynamic=False)
