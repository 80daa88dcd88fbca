"""Deterministic UIDs, and every coded concept checked against DICOM's tables."""

from __future__ import annotations

import dataclasses

import pytest
from pydicom.sr._concepts_dict import concepts
from pydicom.sr.coding import Code

from inference.result import CHEXPERT_LABELS, REGION_NAMES
from sr_writer import codes
from sr_writer.bundle import SEND_ORDER, assemble_bundle
from sr_writer.uids import derive_series_uid, derive_uid, is_valid_uid
from tests.sr_writer.conftest import UID_ROOT
from tests.support.results import make_result, model_identity, rg1_source

SOURCE_UID = "1.3.6.1.4.1.5962.1.1.9.1.1.20040826185059.5457"
DEVICE_UID = "1.2.826.0.1.3680043.10.1431.1.1"

#: SNOMED CT codes that no DICOM context group uses, so pydicom cannot confirm them; each was checked
#: against SNOMED CT concept listings (UMLS / OHDSI vocabularies). Adding a code here needs that check.
EXTERNALLY_VERIFIED = {
    ("SCT", "46621007"): "Atelectasis",
    ("SCT", "8186001"): "Cardiomegaly",
    ("SCT", "95436008"): "Lung consolidation",
    ("SCT", "125605004"): "Fracture of bone",
    ("SCT", "233604007"): "Pneumonia",
    ("DCM", "126000"): "Imaging Measurement Report",
    ("UCUM", "1"): "no units",
    ("UMLS", "C0034375"): "Qualitative Evaluations",  # TID 1500 row "Qualitative Evaluations" (PS3.16)
}


def all_codes() -> list[tuple[str, Code]]:
    return [(name, value) for name, value in vars(codes).items() if isinstance(value, Code)]


