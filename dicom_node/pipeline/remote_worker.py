"""An analyze worker on another host that reaches the node over HTTP only (issue 23).

Started as ``anatomix-node worker --queues analyze --api-url URL --token-file F`` with the broker URL
in its settings: no shared ``data_dir``, no database. It takes the ``analyze`` message from the
broker like any worker, then (the node's side is :mod:`dicom_node.pipeline.remote_work`):

* claims the study version and renews its lease through ``/api/worker/analyses/...``;
* reads each chosen image with WADO-RS from the node's ``/dicomweb`` (dicomweb-client);
* analyses it with its own model, builds the result objects with the node's output settings, and
  sends the result JSON, then the objects by STOW-RS (dicomweb-client) to the node, which stores
  them for delivery;
* completes the claim (or fails it with the reason).

One image is in memory at a time. An HTTP error or a dropped connection ends the task without an
answer to the node: the lease runs out and the node's dispatch loop queues the study again; what was
recorded is reused, and the deterministic UIDs make a re-sent object the same object.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from pydicom.dataset import Dataset

from dicom_node.store.base import StoreUnavailable, WorkerReport

if TYPE_CHECKING:
    from inference.engine import Engine

LOG = logging.getLogger(__name__)

#: The header that names the claim in every call after the claim.
CLAIM_HEADER = "X-AnatomiX-Claim"


class NodeRefused(RuntimeError):
    """The node answered an error other than "claim lost" (``status``; 0 when it kept only some
    result objects): a 4xx fails the study with the reason, a 5xx leaves it to the lease."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class ClaimLost(RuntimeError):
    """The node says this worker no longer holds the study (409): stop, someone else has it or it is over."""


@dataclass(frozen=True)
class WorkOrder:
    """What the node answered to a claim (see :func:`dicom_node.pipeline.remote_work.claim_analysis`)."""

    study_instance_uid: str
    version: int
    claim_id: str
    lease_s: float
    tasks: tuple[str, ...]
    kinds: tuple[str, ...]
    output: dict[str, str]
    images: tuple[dict[str, Any], ...]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkOrder:
        return cls(str(data["study_instance_uid"]), int(data["version"]), str(data["claim_id"]), float(data["lease_s"]),
                   tuple(data["tasks"]), tuple(data["kinds"]), dict(data["output"]), tuple(data["images"]))  # fmt: skip


