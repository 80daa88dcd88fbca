"""The APM's DETR-style encoder/decoder (post-norm), batch-first, with a CLS token.

Key names match the authors' checkpoint: ``transformer.{cls_token,cls_pos}``,
``transformer.encoder.layers.{i}.{self_attn,linear1,linear2,norm1,norm2}``,
``transformer.decoder.layers.{i}.{self_attn,multihead_attn,linear1,linear2,norm1,norm2,norm3}``,
``transformer.decoder.norm``. Dropout is absent: this module only runs inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.apm.config import APMConfig


class MultiheadAttention(nn.Module):
    """Same parameters as ``torch.nn.MultiheadAttention`` (``in_proj_weight`` [3D, D], ``in_proj_bias``,
    ``out_proj``) but batch-first and computed with ``scaled_dot_product_attention`` (flash/memory-
    efficient kernels on CUDA, exports cleanly to ONNX)."""

    def __init__(self, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query: Tensor, key: Tensor, value: Tensor) -> Tensor:
        """query [B, Lq, D], key/value [B, Lk, D] -> [B, Lq, D]."""
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        q = self.split_heads(F.linear(query, w_q, b_q))
        k = self.split_heads(F.linear(key, w_k, b_k))
        v = self.split_heads(F.linear(value, w_v, b_v))
        out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, D/H]
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))

    def split_heads(self, x: Tensor) -> Tensor:
        """[B, L, D] -> [B, H, L, D/H]."""
        batch, length, _ = x.shape
        return x.view(batch, length, self.num_heads, self.embed_dim // self.num_heads).transpose(1, 2)


class EncoderLayer(nn.Module):
    """Post-norm: x = norm1(x + attn(x+pos, x+pos, x)); x = norm2(x + ffn(x))."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = MultiheadAttention(d, config.num_heads)
        self.linear1 = nn.Linear(d, config.ffn_dim)
        self.linear2 = nn.Linear(config.ffn_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        """src, pos: [B, L, D] -> [B, L, D]; the position goes into queries and keys only."""
        q = k = src + pos
        src = self.norm1(src + self.self_attn(q, k, src))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DecoderLayer(nn.Module):
    """Post-norm DETR decoder layer: self-attention, cross-attention over memory, FFN."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        d = config.d_model
        self.self_attn = MultiheadAttention(d, config.num_heads)
        self.multihead_attn = MultiheadAttention(d, config.num_heads)
        self.linear1 = nn.Linear(d, config.ffn_dim)
        self.linear2 = nn.Linear(config.ffn_dim, d)
        self.norm1 = nn.LayerNorm(d)
        self.norm2 = nn.LayerNorm(d)
        self.norm3 = nn.LayerNorm(d)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """tgt [B, Q, D], memory [B, HW, D], pos [1, HW, D], query_pos [1 or B, Q, D] -> [B, Q, D].

        Keys of the cross-attention get the sine position, values do not.
        """
        q = k = tgt + query_pos
        tgt = self.norm1(tgt + self.self_attn(q, k, tgt))
        tgt = self.norm2(tgt + self.multihead_attn(tgt + query_pos, memory + pos, memory))
        return self.norm3(tgt + self.linear2(F.relu(self.linear1(tgt))))


class Encoder(nn.Module):
    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.encoder_layers))

    def forward(self, src: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos)
        return src  # no final encoder norm (post-norm DETR)


class Decoder(nn.Module):
    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.decoder_layers))
        # Shared norm: the reference applies it to every layer's output; only the last reaches the heads.
        self.norm = nn.LayerNorm(config.d_model)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        for layer in self.layers:
            tgt = layer(tgt, memory, pos, query_pos)
        return self.norm(tgt)


class TransformerWithCLS(nn.Module):
    """Encoder over [CLS] + HW tokens, decoder of fixed anatomy queries over the HW memory tokens."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        self.d_model = config.d_model
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.cls_token = nn.Parameter(torch.randn(1, 1, config.d_model))
        self.cls_pos = nn.Parameter(torch.randn(1, 1, config.d_model))

    def forward(self, src: Tensor, pos: Tensor, query_embed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """src [B, HW, D] (row-major tokens), pos [HW, D], query_embed [Q, D] ->
        (decoder output after the shared norm [B, Q, D], memory [B, HW, D], cls [B, D])."""
        batch = src.shape[0]
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(src.dtype), src], dim=1)
        full_pos = torch.cat([self.cls_pos.to(src.dtype), pos[None].to(src.dtype)], dim=1)
        encoded = self.encoder(tokens, full_pos)
        cls, memory = encoded[:, 0], encoded[:, 1:]  # the CLS token never reaches the decoder
        query_pos = query_embed[None].to(src.dtype)
        tgt = torch.zeros(batch, query_embed.shape[0], self.d_model, dtype=src.dtype, device=src.device)
        hs = self.decoder(tgt, memory, pos[None].to(src.dtype), query_pos)
        return hs, memory, cls
