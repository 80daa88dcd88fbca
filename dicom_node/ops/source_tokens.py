"""Tokens bound to source nodes (STOW-RS, issue 23), shared by the CLI and the operations API.

A source token is a 256-bit random secret with the prefix ``axs_`` (API account tokens have
``axn_``); only its SHA-256 is stored (:mod:`dicom_node.store.source_tokens`). Whoever presents
it sends as that source node: the audit, the metrics and the studies name the node's AE title, as
for a C-STORE from it, and results go back to it by the same routing.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime

from dicom_node.store.base import RemoteNode, SourceToken, Store

PREFIX = "axs_"


class SourceTokenRefused(ValueError):
    """A token cannot be made for this node (unknown, or not a source)."""


def token_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def create_source_token(store: Store, node_name: str, label: str) -> tuple[str, SourceToken]:
    """(the secret, shown once; the stored token) for the source node ``node_name``."""
    node = store.get_remote_node(node_name)
    if node is None:
        raise SourceTokenRefused(f"no remote node named {node_name!r}")
    if not node.is_source:
        raise SourceTokenRefused(f"{node_name} is a {node.role} node: a token may only be bound to a source (role source or both)")
    secret = PREFIX + secrets.token_urlsafe(32)
    return secret, store.add_source_token(node_name, label, token_hash(secret), datetime.now(UTC))


def source_for_token(store: Store, secret: str) -> tuple[RemoteNode | None, str]:
    """The source node a presented token is bound to, or (None, why not)."""
    if not secret.startswith(PREFIX):
        return None, f"not a source token (they start with {PREFIX}; API account tokens cannot store)"
    token = store.find_source_token(token_hash(secret), datetime.now(UTC))
    if token is None:
        return None, "the source token is unknown or revoked"
    node = store.get_remote_node(token.node_name)
    if node is None or not node.is_source:
        return None, f"the token's node {token.node_name} is no longer a source"
    return node, ""