class NodeClient:
    """The node's HTTP service as a remote worker uses it: one requests session (bearer token, CA file)."""

    def __init__(self, api_url: str, token: str, ca_file: Path | None = None, timeout_s: float = 60.0) -> None:
        self.api_url = api_url.rstrip("/")
        self.timeout_s = timeout_s
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"
        if ca_file is not None:
            self.session.verify = str(ca_file)

    @classmethod
    def from_token_file(cls, api_url: str, token_file: Path, ca_file: Path | None = None) -> NodeClient:
        token = Path(token_file).read_text(encoding="utf-8").strip()
        if not token:
            raise ValueError(f"{token_file}: empty (put the worker token from `anatomix-node worker-token add NAME` in it)")
        return cls(api_url, token, ca_file)

    def _analysis_url(self, uid: str, version: int) -> str:
        return f"{self.api_url}/api/worker/analyses/{uid}/{version}"

    def _call(self, method: str, url: str, claim_id: str | None = None, **kwargs: Any) -> requests.Response:
        headers = {CLAIM_HEADER: claim_id} if claim_id else {}
        response = self.session.request(method, url, headers=headers, timeout=self.timeout_s, **kwargs)
        if response.status_code == 409:
            raise ClaimLost(_detail(response))
        if response.status_code >= 400:
            raise NodeRefused(f"{method} {url}: {response.status_code} {_detail(response)}", response.status_code)
        return response

    def whoami(self) -> str:
        """The worker token's name (checks the URL and the token once, at the worker's start)."""
        return str(self._call("GET", f"{self.api_url}/api/worker/whoami").json()["name"])

    # ---- the claim -----------------------------------------------------------------------------
    def claim(self, uid: str, version: int) -> WorkOrder | None:
        """The work order, or None when the study is not queued (claimed elsewhere, done, gone)."""
        try:
            return WorkOrder.from_json(self._call("POST", self._analysis_url(uid, version) + "/claim").json())
        except ClaimLost as exc:
            LOG.info("analyze %s v%d: nothing to do (%s)", uid, version, exc)
            return None

    def renew(self, order: WorkOrder) -> None:
        self._call("PUT", self._analysis_url(order.study_instance_uid, order.version) + "/lease", order.claim_id)

    def send_result(self, order: WorkOrder, sop_instance_uid: str, result_json: str | None, error: str | None) -> None:
        url = self._analysis_url(order.study_instance_uid, order.version) + f"/images/{sop_instance_uid}"
        self._call("PUT", url, order.claim_id, json={"result": result_json, "error": error})

    def complete(self, order: WorkOrder, objects: dict[str, list[str]]) -> str:
        url = self._analysis_url(order.study_instance_uid, order.version) + "/complete"
        return str(self._call("POST", url, order.claim_id, json={"objects": objects}).json()["outcome"])

    def fail(self, order: WorkOrder, error: str) -> None:
        self._call("POST", self._analysis_url(order.study_instance_uid, order.version) + "/fail", order.claim_id, json={"error": error})

    # ---- DICOMweb ------------------------------------------------------------------------------
    def _dicomweb(self, order: WorkOrder | None = None) -> Any:
        from dicomweb_client.api import DICOMwebClient

        stow = f"api/worker/analyses/{order.study_instance_uid}/{order.version}" if order else None
        headers = {CLAIM_HEADER: order.claim_id} if order else None
        return DICOMwebClient(self.api_url, session=self.session, wado_url_prefix="dicomweb", stow_url_prefix=stow, headers=headers)

    def retrieve_instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset:
        """One stored instance, as the node received it (WADO-RS, application/dicom)."""
        return self._dicomweb().retrieve_instance(study_uid, series_uid, sop_uid)

    def store_result_objects(self, order: WorkOrder, datasets: list[Dataset]) -> None:
        """STOW-RS the objects to the node; NodeRefused naming each object it did not keep."""
        try:
            answer = self._dicomweb(order).store_instances(datasets, study_instance_uid=order.study_instance_uid)
        except requests.HTTPError as exc:
            if exc.response is not None and exc.response.status_code == 409 and "00081198" not in exc.response.text:
                raise ClaimLost(_detail(exc.response)) from None
            status = exc.response.status_code if exc.response is not None else 0
            raise NodeRefused(f"STOW-RS of {len(datasets)} result object(s): {exc} {_detail(exc.response)}", status) from None
        failed = [f"{item.ReferencedSOPInstanceUID} (0x{int(item.FailureReason):04X})" for item in answer.get("FailedSOPSequence", [])]
        if failed:
            raise NodeRefused(f"the node did not keep result object(s) {', '.join(failed)}")

    # ---- worker reports ------------------------------------------------------------------------
    def record_worker_report(self, report: WorkerReport) -> None:
        """Like the store's method (:class:`dicom_node.pipeline.worker_report.WorkerReporter` calls it)."""
        body = {k: v for k, v in asdict(report).items() if k not in ("started_at", "last_seen_at", "name")}
        body["queues"] = list(report.queues)
        try:
            self._call("PUT", f"{self.api_url}/api/worker/reports/{report.name}", json=body)
        except (requests.RequestException, NodeRefused) as exc:
            raise StoreUnavailable(f"worker report not accepted by the node: {exc}") from None

    def remove_worker_reports(self, seen_before: Any) -> int:
        return 0  # the node forgets old reports itself (another worker's start, or a local one)

    def remove_worker_report(self, name: str) -> bool:
        try:
            self._call("DELETE", f"{self.api_url}/api/worker/reports/{name}")
        except (requests.RequestException, NodeRefused) as exc:
            raise StoreUnavailable(f"worker report not removed by the node: {exc}") from None
        return True


def _detail(response: requests.Response | None) -> str:
    if response is None:
        return ""
    try:
        return str(response.json().get("detail", response.text[:300]))
    except ValueError:
        return response.text[:300]


