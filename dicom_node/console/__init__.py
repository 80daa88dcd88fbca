"""The web console: server-rendered pages (Jinja2) on the operations API's HTTP port, under ``/console``.

Every page authenticates like the API (the session cookie of ``POST /api/auth/login``) and needs the
role the matching API endpoint needs; every action (echo, resend, reanalyse, node changes, logout) is
a ``fetch`` from ``static/console.js`` to the API itself, with the session's CSRF token. The console
adds no privileged path: what the API refuses a role, the console cannot do.
"""

from __future__ import annotations

from fastapi import FastAPI


def mount(app: FastAPI) -> None:
    """Add the console's pages and static files to the API application."""
    from dicom_node.console.views import install

    install(app)
