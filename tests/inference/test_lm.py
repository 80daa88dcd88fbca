"""The LM side on real (tiny demo) files: loader, injection, static-cache greedy decoding vs transformers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from inference.demo_weights import write_demo_model_dir
from inference.lm.config import bf16_embed_scale, build_text_config
from inference.lm.decoding import DecodeStep, DecodeStrategy, KVCache, decode_one_token, decode_rows_one_by_one, generate_greedy, prefill
from inference.lm.layout import PEFT_EMBED, PEFT_LM_HEAD, base_key_shapes, core_key_shapes, lora_key, wrapper_key_shapes
from inference.lm.loader import LMCheckpointError, build_meta_decoder, load_lm, match_lm_checkpoint
from inference.lm.model import InjectionError
from inference.prompt import build_prompt_text, encode_prompt
from inference.result import REGION_NAMES
from inference.tokens import TokenIds, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir(3)


@pytest.fixture(scope="module")
def tokenizer(model_dir):
    return load_tokenizer(model_dir / "medgemma")


@pytest.fixture(scope="module")
def token_ids(tokenizer) -> TokenIds:
    return TokenIds.from_tokenizer(tokenizer)


@pytest.fixture(scope="module")
def loaded(model_dir, token_ids):
    return load_lm(model_dir / "medgemma", model_dir / "lm.pt", token_ids)


def prompt_embeds(lm, tokenizer, token_ids, count: int, seed: int = 0) -> list[torch.Tensor]:
    """``count`` prompts of different lengths with random APM features, each ``[L, H]``."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for row in range(count):
        boxes = [(7 * i + row * 13, 11 * row, 300 + i * row, 500 + row) for i in range(36)]
        sentences = [f"{name} shows opacity." if (i + row) % 3 else f"{name} is healthy." for i, name in enumerate(REGION_NAMES)]
        encoded = encode_prompt(tokenizer, build_prompt_text("Detect abnormalities in the given image.", boxes, sentences), token_ids)
        memory = torch.randn(1, 1024, 64, generator=generator)
        tokens = torch.randn(1, 36, 16, generator=generator)
        out.append(lm.embed_prompt(torch.tensor([encoded.input_ids]), memory, tokens)[0])
    return out


def test_loader_matches_every_key_of_the_authors_layout(loaded) -> None:
    lm, report = loaded
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    config = lm.decoder.config
    assert report.lora_pairs == config.num_hidden_layers * 7
    assert report.core_tensors == config.num_hidden_layers * 14 + 4
    assert report.wrapper_tensors == 12
    assert report.ignored == 2  # the two PEFT original_module copies
    assert not any(t.is_meta for t in (*lm.parameters(), *lm.buffers()))


def test_trained_copies_and_merged_lora_are_what_runs(model_dir, loaded) -> None:
    from safetensors.torch import load_file

    lm, _ = loaded
    checkpoint = torch.load(model_dir / "lm.pt", weights_only=True)["LM"]
    core = checkpoint["core_model"]
    assert torch.equal(lm.decoder.model.embed_tokens.weight, core[PEFT_EMBED].float())
    assert torch.equal(lm.decoder.lm_head.weight, core[PEFT_LM_HEAD].float())
    assert lm.decoder.lm_head.weight.data_ptr() != lm.decoder.model.embed_tokens.weight.data_ptr()
    base = load_file(str(model_dir / "medgemma" / "model.safetensors"))
    a, b = core[lora_key(2, "down_proj", "A")], core[lora_key(2, "down_proj", "B")]
    expected = base["language_model.model.layers.2.mlp.down_proj.weight"].float() + b @ a
    torch.testing.assert_close(lm.decoder.model.layers[2].mlp.down_proj.weight, expected, rtol=0, atol=1e-6)
    assert not torch.equal(expected, base["language_model.model.layers.2.mlp.down_proj.weight"].float())


def test_embedding_scale_is_held_as_bf16(loaded, token_ids) -> None:
    lm, _ = loaded
    assert bf16_embed_scale(2560) == 50.5
    assert bf16_embed_scale(96) == 9.8125  # sqrt(96) = 9.798
    ids = torch.tensor([[token_ids.bos, token_ids.box, 300]])
    embedded = lm.decoder.model.embed_tokens(ids)
    assert torch.equal(embedded, lm.decoder.model.embed_tokens.weight[ids] * 9.8125)


