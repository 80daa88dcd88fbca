"""The AnatomiX language side: projectors and embedding injection around a Gemma-3 decoder.

The APM's encoder memory (1024 tokens) and its 36 anatomy tokens are projected to the decoder width
by two small MLPs (kept in fp32 as the reference does) and written over the embeddings of the
``<image>`` and ``<obj_i>`` prompt positions. Everything after that is a plain causal Gemma-3 pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import Gemma3ForCausalLM

from inference.tokens import TokenIds

IMAGE_TOKENS = 1024
PROJECTOR_INNER = 512


class InjectionError(ValueError):
    """The prompt ids do not hold exactly one slot per injected vector."""


class ProjectionHead(nn.Module):
    """Linear -> GELU (exact erf) -> LayerNorm -> Linear, the authors' ``proj.{0,1,2,3}`` layout."""

    def __init__(self, in_dim: int, out_dim: int, inner: int = PROJECTOR_INNER) -> None:
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(in_dim, inner), nn.GELU(), nn.LayerNorm(inner), nn.Linear(inner, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[..., in_dim]`` -> ``[..., out_dim]`` in the head's dtype (fp32)."""
        return self.proj(features.to(next(self.proj.parameters()).dtype))


@dataclass(frozen=True)
class LMInfo:
    """What a loaded LM is: shapes and dtype, for identity and benchmarks."""

    hidden_size: int
    num_layers: int
    vocab_size: int
    dtype: torch.dtype
    device: torch.device
    #: Bytes of decoder weights read per decoded token (all layers + lm_head; embeddings are gathered).
    decode_weight_bytes: int


class AnatomixLM(nn.Module):
    """Decoder + projectors. ``decoder`` is ``transformers``' ``Gemma3ForCausalLM`` with LoRA merged in."""

    def __init__(
        self,
        decoder: Gemma3ForCausalLM,
        image_projection: ProjectionHead,
        object_projection: ProjectionHead,
        token_ids: TokenIds,
    ) -> None:
        super().__init__()
        self.decoder = decoder
        self.image_projectionhead = image_projection
        self.obj_projectionhead = object_projection
        self.token_ids = token_ids

    @property
    def dtype(self) -> torch.dtype:
        """The activation dtype (the embedding's; an int8 ``lm_head`` holds int8 weights)."""
        return self.decoder.model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.model.embed_tokens.weight.device

    def info(self) -> LMInfo:
        config = self.decoder.config
        # every stored tensor but the embedding (gathered, not read whole): weights, int8 scales, norms
        weight_bytes = sum(t.numel() * t.element_size() for name, t in self.decoder.state_dict().items() if name != "model.embed_tokens.weight")
        return LMInfo(
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            vocab_size=config.vocab_size,
            dtype=self.dtype,
            device=self.device,
            decode_weight_bytes=int(weight_bytes),
        )

    @torch.inference_mode()
    def embed_prompt(self, input_ids: torch.Tensor, image_memory: torch.Tensor, anatomy_tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the APM features injected.

        input_ids: ``[B, T]`` long; image_memory: ``[B, 1024, d_model]`` (encoder memory, row-major
        32x32); anatomy_tokens: ``[B, 36, token_dim]`` (un-normalised). Returns ``[B, T, hidden]`` in
        the decoder dtype: ``embed(ids) * bf16(sqrt(hidden))`` with the projected vectors written over
        the 1024 ``<image>`` positions (in order) and the ``<obj_i>`` positions (no rescale).
        """
        ids = self.token_ids
        batch = input_ids.shape[0]
        input_ids = input_ids.to(self.device)
        image_slots = input_ids == ids.image
        per_row = image_slots.sum(dim=1)
        if bool((per_row != image_memory.shape[1]).any()):
            raise InjectionError(f"each prompt needs exactly {image_memory.shape[1]} <image> tokens, found {per_row.tolist()}")
        object_ids = torch.tensor(ids.objects, device=self.device)
        object_slots = input_ids[:, :, None] == object_ids  # [B, T, 36]
        counts = object_slots.sum(dim=1)  # [B, 36]
        if bool((counts != 1).any()):
            bad = sorted({i for i in range(len(ids.objects)) if bool((counts[:, i] != 1).any())})
            raise InjectionError(f"each prompt needs each <obj_i> exactly once; wrong count for i in {bad[:8]}")
        if anatomy_tokens.shape[1] != len(ids.objects):
            raise InjectionError(f"anatomy_tokens has {anatomy_tokens.shape[1]} rows, the prompt has {len(ids.objects)} <obj_i>")

        embeds = self.decoder.model.embed_tokens(input_ids)  # scale held as bf16(sqrt(hidden)), see loader
        image_vectors = self.image_projectionhead(image_memory.to(self.device)).to(embeds.dtype)
        embeds[image_slots] = image_vectors.reshape(-1, embeds.shape[-1])
        object_vectors = self.obj_projectionhead(anatomy_tokens.to(self.device)).to(embeds.dtype)
        positions = object_slots.float().argmax(dim=1)  # [B, 36]
        rows = torch.arange(batch, device=self.device)[:, None].expand_as(positions)
        embeds[rows, positions] = object_vectors
        return embeds

    def injection_slots(self) -> torch.Tensor:
        """``[V]`` long: slot i for ``<obj_i>``, slot 36 for ``<image>``, -1 for every other id."""
        if getattr(self, "_injection_slots", None) is None:
            ids = self.token_ids
            table = torch.full((self.decoder.model.embed_tokens.num_embeddings,), -1, dtype=torch.long, device=self.device)
            table[torch.tensor(ids.objects, device=self.device)] = torch.arange(len(ids.objects), device=self.device)
            table[ids.image] = len(ids.objects)
            self._injection_slots = table
        return self._injection_slots

    @torch.inference_mode()
    def injected_vectors(self, input_ids: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        """The vectors :meth:`embed_prompt` wrote, gathered back from its output: ``[B, 37, H]`` (the
        36 ``<obj_i>`` vectors in order, then the first ``<image>`` vector). Decoding embeds a
        generated ``<obj_i>``/``<image>`` with them, exactly the values of the prompt."""
        ids = self.token_ids
        input_ids = input_ids.to(embeds.device)
        object_ids = torch.tensor(ids.objects, device=embeds.device)
        object_positions = (input_ids[:, :, None] == object_ids).float().argmax(dim=1)  # [B, 36]
        image_position = (input_ids == ids.image).float().argmax(dim=1, keepdim=True)  # [B, 1] first <image>
        positions = torch.cat([object_positions, image_position], dim=1)
        rows = torch.arange(input_ids.shape[0], device=embeds.device)[:, None].expand_as(positions)
        return embeds[rows, positions]
