"""``ae add|update`` options of a DICOMweb destination (issue 23): ``--url``, ``--auth-token-file``,
``--basic-auth-file``, ``--ca-file``; the checks themselves are :func:`dicom_node.ops.dicomweb_nodes.dicomweb_fields`'."""

from __future__ import annotations

import argparse
from typing import Any

from dicom_node.ops.errors import UserError
from dicom_node.store.base import RemoteNode

#: How the shared validation names the DICOMweb fields: by their ``ae add`` options.
CLI_LABELS = {"url": "--url", "auth_token_file": "--auth-token-file", "basic_auth_file": "--basic-auth-file", "ca_file": "--ca-file"}
#: The DICOM TLS options, which a DICOMweb node does not take (its TLS is https, its CA --ca-file).
_DIMSE_TLS = ("tls", "tls_ca", "tls_cert", "tls_key", "tls_verify", "tls_hostname_check")


def add_dicomweb_options(parser: argparse.ArgumentParser, update: bool) -> None:
    clears = ' ("" removes it)' if update else ""
    parser.add_argument("--url", default=None, metavar="BASE_URL",
                        help="a DICOMweb destination: its base URL (e.g. https://pacs.example.org/dicom-web); results go by STOW-RS, "
                             "echo is a QIDO-RS query; host and port come from it" + (" (\"\" makes it a DIMSE node again)" if update else ""))  # fmt: skip
    auth = parser.add_mutually_exclusive_group()
    auth.add_argument("--auth-token-file", default=None, metavar="FILE", help="with --url: a file holding the bearer token" + clears)
    auth.add_argument("--basic-auth-file", default=None, metavar="FILE", help="with --url: a file holding one line user:password" + clears)
    parser.add_argument("--ca-file", default=None, metavar="PEM", help="with an https --url: CAs trusted for its certificate (default: certifi's)" + clears)


def dimse_tls_given(args: argparse.Namespace) -> list[str]:
    """The DICOM TLS options given on the command line (a DICOMweb node takes none)."""
    return ["--" + name.replace("_", "-") for name in _DIMSE_TLS if getattr(args, name, None) is not None]


def dicomweb_values(args: argparse.Namespace, current: RemoteNode | None) -> dict[str, Any]:
    """``url``, ``auth_token_file``, ``basic_auth_file``, ``ca_file`` for the shared validation: the
    options given over ``current`` (``ae update``: "" removes one; a new credential file replaces the other kind)."""
    url = current.url if current else None
    token = current.auth_token_file if current else None
    basic = current.basic_auth_file if current else None
    ca = current.tls_ca_file if current and current.url else None
    if args.url is not None:
        url = args.url or None
    if args.auth_token_file is not None:
        token, basic = args.auth_token_file or None, None if args.auth_token_file else basic
    if args.basic_auth_file is not None:
        basic, token = args.basic_auth_file or None, None if args.basic_auth_file else token
    if args.ca_file is not None:
        ca = args.ca_file or None
    if args.url == "" and not (args.auth_token_file or args.basic_auth_file or args.ca_file):
        token = basic = ca = None  # back to a DIMSE node: its DICOMweb credentials go too
    if url and dimse_tls_given(args):
        raise UserError(f"{', '.join(dimse_tls_given(args))}: DICOM TLS options; a DICOMweb node uses an https --url and --ca-file")
    return {"url": url, "auth_token_file": token, "basic_auth_file": basic, "ca_file": ca}
