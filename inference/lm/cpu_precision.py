"""How the decoder's weights are held on a CPU: fp32 (exact), bf16, or weight-only int8.

Batch-1 decode reads every weight once per token, so on a CPU its speed is the memory bandwidth
divided by the bytes of weights: bf16 halves them against fp32, int8 quarters them. Prefill
(2.6k prompt tokens) is compute-bound instead, and runs fastest as an fp32 matrix product on CPUs
without bf16 matrix units (AVX2 machines convert bf16 element by element; oneDNN uses AMX or
AVX512-BF16 only where the CPU has them). So each layer picks its kernel by the number of rows it
is given:

- ``bf16``: decode rows multiply the bf16 weight directly; prefill rows multiply it upcast to fp32.
- ``int8``: per-output-channel symmetric int8 weights with bf16 scales (the scheme of torchao's
  int8 weight-only config); decode rows use torch's own ``_weight_int8pack_mm`` kernel with bf16
  activations, prefill rows the weight dequantised to fp32.

Every ``nn.Linear`` of the decoder layers and the ``lm_head`` is replaced; embeddings, norms and
the projectors keep their dtype (bf16 for the decoder, fp32 for the projectors). None of this
applies on CUDA: the engine only calls it for a CPU device.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Gemma3ForCausalLM

CpuPrecision = Literal["fp32", "bf16", "int8"]
CPU_PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
#: A Linear given at most this many rows runs the decode kernel (bf16 / int8 weights as stored);
#: more rows (prefill) run an fp32 matrix product on the upcast weight.
DECODE_ROWS = 16
#: Rows of one fp32 product in prefill: bounds the upcast activations' memory.
PREFILL_CHUNK_ROWS = 1024


def cpu_threads() -> int:
    """The CPU cores this process may run on (its affinity mask, not the machine's core count)."""
    return len(os.sched_getaffinity(0))


def storage_dtype(precision: str) -> torch.dtype:
    """The dtype the decoder is loaded and LoRA-merged in before any quantisation."""
    check_precision(precision)
    return torch.float32 if precision == "fp32" else torch.bfloat16


def check_precision(precision: str) -> None:
    if precision not in CPU_PRECISIONS:
        raise ValueError(f"CPU precision {precision!r}: use {', '.join(CPU_PRECISIONS)}")


def _rows(x: torch.Tensor) -> int:
    return x.numel() // x.shape[-1]


def _prefill_linear(x: torch.Tensor, weight_fp32: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W.T (+ b)`` in fp32 over row chunks, returned in ``x``'s dtype."""
    flat = x.reshape(-1, x.shape[-1])
    out = torch.empty(flat.shape[0], weight_fp32.shape[0], dtype=x.dtype, device=x.device)
    bias32 = bias.float() if bias is not None else None
    for start in range(0, flat.shape[0], PREFILL_CHUNK_ROWS):
        chunk = flat[start : start + PREFILL_CHUNK_ROWS].float()
        out[start : start + chunk.shape[0]] = F.linear(chunk, weight_fp32, bias32)
    return out.reshape(*x.shape[:-1], weight_fp32.shape[0])


class Bf16Linear(nn.Module):
    """A bf16 Linear whose prefill runs in fp32 (bf16 GEMMs are slow without bf16 matrix units)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.weight = nn.Parameter(weight.to(torch.bfloat16), requires_grad=False)
        self.bias = nn.Parameter(bias.to(torch.bfloat16), requires_grad=False) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) <= DECODE_ROWS:
            return F.linear(x.to(torch.bfloat16), self.weight, self.bias).to(x.dtype)
        return _prefill_linear(x, self.weight.float(), self.bias)


def quantize_int8(weight: torch.Tensor, chunk_rows: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: ``(q [N, K] int8, scales [N] bf16)``, ``W ~= q * scale``.

    Scales are rounded to bf16 first and the weight quantised against the rounded scale, so the
    stored pair is exactly what the kernels multiply with. Done ``chunk_rows`` rows at a time: the
    262k-row ``lm_head`` would otherwise need several GB of fp32 temporaries."""
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(weight.shape[0], dtype=torch.bfloat16)
    for start in range(0, weight.shape[0], chunk_rows):
        w = weight[start : start + chunk_rows].float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).to(torch.bfloat16)
        q[start : start + chunk_rows] = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[start : start + chunk_rows] = scale
    return q, scales


class Int8WeightOnlyLinear(nn.Module):
    """Linear with int8 weights and bf16 per-row scales (buffers ``weight``/``scales``, optional bias)."""

    weight: torch.Tensor
    scales: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias.to(torch.bfloat16) if bias is not None else None)

    @classmethod
    def from_linear(cls, linear: Any) -> Int8WeightOnlyLinear:
        q, scales = quantize_int8(linear.weight.detach())
        bias = linear.bias.detach() if getattr(linear, "bias", None) is not None else None
        return cls(q, scales, bias)

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight ``q * scale``."""
        return self.weight.float() * self.scales.float()[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x) > DECODE_ROWS:
            return _prefill_linear(x, self.dequantized(), self.bias)
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def _linear_slots(decoder: Gemma3ForCausalLM) -> list[tuple[nn.Module, str]]:
    """(parent, attribute) of every Linear in the decoder layers, then the lm_head. Slots, not
    modules: a list holding the old modules would keep every replaced weight alive to the end."""
    slots = []
    for parent in decoder.model.layers.modules():
        for name, child in parent.named_children():
            if isinstance(child, (nn.Linear, Bf16Linear, Int8WeightOnlyLinear)):
                slots.append((parent, name))
    slots.append((decoder, "lm_head"))
    return slots


def apply_cpu_precision(decoder: Gemma3ForCausalLM, precision: str) -> Gemma3ForCausalLM:
    """Swap the decoder's Linear layers for ``precision``'s kernels, in place (weights already
    merged and held in :func:`storage_dtype`). fp32 leaves the decoder as it is. One layer at a
    time, each old weight freed as soon as it is replaced (peak: one copy plus one layer).

    On the meta device (a decoder built to receive memory-mapped weights) the new modules hold
    meta tensors of the right shapes and dtypes."""
    check_precision(precision)
    if precision == "fp32":
        return decoder
    for parent, name in _linear_slots(decoder):
        setattr(parent, name, _converted(getattr(parent, name), precision))
    return decoder


def _converted(module: Any, precision: str) -> nn.Module:
    if precision == "bf16":
        return Bf16Linear(module.weight.detach(), module.bias)
    if module.weight.is_meta:
        out_f, in_f = module.weight.shape
        with torch.device("meta"):
            bias = torch.empty(out_f, dtype=torch.bfloat16) if module.bias is not None else None
            return Int8WeightOnlyLinear(torch.empty(out_f, in_f, dtype=torch.int8), torch.empty(out_f, dtype=torch.bfloat16), bias)
    return Int8WeightOnlyLinear.from_linear(module)


def decoder_precision(decoder: Gemma3ForCausalLM) -> str:
    """Which CPU precision a decoder's lm_head is held in (``int8``, ``bf16`` or ``fp32``)."""
    head = decoder.lm_head
    if isinstance(head, Int8WeightOnlyLinear):
        return "int8"
    return "bf16" if head.weight.dtype == torch.bfloat16 else "fp32"
