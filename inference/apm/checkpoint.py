"""Load the authors' APM checkpoint (``.pth``) safely, strictly, and with a report.

File layout (shared/anatomix-model.md): a dict with ``model, vis_optimizer, text_optimizer,
lr_scheduler, epoch, args, best_loss``; ``model`` holds ``vis_model.*`` (the APM) and ``text_model.*``
(PubMedBERT, training only). The pickle also holds an ``argparse.Namespace`` with a
``pathlib.PosixPath``; those two classes are the only globals we allow (``weights_only=True``).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import pathlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from inference.apm.config import APMConfig
from inference.apm.model import AnatomyPerceptionModule, build_apm

log = logging.getLogger(__name__)

VIS_PREFIX = "vis_model."
TEXT_PREFIX = "text_model."
#: Globals the authors' pickle needs besides tensors.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace, pathlib.PosixPath)


class CheckpointError(ValueError):
    """The checkpoint cannot give a complete, correctly shaped APM."""


@dataclass(frozen=True)
class APMLoadReport:
    """What loading found: key names that did not match, what was ignored, the inferred shapes."""

    missing: tuple[str, ...]
    unexpected: tuple[str, ...]
    ignored: int  # text_model.* tensors (training-only text encoder)
    config: APMConfig
    sha256: str
    path: str = ""
    dropped_num_batches_tracked: int = 0
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def clean(self) -> bool:
        return not self.missing and not self.unexpected


def load_apm(path: str | Path, device: str | torch.device = "cpu") -> tuple[AnatomyPerceptionModule, APMLoadReport]:
    """Read the APM ``.pth`` and return the eval-mode module on ``device`` and the load report.

    Raises :class:`CheckpointError` naming the keys when an inference weight is missing or has the
    wrong shape. Unexpected ``vis_model.*`` keys are reported (and logged), not fatal.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"APM checkpoint not found: {path}; put the authors' .pth in the model directory")
    raw = read_checkpoint(path)
    state, ignored = extract_apm_state_dict(raw, path)
    dropped = [key for key in state if key.endswith(".num_batches_tracked")]
    for key in dropped:
        del state[key]
    config, module, missing, bad_shapes = choose_config(state, raw.get("args"))
    expected = module.state_dict()
    unexpected = tuple(key for key in state if key not in expected)
    if missing:
        raise CheckpointError(
            f"{path.name}: {len(missing)} APM weight(s) missing, the model cannot run: {', '.join(missing[:20])}" + (" ..." if len(missing) > 20 else "")
        )
    if bad_shapes:
        raise CheckpointError(f"{path.name}: {len(bad_shapes)} APM weight(s) with the wrong shape: {'; '.join(bad_shapes[:20])}")
    for key in unexpected:
        log.warning("APM checkpoint %s: unexpected key %s ignored", path.name, key)
    tensors = {key: state[key].to(torch.float32) for key in expected}
    module.load_state_dict(tensors, strict=True, assign=True)
    module = module.to(device).eval().requires_grad_(False)
    report = APMLoadReport(
        missing=missing,
        unexpected=unexpected,
        ignored=ignored,
        config=config,
        sha256=file_sha256(path),
        path=str(path),
        dropped_num_batches_tracked=len(dropped),
    )
    return module, report


def read_checkpoint(path: Path) -> dict[str, Any]:
    """``torch.load`` with ``weights_only=True``, allowing only Namespace and PosixPath globals."""
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # Legacy (non-zip) torch.save format cannot be memory-mapped.
                raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError... for bad files
        raise CheckpointError(f"cannot read APM checkpoint {path}: {exc}") from exc
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path.name}: expected a dict checkpoint, got {type(raw).__name__}")
    return raw


def extract_apm_state_dict(raw: dict[str, Any], path: Path) -> tuple[dict[str, Tensor], int]:
    """``raw["model"]`` -> (APM tensors with ``vis_model.`` stripped, number of text_model tensors).

    A bare state dict (no ``model`` key, keys with or without the prefix) is accepted too.
    """
    model = raw.get("model", raw)
    if not isinstance(model, dict):
        raise CheckpointError(f"{path.name}: 'model' entry is {type(model).__name__}, expected a state dict")
    state: dict[str, Tensor] = {}
    ignored = 0
    for key, value in model.items():
        if key.startswith(TEXT_PREFIX):
            ignored += 1
            continue
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{path.name}: entry {key} is {type(value).__name__}, not a tensor")
        state[key[len(VIS_PREFIX) :] if key.startswith(VIS_PREFIX) else key] = value
    if not state:
        raise CheckpointError(f"{path.name}: no vis_model.* tensors found; is this the APM checkpoint?")
    return state, ignored


