"""IHE AIR identification shared by all objects: Contributing Equipment, coding schemes, manufacturer.

highdicom's ``ContributingEquipment`` accepts only CID 7005 purposes and has no Device UID, so the
sequence is written here after each object is constructed, together with the Coding Scheme
Identification Sequence that declares our private designators.
"""

from __future__ import annotations

import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from sr_writer import codes
from sr_writer.context import DEMO_MARK, MANUFACTURER, BundleContext
from sr_writer.text import truncate

#: Value for Device Serial Number (type 1 in SEG/GSPS): the software has no serial, so name the install kind.
DEVICE_SERIAL_NUMBER = "SOFTWARE"
#: Study-level attributes copied from the source when a builder did not set them.
STUDY_LEVEL_COPIED = ("StudyDescription", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDate", "StudyTime")


def code_item(code: pydicom.sr.coding.Code) -> Dataset:
    item = Dataset()
    item.CodeValue = code.value
    item.CodingSchemeDesignator = code.scheme_designator
    item.CodeMeaning = code.meaning
    return item


def contributing_equipment_item(ctx: BundleContext) -> Dataset:
    """One (0018,A001) item for the model: 99IHE purpose, names, versions, Device UID (AIR)."""
    model = ctx.result.model
    item = Dataset()
    item.PurposeOfReferenceCodeSequence = Sequence([code_item(codes.PROCESSING_ALGORITHM)])
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
