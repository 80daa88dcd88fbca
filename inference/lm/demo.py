"""Demo LM files in the authors' formats: MedGemma-style base directory and ``lm.pt``.

Random but deterministic from the seed (one ``torch.Generator`` walked over keys in a fixed order).
Written through the same key layout the loader checks (:mod:`inference.lm.layout`), with the real
dtypes: base and embedding/head copies bf16, LoRA and projectors fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import Gemma3TextConfig

from inference.lm.layout import (
    PEFT_EMBED,
    PEFT_EMBED_ORIGINAL,
    PEFT_LM_HEAD,
    PEFT_LM_HEAD_ORIGINAL,
    base_key_shapes,
    core_key_shapes,
    wrapper_key_shapes,
)


def _normal(shape: tuple[int, ...], std: float, generator: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * std).to(dtype)


def write_base_dir(base_dir: Path, config: Gemma3TextConfig, seed: int) -> None:
    """``config.json`` (multimodal Gemma-3 layout, text_config only) + ``model.safetensors`` (saved
    layout ``language_model.model.*``, bf16). Norm weights are small (Gemma uses ``1 + w``)."""
    from safetensors.torch import save_file

    base_dir.mkdir(parents=True, exist_ok=True)
    text = config.to_dict()
    for key in ("transformers_version", "architectures", "dtype", "torch_dtype"):
        text.pop(key, None)
    manifest = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "text_config": text,
        "_comment": "AnatomiX demo base: random weights, text decoder only (no vision tower)",
    }
    (base_dir / "config.json").write_text(json.dumps(manifest, indent=2, sort_keys=True), encoding="utf-8")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
    tensors = {}
    for key, shape in sorted(base_key_shapes(config).items()):
        std = 0.05 if len(shape) == 1 else (1.0 / config.hidden_size**0.5 if "embed_tokens" in key else 0.02)
        tensors[key] = _normal(shape, std, generator, torch.bfloat16)
    save_file(tensors, str(base_dir / "model.safetensors"), metadata={"format": "pt"})


def write_lm_pt(path: Path, config: Gemma3TextConfig, image_dim: int, token_dim: int, seed: int, base_dir: Path) -> None:
    """``{"apm": None, "LM": {"core_model": ..., "wrapper": ...}}`` with exactly the PEFT keys.

    ``original_module`` holds the base embedding (PEFT stores the frozen base again); the trained
    copies are the base plus noise, so a loader that picks the wrong one gives different output.
    """
    from safetensors import safe_open

    generator = torch.Generator().manual_seed(seed * 1_000_003 + 29)
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as handle:
        base_embed = handle.get_tensor("language_model.model.embed_tokens.weight")
    core: dict[str, torch.Tensor] = {}
    for key, (shape, dtype) in sorted(core_key_shapes(config).items()):
        if key in (PEFT_EMBED_ORIGINAL, PEFT_LM_HEAD_ORIGINAL):
            core[key] = base_embed
        elif key in (PEFT_EMBED, PEFT_LM_HEAD):
            noise = _normal(shape, 1.0 / config.hidden_size**0.5, generator, torch.float32)
            core[key] = (base_embed.float() + noise).to(dtype)
        else:  # LoRA factors: A ~ N(0, 1/in), B small but non-zero (trained)
            std = 1.0 / shape[1] ** 0.5 if ".lora_A." in key else 0.01
            core[key] = _normal(shape, std, generator, dtype)
    wrapper: dict[str, torch.Tensor] = {}
    for key, shape in sorted(wrapper_key_shapes(image_dim, token_dim, config.hidden_size).items()):
        if key.endswith(".2.weight"):
            wrapper[key] = torch.ones(shape) + _normal(shape, 0.02, generator, torch.float32)
        elif key.endswith("bias"):
            wrapper[key] = _normal(shape, 0.02, generator, torch.float32)
        else:
            wrapper[key] = _normal(shape, 1.0 / shape[1] ** 0.5, generator, torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"apm": None, "LM": {"core_model": core, "wrapper": wrapper}}, path)
