"""The console's pages. Reads need the role of the matching API endpoint (viewer for everything
shown); writes are made by the browser against ``/api`` (see ``static/console.js``)."""

from __future__ import annotations

import io
import json
from collections import Counter, OrderedDict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from urllib.parse import quote, urlencode
from zoneinfo import ZoneInfo

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from dicom_node.api import auth
from dicom_node.api.auth import Principal
from dicom_node.api.deps import Problem, authenticate, ctx_of
from dicom_node.ops.node_status import last_model_identity, readiness, spool_disk
from dicom_node.ops.preview import demo_preview_png, demo_source_and_result
from dicom_node.settings import Settings
from dicom_node.store.base import STUDY_STATES, ApiAccountStore, StudyRecord
from sr_writer.kinds import KINDS

HERE = Path(__file__).resolve().parent
PAGE_SIZE = 50
AUDIT_PAGE_SIZE = 50
#: Minutes per bar of the dashboard's last-hour charts.
BUCKET_MIN = 5


class Forbidden(Exception):
    def __init__(self, who: Principal, needed: str, what: str) -> None:
        super().__init__(what)
        self.who, self.needed, self.what = who, needed, what


class NotLoggedIn(Exception):
    pass


class MustChangePassword(Exception):
    """The account logged in with a generated (one-time) password: only its password page opens."""


def accounts_of(request: Request) -> ApiAccountStore:
    """The state store's account half (the API's accounts, tokens and sessions)."""
    return cast(ApiAccountStore, ctx_of(request).store)


def auth_roles() -> tuple[str, ...]:
    from dicom_node.store.base import API_ROLES

    return tuple(API_ROLES)


def dicom_date(value: str | None) -> str:
    """A DICOM DA (``20040826``) as ``2004-08-26``; anything else as it is."""
    text = (value or "").strip()
    if len(text) == 8 and text.isdigit():
        try:
            return datetime.strptime(text, "%Y%m%d").date().isoformat()
        except ValueError:
            return text
    return text


#: DIMSE status codes a C-STORE answer may carry (PS3.4 B.2.3, PS3.7 C), in words.
_DIMSE_STATUS = {0x0000: "success", 0xB000: "warning: coercion of data elements", 0xB007: "warning: data set does not match SOP class",
                 0xB006: "warning: elements discarded", 0xA700: "refused: out of resources", 0xA900: "error: data set does not match SOP class",
                 0xC000: "error: cannot understand", 0x0122: "refused: SOP class not supported", 0x0110: "processing failure",
                 0x0117: "invalid object instance", 0x0124: "refused: not authorised", 0x0211: "unrecognised operation",
                 0x0212: "mistyped argument"}  # fmt: skip


def dimse_status(value: int | None) -> str:
    """A DIMSE status as words with its code: ``success (0x0000)``, ``refused: out of resources (0xA700)``."""
    if value is None:
        return ""
    words = _DIMSE_STATUS.get(value) or ("refused: out of resources" if 0xA700 <= value <= 0xA7FF else
                                         "error: cannot understand" if 0xC000 <= value <= 0xCFFF else "status")  # fmt: skip
    return f"{words} (0x{value:04X})"


def ohif_link(settings: Settings, study: StudyRecord) -> str | None:
    """The study in OHIF (``http.ohif_url``), whose data source is this node's /dicomweb; None when unset or purged."""
    if not settings.http.ohif_url or study.state == "purged":
        return None
    return f"{settings.http.ohif_url.rstrip('/')}/viewer?{urlencode({'StudyInstanceUIDs': study.study_instance_uid})}"


def short_uid(value: str | None, keep: int = 10) -> str:
    """``1.2.826.0…123456789`` for a long UID (the page puts the whole value in ``title``)."""
    if not value:
        return ""
    return value if len(value) <= 2 * keep + 1 else f"{value[:keep]}…{value[-keep:]}"


