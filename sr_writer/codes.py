"""Every coded concept used in our result objects, as named constants.

Sources, checked while writing this module:

* SNOMED CT codes marked ``# pydicom`` are in pydicom's DICOM code tables (``pydicom.sr._concepts_dict``,
  i.e. DICOM PS3.16 context groups); ``tests/sr_writer/test_uids_and_codes.py`` re-checks each of them.
* SNOMED CT codes marked ``# external`` are not used by any DICOM context group, so pydicom does not list
  them; they were checked against SNOMED CT concept listings (UMLS/OHDSI vocabularies). The test keeps
  an explicit list of them, so a new unverified code cannot slip in.
* Where no standard concept exists for what the model names (costophrenic and cardiophrenic angles, the
  cavoatrial junction, the borders of the cardiac silhouette, the superior mediastinum as a region, some
  CheXpert labels), we use our own private coding scheme :data:`PRIVATE_SCHEME` ("99ANATOMIX"), declared in
  every object's Coding Scheme Identification Sequence. We never invent a SNOMED code.

Paired structures use the generic structure plus a laterality modifier (DICOM's post-coordinated
style, as in CID 4 / TID 1410 Finding Site), e.g. "Lung" + "Right" for the right lung.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from highdicom.sr import CodedConcept
from pydicom.sr.coding import Code

from inference.result import REGION_NAMES

#: Our private coding scheme (PS3.3 8.2: private designators start with "99").
PRIVATE_SCHEME = "99ANATOMIX"
PRIVATE_SCHEME_NAME = "AnatomiX Node private concepts"
PRIVATE_SCHEME_RESPONSIBLE = "AnatomiX Node project"
#: IHE's designator for codes defined in IHE profiles (AI Results: "Processing Algorithm").
IHE_SCHEME = "99IHE"
IHE_SCHEME_NAME = "IHE Radiology Technical Framework codes"

# ---- structure of the reports ---------------------------------------------------------------------
IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")
DIAGNOSTIC_IMAGING_REPORT = Code("18748-4", "LN", "Diagnostic Imaging Report")  # pydicom
FINDINGS_SECTION = Code("59776-5", "LN", "Findings")  # pydicom
IMPRESSIONS_SECTION = Code("19005-8", "LN", "Impressions")  # pydicom
FINDING = Code("121071", "DCM", "Finding")  # pydicom
IMPRESSION = Code("121073", "DCM", "Impression")  # pydicom
#: TEXT item name for a region's retrieved sentence (TID 1410 qualitative evaluation with a text answer)
#: and for the note that opens the text SR's model output section.
COMMENT = Code("121106", "DCM", "Comment")  # pydicom
#: Text SR section heading for the image-level classification and the retrieved region sentences. CID 7001
#: (report headings) is extensible and has no heading for raw model outputs, so it is ours.
#: TID 1500 document-level container for whole-image statements (image labels, unlocalised findings).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
MODEL_OUTPUTS_SECTION = Code("MODELOUTPUTS", PRIVATE_SCHEME, "AI image classification and region descriptions")
#: Algorithm family (CID 7162) for SEG/GSPS algorithm identification.
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # pydicom
#: Procedure Reported when the study carries no Procedure Code Sequence (IHE AIR).
#: Procedure reported when the study names none: the CID 100 member for projection radiography (TID 1500
#: row 4 is DCID 100; LOINC 36554-4 "XR Chest Single view" is not in it, and pixelmed reports that as an
#: error). The chest is stated by every group's finding site. docs/results.md.
XR_UNSPECIFIED_BODY_REGION = Code("43468-8", "LN", "XR unspecified body region")  # pydicom, CID 100
#: The whole-image group of a report without finding (tid1500.whole_image_group).
NO_ABNORMALITY = Code("111286", "DCM", "No abnormality")  # pydicom, CID 6030/6031
CHEST = Code("816094009", "SCT", "Chest")  # pydicom
OF_INTEREST = Code("113000", "DCM", "Of Interest")  # KOS document title, pydicom
#: Contributing Equipment purpose (IHE AIR): highdicom accepts only CID 7005, so set after construction.
PROCESSING_ALGORITHM = Code("Newcode1", IHE_SCHEME, "Processing Algorithm")

# ---- qualitative evaluations and measurements ------------------------------------------------------
PRESENCE = Code("121052", "DCM", "Presence of property")  # pydicom
PRESENT = Code("52101004", "SCT", "Present")  # pydicom
ABSENT = Code("272519000", "SCT", "Absent")  # pydicom
PROBABILITY = Code("122157", "DCM", "Probability")  # pydicom
NO_UNITS = Code("1", "UCUM", "no units")
PERCENT = Code("%", "UCUM", "percent")

# ---- segmentation categories ---------------------------------------------------------------------
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")  # pydicom
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")  # pydicom

# ---- laterality -----------------------------------------------------------------------------------
RIGHT = Code("24028007", "SCT", "Right")  # pydicom
LEFT = Code("7771000", "SCT", "Left")  # pydicom
BILATERAL = Code("51440002", "SCT", "Bilateral")  # pydicom

# ---- anatomy (standard) ---------------------------------------------------------------------------
ABDOMINAL_CAVITY = Code("52731004", "SCT", "Abdominal cavity structure")  # pydicom
AORTIC_ARCH = Code("57034009", "SCT", "Aortic arch")  # pydicom
APEX_OF_LUNG = Code("86598002", "SCT", "Apex of Lung")  # pydicom
HEART = Code("80891009", "SCT", "Heart")  # pydicom
DESCENDING_AORTA = Code("32672002", "SCT", "Descending aorta")  # pydicom (descending thoracic aorta)
HILUM_OF_LUNG = Code("46750007", "SCT", "Hilum of lung")  # pydicom
CLAVICLE = Code("51299004", "SCT", "Clavicle")  # pydicom
DIAPHRAGM = Code("5798000", "SCT", "Diaphragm")  # pydicom
LUNG = Code("39607008", "SCT", "Lung")  # pydicom
UPPER_ZONE_OF_LUNG = Code("281392002", "SCT", "Upper zone of lung")  # pydicom
MIDDLE_ZONE_OF_LUNG = Code("281393007", "SCT", "Middle zone of lung")  # pydicom
LOWER_ZONE_OF_LUNG = Code("281394001", "SCT", "Lower zone of lung")  # pydicom
MEDIASTINUM = Code("72410000", "SCT", "Mediastinum")  # pydicom
RIGHT_ATRIUM = Code("73829009", "SCT", "Right atrium")  # pydicom
CARINA = Code("28700002", "SCT", "Carina")  # pydicom
LEFT_UPPER_QUADRANT_OF_ABDOMEN = Code("86367003", "SCT", "Left upper quadrant of abdomen")  # pydicom
RIGHT_UPPER_QUADRANT_OF_ABDOMEN = Code("50519007", "SCT", "Right upper quadrant of abdomen")  # pydicom
SUPERIOR_VENA_CAVA = Code("48345005", "SCT", "Superior vena cava")  # pydicom
TRACHEA_AND_BRONCHUS = Code("110726009", "SCT", "Trachea and bronchus")  # pydicom
VERTEBRAL_COLUMN = Code("421060004", "SCT", "Spine")  # pydicom ("Structure of vertebral column")

# ---- anatomy (private: no standard concept for what the model localises) ----------------------------
SUPERIOR_MEDIASTINUM = Code("SUPMEDIAST", PRIVATE_SCHEME, "Superior mediastinum")
RIGHT_HEART_BORDER = Code("RHEARTBORDER", PRIVATE_SCHEME, "Right border of cardiac silhouette")
LEFT_HEART_BORDER = Code("LHEARTBORDER", PRIVATE_SCHEME, "Left border of cardiac silhouette")
CAVOATRIAL_JUNCTION = Code("CAVOATRIAL", PRIVATE_SCHEME, "Cavoatrial junction")
CARDIOPHRENIC_ANGLE = Code("CARDIOPHRENIC", PRIVATE_SCHEME, "Cardiophrenic angle")
COSTOPHRENIC_ANGLE = Code("COSTOPHRENIC", PRIVATE_SCHEME, "Costophrenic angle")

# ---- findings (standard) --------------------------------------------------------------------------
ATELECTASIS = Code("46621007", "SCT", "Atelectasis")  # external
CARDIOMEGALY = Code("8186001", "SCT", "Cardiomegaly")  # external (pydicom's 287272002 is another concept)
CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")  # external
PULMONARY_EDEMA = Code("19242006", "SCT", "Pulmonary edema")  # pydicom
FRACTURE = Code("125605004", "SCT", "Fracture of bone")  # external
LESION = Code("52988006", "SCT", "Lesion")  # pydicom
OPACITY = Code("112001", "DCM", "Opacity")  # pydicom
INFILTRATE = Code("112121", "DCM", "Infiltrate")  # pydicom
PLEURAL_EFFUSION = Code("60046008", "SCT", "Pleural effusion")  # pydicom
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")  # external
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")  # pydicom
NODULE = Code("27925004", "SCT", "Nodule")  # pydicom
MASS = Code("4147007", "SCT", "Mass")  # pydicom
#: A model finding whose label matches nothing above: the label text stays in the tracking ID and labels.
CLINICAL_FINDING = Code("404684003", "SCT", "Finding")  # pydicom ("Clinical finding")

# ---- findings (private: CheXpert labels without a single standard concept) --------------------------
ENLARGED_CARDIOMEDIASTINUM = Code("ENLCARDIOMED", PRIVATE_SCHEME, "Enlarged cardiomediastinum")
PLEURAL_OTHER = Code("PLEURALOTHER", PRIVATE_SCHEME, "Other pleural abnormality")
SUPPORT_DEVICES = Code("SUPPORTDEVICES", PRIVATE_SCHEME, "Support devices")
NO_FINDING = Code("NOFINDING", PRIVATE_SCHEME, "No finding")


@dataclass(frozen=True)
class AnatomicSite:
    """Where a region is: a structure code and, for paired structures, a laterality modifier."""

    structure: Code
    laterality: Code | None = None


#: Region index (inference.result.REGION_NAMES) -> finding site. One entry per region, checked at import.
REGION_SITES: dict[int, AnatomicSite] = {
    0: AnatomicSite(ABDOMINAL_CAVITY),
    1: AnatomicSite(AORTIC_ARCH),
    2: AnatomicSite(APEX_OF_LUNG, LEFT),
    3: AnatomicSite(APEX_OF_LUNG, RIGHT),
    4: AnatomicSite(HEART),
    5: AnatomicSite(DESCENDING_AORTA),
    6: AnatomicSite(HILUM_OF_LUNG, LEFT),
    7: AnatomicSite(HILUM_OF_LUNG, RIGHT),
    8: AnatomicSite(CLAVICLE, LEFT),
    9: AnatomicSite(DIAPHRAGM, LEFT),
    10: AnatomicSite(LOWER_ZONE_OF_LUNG, LEFT),
    11: AnatomicSite(LUNG, LEFT),
    12: AnatomicSite(MIDDLE_ZONE_OF_LUNG, LEFT),
    13: AnatomicSite(UPPER_ZONE_OF_LUNG, LEFT),
    14: AnatomicSite(MEDIASTINUM),
    15: AnatomicSite(RIGHT_ATRIUM),
    16: AnatomicSite(RIGHT_HEART_BORDER, RIGHT),
    17: AnatomicSite(CLAVICLE, RIGHT),
    18: AnatomicSite(DIAPHRAGM, RIGHT),
    19: AnatomicSite(LOWER_ZONE_OF_LUNG, RIGHT),
    20: AnatomicSite(LUNG, RIGHT),
    21: AnatomicSite(MIDDLE_ZONE_OF_LUNG, RIGHT),
    22: AnatomicSite(UPPER_ZONE_OF_LUNG, RIGHT),
    23: AnatomicSite(CARINA),
    24: AnatomicSite(LEFT_HEART_BORDER, LEFT),
    25: AnatomicSite(LEFT_UPPER_QUADRANT_OF_ABDOMEN),
    26: AnatomicSite(RIGHT_UPPER_QUADRANT_OF_ABDOMEN),
    27: AnatomicSite(SUPERIOR_MEDIASTINUM),
    28: AnatomicSite(SUPERIOR_VENA_CAVA),
    29: AnatomicSite(TRACHEA_AND_BRONCHUS),
    30: AnatomicSite(VERTEBRAL_COLUMN),
    31: AnatomicSite(CAVOATRIAL_JUNCTION),
    32: AnatomicSite(CARDIOPHRENIC_ANGLE, LEFT),
    33: AnatomicSite(COSTOPHRENIC_ANGLE, LEFT),
    34: AnatomicSite(CARDIOPHRENIC_ANGLE, RIGHT),
    35: AnatomicSite(COSTOPHRENIC_ANGLE, RIGHT),
}
if sorted(REGION_SITES) != list(range(len(REGION_NAMES))):  # a programming error, caught on import
    raise RuntimeError("codes.REGION_SITES must map every index of inference.result.REGION_NAMES")

#: CheXpert label (lower case) -> finding type.
CHEXPERT_FINDING_TYPES: dict[str, Code] = {
    "atelectasis": ATELECTASIS,
    "cardiomegaly": CARDIOMEGALY,
    "consolidation": CONSOLIDATION,
    "edema": PULMONARY_EDEMA,
    "enlarged cardiomediastinum": ENLARGED_CARDIOMEDIASTINUM,
    "fracture": FRACTURE,
    "lung lesion": LESION,
    "lung opacity": OPACITY,
    "no finding": NO_FINDING,
    "pleural effusion": PLEURAL_EFFUSION,
    "pleural other": PLEURAL_OTHER,
    "pneumonia": PNEUMONIA,
    "pneumothorax": PNEUMOTHORAX,
    "support devices": SUPPORT_DEVICES,
}

#: (code value, scheme) of a CheXpert finding type -> its CheXpert name ("Edema"), the short label.
SHORT_FINDING_NAMES: dict[tuple[str, str], str] = {(code.value, code.scheme_designator): name.capitalize() for name, code in CHEXPERT_FINDING_TYPES.items()}

#: Free-text model labels: the first keyword found in the label decides (order matters: specific first).
KEYWORD_FINDING_TYPES: tuple[tuple[str, Code], ...] = (
    ("pneumothorax", PNEUMOTHORAX),
    ("effusion", PLEURAL_EFFUSION),
    ("cardiomegaly", CARDIOMEGALY),
    ("enlarged heart", CARDIOMEGALY),
    ("atelecta", ATELECTASIS),
    ("consolidat", CONSOLIDATION),
    ("pneumonia", PNEUMONIA),
    ("edema", PULMONARY_EDEMA),
    ("oedema", PULMONARY_EDEMA),
    ("nodul", NODULE),
    ("mass", MASS),
    ("fracture", FRACTURE),
    ("infiltrat", INFILTRATE),
    ("opacit", OPACITY),
    ("lesion", LESION),
    ("device", SUPPORT_DEVICES),
    ("tube", SUPPORT_DEVICES),
    ("catheter", SUPPORT_DEVICES),
)


def finding_type_for_label(label: str) -> Code:
    """The finding type code for a model label: CheXpert name, else a keyword, else "Finding"."""
    normalised = re.sub(r"\s+", " ", label.strip().lower())
    if normalised in CHEXPERT_FINDING_TYPES:
        return CHEXPERT_FINDING_TYPES[normalised]
    for keyword, code in KEYWORD_FINDING_TYPES:
        if keyword in normalised:
            return code
    return CLINICAL_FINDING


def finding_probability_concept(finding_type: Code, label: str) -> Code:
    """The name of a finding box's probability NUM: "AI probability (in %) that this finding is present
    in the region", one private code per finding type, whose Code Meaning is the finding's short name.

    OHIF labels an SR box "<NUM Code Meaning>: <value> <unit>" (and nothing else, once the finding
    site is a modifier of the NUM): "Cardiomegaly: 91.00 %". DCM 122157 "Probability" named every box
    "Probability". Code value "P" + the finding type's code value; Code Meaning the CheXpert name of
    the finding type where it has one ("Edema", shorter than "Pulmonary edema": OHIF writes the label
    right of the box, where a long one runs past the viewport), else the finding type's meaning; for a
    model label with no finding type of its own ("Finding"), "PX" + 12 hex digits of the label's
    SHA-256 and the label, so a code value never has two meanings."""
    if finding_type.value == CLINICAL_FINDING.value and finding_type.scheme_designator == CLINICAL_FINDING.scheme_designator:
        normalised = re.sub(r"\s+", " ", label.strip())[:64] or CLINICAL_FINDING.meaning
        return Code("PX" + hashlib.sha256(normalised.lower().encode()).hexdigest()[:12].upper(), PRIVATE_SCHEME, normalised)
    return Code(
        ("P" + finding_type.value)[:16], PRIVATE_SCHEME, SHORT_FINDING_NAMES.get((finding_type.value, finding_type.scheme_designator), finding_type.meaning)
    )


def region_site(index: int) -> AnatomicSite:
    """The finding site of region ``index``; ValueError for an index outside the 36 regions."""
    try:
        return REGION_SITES[index]
    except KeyError:
        raise ValueError(f"region index {index} is not one of the {len(REGION_NAMES)} AnatomiX regions (0-{len(REGION_NAMES) - 1})") from None


def as_coded_concept(code: Code) -> CodedConcept:
    """highdicom's dataset form of a pydicom Code."""
    return CodedConcept.from_code(code)


def uses_private_scheme(code: Code) -> bool:
    return code.scheme_designator in (PRIVATE_SCHEME, IHE_SCHEME)
