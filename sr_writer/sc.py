"""Secondary Capture with burned-in boxes and labels: the safety net for viewers that draw nothing else.

Marked as what it is: "NOT FOR DIAGNOSIS" banner in the pixels, BurnedInAnnotation YES, ImageType
DERIVED\\SECONDARY, SourceImageSequence pointing at the analysed image, DerivationDescription saying
how it was made.

Size: the rendering is downscaled to at most :data:`SC_MAX_SIDE` px on its long side before JPEG
baseline (RG1: 1841x2108 -> 894x1024, 0.95 MB -> ~0.2 MB). The SC is its own image (a rendering for
viewers that draw nothing else, not for diagnosis): it references its source through
SourceImageSequence and carries no pixel spacing, so its geometry may differ from the source's.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.sequence import Sequence
from pydicom.uid import JPEGBaseline8Bit

from sr_writer.context import BundleContext
from sr_writer.equipment import apply_common_attributes, apply_lossy_history
from sr_writer.identity import DEMO_MARK
from sr_writer.overlay import render_overlay
from sr_writer.text import code_string, truncate

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS - AI overlay, unverified"
_BIPED = set("LRAPHF")
#: Longest side of the SC in pixels; larger renderings are downscaled.
SC_MAX_SIDE = 1024


def banner_text(ctx: BundleContext) -> str:
    return f"{NOT_FOR_DIAGNOSIS} - {DEMO_MARK}" if ctx.demo else NOT_FOR_DIAGNOSIS


def footer_lines(ctx: BundleContext) -> tuple[str, ...]:
    """Findings the model did not localise, listed at the bottom of the image."""
    return tuple(f"{a.label} (whole image)" for a in ctx.unboxed_findings)


def downscale(rgb: np.ndarray, max_side: int = SC_MAX_SIDE) -> np.ndarray:
    """``rgb`` with its long side reduced to ``max_side`` (aspect kept; Pillow's bilinear, which averages
    over the scaled support when reducing); unchanged if smaller."""
    rows, columns = rgb.shape[:2]
    if max(rows, columns) <= max_side:
        return rgb
    scale = max_side / max(rows, columns)
    size = (max(1, round(columns * scale)), max(1, round(rows * scale)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0))


def sc_pixels(ctx: BundleContext) -> np.ndarray:
    """The SC's RGB pixels before JPEG: the overlay rendering, downscaled to :data:`SC_MAX_SIDE`."""
    pixels, _ = render_overlay(ctx.source, ctx.annotations, banner_text(ctx), footer_lines(ctx))
    return downscale(pixels)


def build_sc(ctx: BundleContext, kind: str = "sc") -> Dataset:
    """RGB Secondary Capture of the source with every box (regions and findings) drawn."""
    if not ctx.boxed:
        raise ValueError("result has no box inside the image: the overlay image would show nothing")
    pixels = sc_pixels(ctx)
    source = ctx.source
    orientation = [str(v) for v in source.get("PatientOrientation", [])]
    # highdicom needs a biped orientation for PATIENT coordinates; copy the source's when it is one.
    valid_orientation = len(orientation) == 2 and all(v and set(v) <= _BIPED for v in orientation)
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        # JPEG baseline (lossy, not for diagnosis anyway): RG1's 11 MB RGB becomes a few hundred kB.
        photometric_interpretation="YBR_FULL_422",
        transfer_syntax_uid=JPEGBaseline8Bit,
        bits_allocated=8,
        coordinate_system="PATIENT",
        study_instance_uid=ctx.study_instance_uid,
        **ctx.new_instance_identity(kind),
        patient_id=source.get("PatientID"),
        patient_name=source.get("PatientName"),
        patient_birth_date=source.get("PatientBirthDate"),
        patient_sex=source.get("PatientSex") or None,
        accession_number=source.get("AccessionNumber"),
        study_id=source.get("StudyID"),
        study_date=source.get("StudyDate"),
        study_time=source.get("StudyTime"),
        referring_physician_name=source.get("ReferringPhysicianName"),
        patient_orientation=tuple(orientation) if valid_orientation else ("L", "F"),
    )
    if not valid_orientation:
        # Type 2: empty rather than a guessed orientation.
        sc.PatientOrientation = None
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.SeriesDescription = ctx.series_description(kind)
    sc.BodyPartExamined = code_string(str(source.get("BodyPartExamined", "") or "CHEST"))
    sc.DerivationDescription = truncate(
        f"{banner_text(ctx)}. Source image rendered through Modality LUT, VOI (window) and polarity to 8-bit RGB; "
        f"findings and the anatomy they are grounded to from {ctx.algorithm_name} {ctx.algorithm_version} burned in; "
        "banner and legend in rows added above and below the image"
        + (f"; downscaled to {pixels.shape[1]}x{pixels.shape[0]} px." if pixels.shape[1] < ctx.columns else "."),
        "ST",
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = Sequence([reference])
    encoded = sum(len(fragment) for fragment in generate_fragments(sc.PixelData))
    apply_lossy_history(sc, source, own=(round(pixels.size / max(encoded, 1), 2), "ISO_10918_1"))
    return apply_common_attributes(sc, ctx)
