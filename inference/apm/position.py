"""DETR sine position embedding (normalize=True, scale 2*pi, temperature 10000, no padding mask)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def sine_position_embedding(height: int, width: int, d_model: int, device: torch.device | str = "cpu", temperature: float = 10000.0) -> Tensor:
    """Position code for a ``height x width`` feature map, row-major: [height * width, d_model].

    Channels are the y code (d_model / 2) then the x code, each interleaving sin (even) and cos (odd)
    of ``pos / temperature ** (2 * (i // 2) / (d_model / 2))``, with positions 1..n normalised to
    ``(0, 2*pi]`` by dividing by ``n + 1e-6``, exactly as DETR with an all-valid mask.
    """
    num_feats = d_model // 2
    eps, scale = 1e-6, 2 * math.pi
    y_embed = torch.arange(1, height + 1, dtype=torch.float32, device=device)
    x_embed = torch.arange(1, width + 1, dtype=torch.float32, device=device)
    y_embed = y_embed / (height + eps) * scale
    x_embed = x_embed / (width + eps) * scale
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)
    pos_y = interleave_sin_cos(y_embed[:, None] / dim_t)  # [H, F]
    pos_x = interleave_sin_cos(x_embed[:, None] / dim_t)  # [W, F]
    grid_y = pos_y[:, None, :].expand(height, width, num_feats)
    grid_x = pos_x[None, :, :].expand(height, width, num_feats)
    return torch.cat([grid_y, grid_x], dim=-1).reshape(height * width, d_model)


def interleave_sin_cos(angles: Tensor) -> Tensor:
    """[N, F] angles -> [N, F] with sin at even and cos at odd channels."""
    return torch.stack([angles[:, 0::2].sin(), angles[:, 1::2].cos()], dim=-1).flatten(1)
