"""Checkpoint key layouts: the authors' ``lm.pt`` (PEFT names) and the MedGemma base directory.

Our decoder is ``transformers``' ``Gemma3ForCausalLM``; its parameter names (``model.layers.N...``,
``model.embed_tokens.weight``, ``lm_head.weight``) are the *target* names. Three source layouts map
onto them:

- ``lm.pt`` core_model (in-memory multimodal names behind PEFT):
  ``base_model.model.model.language_model.<rest>`` with ``.lora_{A,B}.default.weight`` per adapted
  Linear and ``embed_tokens``/``lm_head`` held as ``original_module`` (ignored) + ``modules_to_save.default``.
- base directory, saved layout: ``language_model.model.<rest>`` (and ``language_model.lm_head.weight``).
- base directory, in-memory or text-only layout: ``model.language_model.<rest>`` / ``model.<rest>``.
"""

from __future__ import annotations

import re

import torch
from transformers import Gemma3TextConfig

LORA_RANK = 16
LORA_ALPHA = 16
#: Adapted Linear layers per decoder layer: module name -> parent block.
LORA_TARGETS: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}
PEFT_PREFIX = "base_model.model.model.language_model."
PEFT_EMBED = "base_model.model.model.language_model.embed_tokens.modules_to_save.default.weight"
PEFT_EMBED_ORIGINAL = "base_model.model.model.language_model.embed_tokens.original_module.weight"
PEFT_LM_HEAD = "base_model.model.lm_head.modules_to_save.default.weight"
PEFT_LM_HEAD_ORIGINAL = "base_model.model.lm_head.original_module.weight"
#: Base-directory prefixes that belong to the unused SigLIP tower / multimodal projector.
IGNORED_BASE_PREFIXES = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
)
_LORA_KEY = re.compile(r"^base_model\.model\.model\.language_model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)\.lora_([AB])\.default\.weight$")

Shape = tuple[int, ...]


def lora_key(layer: int, module: str, which: str) -> str:
    """The ``lm.pt`` key of one LoRA factor (``which`` is ``"A"`` or ``"B"``)."""
    return f"{PEFT_PREFIX}layers.{layer}.{LORA_TARGETS[module]}.{module}.lora_{which}.default.weight"


def target_weight_name(layer: int, module: str) -> str:
    """The ``Gemma3ForCausalLM`` parameter a LoRA pair is merged into."""
    return f"model.layers.{layer}.{LORA_TARGETS[module]}.{module}.weight"


def parse_lora_key(key: str) -> tuple[int, str, str] | None:
    """``(layer, module, "A"|"B")`` for a LoRA key, else None."""
    match = _LORA_KEY.match(key)
    if not match or match.group(3) not in LORA_TARGETS or LORA_TARGETS[match.group(3)] != match.group(2):
        return None
    return int(match.group(1)), match.group(3), match.group(4)


def linear_shapes(config: Gemma3TextConfig) -> dict[str, tuple[int, int]]:
    """``(out_features, in_features)`` of each adapted Linear."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_out = config.num_attention_heads * config.head_dim
    kv_out = config.num_key_value_heads * config.head_dim
    return {
        "q_proj": (q_out, hidden),
        "k_proj": (kv_out, hidden),
        "v_proj": (kv_out, hidden),
        "o_proj": (hidden, q_out),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }


def core_key_shapes(config: Gemma3TextConfig, rank: int = LORA_RANK) -> dict[str, tuple[Shape, torch.dtype]]:
    """Every ``core_model`` key of the authors' ``lm.pt`` with its shape and dtype (480 at full size).

    LoRA A is ``[r, in]``, B is ``[out, r]`` (fp32); embed/lm_head copies are ``[vocab, hidden]`` (bf16).
    """
    shapes: dict[str, tuple[Shape, torch.dtype]] = {}
    for layer in range(config.num_hidden_layers):
        for module, (out_f, in_f) in linear_shapes(config).items():
            shapes[lora_key(layer, module, "A")] = ((rank, in_f), torch.float32)
            shapes[lora_key(layer, module, "B")] = ((out_f, rank), torch.float32)
    table = (config.vocab_size, config.hidden_size)
    for key in (PEFT_EMBED_ORIGINAL, PEFT_EMBED, PEFT_LM_HEAD_ORIGINAL, PEFT_LM_HEAD):
        shapes[key] = (table, torch.bfloat16)
    return shapes


def wrapper_key_shapes(image_dim: int, token_dim: int, hidden: int, inner: int = 512) -> dict[str, Shape]:
    """The 12 fp32 projector keys: ``{image,obj}_projectionhead.proj.{0,2,3}.{weight,bias}``."""
    shapes: dict[str, Shape] = {}
    for head, in_dim in (("image_projectionhead", image_dim), ("obj_projectionhead", token_dim)):
        shapes[f"{head}.proj.0.weight"] = (inner, in_dim)
        shapes[f"{head}.proj.0.bias"] = (inner,)
        shapes[f"{head}.proj.2.weight"] = (inner,)
        shapes[f"{head}.proj.2.bias"] = (inner,)
        shapes[f"{head}.proj.3.weight"] = (hidden, inner)
        shapes[f"{head}.proj.3.bias"] = (hidden,)
    return shapes


def base_key_shapes(config: Gemma3TextConfig) -> dict[str, Shape]:
    """The decoder weights of the MedGemma base directory in its saved layout (``language_model.model.*``)."""
    hidden, hd = config.hidden_size, config.head_dim
    shapes: dict[str, Shape] = {"language_model.model.embed_tokens.weight": (config.vocab_size, hidden)}
    for layer in range(config.num_hidden_layers):
        prefix = f"language_model.model.layers.{layer}."
        for module, (out_f, in_f) in linear_shapes(config).items():
            shapes[f"{prefix}{LORA_TARGETS[module]}.{module}.weight"] = (out_f, in_f)
        shapes[f"{prefix}self_attn.q_norm.weight"] = (hd,)
        shapes[f"{prefix}self_attn.k_norm.weight"] = (hd,)
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"):
            shapes[f"{prefix}{norm}.weight"] = (hidden,)
    shapes["language_model.model.norm.weight"] = (hidden,)
    return shapes


def map_base_key(key: str) -> str | None:
    """The ``Gemma3ForCausalLM`` name for a base-directory key; None for keys we ignore on purpose.

    Raises KeyError for a key that matches no known layout (reported as unexpected by the loader).
    """
    if key.startswith(IGNORED_BASE_PREFIXES):
        return None
    for prefix in ("language_model.model.", "model.language_model."):
        if key.startswith(prefix):
            return "model." + key[len(prefix) :]
    if key in ("language_model.lm_head.weight", "lm_head.weight"):
        return "lm_head.weight"
    if key.startswith("model."):
        return key
    raise KeyError(key)
