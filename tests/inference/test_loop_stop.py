"""Decoding stops a sequence once its answer loops (the rule that flags model text unusable), per row.

The decoder is a real tiny Gemma-3 whose weights are set so that greedy decoding is known in advance:
its layers add nothing to the residual stream (zero output projections), so the last hidden state is
the last token's embedding, and ``lm_head`` row ``next(t)`` holds token t's embedding. One token range
counts upwards (t -> t + 1: distinct word pieces, a text that never loops); one token maps to itself
(" heart heart heart ...": a loop).
"""

from __future__ import annotations

import pytest
import torch
from transformers import Gemma3ForCausalLM

from inference.engine import answer_text, loop_check_for
from inference.lm.config import build_text_config
from inference.lm.decoding import LOOP_CHECK_TOKENS, DecodeStep, DecodeStrategy, generate_greedy, round_up
from inference.result import unusable_text_reason
from inference.tokens import add_anatomix_tokens, build_demo_tokenizer

MAX_NEW = 32
COUNT_FROM = 600  # learned word pieces of the demo tokenizer, far from " heart"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return add_anatomix_tokens(build_demo_tokenizer("tiny"))


@pytest.fixture(scope="module")
def scripted(tokenizer):
    """(decoder, counting start token, looping token)."""
    (heart,) = tokenizer.encode(" heart", add_special_tokens=False)
    successor = {t: t + 1 for t in range(COUNT_FROM, COUNT_FROM + MAX_NEW + 1)} | {heart: heart}
    torch.manual_seed(0)
    decoder = Gemma3ForCausalLM(build_text_config("tiny", vocab_size=round_up(len(tokenizer), 64))).eval()
    with torch.no_grad():
        for layer in decoder.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embeddings = decoder.model.embed_tokens.weight
        head = torch.zeros_like(decoder.lm_head.weight)
        for token, following in successor.items():
            head[following] += embeddings[token]
        decoder.lm_head.weight.copy_(head)
    return decoder, COUNT_FROM, heart


def prompts(decoder, last_tokens: list[int]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [decoder.model.embed_tokens(torch.tensor([2, token])) for token in last_tokens]


@pytest.mark.parametrize("strategy", [DecodeStrategy.ROW_BY_ROW, DecodeStrategy.BATCHED])
def test_a_looping_row_stops_and_its_neighbour_decodes_on_untouched(scripted, tokenizer, strategy) -> None:
    decoder, counting, heart = scripted
    step = DecodeStep.build(strategy)
    batch = prompts(decoder, [counting, heart])
    free = generate_greedy(decoder, batch, MAX_NEW, decode_step=step, injection=None)
    assert free.tokens[0] == list(range(counting + 1, counting + 1 + MAX_NEW)) and free.tokens[1] == [heart] * MAX_NEW
    assert unusable_text_reason(answer_text(tokenizer, free.tokens[0])) is None  # counting never loops
    checked = generate_greedy(decoder, batch, MAX_NEW, decode_step=step, injection=None, loop_check=loop_check_for(tokenizer))
    assert checked.tokens[0] == free.tokens[0]  # a text that does not loop is decoded to the end, unchanged
    assert checked.tokens[1] == [heart] * LOOP_CHECK_TOKENS  # stopped at the first check that saw the loop
    assert unusable_text_reason(answer_text(tokenizer, checked.tokens[1])) == "repetition loop"
    assert checked.loops_stopped == 1 and checked.decode_steps == MAX_NEW - 1


def test_a_batch_that_only_loops_ends_early(scripted, tokenizer) -> None:
    decoder, _, heart = scripted
    batch = prompts(decoder, [heart, heart])
    free = generate_greedy(decoder, batch, MAX_NEW, injection=None)
    checked = generate_greedy(decoder, batch, MAX_NEW, injection=None, loop_check=loop_check_for(tokenizer))
    assert free.decode_steps == MAX_NEW - 1
    assert checked.decode_steps == LOOP_CHECK_TOKENS  # 8 steps instead of 31
    assert checked.tokens == [[heart] * LOOP_CHECK_TOKENS] * 2 and checked.loops_stopped == 2
