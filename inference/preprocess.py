"""Image preprocessing: DICOM pixels -> the APM's 1024x1024 letterboxed uint8 input.

The rules follow the AnatomiX reference (see shared/anatomix-model.md, "Preprocessing"), with one
deliberate difference in step 1:

1. DICOM only: Modality LUT, then VOI (window incl. SIGMOID, or VOI LUT sequence), then
   MONOCHROME1 inversion (``max - x``). The reference's DICOM reader windows the *stored* values
   (no Modality LUT); we apply the Modality LUT first, as DICOM defines the window on its output
   (PS3.3 C.11.2.1.2) and pydicom requires. Both give the same image when there is no rescale
   (slope 1, intercept 0: chest CR/DX as sent, bit for bit); with a rescale and a window the
   reference windows the wrong value range (docs/architecture.md, "Preprocessing: the Modality LUT
   before the window").
2. Per-image min-max stretch to [0, 1], ``(x * 255)`` truncated to uint8 (not rounded: the reference
   casts with ``astype(np.uint8)``).
3. Zero-pad the short side by ``(long - short) // 2`` on *each* side. When ``long - short`` is odd the
   padded image stays one pixel short of square; the resize then stretches it very slightly, so the
   geometry keeps separate x and y scales.
4. Resize to 1024x1024 with OpenCV's INTER_LINEAR, called directly (bilinear, half-pixel centres,
   *no antialiasing*; an antialiased resize differs by up to 66 gray levels on real images). OpenCV
   computes in 11-bit fixed point and switches to its area filter for an exact 2:1 reduction, so a
   float bilinear differs by one gray level in about 11% of RG1's pixels: calling the same function
   as the reference is the only way to get its uint8 image bit for bit.

:class:`Letterbox` keeps the geometry so boxes in the model's 1024 frame map back to source pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
import pydicom
import torch
from pydicom.pixels import apply_modality_lut, apply_voi_lut

#: Side of the square image the APM sees.
MODEL_SIZE = 1024

BoxXYXY = tuple[float, float, float, float]


class PreprocessError(ValueError):
    """The image cannot be fed to the model (no pixels, multi-frame, colour, constant...)."""


@dataclass(frozen=True)
class Letterbox:
    """Geometry from source pixels to the model's square frame.

    ``pad_x``/``pad_y`` are the zeros added on the left/top (the same amount is added on the
    right/bottom), in source pixels. ``scale_x``/``scale_y`` are model pixels per padded pixel.
    Coordinates are continuous with (0, 0) the top-left corner of the top-left pixel.
    """

    source_rows: int
    source_columns: int
    pad_x: int
    pad_y: int
    padded_rows: int
    padded_columns: int
    scale_x: float
    scale_y: float
    size: int = MODEL_SIZE

    @classmethod
    def for_shape(cls, rows: int, columns: int, size: int = MODEL_SIZE) -> Letterbox:
        """The reference's letterbox for a ``rows x columns`` source image."""
        if rows <= 0 or columns <= 0:
            raise PreprocessError(f"image has no pixels ({rows} rows x {columns} columns)")
        pad = abs(rows - columns) // 2
        pad_x, pad_y = (pad, 0) if rows > columns else (0, pad)
        padded_rows, padded_columns = rows + 2 * pad_y, columns + 2 * pad_x
        return cls(
            source_rows=rows,
            source_columns=columns,
            pad_x=pad_x,
            pad_y=pad_y,
            padded_rows=padded_rows,
            padded_columns=padded_columns,
            scale_x=size / padded_columns,
            scale_y=size / padded_rows,
            size=size,
        )

    def to_source(self, box_xyxy_model: Sequence[float]) -> BoxXYXY:
        """Box in the model frame (model pixels) -> source pixels, not clipped."""
        x1, y1, x2, y2 = (float(v) for v in box_xyxy_model)
        return (
            x1 / self.scale_x - self.pad_x,
            y1 / self.scale_y - self.pad_y,
            x2 / self.scale_x - self.pad_x,
            y2 / self.scale_y - self.pad_y,
        )

    def to_model(self, box_xyxy_source: Sequence[float]) -> BoxXYXY:
        """Box in source pixels -> the model frame (model pixels)."""
        x1, y1, x2, y2 = (float(v) for v in box_xyxy_source)
        return (
            (x1 + self.pad_x) * self.scale_x,
            (y1 + self.pad_y) * self.scale_y,
            (x2 + self.pad_x) * self.scale_x,
            (y2 + self.pad_y) * self.scale_y,
        )

    def clip(self, box_xyxy_source: Sequence[float]) -> BoxXYXY:
        """Clip a source-pixel box to ``[0, columns] x [0, rows]``."""
        x1, y1, x2, y2 = (float(v) for v in box_xyxy_source)
        cols, rows = float(self.source_columns), float(self.source_rows)
        return (min(max(x1, 0.0), cols), min(max(y1, 0.0), rows), min(max(x2, 0.0), cols), min(max(y2, 0.0), rows))


