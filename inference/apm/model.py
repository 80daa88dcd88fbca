"""The anatomy perception module: backbone -> encoder/decoder -> box, token and label heads.

State-dict keys equal the authors' ``vis_model.*`` keys without the ``vis_model.`` prefix.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from inference.apm.backbone import BackboneJoiner
from inference.apm.config import APMConfig
from inference.apm.position import sine_position_embedding
from inference.apm.transformer import MultiheadAttention, TransformerWithCLS

#: Output keys of :meth:`AnatomyPerceptionModule.forward`, in ONNX output order.
APM_OUTPUT_KEYS: tuple[str, ...] = ("boxes", "anatomy_tokens", "cls", "memory", "image_logits")


class MLP(nn.Module):
    """``layers.{0..n-1}`` Linear with ReLU between (DETR's box head: 256-256-256-4)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x) if index == len(self.layers) - 1 else F.relu(layer(x))
        return x

    def hidden(self, x: Tensor) -> Tensor:
        """Activations entering the last layer (used to fit demo weights)."""
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return x


class AnatomyTokenHead(nn.Module):
    """``anat_obj_embs``: attention of the decoded queries over the memory (no position), then
    Linear D -> token_dim. [B, Q, D], [B, HW, D] -> [B, Q, token_dim]."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        self.mha = MultiheadAttention(config.d_model, config.token_heads)
        self.linear = nn.Linear(config.d_model, config.token_dim)

    def forward(self, queries: Tensor, memory: Tensor) -> Tensor:
        return self.linear(self.mha(queries, memory, memory))


class AnatomyPerceptionModule(nn.Module):
    """DETR-style detector with one fixed query per anatomical region (query i = region i)."""

    def __init__(self, config: APMConfig) -> None:
        super().__init__()
        self.config = config
        d = config.d_model
        self.backbone = BackboneJoiner(config)
        self.input_proj = nn.Conv2d(config.backbone_channels, d, kernel_size=1)
        self.transformer = TransformerWithCLS(config)
        self.query_embed = nn.Embedding(config.num_queries, d)
        self.bbox_embed = MLP(d, d, 4, 3)
        self.anat_obj_embs = AnatomyTokenHead(config)
        self.image_class_embed = nn.Linear(d, config.num_labels)

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        """images [B, 1, 1024, 1024] in [0, 1] -> dict:

        - ``boxes`` [B, 36, 4]: sigmoid, normalised (cx, cy, w, h) in the letterboxed frame
        - ``anatomy_tokens`` [B, 36, 16]: un-normalised anatomy embeddings (retrieval, LM ``<obj_i>``)
        - ``cls`` [B, D]: encoder CLS output
        - ``memory`` [B, 1024, D]: encoder output, row-major (index y * 32 + x), the LM's image tokens
        - ``image_logits`` [B, 14]: CheXpert label logits (order: ``inference.result.CHEXPERT_LABELS``)
        """
        hs, memory, cls = self.encode_decode(images)
        # The box head runs in float32 even under autocast: it is tiny (36 queries), and bf16's
        # 8-bit mantissa on its logits and sigmoid alone would cost several pixels of box position.
        with torch.autocast(images.device.type, enabled=False):
            boxes = self.bbox_embed(hs.float()).sigmoid()
        return {
            "boxes": boxes,
            "anatomy_tokens": self.anat_obj_embs(hs, memory),
            "cls": cls,
            "memory": memory,
            "image_logits": self.image_class_embed(cls),
        }

    def encode_decode(self, images: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """images -> (decoded queries [B, Q, D], memory [B, HW, D], cls [B, D])."""
        features = self.input_proj(self.backbone(images))  # [B, D, h, w]
        _, _, height, width = features.shape
        src = features.flatten(2).transpose(1, 2)  # [B, HW, D], row-major
        pos = sine_position_embedding(height, width, self.config.d_model, device=src.device)
        return self.transformer(src, pos, self.query_embed.weight)


def build_apm(config: APMConfig, device: str | torch.device | None = None) -> AnatomyPerceptionModule:
    """Build the APM in eval mode. ``device="meta"`` builds shapes only (no memory, no init cost)."""
    if device is not None and str(device) == "meta":
        with torch.device("meta"):
            module = AnatomyPerceptionModule(config)
    else:
        module = AnatomyPerceptionModule(config)
        if device is not None:
            module = module.to(device)
    return module.eval().requires_grad_(False)


def boxes_to_xyxy_model(boxes_cxcywh: Tensor | np.ndarray, size: int = 1024) -> np.ndarray:
    """Normalised (cx, cy, w, h) [..., 4] -> integer (x1, y1, x2, y2) [..., 4] in the model frame.

    As the reference formats them for the prompt: xyxy in float32, times ``size``, truncated toward
    zero, not clamped (negative values are possible).
    """
    boxes = torch.as_tensor(boxes_cxcywh).detach().to("cpu", torch.float32)
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1) * size
    return torch.trunc(xyxy).to(torch.int64).numpy()
