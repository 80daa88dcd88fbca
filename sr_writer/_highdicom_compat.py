"""Every place sr_writer relies on highdicom internals or patches what a highdicom constructor made.

Made for highdicom 0.28.2 (``HIGHDICOM_MADE_FOR``); ``pyproject.toml`` allows ``>=0.28,<0.29``.
``tests/sr_writer/test_highdicom_compat.py`` fails when highdicom moves under any of them (a private
method renamed or re-signed, a module name no longer looked up at call time, a constructor that now
writes what we patch): then revisit this module, and widen the pin only after it passes.

Reliance on internals:

1. :class:`BoxSegmentation` overrides the private classmethod
   ``highdicom.seg.Segmentation._check_and_cast_pixel_array(pixel_array, segment_numbers,
   segmentation_type, dtype) -> (array, SegmentsOverlapValues)``, which ``Segmentation.__init__``
   calls once. Why: it scans the whole mask array twice (are the values 0/1, do segments overlap);
   for box masks both are known from the boxes, which halves the SEG's cost.
2. :func:`install_frame_encoder` rebinds ``highdicom.image.encode_frame``, the module-global name
   through which ``Segmentation`` encodes each frame (``highdicom.image`` imports it from
   ``highdicom.frame`` and calls it by name). Why: PackBits of box masks row by row is ~10x faster
   than highdicom's generic RLE. Only frames for which the caller's ``use`` says so take the fast
   path (our SEGs while they are built with RLE Lossless); every other use of highdicom is unchanged.

Construct, then patch (attributes the constructors do not offer, or write differently):

3. :func:`set_projection_geometry` (SEG): highdicom copies the source's Pixel Spacing, even 0\\0
   (RG1), and writes no Plane Orientation for a projection image; OHIF needs both.
4. :func:`as_basic_text_sr` (text SR): highdicom has no Basic Text SR class; its Enhanced SR is
   built from Basic Text SR value types only and then given the Basic Text SR SOP Class.
5. :func:`attach_content` (TID 1500 SR; the text SR appends its last section the same way):
   highdicom's SR constructor deep-copies, re-parses and searches the whole content tree (~1 s for 46
   ROI groups), so the document is built around a small skeleton and the full tree, already built by
   highdicom's template classes, is attached afterwards.
6. ``sr_writer.equipment.apply_common_attributes``: highdicom's ``ContributingEquipment`` accepts
   only CID 7005 purposes and has no Device UID (IHE AIR needs both), so the sequence is written
   after construction.
7. ``sr_writer.seg.segment_description``: ``SegmentDescription`` takes no laterality modifier; it is
   added to the property type (regions) or anatomic region (findings) item after construction.
8. ``sr_writer.tid1500.build_tid1500_sr``: ``MeasurementReport`` insists on at least one measurement
   group; a result with no box is built around a placeholder group whose container is then removed.
   (Left in place: it edits the content tree, not highdicom's output.)
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from typing import Any

import highdicom as hd
import highdicom.image as hd_image
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage

#: The highdicom release these workarounds were made for and tested against.
HIGHDICOM_MADE_FOR = "0.28.2"

# ---- 1. the pixel checks of Segmentation ------------------------------------------------------

#: The SegmentsOverlap value of the build in progress (a ContextVar: builds may run in threads).
BOX_OVERLAP: contextvars.ContextVar[str] = contextvars.ContextVar("box_segments_overlap")


class BoxSegmentation(hd.seg.Segmentation):
    """highdicom's Segmentation for 0/1 uint8 box masks, shape (1, rows, columns, segments), built
    while :data:`BOX_OVERLAP` holds their SegmentsOverlap ("YES"/"NO"); anything else goes to highdicom."""

    @classmethod
    def _check_and_cast_pixel_array(cls, pixel_array, segment_numbers, segmentation_type, dtype):
        overlap = BOX_OVERLAP.get(None)
        is_box_stack = (
            isinstance(pixel_array, np.ndarray) and pixel_array.dtype == np.uint8 and pixel_array.ndim == 4 and pixel_array.shape[-1] == len(segment_numbers)
        )
        if overlap is None or not is_box_stack or segmentation_type != hd.seg.SegmentationTypeValues.FRACTIONAL:
            return super()._check_and_cast_pixel_array(pixel_array, segment_numbers, segmentation_type, dtype)
        return pixel_array, hd.seg.SegmentsOverlapValues(overlap)


# ---- 2. the frame encoder ---------------------------------------------------------------------

#: highdicom's own encoder, kept before any rebinding.
HIGHDICOM_ENCODE_FRAME = hd_image.encode_frame


def install_frame_encoder(use: Callable[[np.ndarray, dict], bool], encode: Callable[[np.ndarray], bytes]) -> None:
    """Route the frames for which ``use(array, kwargs)`` is true to ``encode(array)``; idempotent."""

    def encode_frame(array: np.ndarray, **kwargs: Any) -> bytes:
        if use(array, kwargs):
            return encode(array)
        return HIGHDICOM_ENCODE_FRAME(array, **kwargs)

    hd_image.encode_frame = encode_frame  # type: ignore[assignment]  # highdicom passes everything by keyword


# ---- 3.-5. construct, then patch --------------------------------------------------------------


def set_projection_geometry(seg: Dataset, source: Dataset, pixel_spacing: list[float] | None) -> None:
    """Patient Orientation (empty), the shared Plane Orientation, Pixel Measures and Frame Anatomy.

    * Patient Orientation (General Image, Type 2C, required without Image Position/Orientation): empty,
      meaning "not stated here"; the referenced source image states it. pixelmed's 2022 tables give it
      VM 1, so the source's two values (VM 2, as the standard says) were an error there.
    * Plane Orientation and Pixel Measures: OHIF 3.12/3.13 cannot load a projection SEG without them.
      Pixel Spacing from the source (``pixel_spacing``); where the source states none, a Pixel Measures
      item with no Pixel Spacing (a nominal 1\\1 stated a calibration the image lacks), holding only the
      Slice Thickness 1 every SEG of ours has (Type 1C, may be present; a projection has no slice, and
      nothing measures with it): OHIF 3.13 reads the item's Slice Thickness without a guard, and an
      empty item reaches it as undefined (crash, seen in tests/viewer). dciodvfy and pixelmed accept
      it; highdicom 0.28's ``segread`` cannot read an item without Pixel Spacing (the tests read such a
      SEG without the item: ``tests/sr_writer/conftest.py:read_seg``).
    * Frame Anatomy (Frame Laterality U, unpaired, region chest): pixelmed requires General Series
      Laterality unless some Frame/Image Laterality is present, and the chest is unpaired, so
      Laterality itself must be absent (dciodvfy: "present when condition unsatisfied").
    """
    if "PatientOrientation" in seg:
        del seg.PatientOrientation
    seg.PatientOrientation = None
    shared = seg.SharedFunctionalGroupsSequence[0]
    shared.PlaneOrientationSequence = hd.PlaneOrientationSequence(coordinate_system="PATIENT", image_orientation=[1, 0, 0, 0, 1, 0])
    # Always replace: highdicom copies the source's PixelSpacing even when it is 0\0 (RG1).
    if pixel_spacing is not None:
        shared.PixelMeasuresSequence = hd.PixelMeasuresSequence(pixel_spacing=pixel_spacing, slice_thickness=1)
    else:
        # OHIF reads the item's Slice Thickness without a guard (an empty item reaches it as undefined).
        measures = Dataset()
        measures.SliceThickness = 1
        shared.PixelMeasuresSequence = [measures]
    anatomy, region = Dataset(), Dataset()
    region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "816094009", "SCT", "Chest"
    anatomy.AnatomicRegionSequence = [region]
    anatomy.FrameLaterality = "U"
    shared.FrameAnatomySequence = [anatomy]


def as_basic_text_sr(sr: Dataset) -> Dataset:
    """The Enhanced SR ``sr`` (Basic Text SR value types only) as a Basic Text SR; returns ``sr``."""
    sr.SOPClassUID = BasicTextSRStorage
    sr.file_meta.MediaStorageSOPClassUID = BasicTextSRStorage
    return sr


def attach_content(sr: Dataset, container: Dataset) -> Dataset:
    """Replace the content of ``sr`` (built around a skeleton) with the elements of ``container``."""
    for element in container:
        sr[element.tag] = element
    return sr