def test_projected_features_land_on_image_and_object_positions(loaded, tokenizer, token_ids) -> None:
    lm, _ = loaded
    boxes = [(1, 2, 3, 4)] * 36
    encoded = encode_prompt(tokenizer, build_prompt_text("Task.", boxes, ["s."] * 36), token_ids)
    ids = torch.tensor([encoded.input_ids])
    memory, objects = torch.randn(1, 1024, 64), torch.randn(1, 36, 16)
    embeds = lm.embed_prompt(ids, memory, objects)
    image_rows = embeds[0][ids[0] == token_ids.image]
    torch.testing.assert_close(image_rows, lm.image_projectionhead(memory)[0])
    position = encoded.input_ids.index(token_ids.objects[17])
    torch.testing.assert_close(embeds[0, position], lm.obj_projectionhead(objects)[0, 17])
    plain = encoded.input_ids.index(token_ids.start_of_turn)
    assert torch.equal(embeds[0, plain], lm.decoder.model.embed_tokens.weight[token_ids.start_of_turn] * 9.8125)


def test_wrong_slot_counts_are_refused(loaded, tokenizer, token_ids) -> None:
    lm, _ = loaded
    ids = torch.tensor([[2, 2, 105] + [token_ids.image] * 1000 + list(token_ids.objects)])
    with pytest.raises(InjectionError, match="1024 <image>"):
        lm.embed_prompt(ids, torch.zeros(1, 1024, 64), torch.zeros(1, 36, 16))
    ids = torch.tensor([[2] + [token_ids.image] * 1024 + list(token_ids.objects[:35]) * 1 + [token_ids.objects[0]]])
    with pytest.raises(InjectionError, match=r"\[0, 35\]"):
        lm.embed_prompt(ids, torch.zeros(1, 1024, 64), torch.zeros(1, 36, 16))


def test_prefill_and_greedy_match_transformers(loaded, tokenizer, token_ids) -> None:
    lm, _ = loaded
    (embeds,) = prompt_embeds(lm, tokenizer, token_ids, 1)
    assert embeds.shape[0] > lm.decoder.config.sliding_window  # the local window really cuts the prompt
    with torch.inference_mode():
        ours = prefill(lm.decoder, embeds[None], KVCache.allocate(lm.decoder, 1, embeds.shape[0] + 8))
        reference = lm.decoder(inputs_embeds=embeds[None]).logits[:, -1]
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
        generated = generate_greedy(lm.decoder, [embeds], max_new_tokens=12, injection=None)
        hf = lm.decoder.generate(
            inputs_embeds=embeds[None],
            attention_mask=torch.ones(1, embeds.shape[0], dtype=torch.long),
            max_new_tokens=12,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=token_ids.pad,
        )
    assert generated.tokens[0] == hf[0].tolist()
    assert len(generated.tokens[0]) == 12


def test_batch_of_n_is_bit_identical_to_n_single_calls(loaded, tokenizer, token_ids) -> None:
    lm, _ = loaded
    prompts = prompt_embeds(lm, tokenizer, token_ids, 3, seed=5)
    assert len({p.shape[0] for p in prompts}) > 1  # different lengths, no padding involved
    singles = [generate_greedy(lm.decoder, [p], max_new_tokens=10, injection=None).tokens[0] for p in prompts]
    # the CPU schedule (rows stepped one by one on a shared cache) and the batched GPU schedule
    assert generate_greedy(lm.decoder, prompts, max_new_tokens=10, decode_step=DecodeStep.build(DecodeStrategy.ROW_BY_ROW), injection=None).tokens == singles
    assert generate_greedy(lm.decoder, prompts, max_new_tokens=10, injection=None).tokens == singles
    with torch.inference_mode():
        cache = KVCache.allocate(lm.decoder, 3, 4096)
        for row, p in enumerate(prompts):
            prefill(lm.decoder, p[None], cache.rows(row, row + 1))
        lengths = torch.tensor([p.shape[0] for p in prompts])
        tokens = torch.tensor([5, 6, 7])
        rowwise = decode_rows_one_by_one(lm.decoder, tokens, lengths, cache)
        batched = decode_one_token(lm.decoder, tokens, lengths, cache)
        for row, p in enumerate(prompts):
            single = KVCache.allocate(lm.decoder, 1, 8192)  # another cache length: no effect either
            prefill(lm.decoder, p[None], single)
            alone = decode_rows_one_by_one(lm.decoder, tokens[row : row + 1], lengths[row : row + 1], single)
            assert torch.equal(rowwise[row], alone[0])  # bit for bit
            alone = decode_one_token(lm.decoder, tokens[row : row + 1], lengths[row : row + 1], single)
            # one batched GEMM sums in another order than a single-row GEMV: equal up to rounding
            torch.testing.assert_close(batched[row], alone[0], rtol=1e-5, atol=1e-5)


