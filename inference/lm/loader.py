"""Load the language side from the authors' files: MedGemma base + ``lm.pt`` (LoRA, embeddings, projectors).

The decoder is built on the meta device (no memory, no random init) and every parameter is then
assigned from memory-mapped files: base weights from safetensors, the trained ``embed_tokens`` and
``lm_head`` copies and LoRA factors from ``lm.pt`` (``torch.load(mmap=True, weights_only=True)``).
LoRA is merged into the weights once (``W + B @ A * alpha / r`` in fp32, then cast), so inference runs
plain Linear layers. Names are matched first on shapes only (:func:`match_lm_checkpoint`), which is also
how the full-size layout is checked without 8 GB of files.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig
from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

from inference.lm.config import bf16_embed_scale, read_text_config
from inference.lm.layout import (
    LORA_ALPHA,
    LORA_TARGETS,
    PEFT_EMBED,
    PEFT_EMBED_ORIGINAL,
    PEFT_LM_HEAD,
    PEFT_LM_HEAD_ORIGINAL,
    lora_key,
    map_base_key,
    parse_lora_key,
    target_weight_name,
    wrapper_key_shapes,
)
from inference.lm.model import AnatomixLM, ProjectionHead
from inference.tokens import TokenIds

log = logging.getLogger(__name__)
Shape = tuple[int, ...]


class LMCheckpointError(ValueError):
    """The LM checkpoint cannot fill every inference weight; the message names the keys."""

    def __init__(self, message: str, report: LMLoadReport | None = None) -> None:
        super().__init__(message)
        self.report = report


@dataclass
class LMLoadReport:
    """What the loader matched. ``missing``/``mismatched`` make loading fail; ``unexpected`` is reported."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    #: Keys skipped on purpose (vision tower, PEFT ``original_module`` copies), by count.
    ignored: int = 0
    core_tensors: int = 0
    wrapper_tensors: int = 0
    lora_pairs: int = 0
    #: Target parameter -> where its value comes from (``base:KEY`` or ``lm.pt:KEY``).
    sources: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched

    def summary(self) -> str:
        return (
            f"{len(self.sources)} decoder tensors, {self.lora_pairs} LoRA pairs merged, {self.wrapper_tensors} projector tensors;"
            f" missing {len(self.missing)}, unexpected {len(self.unexpected)}, shape mismatches {len(self.mismatched)},"
            f" ignored {self.ignored}"
        )


def _shape(value) -> Shape:
    return tuple(int(d) for d in value)


def match_lm_checkpoint(
    expected: Mapping[str, Shape],
    base: Mapping[str, Shape],
    core: Mapping[str, Shape],
    wrapper: Mapping[str, Shape],
    config: Gemma3TextConfig,
) -> LMLoadReport:
    """Match source keys to decoder parameters on names and shapes only (works for meta-size checks).

    expected: ``Gemma3ForCausalLM`` parameter name -> shape. base: base-directory keys -> shape.
    core/wrapper: ``lm.pt``'s ``core_model`` / ``wrapper`` key -> shape.
    """
    report = LMLoadReport()
    for key, shape in base.items():
        try:
            target = map_base_key(key)
        except KeyError:
            report.unexpected.append(f"base:{key}")
            continue
        if target is None:
            report.ignored += 1
        elif target not in expected:
            report.unexpected.append(f"base:{key}")
        elif _shape(shape) != expected[target]:
            report.mismatched.append(f"base:{key} has shape {_shape(shape)}, expected {expected[target]}")
        else:
            report.sources[target] = f"base:{key}"

    report.core_tensors = len(core)
    for key, target in ((PEFT_EMBED, "model.embed_tokens.weight"), (PEFT_LM_HEAD, "lm_head.weight")):
        if key not in core:
            report.missing.append(f"lm.pt:{key}")
        elif _shape(core[key]) != expected[target]:
            report.mismatched.append(f"lm.pt:{key} has shape {_shape(core[key])}, expected {expected[target]}")
        else:
            report.sources[target] = f"lm.pt:{key}"
    seen_lora: set[str] = set()
    for key, shape in core.items():
        if key in (PEFT_EMBED, PEFT_LM_HEAD):
            continue
        if key in (PEFT_EMBED_ORIGINAL, PEFT_LM_HEAD_ORIGINAL):
            report.ignored += 1  # the frozen base stored again by PEFT: never used
            continue
        parsed = parse_lora_key(key)
        if parsed is None or parsed[0] >= config.num_hidden_layers:
            report.unexpected.append(f"lm.pt:{key}")
            continue
        layer, module, which = parsed
        out_f, in_f = expected[target_weight_name(layer, module)]
        rank = _shape(shape)[0] if which == "A" else _shape(shape)[-1]
        want = (rank, in_f) if which == "A" else (out_f, rank)
        if len(_shape(shape)) != 2 or _shape(shape) != want:
            report.mismatched.append(f"lm.pt:{key} has shape {_shape(shape)}, expected {want} (r={rank})")
        seen_lora.add(key)
    for layer in range(config.num_hidden_layers):
        for module in LORA_TARGETS:
            pair = [lora_key(layer, module, which) for which in ("A", "B")]
            for key in pair:
                if key not in seen_lora:
                    report.missing.append(f"lm.pt:{key}")
            if all(key in seen_lora for key in pair):
                report.lora_pairs += 1

    for name in expected:
        if name not in report.sources:
            report.missing.append(f"decoder weight {name} (from the base directory or lm.pt)")

    report.wrapper_tensors = len(wrapper)
    image_dim = _shape(wrapper.get("image_projectionhead.proj.0.weight", (0, 0)))[-1]
    token_dim = _shape(wrapper.get("obj_projectionhead.proj.0.weight", (0, 0)))[-1]
    want_wrapper = wrapper_key_shapes(image_dim, token_dim, config.hidden_size)
    for key, shape in want_wrapper.items():
        if key not in wrapper:
            report.missing.append(f"lm.pt:wrapper:{key}")
        elif _shape(wrapper[key]) != shape:
            report.mismatched.append(f"lm.pt:wrapper:{key} has shape {_shape(wrapper[key])}, expected {shape}")
    report.unexpected += [f"lm.pt:wrapper:{key}" for key in wrapper if key not in want_wrapper]
    return report


