"""Generated ``<obj_i>`` / ``<image>`` tokens are embedded as the reference embeds them.

The reference runs its whole forward again at every step and writes the projected vectors over every
``<obj_i>`` / ``<image>`` position, generated ones included: a generated ``<obj_i>`` is region i's
projected anatomy token, a generated ``<image>`` the first projected image vector. The reference here
is that rule written out: a full forward (``transformers``, no cache) over the prompt plus the
generated tokens, embedded that way.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from inference.lm.decoding import (
    DecodeStep,
    DecodeStrategy,
    KVCache,
    TokenInjection,
    compile_decode_step,
    decode_one_token,
    decode_rows_one_by_one,
    generate_greedy,
    prefill,
    round_up,
)
from inference.lm.loader import load_lm
from inference.prompt import build_prompt_text, encode_prompt
from inference.result import REGION_NAMES
from inference.tokens import TokenIds, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    model_dir: Path = tiny_model_dir(3)
    tokenizer = load_tokenizer(model_dir / "medgemma")
    token_ids = TokenIds.from_tokenizer(tokenizer)
    lm, _ = load_lm(model_dir / "medgemma", model_dir / "lm.pt", token_ids)
    generator = torch.Generator().manual_seed(21)
    prompts = []
    for row in range(2):
        boxes = [(5 * i + row, 9 * row, 200 + i, 400 + row) for i in range(36)]
        sentences = [f"{name} is healthy." for name in REGION_NAMES]
        text = build_prompt_text("Detect abnormalities in the given image.", boxes, sentences, "")
        ids = torch.tensor([encode_prompt(tokenizer, text, token_ids).input_ids])
        memory = torch.randn(1, 1024, 64, generator=generator)
        tokens = torch.randn(1, 36, 16, generator=generator) * 3
        embeds = lm.embed_prompt(ids, memory, tokens)
        prompts.append((ids, embeds[0], lm.injected_vectors(ids, embeds)[0]))
    return lm, token_ids, prompts


def reference_embedding(lm, token: int, injected: torch.Tensor) -> torch.Tensor:
    slot = int(lm.injection_slots()[token])
    if slot >= 0:
        return injected[slot]
    return lm.decoder.model.embed_tokens(torch.tensor([[token]]))[0, 0]


@torch.inference_mode()
def reference_next_logits(lm, embeds: torch.Tensor, generated: list[int], injected: torch.Tensor | None) -> torch.Tensor:
    """The reference's step: the full sequence again, generated tokens embedded by its rule (or plain)."""
    extra = [reference_embedding(lm, t, injected) if injected is not None else lm.decoder.model.embed_tokens(torch.tensor([[t]]))[0, 0] for t in generated]
    sequence = torch.cat([embeds, torch.stack(extra)]) if extra else embeds
    return lm.decoder(inputs_embeds=sequence[None]).logits[0, -1].float()


@torch.inference_mode()
def test_injected_vectors_are_the_prompt_vectors(setup):
    lm, token_ids, prompts = setup
    ids, embeds, injected = prompts[0]
    assert injected.shape == (37, embeds.shape[-1])
    slots = lm.injection_slots()
    assert int(slots[token_ids.objects[7]]) == 7 and int(slots[token_ids.image]) == 36 and int(slots[token_ids.box]) == -1
    obj7 = int((ids[0] == token_ids.objects[7]).nonzero()[0, 0])
    first_image = int((ids[0] == token_ids.image).nonzero()[0, 0])
    assert torch.equal(injected[7], embeds[obj7]) and torch.equal(injected[36], embeds[first_image])
    plain = lm.decoder.model.embed_tokens(torch.tensor([[token_ids.objects[7]]]))[0, 0]
    assert float((plain - injected[7]).abs().max()) > 0.1  # the two embeddings are not the same thing


