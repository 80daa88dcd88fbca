"""DICOMweb destinations: results by STOW-RS, echo by QIDO-RS (issue 23), through ``dicomweb-client``.

A remote node with a ``url`` (its DICOMweb base URL) gets one study version's objects in one STOW-RS
request to ``{url}/studies/{StudyInstanceUID}`` (multipart/related; type="application/dicom", the
stored files as they are, in the send order of the C-STORE path). The answer maps onto the outcomes
of :mod:`dicom_node.pipeline.delivery_outcomes`, so retries, dead letters and destination health
follow the DIMSE rules:

* per instance, from the response body (PS3.18 10.5.3) whatever the HTTP status: an instance in
  ReferencedSOPSequence was stored (a WarningReason is logged); one in FailedSOPSequence is classified
  by its FailureReason as a C-STORE status is (0xA7xx transient, the rest permanent; 0x0122 for a
  Comprehensive 3D SR sends it again as Comprehensive SR, same UID); one the body leaves out while
  naming others is transient;
* otherwise by the HTTP status: 2xx sent; 408, 429 and 5xx transient; any other 4xx (400, 401, 403,
  404, 409, 413, 415...) permanent;
* no answer (connection refused, timeout, reset): transient; a certificate we do not trust, or a
  credential file that is missing or malformed: permanent (an admin must act, as for unusable DICOM
  TLS files).

``dicomweb-client``'s own retries are off: the delivery policy (backoff, window, dead letters) is
the only one. Credentials are read from their files at each attempt (a rotated token is picked up
without a restart) and never logged. The HTTP session ignores the environment (no
``REQUESTS_CA_BUNDLE`` overriding the node's CA file, no ``~/.netrc`` credentials, no proxy variables).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage as COMPREHENSIVE_3D_SR

from dicom_node.pipeline.delivery_outcomes import Outcome, OutgoingObject, StoreOutcome, classify_status
from dicom_node.store.base import RemoteNode

LOG = logging.getLogger(__name__)

#: FailureReason 0x0122: the destination does not take this SOP class (the 88.34 -> 88.33 fallback).
SOP_CLASS_NOT_SUPPORTED = 0x0122
#: FailureReason values of PS3.18 Table 10.5.3-2 (and the Storage service's), for the error text.
FAILURE_REASONS = {
    0xA700: "out of resources",
    0xA900: "data set does not match SOP class",
    0xC000: "cannot understand",
    0xC122: "transfer syntax not supported",
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
}
#: What to check, by HTTP status, after a refusal.
HTTP_HINTS = {
    401: "the credentials were refused: check its bearer token or basic user:password",
    403: "the credentials were refused: check its bearer token or basic user:password",
    404: "no DICOMweb service at that path: check its base URL",
    413: "the request is too large for it",
    415: "it refused the media type",
}


class DicomwebError(Exception):
    """A DICOMweb peer could not be asked (credential or CA file unusable) or refused; one line saying why."""


def http_outcome(status_code: int) -> Outcome:
    """An HTTP status as a delivery outcome: 2xx sent; 408, 429, 5xx transient; every other status permanent."""
    if 200 <= status_code < 300:
        return "sent"
    if status_code in (408, 429) or status_code >= 500:
        return "transient"
    return "permanent"


# ---- the HTTP session ----------------------------------------------------------------------------


def read_credential(path: str, what: str) -> str:
    """The first line of a credential file; DicomwebError when it is missing, unreadable or empty."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeError) as exc:
        raise DicomwebError(f"{what} file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    lines = text.strip().splitlines()
    if not lines or not lines[0].strip():
        raise DicomwebError(f"{what} file {path} is empty")
    return lines[0].strip()


def basic_credentials(path: str) -> tuple[str, str]:
    """``user:password`` from the first line of a basic auth file."""
    user, colon, password = read_credential(path, "basic auth").partition(":")
    if not colon or not user:
        raise DicomwebError(f"basic auth file {path}: its first line must be user:password")
    return user, password


def http_session(node: RemoteNode) -> requests.Session:
    """A session carrying the node's credentials and CA file, blind to the environment's settings."""
    session = requests.Session()
    session.trust_env = False
    if node.tls_ca_file:
        if not Path(node.tls_ca_file).is_file():
            raise DicomwebError(f"CA file {node.tls_ca_file}: no such file")
        session.verify = node.tls_ca_file
    if node.auth_token_file:
        session.headers["Authorization"] = "Bearer " + read_credential(node.auth_token_file, "auth token")
    elif node.basic_auth_file:
        session.auth = basic_credentials(node.basic_auth_file)
    session.headers["Accept"] = "application/dicom+json"
    return session


def dicomweb_client(node: RemoteNode, timeout_s: float, answers: list[requests.Response]) -> DICOMwebClient:
    """dicomweb-client for ``node`` (its own retries off); every HTTP answer is appended to ``answers``."""
    if not node.url:
        raise DicomwebError(f"{node.name} has no DICOMweb URL")

    def keep(response: requests.Response, *args: Any, **kwargs: Any) -> requests.Response:
        answers.append(response)
        return response

    try:
        client = DICOMwebClient(node.url, session=http_session(node), callback=keep, timeout=timeout_s)
    except ValueError as exc:  # a URL it cannot use (the node's validation should have said so)
        raise DicomwebError(f"URL {node.url}: {exc}") from None
    client.set_http_retry_params(retry=False)
    return client


def unreachable(exc: requests.RequestException, timeout_s: float) -> tuple[Outcome, str]:
    """Why no answer came, and whether trying later may help."""
    if isinstance(exc, requests.exceptions.SSLError):
        return "permanent", f"TLS failed: its certificate is not trusted or does not name its host (its CA file?): {_first_line(exc)}"
    if isinstance(exc, requests.Timeout):
        return "transient", f"no answer within {timeout_s:g} s"
    if isinstance(exc, requests.ConnectionError):
        return "transient", "cannot connect: connection refused, reset or host not found"
    return "transient", f"HTTP exchange failed: {_first_line(exc)}"


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:300]


