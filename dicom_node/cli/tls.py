"""``anatomix-node tls status``: each configured certificate, its subject and days left."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict

from dicom_node.cli.node import _add_config_option, opened_store
from dicom_node.net.tls import certificate_status
from dicom_node.ops.errors import UserError
from dicom_node.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    tls = subparsers.add_parser("tls", help="DICOM TLS: certificates in use and when they expire")
    tls_actions = tls.add_subparsers(dest="tls_command", metavar="ACTION")
    status = tls_actions.add_parser("status", help="each configured certificate: subject, not after, days left (exit 1 if one is expired)")
    _add_config_option(status)
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=run_tls_status)

    def missing(args: argparse.Namespace) -> int:
        raise UserError("`tls` needs an action: status (see anatomix-node tls --help)")

    tls.set_defaults(func=missing)


def run_tls_status(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        nodes = store.list_remote_nodes()
    statuses = certificate_status(settings, nodes)
    warn_days = settings.tls.expiry_warning_days
    if args.json:
        print(json.dumps({
            "scp_tls": settings.tls.enabled, "tls_port": settings.tls.port if settings.tls.enabled else None,
            "warning_days": warn_days,
            "certificates": [{**asdict(s), "warning": s.warning(warn_days)} for s in statuses],
        }, indent=2))  # fmt: skip
    else:
        if settings.tls.enabled:
            required = "required" if settings.tls.require_client_certificate else "optional"
            print(f"SCP TLS on port {settings.tls.port} (client certificates {required}, {settings.tls.min_version} or later)")
        else:
            print("SCP TLS off (tls.enabled = false)")
        if not statuses:
            print("no certificates configured")
        for status in statuses:
            if status.error is not None:
                print(f"{status.role}: {status.path}: {status.error}")
            else:
                print(f"{status.role}: {status.subject}, not after {status.not_after} ({status.days_left:.0f} days left) [{status.path}]")
        for status in statuses:
            warning = status.warning(warn_days)
            if warning is not None:
                print(f"anatomix-node: warning: {warning}", file=sys.stderr)
    broken = any(s.error is not None or (s.days_left is not None and s.days_left < 0) for s in statuses)
    return 1 if broken else 0
