"""PyTorch APM runner: CPU fp32, or CUDA with bf16/fp16 autocast and channels_last convolutions."""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from inference.apm.backbone import fold_frozen_batchnorm
from inference.apm.model import AnatomyPerceptionModule


class TorchAPMRunner:
    """Runs the APM module eagerly. On CUDA, autocast to ``dtype`` (bf16 by default: the backbone is
    90% of the work and its convolutions run on tensor cores) and channels_last memory format for the
    backbone (cuDNN's fast NHWC kernels; on CPU it does not pay, so it is left off there).

    ``fold_batchnorm`` folds the frozen BatchNorms into the convolutions, on a copy (the caller's
    module is left untouched). Default: fold only for bf16/fp16, never in fp32. With realistic BN
    statistics a fold (even computed in float64) changes the rounding order enough that a 50-layer
    backbone moves the encoder memory by 1e-3 to 4e-3 in fp32, against the reference's unfolded
    module; fp32 is the exact path, so it runs unfolded (the fold would save 15-30% of the CPU APM
    time, a few % of an analysis that the LM dominates). Under bf16 autocast the fold's error is far
    below bf16's own, so the GPU path keeps it.
    """

    name = "torch"

    def __init__(
        self,
        module: AnatomyPerceptionModule,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        channels_last: bool | None = None,
        fold_batchnorm: bool | None = None,
    ) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise RuntimeError(f"device {self.device} requested but CUDA is not available; use device='cpu'")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        self.channels_last = self.device.type == "cuda" if channels_last is None else channels_last
        self.fold_batchnorm = self.dtype != torch.float32 if fold_batchnorm is None else fold_batchnorm
        if self.fold_batchnorm:
            module = copy.deepcopy(module)
            fold_frozen_batchnorm(module.backbone[0].body)
        self.module = module.to(self.device).eval().requires_grad_(False)
        if self.channels_last:
            self.module.backbone.to(memory_format=torch.channels_last)
            self.module.input_proj.to(memory_format=torch.channels_last)

    def run(self, images: Tensor) -> dict[str, Tensor]:
        """images [B, 1, H, W] float in [0, 1] (any device) -> APM outputs (float32, on ``device``)."""
        check_images(images)
        batch = images.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        autocast = self.dtype != torch.float32
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=self.dtype, enabled=autocast):
            outputs = self.module(batch)
        return {key: value.float() for key, value in outputs.items()}


def check_images(images: Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be [B, 1, H, W], got {tuple(images.shape)}")
    if images.shape[0] == 0:
        raise ValueError("images batch is empty")
