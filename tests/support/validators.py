"""The validators DICOM vendors use, run as real subprocesses, with their output parsed.

Each ``run_*`` returns a :class:`Report` with the problem lines the tool printed, minus the
*documented* false positives of the installed builds (each allow-list entry says why it is wrong).
Tests assert that ``report.problems`` is empty, so anything new fails and is printed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

PIXELMED_JAR = "/usr/share/java/pixelmed.jar"
#: Java 17's XPath limits break pixelmed's template checks; lifting them is what pixelmed documents.
JAVA_XPATH_LIMITS_OFF = ("-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0", "-Djdk.xml.xpathTotalOpLimit=0")

#: dciodvfy (dicom3tools, Debian 2022 build): its attribute tables predate Device UID (0018,1002) inside
#: Contributing Equipment Sequence (added by CP-1887); IHE AIR requires it there.
DCIODVFY_FALSE_POSITIVES = (re.compile(r"\(0x0018,0x1002\) UI Device UID"),)

#: pixelmed DicomSRValidator (Debian 2022 build) false positives on correct content:
PIXELMED_FALSE_POSITIVES = (
    # TID 1501/1410 rows "Finding Category" and "Presence of property" were added to the templates
    # after this build's template tables (CP-2073 era); highdicom writes them as the standard says.
    re.compile(r"^Warning: .*/CONTAINER \(125007,DCM,\"Measurement Group\"\)/CODE \(276214006,SCT,\"Finding category\"\): Content Item not in template$"),
    re.compile(r"^Warning: .*/CONTAINER \(125007,DCM,\"Measurement Group\"\)/CODE \(121052,DCM,\"Presence of property\"\): Content Item not in template$"),
    # TID 2000 sections are included through TID 2001/2002 in the current standard; this build's TID 2000
    # table does not follow the include, so the Findings/Impressions sections and their TEXT look foreign.
    re.compile(
        r"^Warning: .*/CONTAINER \(18748-4,LN,\"Diagnostic Imaging Report\"\)/CONTAINER \((59776-5|19005-8),LN,\"(Findings|Impressions)\"\)"
        r"(/TEXT \((121071|121073),DCM,\"(Finding|Impression)\"\))?: Content Item not in template$"
    ),
    # TID 1500 row 4 "Procedure reported" is DCID 100; LOINC 43468-8 "XR unspecified body region" is in
    # CID 100 today (pydicom's tables), not in this build's 2019 copy of it. Only that code.
    re.compile(
        r"^Error: Template 1500 MeasurementReport/.*\(121058,DCM,\"Procedure reported\"\).*"
        r"Code \(43468-8,LN,\"XR unspecified body region\"\) not found in context group 100$"
    ),
)


#: pixelmed DicomInstanceValidator (Debian 2022 build) on a SEG of a projection image (no Plane Position):
#: it checks the Derivation Image macro in the Shared AND in every Per-frame item and also forbids the
#: sequence in both, so no SEG can pass; ours has it per frame (each frame names its source), as highdicom
#: and the standard put it. Only the shared-item line is allowed.
PIXELMED_INSTANCE_FALSE_POSITIVES = (
    re.compile(
        r"^Error: DerivationImageMacro/DerivationImageSequence/: SharedFunctionalGroupsSequence/Item\[1\]/: Missing required sequence attribute \(Type 2\)$"
    ),
)


@dataclass
class Report:
    tool: str
    returncode: int
    output: str
    problems: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return f"{self.tool}: {len(self.problems)} problem(s):\n" + "\n".join(self.problems) + "\n--- full output ---\n" + self.output[-4000:]


def _run(command: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "TCP_NODELAY": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, errors="replace")


def require(tool: str) -> None:
    if shutil.which(tool) is None:
        raise RuntimeError(f"{tool} is not installed: run `make peers` (Debian dicom3tools / dcmtk / libpixelmed-java)")


def _split(lines: list[str], false_positives: tuple[re.Pattern, ...]) -> tuple[list[str], list[str]]:
    problems, allowed = [], []
    for line in lines:
        (allowed if any(p.search(line) for p in false_positives) else problems).append(line)
    return problems, allowed


def run_dciodvfy(path: Path) -> Report:
    """dciodvfy: every ``Error`` line is a problem (warnings are reported but not failures)."""
    require("dciodvfy")
    done = _run(["dciodvfy", str(path)])
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    problems, allowed = _split(errors, DCIODVFY_FALSE_POSITIVES)
    return Report("dciodvfy", done.returncode, output, problems, allowed)


def dciodvfy_warnings(report: Report) -> list[str]:
    return [line for line in report.output.splitlines() if line.startswith("Warning") and not any(p.search(line) for p in DCIODVFY_FALSE_POSITIVES)]


def run_dcentvfy(paths: list[Path]) -> Report:
    """dcentvfy checks patient/study/series consistency across files; it exits 0 even on errors."""
    require("dcentvfy")
    done = _run(["dcentvfy", *map(str, paths)])
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if line.startswith("Error")]
    return Report("dcentvfy", done.returncode, output, problems)


def run_dcmpschk(path: Path) -> Report:
    """DCMTK's presentation state checker: must print "Test passed." and no error."""
    require("dcmpschk")
    done = _run(["dcmpschk", str(path)])
    output = done.stdout + done.stderr
    problems = [line for line in output.splitlines() if "Error" in line or "failed" in line or line.startswith("E:") or line.startswith("F:")]
    if "Test passed." not in output and not problems:
        problems.append("dcmpschk did not report 'Test passed.'")
    return Report("dcmpschk", done.returncode, output, problems)


