"""Which received instances the model analyses: frontal chest projection radiographs. Header only.

Rules, in the order they are checked (the first that fails names the reason):

1. **Not our own output.** Manufacturer ``sr_writer.identity.MANUFACTURER``, a Contributing Equipment item from us,
   or a SOP Instance / Series Instance UID under ``output.uid_root``: never analyse results.
2. **SOP class.** CR (1.2.840.10008.5.1.4.1.1.1) and DX For Presentation (…1.1.1). DX For
   Processing (…1.1.1.1) is raw detector data; every other class (SR, SEG, GSPS, SC, CT, …) is
   stored but not analysed. A DX whose Presentation Intent Type says FOR PROCESSING is skipped too.
3. **Image type.** SECONDARY images (screen captures, reformats, reports) are skipped, as are
   DERIVED images that are not PRIMARY. DERIVED\\PRIMARY stays: processed-for-presentation CR and
   DX images (the real chest CR RG1 among them) carry it.
4. **Pixels the model can read.** Single frame, MONOCHROME1/2.
5. **Chest.** Body Part Examined CHEST/THORAX/LUNG (or a Chest/Thorax code in Anatomic Region
   Sequence). Where both are absent, a chest word in Study/Series Description, Protocol Name or
   Requested Procedure Description is accepted (older CR plates often carry nothing else); where
   nothing at all says chest, the image is skipped.
6. **Frontal.** View Position PA or AP; when View Position is empty, the View Code Sequence
   (SNOMED 272479007 postero-anterior, 399348003 antero-posterior). Lateral, oblique, decubitus or
   unknown views are skipped: the model is trained on frontal images only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.uid import ComputedRadiographyImageStorage as CR_IMAGE_STORAGE
from pydicom.uid import DigitalXRayImageStorageForPresentation as DX_FOR_PRESENTATION
from pydicom.uid import DigitalXRayImageStorageForProcessing as DX_FOR_PROCESSING

from sr_writer.identity import MANUFACTURER

#: What our result objects put in (0008,0070) Manufacturer: the writer's own constant.
OUR_MANUFACTURER = MANUFACTURER
ANALYSABLE_SOP_CLASSES = {CR_IMAGE_STORAGE: "CR", DX_FOR_PRESENTATION: "DX For Presentation"}

CHEST_BODY_PARTS = {"CHEST", "THORAX", "LUNG", "LUNGS", "TORAX", "THORAX_CHEST"}
#: SNOMED CT codes for the region in Anatomic Region Sequence: chest, thorax, lung.
CHEST_REGION_CODES = {"43799004", "51185008", "39607008"}
_CHEST_WORDS = re.compile(r"\b(chest|thorax|thoracic|thorac|lungs?|cxr|torax|t[oó]rax|poumons?|pulmonary|pulmonar)\b", re.IGNORECASE)

FRONTAL_VIEW_POSITIONS = {"PA", "AP"}
FRONTAL_VIEW_CODES = {"272479007": "PA", "399348003": "AP"}
_DESCRIPTION_KEYWORDS = ("StudyDescription", "SeriesDescription", "ProtocolName", "RequestedProcedureDescription")


@dataclass(frozen=True)
class SelectionDecision:
    """Analyse this instance or not, and why (a sentence an admin can read)."""

    selected: bool
    reason: str


def _text(dataset: Dataset, keyword: str) -> str:
    value = dataset.get(keyword)
    return "" if value is None else str(value).strip()


def _values(dataset: Dataset, keyword: str) -> list[str]:
    value = dataset.get(keyword)
    if value is None:
        return []
    if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(value, str):
        return [str(v).strip().upper() for v in value]
    return [str(value).strip().upper()]


def is_own_output(dataset: Dataset, uid_root: str) -> str | None:
    """Why this looks like an object the node produced, or None."""
    if _text(dataset, "Manufacturer") == OUR_MANUFACTURER:
        return f"produced by this node (Manufacturer {OUR_MANUFACTURER!r})"
    for item in dataset.get("ContributingEquipmentSequence", []) or []:
        if _text(item, "Manufacturer") == OUR_MANUFACTURER:
            return "produced by this node (listed in Contributing Equipment)"
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID"):
        if uid_root and _text(dataset, keyword).startswith(uid_root):
            return f"produced by this node ({keyword} under our UID root {uid_root})"
    return None


def check_sop_class(dataset: Dataset) -> str | None:
    sop_class = _text(dataset, "SOPClassUID")
    if sop_class == DX_FOR_PROCESSING:
        return "DX For Processing (raw detector data, not meant for reading)"
    if sop_class not in ANALYSABLE_SOP_CLASSES:
        name = getattr(dataset.get("SOPClassUID"), "name", sop_class) or "missing"
        return f"SOP class {name} is not a CR or DX For Presentation image"
    if _text(dataset, "PresentationIntentType").upper() == "FOR PROCESSING":
        return "Presentation Intent Type is FOR PROCESSING"
    return None


def _joined(values: list[str]) -> str:
    return "\\".join(values[:3])


def check_image_type(dataset: Dataset) -> str | None:
    image_type = _values(dataset, "ImageType")
    if len(image_type) >= 2 and image_type[1] == "SECONDARY":
        return f"secondary image (Image Type {_joined(image_type)})"
    if image_type and image_type[0] == "DERIVED" and (len(image_type) < 2 or image_type[1] != "PRIMARY"):
        return f"derived image that is not primary (Image Type {_joined(image_type)})"
    return None


def check_pixels(dataset: Dataset) -> str | None:
    frames = dataset.get("NumberOfFrames")
    try:
        if frames is not None and int(frames) > 1:
            return f"multi-frame image ({int(frames)} frames)"
    except (TypeError, ValueError):
        return "Number of Frames is not a number"
    photometric = _text(dataset, "PhotometricInterpretation").upper()
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        return f"photometric interpretation {photometric or 'missing'} is not greyscale"
    return None


def check_chest(dataset: Dataset) -> str | None:
    body_part = _text(dataset, "BodyPartExamined").upper()
    if body_part:
        return None if body_part in CHEST_BODY_PARTS else f"body part {body_part} is not chest"
    for item in dataset.get("AnatomicRegionSequence", []) or []:
        if _text(item, "CodeValue") in CHEST_REGION_CODES:
            return None
    if any(_CHEST_WORDS.search(_text(dataset, keyword)) for keyword in _DESCRIPTION_KEYWORDS):
        return None
    return "nothing says chest (no Body Part Examined, no chest region code, no chest word in the descriptions)"


def check_frontal(dataset: Dataset) -> str | None:
    view = _text(dataset, "ViewPosition").upper()
    if view:
        return None if view in FRONTAL_VIEW_POSITIONS else f"view position {view} is not frontal (PA/AP)"
    codes = [_text(item, "CodeValue") for item in dataset.get("ViewCodeSequence", []) or []]
    if any(code in FRONTAL_VIEW_CODES for code in codes):
        return None
    if codes:
        return f"view code {codes[0]} is not frontal (PA 272479007 / AP 399348003)"
    return "view unknown (no View Position, no View Code Sequence)"


def select_instance(dataset: Dataset, uid_root: str) -> SelectionDecision:
    """Decide from the header (no pixel data needed) whether the model analyses this instance."""
    own = is_own_output(dataset, uid_root)
    if own:
        return SelectionDecision(False, own)
    for check in (check_sop_class, check_image_type, check_pixels, check_chest, check_frontal):
        reason = check(dataset)
        if reason:
            return SelectionDecision(False, reason)
    kind = ANALYSABLE_SOP_CLASSES[UID(_text(dataset, "SOPClassUID"))]
    view = _text(dataset, "ViewPosition").upper() or "frontal (from View Code Sequence)"
    return SelectionDecision(True, f"{kind} chest {view}")