def test_a_reused_cache_gives_the_same_tokens(loaded, tokenizer, token_ids) -> None:
    lm, _ = loaded
    prompts = prompt_embeds(lm, tokenizer, token_ids, 2, seed=11)
    first = generate_greedy(lm.decoder, prompts, max_new_tokens=6, injection=None)
    with torch.inference_mode():
        for tensor in first.cache.keys + first.cache.values:
            tensor.fill_(float("nan"))  # whatever the last batch left behind
    again = generate_greedy(lm.decoder, prompts[::-1], max_new_tokens=6, cache=first.cache, injection=None)
    assert again.cache is first.cache
    assert again.tokens == first.tokens[::-1]


def test_stop_tokens_end_a_row_early(loaded, tokenizer, token_ids) -> None:
    lm, _ = loaded
    prompts = prompt_embeds(lm, tokenizer, token_ids, 2, seed=9)
    free = generate_greedy(lm.decoder, prompts, max_new_tokens=8, injection=None)
    stop = free.tokens[0][3]
    stopped = generate_greedy(lm.decoder, prompts, max_new_tokens=8, stop_ids=(stop,), injection=None)
    assert stopped.tokens[0] == free.tokens[0][: free.tokens[0].index(stop)]
    row1 = free.tokens[1]
    assert stopped.tokens[1] == (row1[: row1.index(stop)] if stop in row1 else row1)


def test_same_seed_gives_the_same_tokens(tmp_path, loaded, tokenizer, token_ids) -> None:
    lm, _ = loaded
    other_dir = write_demo_model_dir(tmp_path / "again", "tiny", seed=3)
    other, _ = load_lm(other_dir / "medgemma", other_dir / "lm.pt", token_ids)
    a = generate_greedy(lm.decoder, prompt_embeds(lm, tokenizer, token_ids, 1), 6, injection=None).tokens
    b = generate_greedy(other.decoder, prompt_embeds(other, tokenizer, token_ids, 1), 6, injection=None).tokens
    assert a == b


def _rewrite_lm_pt(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    checkpoint = torch.load(dst / "lm.pt", weights_only=True)
    edit(checkpoint["LM"])
    torch.save(checkpoint, dst / "lm.pt")
    return dst


def test_a_dropped_lora_key_is_named(tmp_path, model_dir, token_ids) -> None:
    key = lora_key(4, "v_proj", "B")
    broken = _rewrite_lm_pt(model_dir, tmp_path / "m", lambda lm: lm["core_model"].pop(key))
    with pytest.raises(LMCheckpointError, match=key.replace(".", r"\.")) as error:
        load_lm(broken / "medgemma", broken / "lm.pt", token_ids)
    assert error.value.report.missing == [f"lm.pt:{key}"]


def test_a_corrupted_shape_is_named(tmp_path, model_dir, token_ids) -> None:
    def corrupt(lm):
        lm["wrapper"]["obj_projectionhead.proj.3.weight"] = torch.zeros(95, 512)

    broken = _rewrite_lm_pt(model_dir, tmp_path / "m", corrupt)
    with pytest.raises(LMCheckpointError, match=r"obj_projectionhead\.proj\.3\.weight has shape \(95, 512\)"):
        load_lm(broken / "medgemma", broken / "lm.pt", token_ids)


def test_a_missing_base_tensor_is_named(tmp_path, model_dir, token_ids) -> None:
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, tmp_path / "m")
    path = tmp_path / "m" / "medgemma" / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["language_model.model.layers.5.post_feedforward_layernorm.weight"]
    tensors["language_model.model.layers.9.mlp.up_proj.weight"] = torch.zeros(2)
    save_file(tensors, str(path))
    with pytest.raises(LMCheckpointError, match=r"model\.layers\.5\.post_feedforward_layernorm\.weight") as error:
        load_lm(tmp_path / "m" / "medgemma", tmp_path / "m" / "lm.pt", token_ids)
    assert error.value.report.unexpected == ["base:language_model.model.layers.9.mlp.up_proj.weight"]


