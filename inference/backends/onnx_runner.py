"""APM export to ONNX and an onnxruntime runner."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from inference.apm.model import APM_OUTPUT_KEYS, AnatomyPerceptionModule
from inference.backends.torch_runner import check_images

ONNX_INPUT_NAME = "images"
ONNX_OPSET = 17


class TupleOutputAPM(nn.Module):
    """Wraps the APM so its dict output becomes a tuple in :data:`APM_OUTPUT_KEYS` order (ONNX outputs)."""

    def __init__(self, module: AnatomyPerceptionModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, images: Tensor) -> tuple[Tensor, ...]:
        outputs = self.module(images)
        return tuple(outputs[key] for key in APM_OUTPUT_KEYS)


def export_apm_onnx(module: AnatomyPerceptionModule, path: str | Path, batch_dynamic: bool = True) -> Path:
    """Export the APM (fp32, on CPU) to ONNX with input ``images`` [B, 1, S, S] and the outputs named
    as the forward's keys. With ``batch_dynamic`` the batch axis is symbolic. Written to a temp file
    and renamed, so a concurrent reader never sees half a model."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cpu_module = copy.deepcopy(module).to("cpu", torch.float32).eval()
    size = cpu_module.config.image_size
    example = torch.zeros(2 if batch_dynamic else 1, 1, size, size)
    dynamic_axes = {name: {0: "batch"} for name in (ONNX_INPUT_NAME, *APM_OUTPUT_KEYS)} if batch_dynamic else None
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated in favour of the dynamo one, which needs
        # onnxscript; the TorchScript path is exact for this model and has no extra dependency.
        warnings.simplefilter("ignore", category=DeprecationWarning)
        warnings.simplefilter("ignore", category=FutureWarning)
        torch.onnx.export(
            TupleOutputAPM(cpu_module),
            (example,),
            str(partial),
            dynamo=False,
            input_names=[ONNX_INPUT_NAME],
            output_names=list(APM_OUTPUT_KEYS),
            dynamic_axes=dynamic_axes,
            opset_version=ONNX_OPSET,
            do_constant_folding=True,
        )
    partial.replace(path)
    return path


class OnnxAPMRunner:
    """Runs an exported APM under onnxruntime; returns CPU float32 tensors."""

    name = "onnxruntime"

    def __init__(self, onnx_path: str | Path, providers: Sequence[str] | None = None, intra_op_threads: int | None = None) -> None:
        import onnxruntime as ort  # heavy import, only when this backend is chosen

        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.onnx_path}; export it with export_apm_onnx()")
        available = ort.get_available_providers()
        chosen = list(providers) if providers else ["CPUExecutionProvider"]
        unknown = [p for p in chosen if p not in available]
        if unknown:
            raise ValueError(f"onnxruntime providers {unknown} are not available here (available: {available})")
        options = ort.SessionOptions()
        # One thread knob for both CPU backends: follow torch's setting unless told otherwise.
        options.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else torch.get_num_threads()
        self.session = ort.InferenceSession(str(self.onnx_path), sess_options=options, providers=chosen)
        self.output_names = [output.name for output in self.session.get_outputs()]

    def run(self, images: Tensor) -> dict[str, Tensor]:
        """images [B, 1, S, S] -> APM outputs as CPU float32 tensors."""
        check_images(images)
        feed = {ONNX_INPUT_NAME: np.ascontiguousarray(images.detach().to("cpu", torch.float32).numpy())}
        values = self.session.run(self.output_names, feed)
        return {name: torch.from_numpy(value) for name, value in zip(self.output_names, values)}