def install(app: FastAPI) -> None:
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    env = templates.env
    env.filters["short_uid"] = short_uid
    env.filters["num"] = lambda v: f"{round(float(v), 1):g}"
    env.filters["dicom_date"] = dicom_date
    env.filters["dimse_status"] = dimse_status
    env.filters["seconds"] = lambda s: "" if s is None else (f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min")

    def zone(request: Request) -> ZoneInfo:
        return ZoneInfo(ctx_of(request).settings.http.time_zone)

    app.mount("/console/static", StaticFiles(directory=str(HERE / "static")), name="console-static")

    def principal(request: Request) -> Principal:
        cookie = request.cookies.get(auth.SESSION_COOKIE)
        if not cookie:
            raise NotLoggedIn()
        try:
            return authenticate(request, None, cookie)
        except Problem as exc:
            if exc.status == 401:
                raise NotLoggedIn() from None
            raise

    def need(request: Request, role: str, what: str, password_page: bool = False) -> Principal:
        who = principal(request)
        if who.must_change_password and not password_page:
            raise MustChangePassword()
        if not auth.role_at_least(who.role, role):
            raise Forbidden(who, role, what)
        return who

    def render(request: Request, name: str, who: Principal | None, status: int = 200, **context: Any) -> HTMLResponse:
        tz = zone(request)

        def local(value: Any) -> str:
            if not value:
                return ""
            at = datetime.fromisoformat(value) if isinstance(value, str) else value
            return at.astimezone(tz).strftime("%Y-%m-%d %H:%M:%S %Z")

        can = {r: bool(who and auth.role_at_least(who.role, r)) for r in ("viewer", "operator", "admin")}
        response = templates.TemplateResponse(
            request,
            name,
            {"who": who, "can": can, "local": local, "time_zone": str(tz), "path": request.url.path, **context},
            status_code=status,
        )
        response.headers["Cache-Control"] = "no-store"
        response.headers["Content-Security-Policy"] = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
        return response

    @app.exception_handler(NotLoggedIn)
    async def on_not_logged_in(request: Request, exc: NotLoggedIn) -> Response:
        return RedirectResponse("/console/login?next=" + quote(str(request.url.path) + (f"?{request.url.query}" if request.url.query else "")), 303)

    @app.exception_handler(MustChangePassword)
    async def on_must_change(request: Request, exc: MustChangePassword) -> Response:
        return RedirectResponse("/console/account?first=1", 303)

    @app.exception_handler(Forbidden)
    async def on_forbidden(request: Request, exc: Forbidden) -> Response:
        return render(request, "forbidden.html", exc.who, 403, needed=exc.needed, what=exc.what)

    # ---- login ---------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    def root() -> Response:
        return RedirectResponse("/console/", 303)

    @app.get("/favicon.ico", include_in_schema=False)
    def favicon() -> Response:
        return Response((HERE / "static" / "favicon.ico").read_bytes(), media_type="image/x-icon", headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/console/login", include_in_schema=False)
    def login_page(request: Request, next: str = "/console/") -> HTMLResponse:
        safe_next = next if next.startswith("/console/") and not next.startswith("//") else "/console/"
        return render(request, "login.html", None, next=safe_next)

    # ---- dashboard -------------------------------------------------------------------------------------
    @app.get("/console/", include_in_schema=False)
    def dashboard(request: Request) -> HTMLResponse:
        who = need(request, "viewer", "see the dashboard")
        ctx = ctx_of(request)
        counts = {**{s: 0 for s in STUDY_STATES}, **ctx.store.count_studies_by_state()}
        checks = readiness(ctx.settings, ctx.store, ctx.celery)
        disk = checks.get("spool_disk", {})
        usage = spool_disk(ctx.settings)
        used_pct = None
        if "total_bytes" in usage and usage["total_bytes"]:
            used_pct = round(100 * (1 - usage["free_bytes"] / usage["total_bytes"]), 1)
        m = ctx.settings.model
        identity = last_model_identity(ctx.store)
        demo = bool(m.demo_weights or (identity or {}).get("demo"))
        failures = sorted(ctx.store.list_deliveries(statuses=("failed", "dead")), key=lambda d: d.updated_at, reverse=True)[:10]
        failed_studies = ctx.store.list_studies(("failed",), limit=10)
        charts = _charts(ctx.store, datetime.now(UTC), zone(request))
        return render(request, "dashboard.html", who, counts=counts, checks=checks, disk=usage, used_pct=used_pct, disk_ok=disk.get("ok"),
                      model=m, identity=identity, demo=demo, failures=failures, failed_studies=failed_studies, charts=charts,
                      queue_depths=ctx.queue_depths(), **delivery_truth(ctx.store))  # fmt: skip

    # ---- studies ---------------------------------------------------------------------------------------
    def studies_context(request: Request) -> dict[str, Any]:
        from dicom_node.ops.studies import stage_durations, study_outcome

        ctx = ctx_of(request)
        q = request.query_params
        states = tuple(s for s in q.getlist("state") if s in STUDY_STATES)
        source = (q.get("source") or "").strip()[:64] or None
        search = (q.get("uid") or "").strip()[:64] or None
        before = None
        error = None
        if q.get("before"):
            try:
                at, uid = q["before"].split("|", 1)
                before = (datetime.fromisoformat(at), uid)
            except ValueError:
                error = "the page link is not valid: showing the newest studies"
        rows = ctx.store.page_studies(states or None, source, search, before, PAGE_SIZE + 1)  # type: ignore[attr-defined]
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        now = datetime.now(UTC)
        counts = ctx.store.instance_state_counts([(s.study_instance_uid, s.version) for s in rows])  # type: ignore[attr-defined]
        studies = []
        for study in rows:
            outcome = study_outcome(study)
            stages = stage_durations(study.history or study.state_times, study.state, now)
            if outcome == "skipped":
                stages = [stage for stage in stages if stage["state"] != "analyzing"]
            studies.append({
                "study_instance_uid": study.study_instance_uid, "version": study.version, "state": study.state, "outcome": outcome,
                "source_ae": study.source_ae, "source_node": study.source_node, "instance_states": counts[(study.study_instance_uid, study.version)],
                "stages": stages, "last_received_at": study.last_received_at, **_header(ctx.settings.storage.spool_dir, ctx.store, study),
            })  # fmt: skip
        filters = [("state", s) for s in states] + ([("source", source)] if source else []) + ([("uid", search)] if search else [])
        next_url = None
        if more and rows:
            last = rows[-1]
            next_url = "/console/studies?" + urlencode([*filters, ("before", f"{last.created_at.isoformat()}|{last.study_instance_uid}")])
        return {"studies": studies, "states": states, "source": source or "", "search": search or "", "next_url": next_url,
                "first_url": "/console/studies?" + urlencode(filters) if before else None, "all_states": STUDY_STATES, "error": error,
                "refresh_url": "/console/studies/rows?" + urlencode([*filters, *([("before", q["before"])] if q.get("before") else [])])}  # fmt: skip

    @app.get("/console/studies", include_in_schema=False)
    def studies_page(request: Request) -> HTMLResponse:
        who = need(request, "viewer", "list studies")
        return render(request, "studies.html", who, **studies_context(request))

    @app.get("/console/studies/rows", include_in_schema=False)
    def studies_rows(request: Request) -> HTMLResponse:
        who = need(request, "viewer", "list studies")
        return render(request, "_studies_rows.html", who, **studies_context(request))

    def study_context(request: Request, uid: str) -> dict[str, Any]:
        from dicom_node.ops.studies import delivery_summary, study_summary

        ctx = ctx_of(request)
        study = ctx.store.get_study(uid)
        if study is None:
            return {"study": None, "uid": uid}
        summary = study_summary(study, ctx.store, datetime.now(UTC), spool_dir=ctx.settings.storage.spool_dir)
        summary["deliveries"] = delivery_summary(ctx.store, ctx.settings, study)
        objects = ctx.store.list_produced_objects(uid)
        analyses = ctx.store.list_analyses(uid, study.version)
        findings, report = [], None
        for analysis in analyses:
            try:
                result = json.loads(analysis.result_json) if analysis.result_json else {}
            except ValueError:
                continue
            report = report or _report_text(result)
            findings += _findings(result)
        deliveries = ctx.store.list_deliveries(uid)
        demo_preview = demo_source_and_result(ctx.store, ctx.settings.storage.spool_dir, study) is not None
        has_preview = demo_preview or any(o.kind == "sc" and o.study_version == study.version for o in objects)
        kinds = {o.sop_instance_uid: KINDS[o.kind].title if o.kind in KINDS else o.kind for o in objects}
        return {"study": summary, "record": study, "uid": uid, "objects": objects, "deliveries": deliveries, "findings": findings,
                "report": report, "analyses": analyses, "has_preview": has_preview, "demo_preview": demo_preview, "kinds": kinds,
                "instances": ctx.store.list_instances(uid, study.version), "ohif_link": ohif_link(ctx.settings, study)}  # fmt: skip

    @app.get("/console/studies/{uid}", include_in_schema=False)
    def study_page(request: Request, uid: str) -> HTMLResponse:
        who = need(request, "viewer", "see a study")
        context = study_context(request, uid[:64])
        return render(request, "study.html", who, 200 if context["study"] else 404, **context)

    @app.get("/console/studies/{uid}/live", include_in_schema=False)
    def study_live(request: Request, uid: str) -> HTMLResponse:
        who = need(request, "viewer", "see a study")
        context = study_context(request, uid[:64])
        return render(request, "_study_live.html", who, 200 if context["study"] else 404, **context)

    @app.get("/console/studies/{uid}/preview.png", include_in_schema=False)
    def study_preview(request: Request, uid: str) -> Response:
        need(request, "viewer", "see a study")

        ctx = ctx_of(request)
        study = ctx.store.get_study(uid[:64])
        if study is None:
            return Response("no such study", 404, media_type="text/plain")
        demo = demo_preview_png(ctx.store, ctx.settings.storage.spool_dir, study)  # demo weights: the anatomy prior, labelled
        if demo is not None:
            return Response(demo, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})
        sc = [o for o in ctx.store.list_produced_objects(study.study_instance_uid, study.version) if o.kind == "sc"]
        if not sc:
            return Response("no burned-in result (SC) for this study version", 404, media_type="text/plain")
        png = _sc_png(ctx.settings.storage.results_dir / sc[0].path)
        return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=60"})

    # ---- remote nodes --------------------------------------------------------------------------------------
    @app.get("/console/nodes", include_in_schema=False)
    def nodes_page(request: Request) -> HTMLResponse:
        who = need(request, "viewer", "list remote nodes")
        store = ctx_of(request).store
        return render(request, "nodes.html", who, nodes=store.list_remote_nodes(), **delivery_truth(store))

    @app.get("/console/nodes/new", include_in_schema=False)
    def node_new(request: Request) -> HTMLResponse:
        who = need(request, "admin", "add a remote node")
        return render(request, "node_form.html", who, node=None)

    @app.get("/console/nodes/{name}/edit", include_in_schema=False)
    def node_edit(request: Request, name: str) -> HTMLResponse:
        who = need(request, "admin", "change a remote node")
        node = ctx_of(request).store.get_remote_node(name[:64])
        if node is None:
            return render(request, "not_found.html", who, 404, what=f"remote node {name[:64]!r}")
        return render(request, "node_form.html", who, node=node)

    # ---- routing rules -------------------------------------------------------------------------------------
    def rule_choices(request: Request) -> dict[str, Any]:
        from dicom_node.settings import DEFAULT_PROFILES

        ctx = ctx_of(request)
        return {"destinations": [n for n in ctx.store.list_remote_nodes() if n.is_destination],
                "profiles": sorted({**DEFAULT_PROFILES, **ctx.settings.output.profiles}), "conditions": _RULE_CONDITIONS}  # fmt: skip

    @app.get("/console/rules", include_in_schema=False)
    def rules_page(request: Request) -> HTMLResponse:
        from dicom_node.pipeline.routing import list_rules

        who = need(request, "viewer", "list routing rules")
        store = ctx_of(request).store
        latest = store.list_studies(limit=1)
        return render(request, "rules.html", who, rules=list_rules(store), conditions=_RULE_CONDITIONS,
                      latest_uid=latest[0].study_instance_uid if latest else "")  # fmt: skip

    @app.get("/console/rules/new", include_in_schema=False)
    def rule_new(request: Request) -> HTMLResponse:
        who = need(request, "admin", "add a routing rule")
        return render(request, "rule_form.html", who, rule=None, **rule_choices(request))

    @app.get("/console/rules/{name}/edit", include_in_schema=False)
    def rule_edit(request: Request, name: str) -> HTMLResponse:
        from dicom_node.pipeline.routing import get_rule

        who = need(request, "admin", "change a routing rule")
        rule = get_rule(ctx_of(request).store, name[:64])
        if rule is None:
            return render(request, "not_found.html", who, 404, what=f"routing rule {name[:64]!r}")
        return render(request, "rule_form.html", who, rule=rule, **rule_choices(request))

    # ---- failures ------------------------------------------------------------------------------------------
    @app.get("/console/failures", include_in_schema=False)
    def failures_page(request: Request) -> HTMLResponse:
        who = need(request, "viewer", "see failures")
        ctx = ctx_of(request)
        by_study, count = undelivered_by_study(ctx.store)
        studies = ctx.store.list_studies(("failed",), limit=200)
        return render(request, "failures.html", who, by_study=by_study, failed_studies=studies, count=count, **delivery_truth(ctx.store))

    @app.get("/console/failures/live", include_in_schema=False)
    def failures_live(request: Request) -> HTMLResponse:
        who = need(request, "viewer", "see failures")
        store = ctx_of(request).store
        by_study, count = undelivered_by_study(store)
        return render(request, "_failures_live.html", who, by_study=by_study, count=count, **delivery_truth(store))

    # ---- accounts ------------------------------------------------------------------------------------------
    @app.get("/console/account", include_in_schema=False)
    def account_page(request: Request) -> HTMLResponse:
        who = need(request, "viewer", "see your account", password_page=True)
        store = accounts_of(request)
        user = store.get_api_user(who.user)
        tokens = [t for t in store.list_api_tokens(who.user) if t.revoked_at is None]
        return render(request, "account.html", who, user=user, tokens=tokens, first=bool(user and user.must_change_password),
                      min_length=auth.MIN_PASSWORD_LENGTH)  # fmt: skip

    @app.get("/console/accounts", include_in_schema=False)
    def accounts_page(request: Request) -> HTMLResponse:
        who = need(request, "admin", "manage accounts")
        store = accounts_of(request)
        tokens = store.list_api_tokens()
        live = Counter(t.user_name for t in tokens if t.revoked_at is None)
        return render(request, "accounts.html", who, users=store.list_api_users(), live=live,
                      tokens=[t for t in tokens if t.revoked_at is None], roles=auth_roles())  # fmt: skip

    # ---- audit ---------------------------------------------------------------------------------------------
    @app.get("/console/audit", include_in_schema=False)
    def audit_page(request: Request) -> HTMLResponse:
        from dicom_node.audit.describe import EVENT_LABELS, PROBLEM_EVENTS, details, sentence

        who = need(request, "viewer", "read the audit trail")
        ctx = ctx_of(request)
        q = request.query_params
        events = tuple(e for e in q.getlist("event") if e.strip())[:40]
        user = (q.get("user") or "").strip()[:128] or None
        ae = (q.get("ae") or "").strip()[:16] or None
        study = (q.get("study") or "").strip()[:64] or None
        since = until = before = None
        error = None
        try:
            since = _parse_local(q.get("since"), zone(request))
            until = _parse_local(q.get("until"), zone(request))
        except ValueError:
            error = "From/Until: use a date and time such as 2026-11-30 14:00"
        if q.get("before"):
            try:
                before = int(q["before"])
            except ValueError:
                error = "; ".join(filter(None, (error, "the page link is not valid: showing the newest events")))
        rows = ctx.store.page_audit_events(since, until, events, ae, user, study, before, AUDIT_PAGE_SIZE + 1)  # type: ignore[attr-defined]
        more = len(rows) > AUDIT_PAGE_SIZE
        rows = rows[:AUDIT_PAGE_SIZE]
        shown = [{"event": e, "label": EVENT_LABELS.get(e.event, e.event.replace("_", " ")), "sentence": sentence(e), "details": details(e),
                  "problem": e.event in PROBLEM_EVENTS} for e in rows]  # fmt: skip
        filters = [("event", e) for e in events] + [(k, v) for k, v in (("user", user), ("ae", ae), ("study", study),
                   ("since", q.get("since")), ("until", q.get("until"))) if v]  # fmt: skip
        next_url = "/console/audit?" + urlencode([*filters, ("before", str(rows[-1].id))]) if more and rows else None
        export = "/api/audit/export?" + urlencode([(k, v) for k, v in (("event", events[0] if len(events) == 1 else None),
                                                   ("since", since.isoformat() if since else None)) if v])  # fmt: skip
        choices = {**EVENT_LABELS, **{e: e.replace("_", " ") for e in events if e not in EVENT_LABELS}}
        return render(request, "audit.html", who, rows=shown, events=events, choices=choices, user=user or "", ae=ae or "", study=study or "",
                      since=q.get("since") or "", until=q.get("until") or "", error=error, export=export, next_url=next_url,
                      first_url="/console/audit?" + urlencode(filters) if before else None)  # fmt: skip


#: The rule conditions the console shows: (field, label, hint); dicom_node.pipeline.routing.CONDITION_FIELDS in its order.
_RULE_CONDITIONS = (
    ("calling_ae", "Calling AE title", "e.g. MODALITY, CT*"),
    ("source", "Source node", "remote node names or globs"),
    ("modality", "Modality", "e.g. CR, DX"),
    ("body_part", "Body part", "e.g. CHEST"),
    ("institution", "Institution", "e.g. St Mary*"),
    ("station", "Station", "e.g. XR-ROOM-?"),
)


#: Patient ID, accession, date, description per (study, version): read once from a spooled header.
_HEADERS: OrderedDict[tuple[str, int], dict[str, str]] = OrderedDict()
_HEADERS_MAX = 20_000


def _header(spool_dir: Path, store: Any, study: Any) -> dict[str, str]:
    """``cli_node.read_study_header`` of the study's current version, cached (a version's
    instances do not change once it is past receiving; a study still receiving is read each time)."""
    from dicom_node.ops.studies import read_study_header

    key = (study.study_instance_uid, study.version)
    cached = _HEADERS.get(key)
    if cached is not None:
        _HEADERS.move_to_end(key)
        return cached
    header = read_study_header(spool_dir, store.list_instances(study.study_instance_uid, version=study.version)[:3])
    if study.state != "receiving" and any(header.values()):
        _HEADERS[key] = header
        while len(_HEADERS) > _HEADERS_MAX:
            _HEADERS.popitem(last=False)
    return header


def _parse_local(value: str | None, tz: ZoneInfo) -> datetime | None:
    if not value or not value.strip():
        return None
    at = datetime.fromisoformat(value.strip())
    return (at.replace(tzinfo=tz) if at.tzinfo is None else at).astimezone(UTC)


def _report_text(result: dict[str, Any]) -> str | None:
    """The report (findings and impression) of an ``AnalysisResult`` dict, else its answers' text;
    a degenerate model text (a repetition loop, replacement characters) is shown as not usable with
    the reason, as in the DICOM results, never as itself."""
    report = result.get("report")
    if isinstance(report, dict):
        parts = [f"{key.capitalize()}: {_shown(report[key])}" for key in ("findings", "impression") if str(report.get(key) or "").strip()]
        raw = str(report.get("raw_text") or "").strip()
        return "\n".join(parts) or (_shown(raw) if raw else None)
    answers = [_shown(a["raw_text"]) for a in result.get("answers") or [] if isinstance(a, dict) and a.get("raw_text")]
    return "\n".join(answers) or None


def _shown(text: Any) -> str:
    """A model text as the console shows it (the writer's rule, ``sr_writer.text.usable_model_text``)."""
    from sr_writer.text import usable_model_text

    return usable_model_text(str(text))[0]


def _findings(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Findings (label, text, probability, boxes) of an ``AnalysisResult`` dict."""
    return [
        {"label": str(f.get("label") or ""), "text": _shown(f.get("text")) if f.get("text") else "", "probability": f.get("probability"),
         "boxes": len(f.get("boxes") or ())}
        for f in result.get("findings") or [] if isinstance(f, dict)
    ]  # fmt: skip


def _sc_png(path: Path, max_side: int = 1024) -> bytes:
    """The burned-in Secondary Capture as a PNG, scaled to at most ``max_side`` pixels."""
    import numpy as np
    import pydicom
    from PIL import Image

    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array
    if pixels.ndim == 2:
        pixels = pixels.astype(np.float32)
        low, high = float(pixels.min()), float(pixels.max())
        pixels = ((pixels - low) / max(high - low, 1.0) * 255).astype(np.uint8)
        if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":
            pixels = 255 - pixels
        image = Image.fromarray(pixels, "L")
    else:
        image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    image.thumbnail((max_side, max_side))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def _nice_top(value: float) -> float:
    """The y axis' top: 1, 2 or 5 times a power of ten, at least ``value`` (and 1 for an empty chart)."""
    import math

    if value <= 1:
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    return float(next(step * power for step in (1, 2, 5, 10) if step * power >= value))


def _charts(store: Any, now: datetime, tz: ZoneInfo | None = None) -> dict[str, Any]:
    """Per 5 minutes of the last hour: studies finished (done) and their mean receive-to-done time,
    with each bar's start time (HH:MM in ``tz``) and round axis tops."""
    since = now - timedelta(hours=1)
    entries = store.state_entries_since(since)
    buckets = 60 // BUCKET_MIN
    done = [0] * buckets
    for state, at in entries:
        if state == "done":
            done[min(buckets - 1, int((at - since).total_seconds() // (BUCKET_MIN * 60)))] += 1
    recent = [s for s in store.list_studies(("done",), limit=500) if s.state_times.get("done") and s.state_times["done"] >= since]
    latency: list[list[float]] = [[] for _ in range(buckets)]
    for s in recent:
        at = s.state_times["done"]
        latency[min(buckets - 1, int((at - since).total_seconds() // (BUCKET_MIN * 60)))].append((at - s.created_at).total_seconds())
    mean = [round(sum(v) / len(v), 1) if v else 0.0 for v in latency]
    zone = tz or ZoneInfo("UTC")
    labels = [(since + timedelta(minutes=BUCKET_MIN * i)).astimezone(zone).strftime("%H:%M") for i in range(buckets)]
    return {"done": done, "latency": mean, "total_done": sum(done), "bucket_min": BUCKET_MIN, "labels": labels,
            "end_label": now.astimezone(zone).strftime("%H:%M"), "done_max": _nice_top(max(done)), "latency_max": _nice_top(max(mean)),
            "counts": Counter(state for state, _ in entries)}  # fmt: skip


def delivery_truth(store: Any) -> dict[str, Any]:
    """Where results go and how each destination fares (dashboard, nodes and failures pages, issue 21):
    ``destinations`` (health rows, see :func:`dicom_node.ops.remotes.destination_health`), ``nowhere``
    (the warning when no destination would get results), ``waiting`` (objects still to send, all
    destinations), ``undelivered`` (done studies whose results went nowhere: the newest, and how many)."""
    from dicom_node.ops.remotes import destination_health, where_results_go
    from dicom_node.store.base import NO_DESTINATION

    destinations = destination_health(store)
    _, nowhere = where_results_go(store.list_remote_nodes(), store.list_routing_rules())
    undelivered = [s for s in store.list_studies(("done",), limit=200) if NO_DESTINATION in (s.error or "")][:20]
    return {"destinations": destinations, "nowhere": nowhere, "waiting": sum(d["waiting"] for d in destinations),
            "undelivered": undelivered, "undelivered_count": store.count_undelivered_studies()}  # fmt: skip


def undelivered_by_study(store: Any) -> tuple[dict[str, list[Any]], int]:
    """Failed and dead-lettered deliveries grouped by study, newest first, and how many there are
    (the failures page and its self-updating fragment show the same thing)."""
    rows = store.list_deliveries(statuses=("failed", "dead"))
    by_study: dict[str, list[Any]] = {}
    for d in sorted(rows, key=lambda d: d.updated_at, reverse=True):
        by_study.setdefault(d.study_instance_uid, []).append(d)
    return by_study, len(rows)
