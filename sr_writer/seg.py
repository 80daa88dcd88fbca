"""Segmentation: one segment per region box and per finding box, box-filled masks.

Regions overlap (the lung contains its zones), so each segment has its own frame, full size. Tracking UIDs are the same as in the SR and GSPS.

Additions after construction, for viewers and validators (see shared/dicom-results.md; the steps that
rely on highdicom's behaviour live in :mod:`sr_writer._highdicom_compat`):
``PatientOrientation`` empty; ``PlaneOrientationSequence`` in the Shared Functional Groups (OHIF
3.12/3.13 crashes without it on projection images) and ``PixelMeasuresSequence`` with spacing from
PixelSpacing when it is calibrated and non-zero, else ImagerPixelSpacing, else none: a SEG of ours
never carries zero or invented spacing, even when the source (RG1: 0\\0) does.

Size for every receiver: :func:`finding_segments` bounds the number of segments so that the SEG as a
BINARY SEG (what a receiver without compression gets) stays within :data:`SEG_UNCOMPRESSED_BUDGET`.

Size and viewers: the masks are written as a FRACTIONAL (OCCUPANCY) SEG holding only 0 and 255 (a box
occupies its pixels fully; the "pseudo-binary" form OHIF itself writes and reads), JPEG-LS Lossless:
RG1's 46 frames take 120 kB (RLE Lossless: 2.7 MB, as PackBits runs are capped at 128 bytes, so an
empty 1841-px row still costs 30 bytes; uncompressed: 165 MB). OHIF 3.13 shows it (tests/viewer): Orthanc
transcodes it for OHIF's whole-instance fetch, and where OHIF rejects that (its length check does not
allow the pad byte of an odd-length frame set) it loads frame by frame, which Orthanc answers decoded. A BINARY SEG would be smaller still but does not
load: highdicom allows only native syntaxes or JPEG 2000 for 1-bit frames, OHIF cannot read a bit-packed
native SEG whose length needs the DICOM pad byte (43 frames of 1955x1841 bits, for example), and Orthanc
answers per-frame requests for 1-bit frames with an error. The frames are JPEG-LS-encoded on a small
thread pool (CharLS releases the GIL); ``SEG_TRANSFER_SYNTAX = RLELossless`` restores the previous form,
whose frames :func:`rle_encode_frame` encodes (box masks have at most two distinct rows per frame).

Speed (46 full-size segments of 1955x1841 is 165 M mask pixels): the masks are 0/1 uint8 in
segment-major memory, exposed as highdicom's (1, rows, columns, segments) view, so each frame highdicom
encodes is a contiguous plane (no strided per-segment copy). highdicom's generic pixel checks scan the
whole array twice to learn that values are 0/1 and whether segments overlap; for box masks we know
both by construction (overlap = some pair of boxes intersects), so
:class:`sr_writer._highdicom_compat.BoxSegmentation` answers them from the boxes. That halves the SEG's
cost; ``tests/sr_writer`` reads the result back through ``hd.seg.segread`` and checks every mask
pixel-exactly.
"""

from __future__ import annotations

import contextvars
import copy
from concurrent.futures import ThreadPoolExecutor
from itertools import combinations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless

from inference.result import Box
from sr_writer import codes
from sr_writer._highdicom_compat import BOX_OVERLAP, BoxSegmentation, install_frame_encoder, set_projection_geometry
from sr_writer.colours import OTHER_FINDINGS_RGB, colour_for_key
from sr_writer.context import Annotation, BundleContext, tracking_uid
from sr_writer.equipment import DEVICE_SERIAL_NUMBER, apply_common_attributes, apply_lossy_history
from sr_writer.text import code_string, truncate

#: Set while one of our SEGs is built: highdicom's frame encoder then uses :func:`rle_encode_frame`.
_FAST_RLE: contextvars.ContextVar[bool] = contextvars.ContextVar("box_fast_rle", default=False)


def rle_encode_frame(frame: np.ndarray) -> bytes:
    """DICOM RLE Lossless (PS3.5 Annex G) of one 8-bit single-sample frame: one segment, PackBits per row.

    Each distinct row is encoded once and reused (box masks have at most two per frame).
    """
    cache: dict[bytes, bytes] = {}
    parts = []
    for row in frame:
        key = row.tobytes()
        encoded = cache.get(key)
        if encoded is None:
            encoded = cache[key] = _packbits_row(row)
        parts.append(encoded)
    segment = b"".join(parts)
    if len(segment) % 2:
        segment += b"\x00"
    header = np.zeros(16, dtype="<u4")
    header[0], header[1] = 1, 64
    return header.tobytes() + segment


