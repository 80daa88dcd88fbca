"""Realistic AnalysisResults and source images for tests (sr_writer, pipeline).

The region boxes are laid out like a PA chest radiograph (the patient's right on the image's left),
as fractions of the image, so they scale to any source. ``rg1_source()`` is the real NEMA WG04 chest CR
(MONOCHROME1, 1955x1841, PixelSpacing 0\\0); ``dx_source()`` is a MONOCHROME2 DX For Presentation made
from the same real pixels, inverted, with ImagerPixelSpacing.
"""

from __future__ import annotations

import copy

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import ExplicitVRLittleEndian

from inference.result import REGION_NAMES, AnalysisResult, Box, Finding, ModelIdentity, Region, Report

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"

#: Region index -> (x1, y1, x2, y2) as fractions of (columns, rows).
REGION_FRACTIONS: dict[int, tuple[float, float, float, float]] = {
    0: (0.20, 0.78, 0.85, 0.98),  # abdominal cavity
    1: (0.50, 0.22, 0.62, 0.32),  # aortic arch
    2: (0.55, 0.10, 0.82, 0.22),  # apical zone left lung (image right)
    3: (0.18, 0.10, 0.45, 0.22),  # apical zone right lung
    4: (0.38, 0.45, 0.75, 0.75),  # heart
    5: (0.52, 0.30, 0.60, 0.72),  # descending aorta
    6: (0.55, 0.35, 0.66, 0.50),  # left hilum
    7: (0.34, 0.35, 0.45, 0.50),  # right hilum
    8: (0.52, 0.12, 0.85, 0.20),  # left clavicle
    9: (0.55, 0.72, 0.88, 0.80),  # left hemidiaphragm
    10: (0.56, 0.55, 0.88, 0.75),  # left lower zone
    11: (0.52, 0.10, 0.90, 0.78),  # left lung
    12: (0.56, 0.35, 0.88, 0.55),  # left mid zone
    13: (0.55, 0.10, 0.85, 0.35),  # left upper zone
    14: (0.40, 0.15, 0.60, 0.70),  # mediastinum
    15: (0.36, 0.50, 0.48, 0.70),  # right atrium
    16: (0.33, 0.48, 0.40, 0.72),  # right heart border
    17: (0.15, 0.12, 0.48, 0.20),  # right clavicle
    18: (0.12, 0.70, 0.45, 0.78),  # right hemidiaphragm
    19: (0.12, 0.55, 0.44, 0.74),  # right lower zone
    20: (0.10, 0.10, 0.48, 0.76),  # right lung
    21: (0.12, 0.35, 0.44, 0.55),  # right mid zone
    22: (0.15, 0.10, 0.45, 0.35),  # right upper zone
    23: (0.46, 0.30, 0.54, 0.36),  # carina
    24: (0.66, 0.48, 0.76, 0.74),  # left heart border
    25: (0.55, 0.80, 0.88, 0.95),  # left upper quadrant
    26: (0.12, 0.80, 0.45, 0.95),  # right upper quadrant
    27: (0.40, 0.12, 0.60, 0.32),  # superior mediastinum
    28: (0.40, 0.18, 0.48, 0.42),  # superior vena cava
    29: (0.45, 0.05, 0.55, 0.36),  # trachea and main bronchi
    30: (0.46, 0.02, 0.54, 0.98),  # vertebral column
    31: (0.40, 0.40, 0.47, 0.46),  # cavoatrial junction
    32: (0.70, 0.70, 0.78, 0.78),  # left cardiophrenic sulcus
    33: (0.82, 0.70, 0.90, 0.79),  # left costophrenic recess
    34: (0.33, 0.68, 0.41, 0.76),  # right cardiophrenic sulcus
    35: (0.10, 0.68, 0.18, 0.77),  # right costophrenic recess
}

#: (label, text, box fractions or (), region indices, probability)
FINDING_SPECS = (
    ("Cardiomegaly", "The cardiac silhouette is enlarged.", ((0.37, 0.44, 0.77, 0.76),), (4,), 0.91),
    ("Pleural Effusion", "Small right pleural effusion blunting the costophrenic angle.", ((0.09, 0.66, 0.20, 0.79),), (35,), 0.74),
    ("Atelectasis", "Bibasal atelectasis.", ((0.12, 0.56, 0.42, 0.73), (0.57, 0.56, 0.86, 0.74)), (19, 10), 0.55),
    ("Lung Opacity", "Patchy opacity in the left mid zone.", ((0.60, 0.38, 0.80, 0.52),), (12,), 0.62),
    ("Support Devices", "No support devices.", (), (), None),
    ("nodule", "A 1 cm nodule projects over the right upper zone.", ((0.25, 0.20, 0.29, 0.24),), (22,), 0.38),
    ("Pneumothorax", "No pneumothorax.", (), (), 0.04),
    ("Consolidation", "Consolidation of the right lower zone.", ((0.14, 0.58, 0.40, 0.72),), (19,), 0.47),
    ("Edema", "Mild interstitial edema.", ((0.12, 0.30, 0.88, 0.70),), (20, 11), 0.33),
    ("Fracture", "Old healed fracture of the left clavicle.", ((0.60, 0.13, 0.70, 0.19),), (8,), 0.29),
)

