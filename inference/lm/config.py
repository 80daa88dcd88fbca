"""Gemma-3 text decoder configuration: read from a model directory, or built for the demo sizes.

The base model directory is MedGemma in Hugging Face layout. Its ``config.json`` is a multimodal
``Gemma3Config`` (``model_type: gemma3``) whose ``text_config`` describes the decoder we run; a plain
``Gemma3TextConfig`` (``model_type: gemma3_text``) is accepted as well. The SigLIP tower is never used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import Gemma3TextConfig

#: Full-size MedGemma-4B decoder shapes (see shared/anatomix-model.md, "LM stage").
FULL_TEXT_SHAPES = dict(
    vocab_size=262208,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=34,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    query_pre_attn_scalar=256,
    sliding_window=1024,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    max_position_embeddings=131072,
)

#: Small decoder with the same structure (6 layers = 5 local : 1 global, GQA 2:1, a sliding window
#: shorter than the prompt so the local/global split is exercised on CPU in seconds).
TINY_TEXT_SHAPES = dict(
    hidden_size=96,  # sqrt(96) = 9.798 is not a bf16 value (9.8125): the embed-scale rounding is exercised
    intermediate_size=192,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    query_pre_attn_scalar=16,
    sliding_window=256,
    rope_theta=1_000_000.0,
    rope_local_base_freq=10_000.0,
    rope_scaling={"rope_type": "linear", "factor": 8.0},
    max_position_embeddings=8192,
)


class LMConfigError(ValueError):
    """The base model's config.json is missing or does not describe a Gemma-3 text decoder."""


def build_text_config(size: str, vocab_size: int | None = None) -> Gemma3TextConfig:
    """A ``Gemma3TextConfig`` for the demo sizes ``tiny`` / ``full`` (untied head, SDPA)."""
    shapes = dict(FULL_TEXT_SHAPES if size == "full" else TINY_TEXT_SHAPES)
    if vocab_size is not None:
        shapes["vocab_size"] = vocab_size
    config = Gemma3TextConfig(**shapes, tie_word_embeddings=False)
    return config


def read_text_config(base_dir: Path) -> Gemma3TextConfig:
    """Read the decoder config from ``base_dir/config.json`` (multimodal or text-only layout).

    ``tie_word_embeddings`` is forced off: AnatomiX trains separate copies of ``embed_tokens`` and
    ``lm_head`` (PEFT ``modules_to_save``), which must never be re-tied.
    """
    path = base_dir / "config.json"
    if not path.is_file():
        raise LMConfigError(f"{path} not found: the base model directory must hold MedGemma's config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LMConfigError(f"{path} is not valid JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type == "gemma3":
        text = dict(raw.get("text_config") or {})
    elif model_type == "gemma3_text":
        text = dict(raw)
    else:
        raise LMConfigError(f"{path}: model_type {model_type!r} is not a Gemma-3 model (expected gemma3 or gemma3_text)")
    for key in ("model_type", "architectures", "transformers_version", "torch_dtype", "dtype"):
        text.pop(key, None)
    text["tie_word_embeddings"] = False
    config = Gemma3TextConfig(**text)
    if config.attn_logit_softcapping is not None:
        raise LMConfigError(f"{path}: attn_logit_softcapping is set; Gemma-3 decoders have none and this engine does not apply it")
    return config


def bf16_embed_scale(hidden_size: int) -> float:
    """The embedding multiplier as the reference's bf16 model holds it: bf16(sqrt(hidden)).

    For hidden 2560 that is 50.5, not 50.596; we use it in every dtype so CPU fp32 runs match the
    reference's arithmetic rather than the ideal value.
    """
    return float(torch.tensor(math.sqrt(hidden_size), dtype=torch.float32).to(torch.bfloat16).float())
