"""APM backends behind one interface, chosen by configuration (never guessed from file names).

- ``torch``: eager PyTorch (CPU fp32; CUDA bf16 autocast + channels_last)
- ``onnxruntime``: the APM exported to ONNX, run by onnxruntime (CPU or CUDA provider)
- ``tensorrt``: an fp16 TensorRT engine built from the same ONNX, cached per GPU model / TensorRT
  version / shape / precision (optional dependency)
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from inference.apm.model import AnatomyPerceptionModule
from inference.backends.onnx_runner import OnnxAPMRunner, export_apm_onnx
from inference.backends.tensorrt_runner import BackendUnavailableError, TensorRTAPMRunner
from inference.backends.torch_runner import TorchAPMRunner
from inference.result import APM_BACKENDS


class APMRunner(Protocol):
    """Runs the APM on a batch: images [B, 1, 1024, 1024] float32 -> dict with the keys of
    ``AnatomyPerceptionModule.forward`` (boxes, anatomy_tokens, cls, memory, image_logits)."""

    name: str

    def run(self, images: Tensor) -> dict[str, Tensor]: ...


def make_apm_runner(
    backend: str,
    module: AnatomyPerceptionModule,
    device: str | torch.device = "cpu",
    cache_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
) -> APMRunner:
    """Build the configured runner. ONNX and TensorRT files go to ``cache_dir`` (a temp folder when
    None), named by a digest of the weights so a new checkpoint never reuses a stale export."""
    if backend not in APM_BACKENDS:
        raise ValueError(f"unknown APM backend {backend!r}; choose one of {', '.join(APM_BACKENDS)}")
    if backend == "torch":
        return TorchAPMRunner(module, device=device, dtype=dtype)
    if backend == "tensorrt":
        from inference.backends.tensorrt_runner import import_tensorrt

        import_tensorrt()  # fail fast, before an ONNX export that would be wasted
    cache = Path(cache_dir) if cache_dir is not None else Path(tempfile.gettempdir()) / "anatomix-apm-cache"
    onnx_path = cache / f"apm-{module_digest(module)[:16]}.onnx"
    if not onnx_path.is_file():
        export_apm_onnx(module, onnx_path, batch_dynamic=True)
    if backend == "onnxruntime":
        use_cuda = torch.device(device).type == "cuda"
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if use_cuda else ["CPUExecutionProvider"]
        return OnnxAPMRunner(onnx_path, providers=providers)
    return TensorRTAPMRunner(onnx_path, cache_dir=cache, image_size=module.config.image_size, device=device)


def module_digest(module: AnatomyPerceptionModule) -> str:
    """sha256 over the module's state dict (names, shapes and fp32 values) and its config."""
    digest = hashlib.sha256(repr(module.config).encode())
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(str(tuple(value.shape)).encode())
        digest.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


__all__ = [
    "APM_BACKENDS",
    "APMRunner",
    "BackendUnavailableError",
    "OnnxAPMRunner",
    "TensorRTAPMRunner",
    "TorchAPMRunner",
    "export_apm_onnx",
    "make_apm_runner",
    "module_digest",
]