def _packbits_row(row: np.ndarray) -> bytes:
    """PackBits of one row (never crossing the row): replicate runs of 2-128, literal runs of 1-128."""
    values = row.astype(np.int16)
    starts = np.flatnonzero(np.diff(values, prepend=-1))
    lengths = np.diff(np.append(starts, len(values)))
    out = bytearray()
    literal = bytearray()
    for start, length in zip(starts.tolist(), lengths.tolist()):
        value = int(row[start])
        if length == 1:
            literal.append(value)
            if len(literal) == 128:
                out += bytes([127]) + literal
                literal.clear()
            continue
        if literal:
            out += bytes([len(literal) - 1]) + literal
            literal.clear()
        while length > 0:
            n = min(length, 128)
            if n == 1:
                literal.append(value)
                if len(literal) == 128:
                    out += bytes([127]) + literal
                    literal.clear()
            else:
                out += bytes([257 - n, value])
            length -= n
    if literal:
        out += bytes([len(literal) - 1]) + literal
    return bytes(out)


def _use_fast_rle(array: np.ndarray, kwargs: dict) -> bool:
    """Our SEG's frames while it is built with RLE Lossless (see sr_writer._highdicom_compat, 2)."""
    return _FAST_RLE.get() and kwargs.get("transfer_syntax_uid") == RLELossless and array.dtype == np.uint8 and array.ndim == 2


install_frame_encoder(_use_fast_rle, rle_encode_frame)


def boxes_overlap(slices: list[tuple[slice, slice]]) -> bool:
    """True when the pixel sets of any two boxes intersect."""
    for (rows_a, columns_a), (rows_b, columns_b) in combinations(slices, 2):
        if rows_a.start < rows_b.stop and rows_b.start < rows_a.stop and columns_a.start < columns_b.stop and columns_b.start < columns_a.stop:
            return True
    return False


def box_pixel_slice(box: Box, rows: int, columns: int) -> tuple[slice, slice]:
    """Rows/columns of the pixels whose centres lie inside ``box`` (pixel (r, c) has centre (c+.5, r+.5)).

    At least one pixel in each direction, so a thin box still marks something.
    """
    c1 = int(np.clip(np.floor(box.x1 + 0.5), 0, columns - 1))
    c2 = int(np.clip(np.ceil(box.x2 - 0.5), c1 + 1, columns))
    r1 = int(np.clip(np.floor(box.y1 + 0.5), 0, rows - 1))
    r2 = int(np.clip(np.ceil(box.y2 - 0.5), r1 + 1, rows))
    return slice(r1, r2), slice(c1, c2)


def box_masks(segments: list[tuple[Annotation, ...]], rows: int, columns: int) -> np.ndarray:
    """0/1 masks, shape (1, rows, columns, segments): segment s is the union of the boxes of ``segments[s]``."""
    # Segment-major storage, exposed as a (1, rows, columns, segments) view: highdicom reads one segment
    # at a time (pixel_array[..., s]), which is then a contiguous uint8 frame it can bit-pack directly,
    # with no per-segment strided copy or dtype conversion (that cost ~0.5 s for 46 full-size segments).
    planes = np.zeros((len(segments), rows, columns), dtype=np.uint8)
    for s, members in enumerate(segments):
        for annotation in members:
            assert annotation.box is not None
            row_slice, column_slice = box_pixel_slice(annotation.box, rows, columns)
            planes[s, row_slice, column_slice] = 1
    return np.moveaxis(planes, 0, -1)[np.newaxis]


#: Bytes the findings SEG may take as a BINARY SEG (what a receiver without compression gets): one
#: bit-packed full-size frame per segment, so at most this // frame bytes segments (RG1: 8 of 0.45 MB).
#: With the palette SC (~0.9 MB) and the SRs and GSPS (~0.1 MB) a bundle stays under 5 MB per image.
SEG_UNCOMPRESSED_BUDGET = 3_600_000


