"""TensorRT APM runner: an fp16 engine built from the exported ONNX, cached on disk.

TensorRT is optional (it cannot be installed on every host); it is imported only when this backend is
constructed, and its absence gives a clear error naming the alternatives.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor

from inference.backends.onnx_runner import ONNX_INPUT_NAME
from inference.backends.torch_runner import check_images

log = logging.getLogger(__name__)


class BackendUnavailableError(RuntimeError):
    """The chosen backend cannot run on this host (missing package or device)."""


def import_tensorrt() -> ModuleType:
    """Import the ``tensorrt`` package or raise :class:`BackendUnavailableError` saying what to do."""
    try:
        import tensorrt
    except ImportError as exc:
        raise BackendUnavailableError(
            "APM backend 'tensorrt' needs NVIDIA TensorRT (Python package 'tensorrt', version 10 or newer) "
            "and a CUDA GPU; it is not installed here. Install TensorRT on the GPU worker, or configure the "
            "'torch' or 'onnxruntime' backend."
        ) from exc
    return tensorrt


def engine_cache_name(gpu_name: str, trt_version: str, image_size: int, max_batch: int, precision: str, onnx_digest: str) -> str:
    """File name that changes whenever the engine would: GPU model, TensorRT version, shape, precision
    and the ONNX contents."""
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-")
    return f"apm-{gpu}-trt{trt_version}-b1-{max_batch}x1x{image_size}x{image_size}-{precision}-{onnx_digest[:16]}.engine"


class TensorRTAPMRunner:
    """Runs the APM through a TensorRT engine (fp16) on CUDA; outputs are CUDA float32 tensors."""

    name = "tensorrt"

    def __init__(
        self,
        onnx_path: str | Path,
        cache_dir: str | Path,
        image_size: int = 1024,
        max_batch: int = 16,
        precision: str = "fp16",
        device: str | torch.device = "cuda",
    ) -> None:
        trt = import_tensorrt()
        self.trt = trt
        if not torch.cuda.is_available():
            raise BackendUnavailableError("APM backend 'tensorrt' needs a CUDA GPU, and none is visible")
        if precision not in ("fp16", "fp32"):
            raise ValueError(f"precision must be 'fp16' or 'fp32', got {precision!r}")
        self.device = torch.device(device)
        self.image_size, self.max_batch, self.precision = image_size, max_batch, precision
        onnx_bytes = Path(onnx_path).read_bytes()
        name = engine_cache_name(
            torch.cuda.get_device_name(self.device), trt.__version__, image_size, max_batch, precision, hashlib.sha256(onnx_bytes).hexdigest()
        )
        self.engine_path = Path(cache_dir) / name
        self.logger = trt.Logger(trt.Logger.WARNING)
        serialized = self.load_or_build(onnx_bytes)
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(serialized)
        if self.engine is None:
            raise BackendUnavailableError(f"TensorRT could not deserialize engine {self.engine_path}; delete it to rebuild")
        self.context = self.engine.create_execution_context()
        self.output_names = [
            self.engine.get_tensor_name(i)
            for i in range(self.engine.num_io_tensors)
            if self.engine.get_tensor_mode(self.engine.get_tensor_name(i)) == trt.TensorIOMode.OUTPUT
        ]

    def load_or_build(self, onnx_bytes: bytes) -> bytes:
        if self.engine_path.is_file():
            log.info("loading cached TensorRT engine %s", self.engine_path)
            return self.engine_path.read_bytes()
        serialized = self.build_engine(onnx_bytes)
        self.engine_path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.engine_path.with_name(f".{self.engine_path.name}.{os.getpid()}.partial")
        partial.write_bytes(serialized)
        partial.replace(self.engine_path)
        return serialized

    def build_engine(self, onnx_bytes: bytes) -> bytes:
        trt = self.trt
        log.info("building TensorRT engine %s (takes minutes, once per GPU model/version/shape)", self.engine_path.name)
        builder = trt.Builder(self.logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, self.logger)
        if not parser.parse(onnx_bytes):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise BackendUnavailableError(f"TensorRT could not parse the APM ONNX: {errors}")
        config = builder.create_builder_config()
        if self.precision == "fp16":
            config.set_flag(trt.BuilderFlag.FP16)
        profile = builder.create_optimization_profile()
        size = self.image_size
        opt = min(8, self.max_batch)
        profile.set_shape(ONNX_INPUT_NAME, (1, 1, size, size), (opt, 1, size, size), (self.max_batch, 1, size, size))
        config.add_optimization_profile(profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise BackendUnavailableError("TensorRT failed to build the APM engine (see the TensorRT log above)")
        return bytes(serialized)

    def run(self, images: Tensor) -> dict[str, Tensor]:
        """images [B, 1, S, S] (B <= max_batch) -> outputs as CUDA float32 tensors."""
        check_images(images)
        if images.shape[0] > self.max_batch:
            raise ValueError(f"batch {images.shape[0]} exceeds the engine's max batch {self.max_batch}")
        batch = images.to(self.device, torch.float32).contiguous()
        self.context.set_input_shape(ONNX_INPUT_NAME, tuple(batch.shape))
        self.context.set_tensor_address(ONNX_INPUT_NAME, batch.data_ptr())
        outputs: dict[str, Tensor] = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            outputs[name] = torch.empty(shape, dtype=torch.float32, device=self.device)
            self.context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return outputs
