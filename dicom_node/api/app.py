"""The operations API: FastAPI application over the state store (OpenAPI at ``/openapi.json``).

Everything under ``/api`` needs an account: an API token (``Authorization: Bearer axn_...``) or a
console session cookie (``POST /api/auth/login``; state-changing requests must then echo the
session's CSRF token in ``X-CSRF-Token``). ``/healthz`` and ``/readyz`` answer without, and so does
``/metrics`` unless ``http.metrics_token_file`` is set (then it needs that token as a Bearer token).
Roles: ``viewer`` reads, ``operator`` also echoes, resends and reanalyses, ``admin`` also changes remote nodes and accounts. Errors are RFC 9457 problem details
(``application/problem+json``) whose ``detail`` says what was wrong.

The endpoints call the same functions as the CLI and the console (:mod:`dicom_node.ops`: node
validation, echo, the ``studies`` view, study selection, resend, reanalysis), so all behave alike.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from dicom_node.api.deps import ApiContext, install_error_handlers, problem_responses_in_schema
from dicom_node.api.routers import accounts, audit, auth, dicomweb_read, dicomweb_stow, health, node_status, nodes, profiles, remote_workers, rules, studies
from dicom_node.settings import Settings
from dicom_node.store.base import Store

#: The routers in the order their routes are matched and listed in the schema.
ROUTERS = (health, auth, accounts, nodes, studies, audit, node_status, rules, profiles, dicomweb_read, dicomweb_stow, remote_workers)


def create_api(settings: Settings, store: Store) -> FastAPI:
    """The operations API over ``store`` (the HTTP process adds the console: :func:`dicom_node.web.app.create_app`)."""
    app = FastAPI(
        title="AnatomiX Node operations API",
        version="1",
        description=__doc__,
        # No /docs or /redoc: they load their JavaScript from a CDN, which hospital networks block.
        docs_url=None,
        redoc_url=None,
    )
    app.state.ctx = ApiContext(settings, store)
    install_error_handlers(app)
    for module in ROUTERS:
        app.include_router(module.router)
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problem_responses_in_schema(original())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the generated schema
    return app