@dataclass(frozen=True)
class PreparedImage:
    """One image ready for the APM: ``pixels`` uint8 [1024, 1024] plus the geometry to map back."""

    pixels: np.ndarray
    letterbox: Letterbox
    sop_instance_uid: str | None = None


def prepare_dataset(ds: pydicom.Dataset) -> PreparedImage:
    """DICOM dataset -> :class:`PreparedImage` (Modality LUT, VOI, MONOCHROME1 inversion, letterbox)."""
    display = display_values_from_dataset(ds)
    uid = str(ds.SOPInstanceUID) if "SOPInstanceUID" in ds else None
    return prepare_array(display, sop_instance_uid=uid)


def prepare_array(pixels: np.ndarray, sop_instance_uid: str | None = None) -> PreparedImage:
    """A 2-D display-ready array (any dtype, larger = brighter) -> :class:`PreparedImage`."""
    image8 = stretch_to_uint8(pixels)
    letterbox = Letterbox.for_shape(*image8.shape)
    padded = pad_letterbox(image8, letterbox)
    resized = resize_bilinear_uint8(padded, letterbox.size)
    return PreparedImage(pixels=resized, letterbox=letterbox, sop_instance_uid=sop_instance_uid)


def images_to_tensor(images: Sequence[PreparedImage], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack prepared images into the APM input ``[B, 1, 1024, 1024]`` with values in [0, 1]."""
    if not images:
        raise PreprocessError("no images to stack")
    batch = torch.from_numpy(np.stack([image.pixels for image in images]))[:, None]
    return batch.to(device=device).to(dtype).div_(255.0)


def display_values_from_dataset(ds: pydicom.Dataset) -> np.ndarray:
    """Stored pixel values -> float64 display values (larger = brighter), shape [rows, columns]."""
    check_dataset_is_usable(ds)
    stored = ds.pixel_array
    if stored.ndim != 2:
        raise PreprocessError(f"expected one 2-D frame, got pixel array of shape {stored.shape}")
    # Modality LUT first (the window is defined on its output), unlike the reference's reader, which
    # windows stored values: identical without a rescale, see the module docstring.
    values = apply_modality_lut(stored, ds)
    # VOI LUT sequence is preferred over the window, as the reference (pydicom's default) does.
    values = np.asarray(apply_voi_lut(values, ds), dtype=np.float64)
    if str(ds.PhotometricInterpretation).upper() == "MONOCHROME1":
        # MONOCHROME1: low values are white. The reference inverts with max - x.
        values = values.max() - values
    return values


def check_dataset_is_usable(ds: pydicom.Dataset) -> None:
    """Raise :class:`PreprocessError` for datasets the model cannot use, saying why."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise PreprocessError("dataset has no Pixel Data (7FE0,0010); send an image object, not a report or KOS")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise PreprocessError(f"multi-frame image ({frames} frames); the model takes single-frame chest X-rays")
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if samples != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise PreprocessError(
            f"colour or non-grayscale image (SamplesPerPixel={samples}, PhotometricInterpretation={photometric!r}); "
            "the model takes MONOCHROME1/MONOCHROME2 images"
        )


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """Per-image min-max to [0, 1], then ``(x * 255)`` truncated to uint8 as the reference does."""
    if values.ndim != 2:
        raise PreprocessError(f"expected a 2-D grayscale array, got shape {values.shape}")
    if values.size == 0:
        raise PreprocessError("image has no pixels")
    data = np.asarray(values, dtype=np.float64)
    if not np.isfinite(data).all():
        raise PreprocessError("image contains NaN or infinite values")
    low, high = float(data.min()), float(data.max())
    if high <= low:
        raise PreprocessError(f"constant image (every pixel is {low:g}); nothing to analyse")
    unit = (data - low) / (high - low)
    return (unit * 255.0).astype(np.uint8)


def pad_letterbox(image8: np.ndarray, letterbox: Letterbox) -> np.ndarray:
    """Zero-pad ``[rows, columns]`` to ``[padded_rows, padded_columns]`` (same pad both sides)."""
    return np.pad(image8, ((letterbox.pad_y, letterbox.pad_y), (letterbox.pad_x, letterbox.pad_x)))


def resize_bilinear_uint8(image8: np.ndarray, size: int) -> np.ndarray:
    """``cv2.resize(..., INTER_LINEAR)`` to ``size x size``: the reference's resize, bit for bit.

    Bilinear with half-pixel centres and no antialias, in OpenCV's fixed-point arithmetic (an exact
    2:1 reduction becomes OpenCV's area average, as it does in the reference).
    """
    if image8.dtype != np.uint8 or image8.ndim != 2:
        raise PreprocessError(f"resize expects a 2-D uint8 image, got {image8.dtype} {image8.shape}")
    return cv2.resize(np.ascontiguousarray(image8), (size, size), interpolation=cv2.INTER_LINEAR)
