"""The model directory: where each file lives, the optional ``model.json`` manifest, weights digest.

Layout (file names configurable in ``model.json`` under ``"files"``)::

    MODEL_DIR/
      model.json        optional: {"name", "version", "demo", "files": {...}}
      apm.pth           the authors' APM checkpoint (any single *.pth is accepted without a manifest)
      lm.pt             the authors' LM checkpoint (LoRA, embed/lm_head copies, projectors)
      medgemma/         MedGemma base in Hugging Face layout: config.json, tokenizer files, *.safetensors
      emb_db.pt         retrieval DB (the reference also reads emb_db_test.pt: name it in model.json)

The weights digest is a SHA-256 over the files' bytes (names and contents, in a fixed order), cached
by (path, size, mtime) in ``.anatomix-digest.json`` so an 8 GB directory is hashed once. The device
UID (a DICOM UID under 2.25) is derived from the digest: new weights, new device UID.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "model.json"
DIGEST_CACHE = ".anatomix-digest.json"
DEFAULT_FILES = {"apm": "apm.pth", "lm": "lm.pt", "base": "medgemma", "retrieval_db": "emb_db.pt"}
DEFAULT_NAME = "AnatomiX"


class ModelDirError(ValueError):
    """The model directory is incomplete or its manifest is unreadable; the message says what to add."""


@dataclass(frozen=True)
class ModelDir:
    """Resolved paths and manifest facts of one model directory."""

    root: Path
    apm: Path
    lm: Path
    base: Path
    retrieval_db: Path
    name: str
    version: str
    demo: bool
    manifest: dict

    @classmethod
    def open(cls, root: Path) -> ModelDir:
        """Resolve and check every path; raise :class:`ModelDirError` listing what is missing."""
        root = Path(root)
        if not root.is_dir():
            raise ModelDirError(f"model directory {root} does not exist")
        manifest: dict = {}
        if (root / MANIFEST).is_file():
            try:
                manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise ModelDirError(f"{root / MANIFEST} is not valid JSON ({exc})") from exc
        files = {**DEFAULT_FILES, **(manifest.get("files") or {})}
        apm = root / files["apm"]
        if not apm.is_file() and "apm" not in (manifest.get("files") or {}):
            candidates = sorted(root.glob("*.pth"))
            if len(candidates) == 1:
                apm = candidates[0]
        paths = {"apm": apm, "lm": root / files["lm"], "base": root / files["base"], "retrieval_db": root / files["retrieval_db"]}
        problems = [f"{kind} ({path.name})" for kind, path in paths.items() if not path.exists()]
        if paths["base"].is_dir() and not (paths["base"] / "config.json").is_file():
            problems.append(f"base model config ({files['base']}/config.json)")
        if problems:
            raise ModelDirError(
                f"model directory {root} is incomplete, missing: {', '.join(problems)}."
                " Put the authors' files there (see docs/architecture.md, 'Model directory') or run"
                " `anatomix-node model demo-weights --out DIR` for demo weights"
            )
        return cls(
            root=root,
            apm=paths["apm"],
            lm=paths["lm"],
            base=paths["base"],
            retrieval_db=paths["retrieval_db"],
            name=str(manifest.get("name", DEFAULT_NAME)),
            version=str(manifest.get("version", "1.0")),
            demo=bool(manifest.get("demo", False)),
            manifest=manifest,
        )

    def weight_files(self) -> list[Path]:
        """Every file that determines the model's output, in a fixed order."""
        base_files = sorted(p for p in self.base.rglob("*") if p.is_file() and not p.name.startswith("."))
        return [self.apm, self.lm, *base_files, self.retrieval_db]

    def weights_digest(self) -> str:
        """SHA-256 (hex) over relative names and bytes of :meth:`weight_files`, cached by size+mtime."""
        cache_path = self.root / DIGEST_CACHE
        files = self.weight_files()
        stamp = [[str(p.relative_to(self.root)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        try:
            cached = json.loads(cache_path.read_text(encoding="utf-8"))
            if cached.get("stamp") == stamp:
                return str(cached["digest"])
        except (OSError, ValueError, KeyError):
            pass
        digest = hashlib.sha256()
        for path in files:
            digest.update(str(path.relative_to(self.root)).encode() + b"\0")
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 22):
                    digest.update(chunk)
        value = digest.hexdigest()
        try:
            cache_path.write_text(json.dumps({"stamp": stamp, "digest": value}), encoding="utf-8")
        except OSError as exc:  # a read-only model directory is fine: we just hash again next time
            log.info("could not cache the weights digest in %s (%s)", cache_path, exc)
        return value


def device_uid_from_digest(digest: str) -> str:
    """A DICOM UID (``2.25.<decimal>``, at most 44 characters) derived from the weights digest."""
    return "2.25." + str(int(digest[:32], 16))
