"""Retrieval DB ("RAG"): the closest stored sentence for each region's anatomy token.

File format (the authors'): a ``torch.save``d ordered dict ``{raw_region_name: {sentence:
Tensor[1, 16]}}`` with exactly 36 regions. Region i is ``sorted(keys)[i]`` (never matched by name).
Lookup: L2-normalise token i and region i's vectors, dot product, argmax with the first index on ties.
One normalised ``[N_i, 16]`` matrix per region is built once at load, so a lookup is a handful of
small matrix products even with tens of thousands of sentences per region.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NUM_REGIONS = 36


class RetrievalDBError(ValueError):
    """The retrieval DB file is unusable (wrong structure, region count, vector shapes)."""


@dataclass(frozen=True)
class RegionIndex:
    """One region's sentences and their L2-normalised vectors ``[N, D]`` (float32, C-contiguous)."""

    raw_name: str
    sentences: tuple[str, ...]
    unit_vectors: np.ndarray


class RetrievalDB:
    """Per-region top-1 cosine retrieval over the authors' sentence DB."""

    def __init__(self, regions: list[RegionIndex], sha256: str = "", path: str = "") -> None:
        if len(regions) != NUM_REGIONS:
            raise RetrievalDBError(f"retrieval DB must hold exactly {NUM_REGIONS} regions, got {len(regions)}")
        self.regions = regions
        self.sha256 = sha256
        self.path = path
        dims = {int(region.unit_vectors.shape[1]) for region in regions}
        if len(dims) != 1:
            raise RetrievalDBError(f"retrieval DB regions have different vector lengths {sorted(dims)}")
        self.token_dim = dims.pop()

    @classmethod
    def load(cls, path: str | Path) -> RetrievalDB:
        """Read a DB file (``weights_only=True``: plain dicts, strings and tensors only)."""
        path = Path(path)
        if not path.is_file():
            raise RetrievalDBError(f"retrieval DB not found: {path}; set the model directory's retrieval DB path")
        data = path.read_bytes()
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for unreadable or unsafe pickles
            raise RetrievalDBError(f"cannot read retrieval DB {path}: {exc}") from exc
        return cls.from_mapping(raw, sha256=hashlib.sha256(data).hexdigest(), path=str(path))

    @classmethod
    def from_mapping(cls, raw: object, sha256: str = "", path: str = "") -> RetrievalDB:
        """Build from ``{region: {sentence: Tensor[1, D] or [D]}}``; region i = sorted(keys)[i]."""
        if not isinstance(raw, Mapping):
            raise RetrievalDBError(f"retrieval DB must be a dict of regions, got {type(raw).__name__}")
        if len(raw) != NUM_REGIONS:
            raise RetrievalDBError(f"retrieval DB must hold exactly {NUM_REGIONS} regions (one per APM query), got {len(raw)}")
        return cls([build_region_index(name, raw[name]) for name in sorted(raw.keys())], sha256=sha256, path=path)

    @property
    def raw_region_names(self) -> list[str]:
        return [region.raw_name for region in self.regions]

    def lookup(self, tokens: Tensor | np.ndarray) -> list[list[str]]:
        """tokens [B, 36, D] (or [36, D]) -> per image, 36 sentences (region order)."""
        indices = self.lookup_indices(tokens)
        return [[self.regions[r].sentences[int(i)] for r, i in enumerate(row)] for row in indices.tolist()]

    def lookup_indices(self, tokens: Tensor | np.ndarray) -> np.ndarray:
        """tokens [B, 36, D] -> sentence indices [B, 36] (int64): top-1 cosine, first index on ties.

        Computed in numpy: its argmax is documented to return the first maximum, and on CPU it is
        two orders of magnitude faster than torch's for a [B, 60000] score matrix.
        """
        batch = torch.as_tensor(tokens).detach().to("cpu", torch.float32)
        if batch.dim() == 2:
            batch = batch[None]
        if batch.dim() != 3 or batch.shape[1] != NUM_REGIONS or batch.shape[2] != self.token_dim:
            raise ValueError(f"tokens must be [B, {NUM_REGIONS}, {self.token_dim}], got {tuple(batch.shape)}")
        by_region = np.ascontiguousarray(F.normalize(batch, dim=-1).numpy().transpose(1, 0, 2))  # [36, B, D]
        indices = np.empty((batch.shape[0], NUM_REGIONS), dtype=np.int64)
        for index, region in enumerate(self.regions):
            scores = region.unit_vectors @ by_region[index].T  # [N_i, B]
            indices[:, index] = scores.argmax(axis=0)
        return indices


def build_region_index(name: object, entries: object) -> RegionIndex:
    if not isinstance(entries, Mapping) or not entries:
        raise RetrievalDBError(f"region {name!r}: expected a non-empty dict of sentence -> vector")
    sentences, rows = [], []
    for sentence, vector in entries.items():
        if not isinstance(vector, Tensor):
            raise RetrievalDBError(f"region {name!r}, sentence {sentence!r}: vector is {type(vector).__name__}")
        if not (vector.dim() == 1 or (vector.dim() == 2 and vector.shape[0] == 1)):
            raise RetrievalDBError(f"region {name!r}, sentence {sentence!r}: vector shape {tuple(vector.shape)}, expected [1, D]")
        sentences.append(str(sentence))
        rows.append(vector.detach().to(torch.float32).reshape(-1))
    dims = {row.numel() for row in rows}
    if len(dims) != 1:
        raise RetrievalDBError(f"region {name!r}: vectors of different lengths {sorted(dims)}")
    matrix = np.ascontiguousarray(F.normalize(torch.stack(rows), dim=1).numpy())
    return RegionIndex(raw_name=str(name), sentences=tuple(sentences), unit_vectors=matrix)
