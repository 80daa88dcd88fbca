"""DICOMweb destinations as the CLI, the API and the console configure them (issue 23).

A remote node with a base URL receives results by STOW-RS and is echoed by QIDO-RS
(:mod:`dicom_node.pipeline.delivery_dicomweb`). Its credentials live in files, never in the state
store: a bearer token file or a basic auth file (one line ``user:password``), and for an https URL
optionally a CA file. The CLI names files on the host; the API and the console, whose users do not
own the host, send the secret itself, which :func:`write_credentials` keeps in a file of the node's
own (``storage.data_dir/dicomweb/``, mode 0600), so that an API account can never make the node read
(and send away) a file of its choosing.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dicom_node.ops.errors import UserError
from dicom_node.settings import Settings
from dicom_node.store.base import RemoteNode

#: How the validation names the DICOMweb fields by default (the API's body fields); the CLI passes its options.
DICOMWEB_LABELS = {"url": "url", "auth_token_file": "auth_token_file", "basic_auth_file": "basic_auth_file", "ca_file": "ca_file"}
#: Where the API and the console keep the credentials they are given, under storage.data_dir.
CREDENTIALS_DIR = "dicomweb"


def dicomweb_fields(
    url: str | None, auth_token_file: str | None, basic_auth_file: str | None, ca_file: str | None, role: str, label: Mapping[str, str]
) -> dict[str, Any]:
    """The checked DICOMweb columns of a node (``url``, ``auth_token_file``, ``basic_auth_file``,
    ``tls_ca_file``) plus the URL's ``host`` and ``port``; UserError naming the bad field by ``label``.

    Files must exist now and are kept as absolute paths; the credential files' contents are checked
    (not empty; user:password) but not kept.
    """
    from dicom_node.pipeline.delivery_dicomweb import DicomwebError, basic_credentials, read_credential

    if not url:
        given = [label[k] for k, v in (("auth_token_file", auth_token_file), ("basic_auth_file", basic_auth_file), ("ca_file", ca_file)) if v]
        raise UserError(f"{', '.join(given)}: only for a DICOMweb node; give its base URL with {label['url']}")
    if role == "source":
        raise UserError(f"{label['url']} is where we send results by STOW-RS: a source needs none (use role destination or both)")
    clean = url.strip().rstrip("/")
    try:
        parts = urlsplit(clean)
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
    except ValueError as exc:
        raise UserError(f"{label['url']} {url!r}: not a usable URL ({exc})") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise UserError(f"{label['url']} {url!r}: give the DICOMweb base URL, e.g. https://pacs.example.org/dicom-web")
    if parts.username or parts.password:
        raise UserError(f"{label['url']}: no credentials in the URL; put them in a file ({label['basic_auth_file']})")
    if parts.query or parts.fragment or any(c.isspace() for c in clean):
        raise UserError(f"{label['url']} {url!r}: the base URL takes no query, fragment or spaces")
    if auth_token_file and basic_auth_file:
        raise UserError(f"{label['auth_token_file']} and {label['basic_auth_file']}: give one of them")
    fields: dict[str, Any] = {"url": clean, "host": parts.hostname, "port": port, "auth_token_file": None, "basic_auth_file": None, "tls_ca_file": None}
    try:
        if auth_token_file:
            fields["auth_token_file"] = _existing(auth_token_file, label["auth_token_file"])
            read_credential(fields["auth_token_file"], "auth token")
        if basic_auth_file:
            fields["basic_auth_file"] = _existing(basic_auth_file, label["basic_auth_file"])
            basic_credentials(fields["basic_auth_file"])
    except DicomwebError as exc:
        raise UserError(str(exc)) from None
    if ca_file:
        if parts.scheme.lower() != "https":
            raise UserError(f"{label['ca_file']}: only for an https URL")
        fields["tls_ca_file"] = _existing(ca_file, label["ca_file"])
        try:
            ssl.create_default_context(cafile=fields["tls_ca_file"])
        except (ssl.SSLError, OSError, ValueError):
            raise UserError(f"{label['ca_file']} {ca_file}: holds no PEM CA certificate") from None
    return fields


def _existing(path: str, label: str) -> str:
    resolved = Path(path).expanduser().resolve()
    if not resolved.is_file():
        raise UserError(f"{label} {path}: no such file")
    return str(resolved)


def describe_auth(node: RemoteNode) -> str:
    """``bearer token``, ``basic auth`` or ``no auth`` (never the secret)."""
    return "bearer token" if node.auth_token_file else "basic auth" if node.basic_auth_file else "no auth"


def write_credentials(settings: Settings, name: str, *, auth_token: str | None = None, basic_auth: str | None = None,
                      ca_pem: str | None = None) -> dict[str, str]:  # fmt: skip
    """Keep secrets given through the API in files of the node's own; the paths, by field name.

    ``basic_auth`` is ``user:password``. Written atomically with mode 0600 under
    ``storage.data_dir/dicomweb/``; the caller validates the node with these paths.
    """
    directory = settings.storage.data_dir / CREDENTIALS_DIR
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    paths = {}
    for field, value, suffix in (("auth_token_file", auth_token, "token"), ("basic_auth_file", basic_auth, "basic"), ("ca_file", ca_pem, "ca.pem")):
        if value is None:
            continue
        if field != "ca_file" and ("\n" in value.strip() or not value.strip()):
            raise UserError(f"{field.removesuffix('_file')}: one line, not empty")
        target = directory / f"{name}.{suffix}"
        temporary = target.with_name(target.name + ".new")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
            handle.write(value.strip() + "\n")
        os.replace(temporary, target)
        paths[field] = str(target)
    return paths


def echo_dicomweb(node: RemoteNode, timeout: float) -> float:
    """QIDO-RS echo: milliseconds round trip; UserError with one line saying what failed."""
    from dicom_node.pipeline.delivery_dicomweb import DicomwebError, qido_echo

    try:
        return qido_echo(node, timeout)
    except DicomwebError as exc:
        raise UserError(str(exc)) from None
