"""CPU precision choices (model.cpu_precision: fp32 | bf16 | int8) at tiny size: kernels, loading from
the memory-mapped prepared file, quality against fp32, and that none of it touches CUDA."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from inference.demo_apm import synthetic_chest_radiograph
from inference.engine import Engine, EngineOptions, ModelLoadError
from inference.lm.cpu_precision import (
    CPU_PRECISIONS,
    DECODE_ROWS,
    Bf16Linear,
    Int8WeightOnlyLinear,
    cpu_threads,
    decoder_precision,
    quantize_int8,
)
from inference.lm.precision_check import divergence, greedy_trace
from inference.lm.prepared import prepared_path
from inference.preprocess import prepare_array

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A private copy: these tests write prepared files into its engine cache."""
    copy = tmp_path_factory.mktemp("cpu-precision") / "model"
    shutil.copytree(tiny_model_dir(0), copy)
    return copy


@pytest.fixture(scope="module")
def engines(model_dir) -> dict[str, Engine]:
    return {p: Engine.load(model_dir, EngineOptions(cpu_precision=p, max_new_tokens=12, stop_at_end_of_turn=False)) for p in CPU_PRECISIONS}


@pytest.fixture(scope="module")
def prompt(engines):
    """One report prompt for the fp32 engine: (input ids, APM outputs)."""
    from inference.apm.model import boxes_to_xyxy_model
    from inference.preprocess import images_to_tensor
    from inference.prompt import build_prompt_text, encode_prompt
    from inference.tasks import REPORT_INSTRUCTION

    engine = engines["fp32"]
    outputs = engine.apm_runner.run(images_to_tensor([prepare_array(synthetic_chest_radiograph(900, 800, seed=3))]))
    boxes = boxes_to_xyxy_model(outputs["boxes"])[0].tolist()
    sentences = engine.retrieval.lookup(outputs["anatomy_tokens"])[0]
    text = build_prompt_text(REPORT_INSTRUCTION, boxes, sentences)
    return torch.tensor([encode_prompt(engine.tokenizer, text, engine.token_ids).input_ids]), outputs


def test_settings_and_engine_offer_the_same_precisions() -> None:
    from dicom_node.settings import CPU_PRECISIONS as SETTINGS_PRECISIONS

    assert SETTINGS_PRECISIONS == CPU_PRECISIONS


def test_an_unknown_precision_is_refused_by_settings_and_engine(model_dir) -> None:
    from dataclasses import replace

    from dicom_node.settings import ModelSettings, Settings, SettingsError, validate

    validate(replace(Settings(), model=ModelSettings(cpu_precision="int8")))
    with pytest.raises(SettingsError, match="cpu_precision = 'int4'"):
        validate(replace(Settings(), model=ModelSettings(cpu_precision="int4")))
    with pytest.raises(SettingsError, match="cpu_threads = -1"):
        validate(replace(Settings(), model=ModelSettings(cpu_threads=-1)))
    with pytest.raises(ModelLoadError, match="int4"):
        Engine.load(model_dir, EngineOptions(cpu_precision="int4"))


def test_int8_weights_round_to_within_half_a_step() -> None:
    weight = torch.randn(64, 96, generator=torch.Generator().manual_seed(0))
    q, scales = quantize_int8(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16
    error = (weight - q.float() * scales.float()[:, None]).abs()
    assert bool((error <= scales.float()[:, None] / 2 + 1e-6).all())
    assert int(q.abs().max()) == 127  # the largest weight of each row uses the full range


@pytest.mark.parametrize("rows", [1, DECODE_ROWS + 5])  # the decode kernel and the fp32 prefill path
def test_quantised_and_bf16_linears_match_the_fp32_product(rows) -> None:
    generator = torch.Generator().manual_seed(1)
    linear = nn.Linear(96, 64, bias=True)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(64, 96, generator=generator) * 0.05)
        linear.bias.copy_(torch.randn(64, generator=generator) * 0.05)
    x = torch.randn(1, rows, 96, generator=generator).to(torch.bfloat16)
    int8 = Int8WeightOnlyLinear.from_linear(linear)
    expected = x.float() @ int8.dequantized().T + int8.bias.float()
    out = int8(x)
    assert out.shape == (1, rows, 64) and out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected, atol=0.03, rtol=0.02)
    bf16 = Bf16Linear(linear.weight.detach(), linear.bias.detach())
    assert torch.allclose(bf16(x).float(), x.float() @ bf16.weight.float().T + bf16.bias.float(), atol=0.03, rtol=0.02)


