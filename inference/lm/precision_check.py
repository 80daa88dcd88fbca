"""What a CPU precision costs: greedy tokens and logits against the fp32 decoder on the same prompt.

The candidate decoder is teacher-forced along the reference's greedy tokens, so step ``k`` compares
the two models on the same history: the first step whose argmax differs is exactly where free
greedy decoding would part, and the logit differences before it are not inflated by a different
history. Prefill and every step run through the engine's own kernels (:func:`prefill`,
:func:`decode_one_token`), the paths a worker takes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Gemma3ForCausalLM

from inference.lm.decoding import KVCache, decode_one_token, prefill


@dataclass(frozen=True)
class GreedyTrace:
    """Greedy tokens and the logits each was chosen from (``logits[k]`` gave ``tokens[k]``)."""

    tokens: list[int]
    logits: torch.Tensor  # [steps, V] fp32
    prefill_s: float = 0.0
    #: Seconds of the ``steps - 1`` decode steps.
    decode_s: float = 0.0


@dataclass(frozen=True)
class Divergence:
    """A candidate against the reference: ``first_divergent`` is the 0-based step where its argmax
    first differs (None: never within ``steps``); ``max_logit_diff`` the largest absolute logit
    difference over the steps before it; ``reference_logit_range`` the reference's logit spread there,
    to read the difference against."""

    steps: int
    first_divergent: int | None
    max_logit_diff: float
    reference_logit_range: float


@torch.inference_mode()
def greedy_trace(decoder: Gemma3ForCausalLM, embeds: torch.Tensor, steps: int, forced: Sequence[int] | None = None) -> GreedyTrace:
    """Decode ``steps`` tokens after the prompt ``embeds`` ``[L, H]``; with ``forced`` the tokens fed
    back are those (teacher forcing) and ``tokens`` are still this decoder's own argmaxes."""
    length = embeds.shape[0]
    cache = KVCache.allocate(decoder, 1, length + steps)
    start = time.perf_counter()
    logits = prefill(decoder, embeds[None].to(decoder.model.embed_tokens.weight.dtype), cache)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    rows, tokens = [], []
    for step in range(steps):
        rows.append(logits[0].float())
        tokens.append(int(logits[0].argmax()))
        if step == steps - 1:
            break
        fed = forced[step] if forced is not None else tokens[-1]
        position = torch.tensor([length + step])
        logits = decode_one_token(decoder, torch.tensor([fed]), position, cache, kv_len=length + step + 1)
    return GreedyTrace(tokens, torch.stack(rows), prefill_s, time.perf_counter() - start)


def divergence(reference: GreedyTrace, candidate: GreedyTrace) -> Divergence:
    """Compare a teacher-forced candidate trace with the reference trace it was forced along."""
    steps = min(len(reference.tokens), len(candidate.tokens))
    first = next((k for k in range(steps) if reference.tokens[k] != candidate.tokens[k]), None)
    upto = steps if first is None else first
    if upto == 0:
        return Divergence(steps, first, 0.0, 0.0)
    diff = (reference.logits[:upto] - candidate.logits[:upto]).abs().max()
    spread = (reference.logits[:upto].amax(dim=1) - reference.logits[:upto].amin(dim=1)).max()
    return Divergence(steps, first, float(diff), float(spread))
