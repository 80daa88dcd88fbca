"""Selection on real headers (pydicom-data RG1/RG3) and on variants of them."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset

from dicom_node.pipeline.selection import OUR_MANUFACTURER, select_instance

UID_ROOT = "1.2.826.0.1.3680043.10.1431."


def rg1() -> Dataset:
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"), stop_before_pixels=True)


def coded(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def test_frontal_chest_cr_is_selected() -> None:
    decision = select_instance(rg1(), UID_ROOT)
    assert decision.selected and decision.reason == "CR chest PA"


def test_dx_for_presentation_ap_is_selected() -> None:
    ds = rg1()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.ViewPosition = "AP"
    ds.PresentationIntentType = "FOR PRESENTATION"
    assert select_instance(ds, UID_ROOT).reason == "DX For Presentation chest AP"


def lateral() -> Dataset:
    ds = rg1()
    ds.ViewPosition = "LL"
    return ds


def dx_for_processing() -> Dataset:
    ds = rg1()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1.1"
    ds.PresentationIntentType = "FOR PROCESSING"
    return ds


def structured_report() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Modality = "SR"
    return ds


def own_sr() -> Dataset:
    ds = structured_report()
    ds.Manufacturer = OUR_MANUFACTURER
    return ds


def own_uid() -> Dataset:
    ds = rg1()
    ds.SOPInstanceUID = UID_ROOT + "7.7"
    return ds


def secondary() -> Dataset:
    ds = rg1()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    return ds


def lateral_by_code() -> Dataset:
    ds = rg1()
    ds.ViewPosition = ""
    ds.ViewCodeSequence = [coded("399067008", "lateral")]
    return ds


def no_view() -> Dataset:
    ds = rg1()
    del ds.ViewPosition
    return ds


def nothing_says_chest() -> Dataset:
    ds = rg1()
    del ds.BodyPartExamined
    del ds.StudyDescription
    return ds


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lateral, "view position LL is not frontal (PA/AP)"),
        (lambda: pydicom.dcmread(get_testdata_file("RG3_UNCR.dcm"), stop_before_pixels=True), "body part EXTREMITY is not chest"),
        (dx_for_processing, "DX For Processing (raw detector data, not meant for reading)"),
        (structured_report, "SOP class Comprehensive SR Storage is not a CR or DX For Presentation image"),
        (own_sr, f"produced by this node (Manufacturer {OUR_MANUFACTURER!r})"),
        (own_uid, f"produced by this node (SOPInstanceUID under our UID root {UID_ROOT})"),
        (secondary, "secondary image (Image Type DERIVED\\SECONDARY)"),
        (lateral_by_code, "view code 399067008 is not frontal (PA 272479007 / AP 399348003)"),
        (no_view, "view unknown (no View Position, no View Code Sequence)"),
        (nothing_says_chest, "nothing says chest (no Body Part Examined, no chest region code, no chest word in the descriptions)"),
    ],
    ids=["lateral", "rg3-extremity", "dx-for-processing", "sr", "own-sr", "own-uid", "secondary", "lateral-code", "no-view", "not-chest"],
)
def test_skipped_with_a_reason(make, reason: str) -> None:
    decision = select_instance(make(), UID_ROOT)
    assert not decision.selected
    assert decision.reason == reason


def test_frontal_from_view_code_and_chest_from_description() -> None:
    ds = rg1()
    ds.ViewPosition = ""
    ds.ViewCodeSequence = [coded("399348003", "antero-posterior")]
    del ds.BodyPartExamined
    ds.StudyDescription = "XR Chest 1 view"
    decision = select_instance(ds, UID_ROOT)
    assert decision.selected and decision.reason == "CR chest frontal (from View Code Sequence)"