#: Image-level classification for every CheXpert label (distinct values, so any sort order is unambiguous).
IMAGE_LABELS: dict[str, float] = {
    "Atelectasis": 0.55,
    "Cardiomegaly": 0.91,
    "Consolidation": 0.47,
    "Edema": 0.33,
    "Enlarged Cardiomediastinum": 0.58,
    "Fracture": 0.29,
    "Lung Lesion": 0.21,
    "Lung Opacity": 0.62,
    "No Finding": 0.03,
    "Pleural Effusion": 0.74,
    "Pleural Other": 0.06,
    "Pneumonia": 0.18,
    "Pneumothorax": 0.04,
    "Support Devices": 0.08,
}

REPORT = Report(
    findings="The cardiac silhouette is enlarged. Small right pleural effusion. Bibasal atelectasis. No pneumothorax.",
    impression="Cardiomegaly with small right pleural effusion.",
    raw_text="Findings: The cardiac silhouette is enlarged. Small right pleural effusion. Bibasal atelectasis. "
    "No pneumothorax. Impression: Cardiomegaly with small right pleural effusion.",
)


def model_identity(demo: bool = True, device_uid: str = "1.2.826.0.1.3680043.10.1431.1.1", version: str = "0.1.0") -> ModelIdentity:
    return ModelIdentity(
        name="AnatomiX",
        version=version,
        weights_digest="sha256:" + "ab" * 32,
        device_uid=device_uid,
        demo=demo,
    )


def scaled_box(fractions: tuple[float, float, float, float], columns: int, rows: int) -> Box:
    x1, y1, x2, y2 = fractions
    return Box(round(x1 * columns, 1), round(y1 * rows, 1), round(x2 * columns, 1), round(y2 * rows, 1))


def make_result(
    source: pydicom.Dataset,
    n_findings: int = 6,
    demo: bool = True,
    model: ModelIdentity | None = None,
    image_labels: dict[str, float] | None = None,
) -> AnalysisResult:
    """A result for ``source`` with all 36 regions (each with a retrieved sentence), ``n_findings``
    findings (cycled), a report and the 14 image labels (``image_labels``, default :data:`IMAGE_LABELS`)."""
    rows, columns = int(source.Rows), int(source.Columns)
    regions = tuple(
        Region(
            index=i, name=REGION_NAMES[i], box=scaled_box(REGION_FRACTIONS[i], columns, rows), score=0.9, retrieved_sentence=f"{REGION_NAMES[i]} is healthy."
        )
        for i in range(len(REGION_NAMES))
    )
    findings = []
    for i in range(n_findings):
        label, text, boxes, region_indices, probability = FINDING_SPECS[i % len(FINDING_SPECS)]
        shift = 0.01 * (i // len(FINDING_SPECS))  # repeated specs are moved a little so boxes differ
        findings.append(
            Finding(
                index=i,
                label=label,
                text=text,
                boxes=tuple(scaled_box(tuple(v + shift for v in b), columns, rows) for b in boxes),
                task="grounded_diagnosis",
                probability=probability,
                region_indices=region_indices,
            )
        )
    return AnalysisResult(
        sop_instance_uid=str(source.SOPInstanceUID),
        rows=rows,
        columns=columns,
        regions=regions,
        findings=tuple(findings),
        report=REPORT,
        model=model or model_identity(demo=demo),
        image_labels=dict(IMAGE_LABELS if image_labels is None else image_labels),
    )


def rg1_source() -> pydicom.Dataset:
    """The real RG1 chest CR, pixel data loaded (MONOCHROME1, 1955 rows x 1841 columns)."""
    return pydicom.dcmread(get_testdata_file("RG1_UNCR.dcm"))


def dx_source() -> pydicom.Dataset:
    """A MONOCHROME2 DX For Presentation from RG1's real pixels (inverted), with ImagerPixelSpacing."""
    ds = rg1_source()
    pixels = ds.pixel_array.astype(np.uint16)
    max_value = (1 << int(ds.BitsStored)) - 1
    ds.PixelData = (max_value - pixels).astype(np.uint16).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.file_meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1431.99.2.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.10.1431.99.2"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.10.1431.99.1"
    ds.Modality = "DX"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PresentationLUTShape = "IDENTITY"
    ds.ImagerPixelSpacing = [0.143, 0.143]
    del ds.PixelSpacing
    ds.WindowCenter = max_value - int(ds.WindowCenter)
    ds.WindowWidth = ds.WindowWidth
    ds.PatientName = "Test^DX"
    ds.PatientID = "DX-TEST-1"
    ds.ViewPosition = "PA"
    return ds


def with_uid(ds: pydicom.Dataset, sop_instance_uid: str) -> pydicom.Dataset:
    """A copy of ``ds`` with another SOP Instance UID."""
    copy_ = copy.deepcopy(ds)
    copy_.SOPInstanceUID = sop_instance_uid
    copy_.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid
    return copy_
