"""A real Orthanc accepts every object by C-STORE and files them under the source study."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from sr_writer.bundle import comprehensive_sr_fallback
from tests.sr_writer.conftest import BuiltCase
from tests.support.orthanc import Orthanc


@pytest.fixture()
def orthanc(tmp_path: Path):
    pacs = Orthanc(workdir=tmp_path / "orthanc").start()
    try:
        yield pacs
    finally:
        pacs.stop()


def c_store(orthanc: Orthanc, datasets: list[pydicom.Dataset]) -> list[int]:
    ae = AE(ae_title="ANATOMIX")
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        own = {str(ds.file_meta.TransferSyntaxUID) for ds in datasets if str(ds.SOPClassUID) == sop_class}
        # The object's own syntax in a context of its own (the SC is JPEG baseline, the SEG JPEG-LS Lossless), as the node's SCU does.
        for syntax in sorted(own - {ExplicitVRLittleEndian, ImplicitVRLittleEndian}):
            ae.add_requested_context(sop_class, [syntax])
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    association = ae.associate("127.0.0.1", orthanc.dicom_port, ae_title=orthanc.aet)
    assert association.is_established, "Orthanc refused the association"
    try:
        statuses = []
        for ds in datasets:
            status = association.send_c_store(ds)
            statuses.append(int(status.Status) if status else -1)
        return statuses
    finally:
        association.release()


def test_orthanc_stores_every_object_under_the_source_study(case: BuiltCase, orthanc: Orthanc) -> None:
    assert orthanc.upload(case.source_path)["Status"] == "Success"
    results = [pydicom.dcmread(path) for path in case.paths.values()]
    statuses = c_store(orthanc, results)
    assert statuses == [0] * len(results), statuses

    study = orthanc.post("/tools/lookup", str(case.source.StudyInstanceUID).encode())
    assert len(study) == 1 and study[0]["Type"] == "Study"
    instances = orthanc.get(f"/studies/{study[0]['ID']}/instances")
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in instances}
    expected = {str(case.source.SOPInstanceUID)} | {str(ds.SOPInstanceUID) for ds in results}
    assert stored == expected
    series = orthanc.get(f"/studies/{study[0]['ID']}/series")
    descriptions = {s["MainDicomTags"].get("SeriesDescription", "") for s in series}
    assert sum("DEMO WEIGHTS" in d for d in descriptions) == len(results)  # one new series per object kind
    assert len(series) == len(results) + 1


def test_redelivery_and_the_88_33_fallback_do_not_make_a_second_copy(case: BuiltCase, orthanc: Orthanc) -> None:
    orthanc.upload(case.source_path)
    sr = case.dataset("sr")
    assert c_store(orthanc, [sr]) == [0]
    assert c_store(orthanc, [sr]) == [0]  # a retry of the same object
    assert c_store(orthanc, [comprehensive_sr_fallback(sr)]) == [0]
    study = orthanc.post("/tools/lookup", str(case.source.StudyInstanceUID).encode())
    instances = orthanc.get(f"/studies/{study[0]['ID']}/instances")
    assert len(instances) == 2  # the source and one SR document
