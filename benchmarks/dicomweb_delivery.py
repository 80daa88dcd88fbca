"""Result delivery by STOW-RS against C-STORE, side by side, to one Orthanc (DICOMweb plugin, basic auth on).

Each round sends one study's bundle (3 Basic Text SR and one 1 MB Secondary Capture, uncompressed)
through the node's own ``send_objects``: once to Orthanc's DICOM port (one association, C-STORE),
once to its DICOMweb URL (one STOW-RS request); the order alternates per round. Prints the median
milliseconds per bundle for each and the ratio STOW-RS / C-STORE.

    .venv/bin/python benchmarks/dicomweb_delivery.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicom_node.pipeline.delivery import send_objects
from dicom_node.pipeline.delivery_outcomes import OutgoingObject
from dicom_node.store.base import RemoteNode
from tests.integration.test_delivery import BASIC_TEXT_SR, make_sr, to_comprehensive
from tests.support.orthanc import Orthanc


def secondary_capture(path: Path, study_uid: str) -> OutgoingObject:
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.PatientID, ds.Modality = "BENCH", "OT"
    ds.Rows = ds.Columns = 1024
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (1024, 1024), dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    return OutgoingObject(ds.SOPInstanceUID, SecondaryCaptureImageStorage, "sc", path)


def bundle(folder: Path) -> list[OutgoingObject]:
    study = generate_uid()
    folder.mkdir(parents=True)
    return [make_sr(folder / f"sr{i}.dcm", BASIC_TEXT_SR, study) for i in range(3)] + [secondary_capture(folder / "sc.dcm", study)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "basic").write_text("bench:bench-password\n")
        pacs = Orthanc(work / "orthanc", users={"bench": "bench-password"}).start()
        try:
            dimse = RemoteNode("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port, role="destination")
            web = RemoteNode("pacs-web", "", "127.0.0.1", pacs.http_port, role="destination", url=f"{pacs.url}/dicom-web",
                             basic_auth_file=str(work / "basic"))  # fmt: skip
            times: dict[str, list[float]] = {"C-STORE": [], "STOW-RS": []}
            for n in range(args.rounds + 1):  # round 0 warms both paths up and is not counted
                order = [("C-STORE", dimse), ("STOW-RS", web)][:: 1 if n % 2 else -1]
                for label, node in order:
                    objects = bundle(work / f"{label}-{n}")
                    began = time.perf_counter()
                    outcomes = send_objects(node, objects, calling_ae="ANATOMIX", timeout_s=30, fallback=to_comprehensive)
                    elapsed = (time.perf_counter() - began) * 1000
                    if {o.outcome for o in outcomes} != {"sent"}:
                        raise SystemExit(f"{label}: not all sent: {outcomes}")
                    if n:
                        times[label].append(elapsed)
        finally:
            pacs.stop()
    cstore, stow = statistics.median(times["C-STORE"]), statistics.median(times["STOW-RS"])
    print(f"bundle: 3 Basic Text SR + 1 MB SC, {args.rounds} rounds each, median ms per bundle")
    print(f"C-STORE  {cstore:8.1f} ms")
    print(f"STOW-RS  {stow:8.1f} ms")
    print(f"ratio STOW-RS / C-STORE: {stow / cstore:.2f}")


if __name__ == "__main__":
    main()