def infer_apm_config(state: dict[str, Tensor], args: Any = None) -> APMConfig:
    """Infer the APM shapes from tensor shapes (heads from ``args`` when present, else 4 and 2).

    The input is always one grayscale channel (the preprocessing makes it so), so conv1's input
    channels are checked against 1, never inferred.
    """
    try:
        conv1 = state["backbone.0.body.conv1.weight"]
        blocks = tuple(count_indices(state, rf"backbone\.0\.body\.layer{i}\.(\d+)\.conv1\.weight") for i in range(1, 5))
        defaults = APMConfig()
        return APMConfig(
            stem_width=int(conv1.shape[0]),
            blocks=blocks,  # type: ignore[arg-type]
            expansion=int(state["backbone.0.body.layer1.0.conv3.weight"].shape[0] // conv1.shape[0]),
            d_model=int(state["input_proj.weight"].shape[0]),
            num_heads=int(heads_from_args(args, "nheads", defaults.num_heads)),
            ffn_dim=int(state["transformer.encoder.layers.0.linear1.weight"].shape[0]),
            encoder_layers=count_indices(state, r"transformer\.encoder\.layers\.(\d+)\.linear1\.weight"),
            decoder_layers=count_indices(state, r"transformer\.decoder\.layers\.(\d+)\.linear1\.weight"),
            num_queries=int(state["query_embed.weight"].shape[0]),
            token_dim=int(state["anat_obj_embs.linear.weight"].shape[0]),
            token_heads=defaults.token_heads,
            num_labels=int(state["image_class_embed.weight"].shape[0]),
        )
    except KeyError as exc:
        raise CheckpointError(f"APM checkpoint lacks {exc.args[0]}, needed to infer the model shape") from exc
    except ValueError as exc:
        raise CheckpointError(f"APM checkpoint shapes are inconsistent: {exc}") from exc


def heads_from_args(args: Any, name: str, default: int) -> int:
    """The reference's ``args.model.<name>`` (or ``args.<name>``) when the pickle carries it."""
    for holder in (getattr(args, "model", None), args):
        value = getattr(holder, name, None) if holder is not None else None
        if isinstance(value, int) and value > 0:
            return value
    return default


def count_indices(state: dict[str, Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for key in state if (m := re.fullmatch(pattern, key))}
    return max(found) + 1 if found else 0


def choose_config(state: dict[str, Tensor], args: Any) -> tuple[APMConfig, AnatomyPerceptionModule, tuple[str, ...], tuple[str, ...]]:
    """Pick the APM shape that explains the file best: the one inferred from its tensors, or the
    known ``full``/``tiny`` shapes. Comparing candidates means one corrupted tensor is named itself
    instead of skewing the inferred shape and blaming its neighbours.

    Returns (config, meta-device module, missing keys, wrong-shape descriptions).
    """
    candidates: list[APMConfig] = []
    try:
        candidates.append(infer_apm_config(state, args))
    except CheckpointError as exc:
        log.warning("APM shape inference failed (%s); trying the known shapes", exc)
    candidates += [c for c in (APMConfig.full(), APMConfig.tiny()) if c not in candidates]
    best: tuple[APMConfig, AnatomyPerceptionModule, tuple[str, ...], tuple[str, ...]] | None = None
    for config in candidates:
        module = build_apm(config, device="meta")
        expected = module.state_dict()
        missing = tuple(key for key in expected if key not in state)
        bad = tuple(
            f"{key} (file {tuple(state[key].shape)}, model {tuple(ref.shape)})"
            for key, ref in expected.items()
            if key in state and tuple(state[key].shape) != tuple(ref.shape)
        )
        if best is None or len(missing) + len(bad) < len(best[2]) + len(best[3]):
            best = (config, module, missing, bad)
        if not missing and not bad:
            break  # the first candidate that fits exactly wins (the inferred shape comes first)
    assert best is not None
    return best


def file_sha256(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