def run_dsrdump(path: Path) -> Report:
    """DCMTK's SR parser: must read the document (exit 0) without E:/F: messages."""
    require("dsrdump")
    done = _run(["dsrdump", "-v", str(path)])
    output = done.stdout + done.stderr
    problems = [line for line in (done.stderr.splitlines()) if line.startswith(("E:", "F:"))]
    if done.returncode != 0:
        problems.append(f"dsrdump exited with {done.returncode}")
    return Report("dsrdump", done.returncode, output, problems)


def run_pixelmed_sr_validator(path: Path) -> Report:
    """pixelmed's DicomSRValidator: every Error/Warning line is a problem unless a documented false positive."""
    require("java")
    if not Path(PIXELMED_JAR).exists():
        raise RuntimeError(f"{PIXELMED_JAR} is missing: install the Debian package libpixelmed-java")
    done = _run(["java", *JAVA_XPATH_LIMITS_OFF, "-cp", PIXELMED_JAR, "com.pixelmed.validate.DicomSRValidator", str(path)])
    output = done.stdout + done.stderr
    lines = [line for line in output.splitlines() if line.startswith(("Error", "Warning"))]
    # Lines carry a content-item position ("1.7.3: ") that we drop before matching.
    normalised = [re.sub(r": (\d+\.)*\d+: /", ": /", line) for line in lines]
    problems, allowed = _split(normalised, PIXELMED_FALSE_POSITIVES)
    if "Found Root Template" not in output:
        problems.append("pixelmed did not recognise the root template")
    return Report("pixelmed DicomSRValidator", done.returncode, output, problems, allowed)


def run_pixelmed_instance_validator(path: Path) -> Report:
    """pixelmed's DicomInstanceValidator (IOD and module rules): every Error line is a problem unless a
    documented false positive."""
    require("java")
    if not Path(PIXELMED_JAR).exists():
        raise RuntimeError(f"{PIXELMED_JAR} is missing: install the Debian package libpixelmed-java")
    done = _run(["java", *JAVA_XPATH_LIMITS_OFF, "-cp", PIXELMED_JAR, "com.pixelmed.validate.DicomInstanceValidator", str(path)])
    output = done.stdout + done.stderr
    problems, allowed = _split([line for line in output.splitlines() if line.startswith("Error")], PIXELMED_INSTANCE_FALSE_POSITIVES)
    if "IOD validation complete" not in output:
        problems.append("pixelmed did not complete the IOD validation")
    return Report("pixelmed DicomInstanceValidator", done.returncode, output, problems, allowed)


PIXELMED_BATCH = Path(__file__).with_name("PixelmedBatch.java")


def run_pixelmed_batch(mode: str, paths: list[Path]) -> dict[Path, Report]:
    """pixelmed's DicomInstanceValidator (``mode`` "iod") or DicomSRValidator ("sr") on many files in one
    JVM (tests/support/PixelmedBatch.java); the same problem rules as the one-file runners."""
    require("java")
    if not paths:
        return {}
    done = _run(["java", *JAVA_XPATH_LIMITS_OFF, "-cp", PIXELMED_JAR, str(PIXELMED_BATCH), mode, *map(str, paths)], timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"pixelmed batch failed: {done.stderr[-3000:]}")
    reports: dict[Path, Report] = {}
    for chunk in done.stdout.split("=== ")[1:]:
        name, _, output = chunk.partition("\n")
        if mode == "sr":
            lines = [re.sub(r": (\d+\.)*\d+: /", ": /", line) for line in output.splitlines() if line.startswith(("Error", "Warning"))]
            problems, allowed = _split(lines, PIXELMED_FALSE_POSITIVES)
            if "Root Template Validation Complete" not in output:
                problems.append("pixelmed did not complete the root template validation")
        else:
            problems, allowed = _split([line for line in output.splitlines() if line.startswith("Error")], PIXELMED_INSTANCE_FALSE_POSITIVES)
        reports[Path(name)] = Report(f"pixelmed {mode}", 0, output, problems, allowed)
    missing = set(paths) - set(reports)
    if missing:
        raise RuntimeError(f"pixelmed batch reported nothing for {sorted(map(str, missing))}")
    return reports