def read_lm_pt(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(core_model, wrapper)`` from the authors' ``lm.pt``, memory-mapped, weights only."""
    if not path.is_file():
        raise LMCheckpointError(f"{path} not found: the model directory needs the AnatomiX LM checkpoint lm.pt")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise LMCheckpointError(f"{path} is not a readable torch checkpoint ({exc})") from exc
    lm = checkpoint.get("LM") if isinstance(checkpoint, dict) else None
    if not isinstance(lm, dict) or not isinstance(lm.get("core_model"), dict) or not isinstance(lm.get("wrapper"), dict):
        raise LMCheckpointError(f"{path} is not an AnatomiX LM checkpoint: expected {{'LM': {{'core_model': ..., 'wrapper': ...}}}}")
    return lm["core_model"], lm["wrapper"]


def open_base_weights(base_dir: Path) -> dict[str, tuple[Path, Shape]]:
    """Every tensor key in the base directory's safetensors files -> (file, shape), without reading data."""
    from safetensors import safe_open

    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted({base_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(base_dir.glob("*.safetensors"))
    if not files:
        raise LMCheckpointError(f"{base_dir} holds no *.safetensors: the base model directory must hold MedGemma's weights")
    keys: dict[str, tuple[Path, Shape]] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                keys[key] = (file, _shape(handle.get_slice(key).get_shape()))
    return keys


def inspect_lm_checkpoint(base_dir: Path, lm_path: Path) -> LMLoadReport:
    """Match the files on names and shapes only (mmap, no weight data read): fast even at full size."""
    config = read_text_config(base_dir)
    decoder = build_meta_decoder(config)
    expected = {name: _shape(p.shape) for name, p in decoder.named_parameters()}
    base = open_base_weights(base_dir)
    core, wrapper = read_lm_pt(lm_path)
    return match_lm_checkpoint(
        expected,
        {k: shape for k, (_, shape) in base.items()},
        {k: _shape(v.shape) for k, v in core.items()},
        {k: _shape(v.shape) for k, v in wrapper.items()},
        config,
    )


def build_meta_decoder(config: Gemma3TextConfig) -> Gemma3ForCausalLM:
    """``Gemma3ForCausalLM`` with every tensor on the meta device (no allocation, no init)."""
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return Gemma3ForCausalLM(config)


def _fail_if_incomplete(report: LMLoadReport, where: str) -> None:
    if report.ok:
        return
    problems = report.missing + report.mismatched
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    raise LMCheckpointError(f"{where}: cannot load the AnatomiX LM ({len(problems)} problem(s)): {shown}", report)


def load_lm(
    base_dir: Path,
    lm_path: Path,
    token_ids: TokenIds,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[AnatomixLM, LMLoadReport]:
    """Build the decoder on meta, assign base + ``lm.pt`` weights (LoRA merged), attach the projectors.

    Raises :class:`LMCheckpointError` naming every missing key or wrong shape; unexpected keys are
    logged and kept in the report.
    """
    from safetensors import safe_open

    device = torch.device(device)
    config = read_text_config(base_dir)
    decoder = build_meta_decoder(config)
    expected = {name: _shape(p.shape) for name, p in decoder.named_parameters()}
    base = open_base_weights(base_dir)
    core, wrapper = read_lm_pt(lm_path)
    report = match_lm_checkpoint(
        expected,
        {k: shape for k, (_, shape) in base.items()},
        {k: _shape(v.shape) for k, v in core.items()},
        {k: _shape(v.shape) for k, v in wrapper.items()},
        config,
    )
    _fail_if_incomplete(report, str(lm_path.parent))
    if report.unexpected:
        log.warning("LM checkpoint: %d unexpected key(s) ignored: %s", len(report.unexpected), ", ".join(report.unexpected[:8]))

    handles: dict[Path, safe_open] = {}
    state: dict[str, torch.Tensor] = {}
    try:
        for target, source in report.sources.items():
            origin, key = source.split(":", 1)
            if origin == "lm.pt":
                tensor = core[key]
            else:
                file = base[key][0]
                if file not in handles:
                    handles[file] = safe_open(str(file), framework="pt", device="cpu")
                tensor = handles[file].get_tensor(key)
            state[target] = tensor.to(device=device, dtype=dtype)
    finally:
        handles.clear()
    for layer in range(config.num_hidden_layers):
        for module in LORA_TARGETS:
            lora_a = core[lora_key(layer, module, "A")].to(device=device, dtype=torch.float32)
            lora_b = core[lora_key(layer, module, "B")].to(device=device, dtype=torch.float32)
            rank = lora_a.shape[0]
            name = target_weight_name(layer, module)
            merged = state[name].float() + (lora_b @ lora_a) * (LORA_ALPHA / rank)  # alpha/r = 1.0 for r=16
            state[name] = merged.to(dtype)
    decoder.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(decoder, config, device)
    decoder.eval()

    image_head, object_head = _load_projectors(wrapper, config.hidden_size, device)
    lm = AnatomixLM(decoder, image_head, object_head, token_ids)
    stray = [name for name, t in (*lm.named_parameters(), *lm.named_buffers()) if t.is_meta]
    if stray:
        raise LMCheckpointError(f"{lm_path.parent}: weights left unset after loading: {', '.join(stray[:8])}", report)
    return lm, report


def _materialise_buffers(decoder: Gemma3ForCausalLM, config: Gemma3TextConfig, device: torch.device) -> None:
    """Recreate the non-persistent buffers the meta build left empty (RoPE tables, embedding scale).

    The embedding scale is set to bf16(sqrt(hidden)), the value the reference's bf16 model multiplies
    by, whatever dtype we run in (RoPE frequencies stay fp32 as in the reference).
    """
    decoder.model.rotary_emb = Gemma3RotaryEmbedding(config, device=device)
    embed = decoder.model.embed_tokens
    scale = bf16_embed_scale(config.hidden_size)
    embed.scalar_embed_scale = scale
    embed.embed_scale = torch.tensor(scale, device=device)


def _load_projectors(wrapper: Mapping[str, torch.Tensor], hidden: int, device: torch.device) -> tuple[ProjectionHead, ProjectionHead]:
    """The two fp32 projection heads from ``lm.pt``'s wrapper (shapes already checked)."""
    heads = []
    for name in ("image_projectionhead", "obj_projectionhead"):
        in_dim = wrapper[f"{name}.proj.0.weight"].shape[1]
        inner = wrapper[f"{name}.proj.0.weight"].shape[0]
        with torch.device("meta"):
            head = ProjectionHead(in_dim, hidden, inner)
        prefix = f"{name}."
        state = {k[len(prefix) :]: v.to(device=device, dtype=torch.float32) for k, v in wrapper.items() if k.startswith(prefix)}
        head.load_state_dict(state, strict=True, assign=True)
        heads.append(head.eval())
    return heads[0], heads[1]