# ---- STOW-RS ---------------------------------------------------------------------------------------


def store_over_http(
    destination: RemoteNode,
    ordered: Sequence[OutgoingObject],
    *,
    timeout_s: float,
    fallback: Callable[[Dataset], Dataset],
    study_instance_uid: str | None = None,
) -> list[StoreOutcome]:
    """STOW-RS ``ordered`` (already in send order) to ``destination``, to the URL of ``study_instance_uid``
    (None: the study most of them name): one outcome per object, in that order."""
    datasets = [pydicom.dcmread(obj.path) for obj in ordered]
    study = study_instance_uid or Counter(str(ds.StudyInstanceUID) for ds in datasets).most_common(1)[0][0]
    outcomes = _stow(destination, ordered, datasets, timeout_s, study)
    refused_3d = [i for i, o in enumerate(outcomes) if o.status == SOP_CLASS_NOT_SUPPORTED and str(datasets[i].SOPClassUID) == COMPREHENSIVE_3D_SR]
    if refused_3d:  # the same content and UID as Comprehensive SR (88.33), as over DIMSE
        again = _stow(destination, [ordered[i] for i in refused_3d], [fallback(datasets[i]) for i in refused_3d], timeout_s, study)
        for index, outcome in zip(refused_3d, again):
            outcomes[index] = outcome
    return outcomes


def _stow(destination: RemoteNode, objects: Sequence[OutgoingObject], datasets: Sequence[Dataset], timeout_s: float, study: str) -> list[StoreOutcome]:
    answers: list[requests.Response] = []
    try:
        dicomweb_client(destination, timeout_s, answers).store_instances(datasets, study_instance_uid=study)
    except DicomwebError as exc:
        return [StoreOutcome(o.sop_instance_uid, "permanent", None, f"STOW-RS to {destination.name}: {exc}") for o in objects]
    except requests.HTTPError:
        pass  # a 4xx/5xx answer: read below, with its body
    except requests.RequestException as exc:
        outcome, why = unreachable(exc, timeout_s)
        return [StoreOutcome(o.sop_instance_uid, outcome, None, f"STOW-RS to {destination.name} ({destination.url}): {why}") for o in objects]
    except (ValueError, TypeError, KeyError):
        pass  # dicomweb-client could not read the body; the answer is read below
    if not answers:
        return [StoreOutcome(o.sop_instance_uid, "transient", None, f"no answer from {destination.name} ({destination.url})") for o in objects]
    answer = answers[-1]
    sent_classes = [str(ds.SOPClassUID) for ds in datasets]
    return outcomes_from_answer(destination, answer.status_code, answer.reason or "", answer_body(answer.content), objects, sent_classes)