@torch.inference_mode()
def test_every_decode_path_embeds_generated_obj_and_image_tokens(setup):
    """Row 0 is fed a generated <obj_7>, row 1 a generated <image>: eager batched, row-by-row and
    compiled steps give the reference's logits, and those differ from the plain embedding's."""
    lm, token_ids, prompts = setup
    decoder = lm.decoder
    lengths = [int(p[1].shape[0]) for p in prompts]
    tokens = torch.tensor([token_ids.objects[7], token_ids.image])
    positions = torch.tensor(lengths)
    injection = TokenInjection(lm.injection_slots(), torch.stack([p[2] for p in prompts]))
    max_len = round_up(max(lengths) + 4, 256)

    def fresh_cache():
        cache = KVCache.allocate(decoder, 2, max_len)
        for row, (_, embeds, _) in enumerate(prompts):
            prefill(decoder, embeds[None], cache.rows(row, row + 1))
        return cache

    expected = torch.stack([reference_next_logits(lm, p[1], [int(t)], p[2]) for p, t in zip(prompts, tokens)])
    plain = torch.stack([reference_next_logits(lm, p[1], [int(t)], None) for p, t in zip(prompts, tokens)])
    assert float((expected - plain).abs().max()) > 1e-2  # the injection changes the next token's logits

    eager = decode_one_token(decoder, tokens, positions, fresh_cache(), injection)
    rowwise = decode_rows_one_by_one(decoder, tokens, positions, fresh_cache(), injection)
    torch._dynamo.reset()
    cache = fresh_cache()
    cache.mark_static()
    compiled = compile_decode_step()(decoder, tokens.clone(), positions.clone(), cache, injection)
    torch._dynamo.reset()
    for name, logits in (("eager", eager), ("row by row", rowwise), ("compiled", compiled)):
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4, msg=lambda m, name=name: f"{name}: {m}")
        assert torch.equal(logits.argmax(-1), expected.argmax(-1)), name
    without = decode_one_token(decoder, tokens, positions, fresh_cache())
    torch.testing.assert_close(without, plain, rtol=1e-4, atol=1e-4)


@torch.inference_mode()
def test_greedy_output_after_a_generated_obj_token_follows_the_reference(setup):
    """A model whose first answer token is <obj_7> (lm_head row edited on a copy): greedy decoding
    continues exactly as the reference's full-forward loop with the injected embedding."""
    lm, token_ids, prompts = setup
    _, embeds, injected = prompts[0]
    lm = copy.copy(lm)
    lm.decoder = copy.deepcopy(lm.decoder)
    decoder = lm.decoder
    hidden = decoder.model(inputs_embeds=embeds[None]).last_hidden_state[0, -1]
    logits = decoder.lm_head(hidden)
    obj = token_ids.objects[7]
    decoder.lm_head.weight[obj] = hidden * ((float(logits.max()) + 5.0) / float(hidden @ hidden))
    steps = 6
    reference, plain_reference = [], []
    for out, inject in ((reference, injected), (plain_reference, None)):
        for _ in range(steps):
            out.append(int(reference_next_logits(lm, embeds, out, inject).argmax()))
    assert reference[0] == obj and reference.count(obj) <= steps
    injection = TokenInjection(lm.injection_slots(), injected[None])
    for step in (None, DecodeStep.build(DecodeStrategy.ROW_BY_ROW)):
        ours = generate_greedy(decoder, [embeds], steps, decode_step=step, injection=injection)
        assert ours.tokens[0] == reference, step
    assert generate_greedy(decoder, [embeds], steps, injection=None).tokens[0] == plain_reference
    assert plain_reference != reference  # what the plain embedding did: greedy outputs diverge


def test_greedy_decoding_without_a_word_on_injection_is_refused(setup):
    """Leaving ``injection`` out would decode an AnatomiX prompt without its <obj_i>/<image> vectors:
    the caller has to pass one, or ``injection=None`` on purpose."""
    lm, _, prompts = setup
    _, embeds, _ = prompts[0]
    with pytest.raises(TypeError, match="injection"):
        generate_greedy(lm.decoder, [embeds], 2)
