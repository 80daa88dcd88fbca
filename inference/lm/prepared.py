"""The CPU decoder as loaded: LoRA merged, in its CPU precision, kept in one safetensors file and
memory-mapped, so every worker process on a machine shares the same page-cache pages.

The authors' files need work before inference (LoRA merged into every projection, int8 quantised):
done in one process, that work is private memory. The first load on a machine writes the result to
``lm-{precision}-{digest}.safetensors`` in the engine cache; every load then maps that file
(``safetensors``' ``safe_open`` returns tensors backed by the file mapping, nothing is copied), so N
workers hold one copy of the weights between them. The digest is the model directory's weights
digest: new weights, new file. fp32 (the exact reference path, used with small weights) is not cached.

The file is written tensor by tensor (header, then each tensor's bytes), never as one in-memory
blob, so writing a 5 GB file needs no second copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import torch

from inference.lm.config import read_text_config
from inference.lm.cpu_precision import apply_cpu_precision, storage_dtype
from inference.lm.loader import (
    LMLoadReport,
    _fail_if_incomplete,
    _load_projectors,
    _materialise_buffers,
    build_meta_decoder,
    inspect_lm_checkpoint,
    load_lm,
    read_lm_pt,
)
from inference.lm.model import AnatomixLM
from inference.tokens import TokenIds

log = logging.getLogger(__name__)

_SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int8: "I8", torch.float16: "F16"}


def prepared_path(cache_dir: Path, precision: str, digest: str) -> Path:
    return Path(cache_dir) / f"lm-{precision}-{digest[:16]}.safetensors"


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` in the safetensors format, one tensor at a time (no whole-file buffer), to a
    temporary name renamed into place (a concurrent reader never sees half a file)."""
    header: dict[str, object] = {"__metadata__": dict(metadata or {})}
    offset = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {"dtype": _SAFETENSORS_DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(struct.pack("<Q", len(encoded)))
            handle.write(encoded)
            for tensor in tensors.values():
                handle.write(tensor.detach().contiguous().view(torch.uint8).reshape(-1).numpy().data)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def load_cpu_lm(
    base_dir: Path,
    lm_path: Path,
    token_ids: TokenIds,
    precision: str,
    cache_dir: Path | None,
    digest: str,
) -> tuple[AnatomixLM, LMLoadReport]:
    """The LM on the CPU in ``precision``: mapped from the prepared file when there is one, else
    built from the authors' files (and the prepared file written when ``cache_dir`` is writable)."""
    dtype = storage_dtype(precision)
    if precision == "fp32" or cache_dir is None:
        lm, report = load_lm(base_dir, lm_path, token_ids, device="cpu", dtype=dtype)
        apply_cpu_precision(lm.decoder, precision)
        return lm, report
    path = prepared_path(cache_dir, precision, digest)
    if not path.is_file():
        lm, report = load_lm(base_dir, lm_path, token_ids, device="cpu", dtype=dtype)
        apply_cpu_precision(lm.decoder, precision)
        try:
            write_safetensors(lm.decoder.state_dict(), path, {"precision": precision, "weights_digest": digest})
        except OSError as exc:  # a read-only model directory: keep the private copy
            log.warning("could not write the prepared %s LM to %s (%s): this worker keeps a private copy", precision, path, exc)
            return lm, report
        log.info("prepared %s LM written to %s (%.2f GB)", precision, path, path.stat().st_size / 1e9)
        del lm
    return map_prepared_lm(base_dir, lm_path, token_ids, precision, path)


def map_prepared_lm(base_dir: Path, lm_path: Path, token_ids: TokenIds, precision: str, path: Path) -> tuple[AnatomixLM, LMLoadReport]:
    """Build the decoder on meta and assign every weight from the memory-mapped prepared file."""
    from safetensors import safe_open

    report = inspect_lm_checkpoint(base_dir, lm_path)  # names and shapes of the authors' files (no data read)
    _fail_if_incomplete(report, str(lm_path.parent))
    config = read_text_config(base_dir)
    decoder = apply_cpu_precision(build_meta_decoder(config), precision)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    decoder.load_state_dict(state, strict=True, assign=True)
    _materialise_buffers(decoder, config, torch.device("cpu"))
    decoder.eval()
    _, wrapper = read_lm_pt(lm_path)
    image_head, object_head = _load_projectors(wrapper, config.hidden_size, torch.device("cpu"))
    return AnatomixLM(decoder, image_head, object_head, token_ids), report
