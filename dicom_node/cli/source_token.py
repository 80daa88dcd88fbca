"""``anatomix-node ae token add|list|revoke``: tokens bound to source nodes, for STOW-RS (issue 23).

A source token lets a sender store by STOW-RS as that source node (docs/security.md, "STOW-RS").
The secret is printed once; only its SHA-256 is stored. Every change is audited with the OS user.
"""

from __future__ import annotations

import argparse
from datetime import UTC, datetime

from dicom_node.cli.user import _audit, _open
from dicom_node.ops.errors import UserError
from dicom_node.ops.source_tokens import SourceTokenRefused, create_source_token


def register_ae_token(ae_actions: argparse._SubParsersAction) -> None:
    """``ae token ...`` (called by :mod:`dicom_node.cli.node` where it builds ``ae``)."""
    token = ae_actions.add_parser("token", help="tokens bound to a source node, for STOW-RS: add, list, revoke")
    token.set_defaults(func=_missing)
    actions = token.add_subparsers(dest="token_command", metavar="ACTION")
    add = actions.add_parser("add", help="create a token bound to a source node (printed once)")
    add.add_argument("name", help="the source node (role source or both)")
    add.add_argument("--label", default="stow", help="what the token is for (default: stow)")
    add.set_defaults(func=cmd_add)
    listing = actions.add_parser("list", help="list source tokens (of one node, or all)")
    listing.add_argument("name", nargs="?")
    listing.set_defaults(func=cmd_list)
    revoke = actions.add_parser("revoke", help="revoke a source token by its id")
    revoke.add_argument("token_id", type=int)
    revoke.set_defaults(func=cmd_revoke)
    for parser in (add, listing, revoke):
        parser.add_argument("--config", default=None, metavar="FILE", help="settings file (default: ./anatomix-node.toml if present)")


def _missing(args: argparse.Namespace) -> int:
    raise UserError("`ae token` needs an action: add, list or revoke (see anatomix-node ae token --help)")


def cmd_add(args: argparse.Namespace) -> int:
    store, trail = _open(args)
    try:
        try:
            secret, token = create_source_token(store, args.name, args.label)
        except SourceTokenRefused as exc:
            raise UserError(f"{exc}; see `anatomix-node ae list`") from None
        _audit(trail, "source_token_created", args.name, after={"id": token.id, "label": token.label})
    finally:
        store.close()
    print(f"token {token.id} for source {args.name} ({args.label}); shown once, send it with STOW-RS as 'Authorization: Bearer <token>':")
    print(secret)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store, _ = _open(args)
    try:
        tokens = store.list_source_tokens(args.name)
    finally:
        store.close()
    print(f"{'ID':>4}  {'NODE':<20} {'LABEL':<20} {'CREATED':<20} {'LAST USED':<20} STATE")
    for t in tokens:
        used = t.last_used_at.strftime("%Y-%m-%d %H:%M:%S") if t.last_used_at else "never"
        state = "revoked" if t.revoked_at else "active"
        print(f"{t.id:>4}  {t.node_name:<20} {t.label:<20} {t.created_at.strftime('%Y-%m-%d %H:%M:%S'):<20} {used:<20} {state}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    store, trail = _open(args)
    try:
        token = next((t for t in store.list_source_tokens() if t.id == args.token_id), None)
        if token is None or not store.revoke_source_token(args.token_id, datetime.now(UTC)):
            raise UserError(f"no unrevoked source token {args.token_id}; see `anatomix-node ae token list`")
        _audit(trail, "source_token_revoked", token.node_name, before={"id": token.id, "label": token.label})
    finally:
        store.close()
    print(f"source token {args.token_id} of {token.node_name} revoked")
    return 0
