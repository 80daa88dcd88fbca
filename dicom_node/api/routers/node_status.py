"""The node's status (``GET /api/status``) and the model in use (``GET /api/model``); the facts come from :mod:`dicom_node.ops.node_status`."""

from __future__ import annotations

import socket
import time
from typing import Any

from fastapi import APIRouter, Request

from dicom_node.api.deps import Viewer, ctx_of
from dicom_node.ops.node_status import certificates, last_model_identity, spool_disk, workers
from dicom_node.store.base import STUDY_STATES

router = APIRouter(tags=["node"])


@router.get("/api/model",
            summary="the model in use: settings, the model each live analyze worker loaded, the identity the newest analysis recorded")  # fmt: skip
def model(request: Request, who: Viewer) -> dict[str, Any]:
    from dicom_node.pipeline.dispatch import model_configured

    ctx = ctx_of(request)
    m = ctx.settings.model
    keys = ("name", "model", "model_name", "model_version", "model_digest", "demo_weights", "device", "load_seconds", "error")
    loaded = [{k: w[k] for k in keys} for w in workers(ctx.settings, ctx.store) if w["live"] and "analyze" in w["queues"]]
    return {
        "configured": model_configured(ctx.settings), "demo_weights": m.demo_weights, "dir": str(m.dir) if m.dir else None,
        "backend": m.backend, "device": m.device, "tasks": list(m.tasks), "workers": loaded, "last_used": last_model_identity(ctx.store),
    }  # fmt: skip


@router.get("/api/status", summary="node status: identity, disk, studies by state, queue depths, dead letters, workers seen")
def status(request: Request, who: Viewer) -> dict[str, Any]:
    ctx = ctx_of(request)
    s = ctx.settings
    counts = {**{state: 0 for state in STUDY_STATES}, **ctx.store.count_studies_by_state()}
    return {
        "ae_title": s.node.ae_title, "dicom_port": s.node.port, "scp_processes": s.node.scp_processes,
        "store": "postgresql" if s.database_url.startswith("postgres") else "sqlite", "embedded": s.embedded,
        "disk": spool_disk(s), "studies_by_state": counts, "queue_depths": ctx.queue_depths(),
        "dead_letters": len(ctx.store.list_deliveries(statuses=("dead",))),
        # Issue 21: results that went nowhere, and destinations whose last attempt failed with objects waiting.
        "undelivered_studies": ctx.store.count_undelivered_studies(),
        "destinations_down": [h.destination for h in ctx.store.list_destination_health() if h.state == "down"],
        "api_uptime_s": round(time.monotonic() - ctx.started, 1), "hostname": socket.gethostname(),
        "workers": workers(ctx.settings, ctx.store), "certificates": certificates(ctx.settings, ctx.store),
    }  # fmt: skip
