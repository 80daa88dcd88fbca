"""IHE AIR identification shared by all objects: Contributing Equipment, coding schemes, manufacturer.

highdicom's ``ContributingEquipment`` accepts only CID 7005 purposes and has no Device UID, so the
sequence is written here after each object is constructed (``sr_writer._highdicom_compat``, 6), together with the Coding Scheme
Identification Sequence that declares our private designators.
"""

from __future__ import annotations

import pydicom
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.sr.codedict import codes as dcm_codes

from sr_writer import codes
from sr_writer.context import BundleContext
from sr_writer.identity import DEMO_MARK, MANUFACTURER
from sr_writer.text import truncate

#: Value for Device Serial Number (type 1 in SEG/GSPS): the software has no serial, so name the install kind.
DEVICE_SERIAL_NUMBER = "SOFTWARE"
#: Study-level attributes copied from the source when a builder did not set them.
STUDY_LEVEL_COPIED = ("StudyDescription", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyTime")


def contributing_equipment_item(ctx: BundleContext) -> Dataset:
    """One (0018,A001) item for the model: 99IHE purpose, names, versions, Device UID (AIR)."""
    model = ctx.result.model
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([codes.as_coded_concept(codes.PROCESSING_ALGORITHM)])
    item.Manufacturer = truncate(model.manufacturer or MANUFACTURER, "LO")
    item.ManufacturerModelName = ctx.algorithm_name
    item.SoftwareVersions = ctx.algorithm_version
    item.DeviceUID = model.device_uid
    if ctx.institution_name:
        item.InstitutionName = ctx.institution_name
    description = f"{model.name} {model.version}, weights {model.weights_digest[:16]}, {model.backend}/{model.device}"
    if model.demo:
        description = f"{DEMO_MARK}; {description}"
    item.ContributionDescription = truncate(description, "ST")
    return item


def device_observer(ctx: BundleContext) -> ObserverContext:
    """The observer of every SR and KOS we write: a Device (the model), identified by its Device UID."""
    return ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=ctx.result.model.device_uid, name=ctx.algorithm_name, manufacturer_name=MANUFACTURER, model_name=ctx.algorithm_version
        ),
    )


def coding_scheme_identification() -> Sequence:
    """(0008,0110): declare the private designators we use (PS3.3 C.12.1.1.4 requires it for private ones)."""
    items = []
    for designator, name, responsible in (
        (codes.PRIVATE_SCHEME, codes.PRIVATE_SCHEME_NAME, codes.PRIVATE_SCHEME_RESPONSIBLE),
        (codes.IHE_SCHEME, codes.IHE_SCHEME_NAME, "IHE International"),
    ):
        item = Dataset()
        item.CodingSchemeDesignator = designator
        item.CodingSchemeName = name
        item.CodingSchemeResponsibleOrganization = responsible
        items.append(item)
    return Sequence(items)


def apply_common_attributes(dataset: Dataset, ctx: BundleContext) -> Dataset:
    """Set what every result object carries; returns ``dataset`` for chaining."""
    if ctx.character_set is None:
        if "SpecificCharacterSet" in dataset:
            del dataset.SpecificCharacterSet  # default repertoire: the attribute is absent ("ISO_IR 6" is no defined term)
    else:
        dataset.SpecificCharacterSet = ctx.character_set
    dataset.ContributingEquipmentSequence = Sequence([contributing_equipment_item(ctx)])
    dataset.CodingSchemeIdentificationSequence = coding_scheme_identification()
    if ctx.institution_name:
        dataset.InstitutionName = ctx.institution_name
    for keyword in STUDY_LEVEL_COPIED:
        # Same study, same study-level values in every object (dcentvfy compares them across the bundle).
        if keyword in ctx.source and keyword not in dataset:
            dataset[keyword] = ctx.source[keyword]
    if "TimezoneOffsetFromUTC" in ctx.source:
        # Study-level dates/times are copied from the source, so they share its offset.
        dataset.TimezoneOffsetFromUTC = ctx.source.TimezoneOffsetFromUTC
    return dataset


#: Lossy transfer syntaxes -> Lossy Image Compression Method defined term (PS3.3 C.7.6.1.1.5).
LOSSY_SYNTAX_METHODS = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000
    "1.2.840.10008.1.2.4.93": "ISO_15444_1",  # JPEG 2000 Part 2
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K
}


def lossy_history(source: Dataset) -> tuple[list[float], list[str]] | None:
    """(ratios, methods) of the lossy compression the source's pixels went through, None when lossless.

    From the source's own Lossy Image Compression Ratio/Method when it has them, else from its transfer
    syntax (ratio = uncompressed bytes / encoded bytes). A lossy flag without either gives ratio 1 and the
    syntax's or no method: the derived object still says 01, as it must.
    """
    syntax = str(getattr(getattr(source, "file_meta", None), "TransferSyntaxUID", "") or "")
    flagged = str(source.get("LossyImageCompression", "")) == "01"
    if not flagged and syntax not in LOSSY_SYNTAX_METHODS:
        return None
    ratios = [float(v) for v in _as_list(source.get("LossyImageCompressionRatio"))]
    methods = [str(v) for v in _as_list(source.get("LossyImageCompressionMethod"))]
    if not ratios and syntax in LOSSY_SYNTAX_METHODS:
        encoded = len(source.get("PixelData", b"") or b"")
        raw = int(source.Rows) * int(source.Columns) * int(source.get("BitsAllocated", 16)) // 8
        ratios = [round(raw / encoded, 2)] if encoded else []
    if not methods and syntax in LOSSY_SYNTAX_METHODS:
        methods = [LOSSY_SYNTAX_METHODS[syntax]]
    return (ratios or [1.0]), methods


def apply_lossy_history(dataset: Dataset, source: Dataset, own: tuple[float, str] | None = None) -> None:
    """Lossy Image Compression 01 with ratio and method for an object derived from lossy pixels.

    ``own`` is the object's own lossy step (ratio, method), appended after the source's history.
    """
    history = lossy_history(source)
    if history is None and own is None:
        if str(dataset.get("LossyImageCompression", "")) == "01":  # copied by highdicom from a flag we cannot back
            dataset.LossyImageCompression = "00"
        return
    ratios, methods = history if history is not None else ([], [])
    if own is not None:
        ratios, methods = [*ratios, own[0]], [*methods, own[1]]
    dataset.LossyImageCompression = "01"
    dataset.LossyImageCompressionRatio = [_ratio_ds(r) for r in ratios]
    if methods:
        dataset.LossyImageCompressionMethod = methods


def _ratio_ds(value: float) -> str:
    return f"{value:.2f}"[:16]


def _as_list(value: object) -> list:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return list(value)
    return [value]