def answer_body(content: bytes) -> Dataset | None:
    """The STOW-RS response body as a dataset (DICOM JSON); None when there is none or it is not DICOM JSON.

    Read whatever the Content-Type says: Orthanc answers a 409 with a DICOM JSON body and no Content-Type.
    """
    if not content or content.lstrip()[:1] != b"{":
        return None
    try:
        return Dataset.from_json(json.loads(content))
    except (ValueError, TypeError, KeyError, AttributeError):
        return None


def outcomes_from_answer(
    destination: RemoteNode,
    status_code: int,
    reason: str,
    body: Dataset | None,
    objects: Sequence[OutgoingObject],
    sent_classes: Sequence[str],
) -> list[StoreOutcome]:
    """One outcome per object from a STOW-RS answer: per instance from the body, else by the HTTP status."""
    where = f"{destination.name} ({destination.url})"
    http = f"HTTP {status_code}" + (f" {reason}" if reason else "")
    stored: dict[str, int | None] = {}
    failed: dict[str, int | None] = {}
    if body is not None:
        for item in body.get("ReferencedSOPSequence", None) or []:
            stored[str(item.get("ReferencedSOPInstanceUID", ""))] = _int(item.get("WarningReason", None))
        for item in body.get("FailedSOPSequence", None) or []:
            failed[str(item.get("ReferencedSOPInstanceUID", ""))] = _int(item.get("FailureReason", None))
    listed = bool(stored or failed)
    by_status = http_outcome(status_code)
    hint = HTTP_HINTS.get(status_code)
    outcomes = []
    for obj, sop_class in zip(objects, sent_classes):
        uid = obj.sop_instance_uid
        if uid in failed:
            code = failed[uid]
            outcome: Outcome = "transient" if code is not None and classify_status(code) == "transient" else "permanent"
            named = (
                f"FailureReason 0x{code:04X}" + (f" ({FAILURE_REASONS[code]})" if code in FAILURE_REASONS else "") if code is not None else "no reason given"
            )
            outcomes.append(StoreOutcome(uid, outcome, code, f"STOW-RS to {where}: not stored, {named} ({http})", sop_class))
        elif uid in stored:
            if stored[uid]:
                LOG.info("destination %s stored %s with WarningReason 0x%04X", destination.name, uid, stored[uid])
            outcomes.append(StoreOutcome(uid, "sent", stored[uid], None, sop_class))
        elif listed:
            outcomes.append(StoreOutcome(uid, "transient", None, f"STOW-RS to {where}: the answer ({http}) does not mention this instance", sop_class))
        elif by_status == "sent":
            outcomes.append(StoreOutcome(uid, "sent", None, None, sop_class))
        else:
            outcomes.append(StoreOutcome(uid, by_status, None, f"STOW-RS to {where}: {http}" + (f": {hint}" if hint else ""), sop_class))
    return outcomes


def _int(value: Any) -> int | None:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


# ---- echo ---------------------------------------------------------------------------------------------


def qido_echo(node: RemoteNode, timeout_s: float) -> float:
    """A QIDO-RS study search (``{url}/studies?limit=1``): milliseconds from request to parsed answer.

    Raises DicomwebError with one line: the credential or CA file, no answer (refused, timeout, TLS),
    or the HTTP status the peer refused with and what to check.
    """
    answers: list[requests.Response] = []
    where = f"echo {node.name} ({node.url})"
    try:
        client = dicomweb_client(node, timeout_s, answers)
        started = time.perf_counter()
        client.search_for_studies(limit=1)
        return (time.perf_counter() - started) * 1000
    except DicomwebError as exc:
        raise DicomwebError(f"{where}: {exc}") from None
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        hint = HTTP_HINTS.get(code)
        raise DicomwebError(f"{where}: QIDO-RS answered HTTP {code} {exc.response.reason if exc.response is not None else ''}".rstrip()
                            + (f": {hint}" if hint else "")) from None  # fmt: skip
    except requests.RequestException as exc:
        raise DicomwebError(f"{where}: {unreachable(exc, timeout_s)[1]}") from None
    except (ValueError, TypeError, KeyError) as exc:
        raise DicomwebError(f"{where}: the QIDO-RS answer is not DICOM JSON ({_first_line(exc)})") from None