def test_derive_uid_is_deterministic_valid_and_distinct() -> None:
    first = derive_uid(UID_ROOT, SOURCE_UID, DEVICE_UID, 1, "sr")
    assert first == derive_uid(UID_ROOT, SOURCE_UID, DEVICE_UID, 1, "sr")
    assert first.startswith(UID_ROOT) and is_valid_uid(first) and len(first) <= 64
    others = {
        derive_uid(UID_ROOT, SOURCE_UID, DEVICE_UID, 2, "sr"),
        derive_uid(UID_ROOT, SOURCE_UID, DEVICE_UID + ".2", 1, "sr"),
        derive_uid(UID_ROOT, SOURCE_UID, DEVICE_UID, 1, "seg"),
        derive_uid(UID_ROOT, SOURCE_UID + ".1", DEVICE_UID, 1, "sr"),
        derive_uid("1.2.3.", SOURCE_UID, DEVICE_UID, 1, "sr"),
    }
    assert first not in others and len(others) == 5
    long_root = "1.2.826.0.1.3680043.10.1431.123456789.1."  # 40 characters, the settings maximum
    uid = derive_uid(long_root, SOURCE_UID, DEVICE_UID, 1, "sr")
    assert len(uid) <= 64 and is_valid_uid(uid)
    assert derive_series_uid(UID_ROOT, "1.2.3", DEVICE_UID, 1, "sr") != derive_series_uid(UID_ROOT, "1.2.3", DEVICE_UID, 1, "seg")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1.2.3", SOURCE_UID, DEVICE_UID, 1, "sr"), "uid_root"),
        (("01.2.", SOURCE_UID, DEVICE_UID, 1, "sr"), "uid_root"),
        ((UID_ROOT, "not-a-uid", DEVICE_UID, 1, "sr"), "source_sop_instance_uid"),
        ((UID_ROOT, SOURCE_UID, "", 1, "sr"), "device_uid"),
        ((UID_ROOT, SOURCE_UID, DEVICE_UID, 0, "sr"), "analysis_version"),
        ((UID_ROOT, SOURCE_UID, DEVICE_UID, 1, ""), "kind"),
    ],
)
def test_derive_uid_rejects_bad_input_naming_the_argument(args: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        derive_uid(*args)


def test_building_twice_gives_identical_uids_and_other_version_or_device_differs() -> None:
    source = rg1_source()
    result = make_result(source, n_findings=3)

    def uids(res, version):
        bundle = assemble_bundle(source, res, ("sr", "text_sr", "gsps", "kos"), uid_root=UID_ROOT, analysis_version=version)
        return [(o.kind, o.sop_instance_uid, str(o.dataset.SeriesInstanceUID)) for o in bundle.objects]

    first = uids(result, 1)
    assert first == uids(result, 1)

    def tracking() -> list[str]:
        gsps = assemble_bundle(source, result, ("gsps",), uid_root=UID_ROOT, analysis_version=1).objects[0].dataset
        return [g.TrackingUID for a in gsps.GraphicAnnotationSequence for g in a.GraphicObjectSequence]

    assert tracking() == tracking()
    second_version = uids(result, 2)
    other_device = uids(dataclasses.replace(result, model=model_identity(device_uid="1.2.826.0.1.3680043.10.1431.1.2")), 1)
    flat = lambda rows: {uid for row in rows for uid in row[1:]}  # noqa: E731
    assert not flat(first) & flat(second_version) and not flat(first) & flat(other_device)
    assert len(flat(first)) == 2 * len(first)  # a new series per kind


def test_every_standard_code_is_in_dicom_tables_or_explicitly_verified() -> None:
    checked = 0
    for name, code in all_codes():
        scheme, value = code.scheme_designator, code.value
        if scheme in (codes.PRIVATE_SCHEME, codes.IHE_SCHEME):
            continue
        if (scheme, value) in EXTERNALLY_VERIFIED:
            assert EXTERNALLY_VERIFIED[(scheme, value)] == code.meaning, name
            continue
        table = concepts.get(scheme, {})
        meanings = {m for entry in table.values() for v, (m, _) in entry.items() if v == value}
        assert meanings, f"codes.{name} = {code}: not in pydicom's {scheme} table and not in EXTERNALLY_VERIFIED"
        checked += 1
    assert checked > 40


def test_private_codes_never_use_a_standard_designator() -> None:
    private = [(n, c) for n, c in all_codes() if c.scheme_designator == codes.PRIVATE_SCHEME]
    assert len(private) >= 8
    for name, code in private:
        assert not code.value.isdigit(), f"{name}: a private code that looks like a SNOMED id invites confusion"
        assert len(code.value) <= 16 and len(code.meaning) <= 64


def test_every_region_has_a_site_and_paired_structures_have_laterality() -> None:
    assert sorted(codes.REGION_SITES) == list(range(len(REGION_NAMES)))
    # These codes already name the side (pre-coordinated), so they carry no laterality modifier.
    sided_codes = {codes.RIGHT_ATRIUM, codes.LEFT_UPPER_QUADRANT_OF_ABDOMEN, codes.RIGHT_UPPER_QUADRANT_OF_ABDOMEN}
    for index, name in enumerate(REGION_NAMES):
        site = codes.region_site(index)
        lowered = name.lower()
        if site.structure in sided_codes:
            assert site.laterality is None, name
            continue
        if lowered.startswith("left") or " left " in f" {lowered} ":
            assert site.laterality == codes.LEFT, name
        elif lowered.startswith("right") or " right " in f" {lowered} ":
            assert site.laterality == codes.RIGHT, name
    with pytest.raises(ValueError, match="region index 36"):
        codes.region_site(36)


def test_chexpert_and_free_text_labels_map_to_finding_types() -> None:
    for label in CHEXPERT_LABELS:
        assert codes.finding_type_for_label(label) is not codes.CLINICAL_FINDING, label
    assert codes.finding_type_for_label("Small left pleural effusion") == codes.PLEURAL_EFFUSION
    assert codes.finding_type_for_label("right apical pneumothorax") == codes.PNEUMOTHORAX
    assert codes.finding_type_for_label("  PNEUMONIA ") == codes.PNEUMONIA
    assert codes.finding_type_for_label("something unheard of") == codes.CLINICAL_FINDING


def test_send_order_puts_sr_and_seg_first_and_kos_last() -> None:
    assert SEND_ORDER.index("sr") < SEND_ORDER.index("gsps") and SEND_ORDER.index("seg") < SEND_ORDER.index("gsps")
    assert SEND_ORDER[-1] == "kos"