def finding_segments(ctx: BundleContext, budget: int = SEG_UNCOMPRESSED_BUDGET) -> list[tuple[Annotation, ...]]:
    """The findings SEG's segments: one per finding box while their BINARY frames fit ``budget``; else
    the most probable boxes each their own segment and the rest together in one last segment.

    A projection SEG without a Frame of Reference keeps the source's pixel grid, so each segment costs
    rows x columns / 8 bytes uncompressed whatever its box; the number of segments is what bounds it."""
    boxes = ctx.finding_boxes
    frame_bytes = -(-ctx.rows * ctx.columns // 8)
    most = max(1, budget // frame_bytes)
    if len(boxes) <= most:
        return [(a,) for a in boxes]
    ranked = sorted(boxes, key=lambda a: -(a.probability if a.probability is not None else -1.0))
    own = set(id(a) for a in ranked[: most - 1])
    return [(a,) for a in boxes if id(a) in own] + [tuple(a for a in boxes if id(a) not in own)]


def other_findings_annotation(ctx: BundleContext, members: tuple[Annotation, ...]) -> Annotation:
    """The description of the segment that holds several findings' boxes (see :func:`finding_segments`)."""
    names = ", ".join(dict.fromkeys(a.name or a.label for a in members))
    return Annotation(
        kind="finding",
        key="finding-other",
        tracking_id=truncate(f"Other findings: {names}", "LO"),
        tracking_uid=tracking_uid(ctx.result, ctx.uid_root, ctx.analysis_version, "seg/other-findings"),
        label=truncate(f"Other findings ({len(members)})", "LO"),
        box=None,
        finding_type=codes.CLINICAL_FINDING,
        sites=(),
        name=truncate(f"Other findings ({len(members)})", "LO"),
    )


def segment_description(
    number: int, annotation: Annotation, algorithm: hd.AlgorithmIdentificationSequence, colour: tuple[int, int, int] | None = None
) -> hd.seg.SegmentDescription:
    site = annotation.sites[0] if annotation.sites else None
    if annotation.is_region:
        category, property_type = codes.ANATOMICAL_STRUCTURE, annotation.finding_type
    else:
        category, property_type = codes.MORPHOLOGICALLY_ABNORMAL_STRUCTURE, annotation.finding_type
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=annotation.name or annotation.label,
        segmented_property_category=category,
        segmented_property_type=property_type,
        algorithm_type="AUTOMATIC",
        algorithm_identification=algorithm,
        tracking_uid=annotation.tracking_uid,
        tracking_id=annotation.tracking_id,
        anatomic_regions=[site.structure] if site is not None and not annotation.is_region else None,
        display_color=hd.color.CIELabColor.from_rgb(*(colour or colour_for_key(annotation.key))),  # one table for SEG, GSPS, SC
    )
    if site is not None and site.laterality is not None:
        # Laterality of a paired structure: a modifier of the property type (regions) or anatomic region (findings).
        modifier = [codes.as_coded_concept(site.laterality)]
        if annotation.is_region:
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = modifier
        else:
            description.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = modifier
    return description


def pixel_spacing_for(source: Dataset) -> list[float] | None:
    """(row, column) spacing for the SEG: calibrated PixelSpacing if non-zero, else ImagerPixelSpacing,
    else None (the SEG states no spacing the source lacks)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = source.get(keyword)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            return [float(value[0]), float(value[1])]
    return None


def build_seg(ctx: BundleContext, kind: str = "seg") -> Dataset:
    """The findings' SEG: one segment per finding box, what a viewer should draw at first opening.

    OHIF draws every segment of a SEG at once, filled; the anatomy (36 overlapping region boxes) buried
    the findings, so it has its own object (:func:`build_anatomy_seg`, kind ``anatomy_seg``)."""
    return _build_box_seg(ctx, kind, finding_segments(ctx), "finding boxes", "AI_FINDINGS")


def build_anatomy_seg(ctx: BundleContext, kind: str = "anatomy_seg") -> Dataset:
    """The anatomy SEG: one segment per located region (for a profile that asks for it)."""
    return _build_box_seg(ctx, kind, [(a,) for a in ctx.boxed if a.is_region], "anatomical region boxes", "AI_ANATOMY")


def _build_box_seg(ctx: BundleContext, kind: str, segments: list[tuple[Annotation, ...]], what: str, label: str) -> Dataset:
    if not segments:
        raise ValueError(f"result has no {what} inside the image: nothing to segment")
    algorithm = hd.AlgorithmIdentificationSequence(name=ctx.algorithm_name, family=codes.ARTIFICIAL_INTELLIGENCE, version=ctx.algorithm_version)
    descriptions = [
        segment_description(n, members[0], algorithm)
        if len(members) == 1
        else segment_description(n, other_findings_annotation(ctx, members), algorithm, OTHER_FINDINGS_RGB)
        for n, members in enumerate(segments, start=1)
    ]
    slices = [[box_pixel_slice(a.box, ctx.rows, ctx.columns) for a in members if a.box is not None] for members in segments]
    overlap = any(boxes_overlap([a, b]) for one, other in combinations(slices, 2) for a in one for b in other)
    token = BOX_OVERLAP.set("YES" if overlap else "NO")
    rle = _FAST_RLE.set(True)
    try:
        seg = _construct(ctx, kind, segments, descriptions, what, label)
    finally:
        _FAST_RLE.reset(rle)
        BOX_OVERLAP.reset(token)
    seg.SeriesDescription = ctx.series_description(kind)
    set_projection_geometry(seg, ctx.source, pixel_spacing_for(ctx.source))
    apply_lossy_history(seg, ctx.source)
    return apply_common_attributes(seg, ctx)


#: Transfer syntax of our SEGs (see the module docstring).
SEG_TRANSFER_SYNTAX = JPEGLSLossless
#: Threads that JPEG-LS-encode frames (CharLS releases the GIL).
ENCODE_THREADS = 2


def _construct(ctx: BundleContext, kind: str, segments: list[tuple[Annotation, ...]], descriptions: list, what: str, label: str) -> Dataset:
    if SEG_TRANSFER_SYNTAX == RLELossless:
        return _construct_with(ctx, kind, segments, descriptions, 0, what, label)
    with ThreadPoolExecutor(ENCODE_THREADS) as pool:
        return _construct_with(ctx, kind, segments, descriptions, pool, what, label)


def _construct_with(ctx: BundleContext, kind: str, segments: list[tuple[Annotation, ...]], descriptions: list, workers, what: str, label: str) -> Dataset:
    return BoxSegmentation(
        source_images=[ctx.source],
        pixel_array=box_masks(segments, ctx.rows, ctx.columns),
        segmentation_type="FRACTIONAL",  # 0 or 255 only ("pseudo-binary"): see the module docstring
        fractional_type="OCCUPANCY",
        max_fractional_value=255,
        transfer_syntax_uid=SEG_TRANSFER_SYNTAX,
        workers=workers,
        segment_descriptions=descriptions,
        **ctx.new_instance_identity(kind),
        manufacturer_model_name=ctx.algorithm_name,
        software_versions=ctx.algorithm_version,
        device_serial_number=DEVICE_SERIAL_NUMBER,
        content_label=code_string("DEMO_WEIGHTS" if ctx.demo else label),
        content_description=ctx.content_description(what),
        omit_empty_frames=False,
    )


def as_binary_seg(seg: Dataset) -> Dataset:
    """Our pseudo-binary SEG (FRACTIONAL OCCUPANCY, 0/255) as a BINARY SEG (1 bit per pixel, Explicit VR
    Little Endian): the same masks, segments, tracking UIDs and references, an eighth of the bytes.

    For a destination that takes no compressed transfer syntax (and not Deflated) for SEG: uncompressed,
    our 8-bit frames are rows x columns bytes each (RG1: 3.6 MB per finding box); bit-packed, 0.45 MB.
    A SEG of a projection image without a Frame of Reference must keep the source's pixel grid, so this
    is the smallest standard form. It keeps the SOP Instance UID, as every decompressed copy the node
    sends does (tests/dicom_node/test_delivery_keeps_uids.py): the same masks in another encoding, so a
    re-send is recognised as the same instance and the PACS holds one copy; one destination only ever
    gets one of the two forms (its negotiation decides).
    """
    if seg.get("SegmentationType") != "FRACTIONAL" or int(seg.get("MaximumFractionalValue", 0)) != 255:
        raise ValueError("as_binary_seg expects our pseudo-binary SEG (FRACTIONAL, maximum fractional value 255)")
    frames = seg.pixel_array.reshape(-1, int(seg.Rows), int(seg.Columns))
    if not set(np.unique(frames).tolist()) <= {0, 255}:
        raise ValueError("the SEG holds fractional values other than 0 and 255: it is not a box mask")
    binary = copy.deepcopy(seg)
    del binary.PixelData  # the decoded copy is not needed; the packed bits replace it
    packed = pack_bits(frames > 0, pad=True)
    binary.SegmentationType = "BINARY"
    for keyword in ("SegmentationFractionalType", "MaximumFractionalValue"):
        if keyword in binary:
            delattr(binary, keyword)
    binary.BitsAllocated, binary.BitsStored, binary.HighBit = 1, 1, 0
    binary.LossyImageCompression = seg.get("LossyImageCompression", "00")
    binary.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    binary.PixelData = packed
    binary["PixelData"].VR = "OB"
    binary["PixelData"].is_undefined_length = False
    return binary