def test_full_size_layout_matches_on_the_meta_device() -> None:
    config = build_text_config("full")
    decoder = build_meta_decoder(config)
    expected = {name: tuple(p.shape) for name, p in decoder.named_parameters()}
    core = {k: shape for k, (shape, _) in core_key_shapes(config).items()}
    wrapper = wrapper_key_shapes(256, 16, 2560)
    base = {**base_key_shapes(config), "vision_tower.vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14)}
    report = match_lm_checkpoint(expected, base, core, wrapper, config)
    assert report.missing == [] and report.unexpected == [] and report.mismatched == []
    assert report.core_tensors == 480 and report.wrapper_tensors == 12
    assert expected["lm_head.weight"] == (262208, 2560)
    assert core[lora_key(0, "o_proj", "A")] == (16, 2048) and core[lora_key(0, "gate_proj", "B")] == (10240, 16)
    assert config.layer_types[:6] == ["sliding_attention"] * 5 + ["full_attention"]
    dropped = dict(core)
    del dropped[lora_key(33, "down_proj", "A")]
    report = match_lm_checkpoint(expected, base, dropped, wrapper, config)
    assert report.missing == [f"lm.pt:{lora_key(33, 'down_proj', 'A')}"]


@pytest.mark.gpu
def test_cuda_bf16_path_with_compiled_decode(model_dir, token_ids, tokenizer) -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device on this machine: the bf16 / compiled decode path is tested only on a GPU host")
    lm, _ = load_lm(model_dir / "medgemma", model_dir / "lm.pt", token_ids, device="cuda", dtype=torch.bfloat16)
    prompts = prompt_embeds(lm, tokenizer, token_ids, 2)
    eager = generate_greedy(lm.decoder, prompts, max_new_tokens=8, injection=None)
    compiled = generate_greedy(lm.decoder, prompts, max_new_tokens=8, decode_step=DecodeStep.build(DecodeStrategy.COMPILED), injection=None)
    assert eager.tokens == compiled.tokens


def test_compiled_decode_step_traces_and_matches_eager_on_cpu_bf16(model_dir, token_ids, tokenizer) -> None:
    """The GPU path's compiled step (``compile_decode_step``: dynamo + inductor, static cache
    addresses) run on CPU in bf16: it must trace and give eager's logits, step after step. (CUDA
    graphs themselves only exist on a GPU; the CUDA test above covers them where one is present.)"""
    from inference.lm.decoding import KVCache, compile_decode_step, decode_one_token, prefill, round_up

    torch._dynamo.reset()
    lm, _ = load_lm(model_dir / "medgemma", model_dir / "lm.pt", token_ids, dtype=torch.bfloat16)
    prompts = prompt_embeds(lm, tokenizer, token_ids, 2, seed=5)
    compiled_step = compile_decode_step()
    with torch.inference_mode():
        caches = []
        for _ in range(2):
            cache = KVCache.allocate(lm.decoder, 2, round_up(max(int(p.shape[0]) for p in prompts) + 8, 256))
            for row, embeds in enumerate(prompts):
                prefill(lm.decoder, embeds[None], cache.rows(row, row + 1))
            caches.append(cache)
        caches[1].mark_static()
        tokens = torch.tensor([5, 9])
        positions = torch.tensor([int(p.shape[0]) for p in prompts])
        for _ in range(4):
            eager = decode_one_token(lm.decoder, tokens.clone(), positions.clone(), caches[0])
            compiled = compiled_step(lm.decoder, tokens.clone(), positions.clone(), caches[1])
            assert torch.allclose(eager, compiled, atol=0.1, rtol=0.05), (eager - compiled).abs().max()
            assert torch.equal(eager.argmax(-1), compiled.argmax(-1))
            tokens = eager.argmax(-1)
            positions = positions + 1
    torch._dynamo.reset()


def test_medgemma_style_config_is_read_with_its_legacy_keys(tmp_path) -> None:
    import json

    from inference.lm.config import LMConfigError, read_text_config

    text = {
        "model_type": "gemma3_text", "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
        "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
        "rope_local_base_freq": 10000.0, "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0,
        "sliding_window": 1024, "sliding_window_pattern": 6, "vocab_size": 262208, "torch_dtype": "bfloat16",
    }  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": text, "vision_config": {}}))
    config = read_text_config(tmp_path)
    assert config.layer_types.count("full_attention") == 5 and config.layer_types[5] == "full_attention"
    assert config.rope_parameters["full_attention"] == {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0}
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert config.tie_word_embeddings is False  # the trained embed/lm_head copies stay separate
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(LMConfigError, match="not a Gemma-3 model"):
        read_text_config(tmp_path)