class ClaimKeeper:
    """Renews the claim every third of its lease from a daemon thread; ``lost`` is set when the node refuses."""

    def __init__(self, node: NodeClient, order: WorkOrder) -> None:
        self.node, self.order = node, order
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lease-analyze-remote", daemon=True)

    def __enter__(self) -> ClaimKeeper:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def check(self) -> None:
        if self.lost.is_set():
            raise ClaimLost(f"study {self.order.study_instance_uid} v{self.order.version}: the node took the claim back")

    def _run(self) -> None:
        while not self._stop.wait(max(0.2, self.order.lease_s / 3)):
            try:
                self.node.renew(self.order)
            except ClaimLost:
                self.lost.set()
                return
            except (requests.RequestException, NodeRefused) as exc:  # the next beat tries again; the lease may run out
                LOG.warning("analyze %s v%d: lease not renewed (%s)", self.order.study_instance_uid, self.order.version, exc)


def build_result_objects(source: Dataset, result: Any, order: WorkOrder) -> list[Dataset]:
    """The bundle for one image with the node's output settings (the same objects a local worker writes)."""
    from sr_writer.bundle import build_bundle

    output = order.output
    built = build_bundle(source, result, order.kinds, uid_root=output["uid_root"], analysis_version=order.version,
                         institution_name=output["institution_name"], sr_anatomy=output["sr_anatomy"])  # fmt: skip
    return [obj.dataset for obj in built]


def analyze_remote_study(node: NodeClient, engine_of: Any, uid: str, version: int) -> str:
    """The analyze task of a remote worker; returns what happened (analyzed, failed, nothing, skipped, lost)."""
    from dicom_node.pipeline.analysis import analyze_datasets
    from inference.result import AnalysisResult

    order = node.claim(uid, version)
    if order is None:
        return "skipped"
    started = time.monotonic()
    objects: dict[str, list[str]] = {}
    try:
        with ClaimKeeper(node, order) as keeper:
            engine: Engine | None = None
            for image in order.images:
                sop_uid = str(image["sop_instance_uid"])
                source = node.retrieve_instance(uid, str(image["series_instance_uid"]), sop_uid)
                keeper.check()
                if image.get("result"):  # recorded by an earlier claim: reuse it
                    result = AnalysisResult.from_json(image["result"])
                else:
                    engine = engine or engine_of()
                    [outcome] = analyze_datasets(engine, [source], order.tasks)  # an unusable image comes back with its reason
                    keeper.check()
                    if outcome.result is None:
                        node.send_result(order, sop_uid, None, outcome.error)
                        continue
                    result = outcome.result
                    node.send_result(order, sop_uid, result.to_json(), None)
                datasets = build_result_objects(source, result, order)
                del source
                if datasets:
                    node.store_result_objects(order, datasets)
                objects[sop_uid] = [str(ds.SOPInstanceUID) for ds in datasets]
                keeper.check()
            outcome_text = node.complete(order, objects)
    except ClaimLost as exc:
        LOG.warning("analyze %s v%d: stopped, the claim is lost (%s)", uid, version, exc)
        return "lost"
    except NodeRefused as exc:
        if exc.status >= 500:  # the node's own trouble: the lease runs out and dispatch queues the study again
            LOG.error("analyze %s v%d: the node failed (%s); the study will be queued again", uid, version, exc)
            raise
        # The node refused what this worker sent (a bug or a mismatch): retrying would refuse it again.
        LOG.error("analyze %s v%d: the node refused this worker's results: %s", uid, version, exc)
        return _fail_at_node(node, order, f"the node refused the remote worker's results: {exc}")
    except requests.RequestException as exc:
        # The node is unreachable: no answer; the lease runs out and dispatch queues the study again.
        LOG.error("analyze %s v%d: the node could not be reached (%s); the study will be queued again", uid, version, exc)
        raise
    except Exception as exc:  # task boundary: a model or writer error fails this study at the node, recorded
        LOG.exception("analyze %s v%d failed", uid, version)
        return _fail_at_node(node, order, f"{type(exc).__name__}: {exc}")
    LOG.info("analyze %s v%d: %s on this remote worker in %.1f s (%d object(s) sent)", uid, version, outcome_text,
             time.monotonic() - started, sum(map(len, objects.values())))  # fmt: skip
    return outcome_text


def _fail_at_node(node: NodeClient, order: WorkOrder, reason: str) -> str:
    """Record the study failed at the node; if the node cannot be told, its lease runs out and it is queued again."""
    try:
        node.fail(order, reason[:500])
    except (ClaimLost, NodeRefused, requests.RequestException) as exc:
        LOG.error("analyze %s v%d: the failure could not be recorded at the node (%s)", order.study_instance_uid, order.version, exc)
        return "lost"
    return "failed"
