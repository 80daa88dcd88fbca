"""Secondary Capture with burned-in boxes and labels: the safety net for viewers that draw nothing else.

Marked as what it is: "NOT FOR DIAGNOSIS" banner in the pixels, BurnedInAnnotation YES, ImageType
DERIVED\\SECONDARY, SourceImageSequence pointing at the analysed image, DerivationDescription saying
how it was made.

Size: the rendering is downscaled to at most :data:`SC_MAX_SIDE` px on its long side before JPEG
baseline (RG1: 1841x2108 -> 894x1024, 0.95 MB -> ~0.2 MB). The SC is its own image (a rendering for
viewers that draw nothing else, not for diagnosis): it references its source through
SourceImageSequence and carries no pixel spacing, so its geometry may differ from the source's.

A receiver that takes no JPEG gets :func:`as_palette_sc`: the same rendering as PALETTE COLOR, one
byte per pixel (RG1: 0.9 MB instead of 2.7 MB of RGB; 0.4 MB deflated instead of 1.0 MB), with the
same SOP Instance UID, as every decompressed copy the node sends.
"""

from __future__ import annotations

import copy

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from sr_writer.context import BundleContext, grounded_annotations
from sr_writer.equipment import apply_common_attributes, apply_lossy_history
from sr_writer.identity import DEMO_MARK
from sr_writer.overlay import render_overlay
from sr_writer.text import code_string, truncate
from sr_writer.tid1500 import NO_FINDING_TRACKING_ID

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSIS - AI overlay, unverified"
_BIPED = set("LRAPHF")
#: Longest side of the SC in pixels; larger renderings are downscaled.
SC_MAX_SIDE = 1024


def banner_text(ctx: BundleContext) -> str:
    return f"{NOT_FOR_DIAGNOSIS} - {DEMO_MARK}" if ctx.demo else NOT_FOR_DIAGNOSIS


def footer_lines(ctx: BundleContext) -> tuple[str, ...]:
    """Findings the model did not localise, listed at the bottom of the image; with nothing to draw at all,
    the statement that the AI found nothing (else a normal study's SC would show only its banner)."""
    if not grounded_annotations(ctx.annotations) and not ctx.unboxed_findings:
        return (NO_FINDING_TRACKING_ID,)
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


#: Palette entries of :func:`as_palette_sc` that hold a grey ramp; the rest hold the overlay's colours.
PALETTE_GREYS = 192
#: A decoded pixel whose channels differ by more than this is coloured (JPEG's chroma noise on grey is less).
COLOURED_SPREAD = 24


def palette_pixels(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``rgb`` (rows, columns, 3) as 8-bit palette indices and the 256 x 3 palette.

    Indices 0-191 are a grey ramp by luminance (the radiograph, the banner's black and white), in
    order, so the indices deflate like a grey image; 192-255 hold the coloured pixels (boxes, labels),
    reduced to 64 colours by Pillow's octree quantiser, no dithering."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"palette_pixels expects 8-bit RGB pixels, got shape {rgb.shape} of {rgb.dtype}")
    channels = rgb.astype(np.int16)
    coloured = (channels.max(axis=2) - channels.min(axis=2)) > COLOURED_SPREAD
    luminance = rgb.astype(np.float32) @ np.float32([0.299, 0.587, 0.114])
    index = np.rint(luminance * (PALETTE_GREYS - 1) / 255).astype(np.uint8)
    palette = np.zeros((256, 3), np.uint8)
    palette[:PALETTE_GREYS] = np.rint(np.arange(PALETTE_GREYS) * 255 / (PALETTE_GREYS - 1)).astype(np.uint8)[:, None]
    if coloured.any():
        strip = Image.fromarray(np.ascontiguousarray(rgb[coloured])[np.newaxis])
        reduced = strip.quantize(colors=256 - PALETTE_GREYS, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE)
        colours = np.array(reduced.getpalette()[: 3 * (256 - PALETTE_GREYS)], np.uint8).reshape(-1, 3)
        palette[PALETTE_GREYS : PALETTE_GREYS + len(colours)] = colours
        index[coloured] = PALETTE_GREYS + np.asarray(reduced)[0]
    return index, palette


def as_palette_sc(sc: Dataset) -> Dataset:
    """Our JPEG SC as PALETTE COLOR (8-bit indices, 256-entry 16-bit LUTs), Explicit VR Little Endian.

    For a destination that takes no JPEG for the SC: RGB would be three bytes a pixel. Same SOP
    Instance UID (the same image in another encoding; one destination only ever gets one form), lossy
    history kept and the colour reduction stated in Derivation Description."""
    if sc.get("SamplesPerPixel") != 3 or int(sc.get("BitsAllocated", 0)) != 8:
        raise ValueError("as_palette_sc expects our 8-bit colour Secondary Capture")
    plain = copy.deepcopy(sc)
    plain.decompress(generate_instance_uid=False)
    index, palette = palette_pixels(plain.pixel_array)
    del plain.PixelData
    if "PlanarConfiguration" in plain:
        del plain.PlanarConfiguration
    plain.SamplesPerPixel = 1
    plain.PhotometricInterpretation = "PALETTE COLOR"
    plain.BitsAllocated, plain.BitsStored, plain.HighBit, plain.PixelRepresentation = 8, 8, 7, 0
    for colour, channel in (("Red", 0), ("Green", 1), ("Blue", 2)):
        setattr(plain, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        # US, not the dictionary's "US or SS": a deflated encoding does not resolve ambiguous VRs.
        plain[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(plain, f"{colour}PaletteColorLookupTableData", (palette[:, channel].astype("<u2") * 257).tobytes())
        plain[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    plain.DerivationDescription = truncate(
        f"{plain.get('DerivationDescription', '')} Colours reduced to a 256-entry palette for a receiver without JPEG.".strip(), "ST"
    )
    plain.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    plain.PixelData = index.tobytes()
    plain["PixelData"].VR = "OB"
    return plain