def test_each_precision_holds_the_decoder_as_configured(engines) -> None:
    fp32, bf16, int8 = (engines[p].lm for p in ("fp32", "bf16", "int8"))
    assert [decoder_precision(lm.decoder) for lm in (fp32, bf16, int8)] == ["fp32", "bf16", "int8"]
    assert isinstance(int8.decoder.lm_head, Int8WeightOnlyLinear)
    assert isinstance(int8.decoder.model.layers[0].mlp.down_proj, Int8WeightOnlyLinear)
    assert int8.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    # bytes read per token: bf16 half of fp32, int8 about a quarter (plus scales and bf16 norms)
    assert abs(bf16.info().decode_weight_bytes / fp32.info().decode_weight_bytes - 0.5) < 0.01
    assert 0.25 < int8.info().decode_weight_bytes / fp32.info().decode_weight_bytes < 0.3


def test_bf16_and_int8_weights_are_mapped_from_one_prepared_file(engines, model_dir) -> None:
    maps = Path("/proc/self/maps").read_text()
    digest = engines["int8"].identity.weights_digest
    for precision in ("bf16", "int8"):
        path = prepared_path(model_dir / ".engine-cache", precision, digest)
        assert path.is_file()
        assert str(path) in maps  # the weights are file pages, shared by every worker mapping them
    assert not list((model_dir / ".engine-cache").glob("lm-fp32-*"))  # fp32 (the exact path) is not prepared
    again = Engine.load(model_dir, EngineOptions(cpu_precision="int8"))  # second load: mapped, equal
    assert torch.equal(again.lm.decoder.lm_head.weight, engines["int8"].lm.decoder.lm_head.weight)


def test_an_unwritable_cache_keeps_a_private_copy(model_dir, tmp_path, caplog) -> None:
    cache = tmp_path / "not-a-directory"  # (tests run as root: a file, not permissions, makes it unwritable)
    cache.write_text("")
    engine = Engine.load(model_dir, EngineOptions(cpu_precision="int8"), cache_dir=cache)
    assert decoder_precision(engine.lm.decoder) == "int8"
    assert "keeps a private copy" in caplog.text


def test_quality_cost_against_fp32_greedy_tokens(engines, prompt) -> None:
    """Teacher-forced along fp32's greedy tokens: bf16 and int8 choose the same tokens and stay close
    in logits (figures for these weights; benchmarks/engine.py prints them at full size)."""
    ids, outputs = prompt
    traces = {}
    for precision in CPU_PRECISIONS:
        lm = engines[precision].lm
        embeds = lm.embed_prompt(ids, outputs["memory"], outputs["anatomy_tokens"])[0]
        traces[precision] = greedy_trace(lm.decoder, embeds, 12, forced=traces["fp32"].tokens if precision != "fp32" else None)
    for precision, limit in (("bf16", 0.3), ("int8", 0.5)):
        cost = divergence(traces["fp32"], traces[precision])
        assert cost.first_divergent is None, cost
        assert 0 < cost.max_logit_diff < limit, cost  # not bit-identical (else the comparison is void), but close


def test_every_precision_writes_a_complete_result(engines) -> None:
    image = prepare_array(synthetic_chest_radiograph(700, 600, seed=5))
    for engine in engines.values():
        (result,) = engine.analyze([image], ["report"])
        assert result.answers[0].generated_tokens == 12  # stop_at_end_of_turn off: every token decoded
        assert result.answers[0].raw_text and len(result.regions) == 36


def test_threads_follow_the_affinity_mask() -> None:
    import os

    assert cpu_threads() == len(os.sched_getaffinity(0)) >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_precision_never_applies_on_cuda(model_dir) -> None:
    engine = Engine.load(model_dir, EngineOptions(device="cuda", cpu_precision="int8"))
    assert type(engine.lm.decoder.lm_head) is nn.Linear and engine.lm.decoder.lm_head.weight.dtype == torch.bfloat16
