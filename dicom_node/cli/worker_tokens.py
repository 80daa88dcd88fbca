"""``anatomix-node worker-token``: tokens of analyze workers on other hosts (add, list, revoke).

A worker that reaches the node over HTTP (``worker --api-url URL --token-file F``), without the
node's data directory or database, authenticates with a worker token. It may read studies over
DICOMweb and report analyses, nothing else. The secret is shown (or written to ``--out``) once;
only its SHA-256 is stored. Every change is audited with the OS user.
"""

from __future__ import annotations

import argparse
import os
import re
from datetime import UTC, datetime
from pathlib import Path

from dicom_node.cli.user import _audit, _open
from dicom_node.ops.errors import UserError
from dicom_node.store.base import StoreConflict

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def register(subparsers: argparse._SubParsersAction) -> None:
    tokens = subparsers.add_parser("worker-token", help="tokens of analyze workers on other hosts (over HTTP): add, list, revoke")
    tokens.set_defaults(func=_missing)
    actions = tokens.add_subparsers(dest="worker_token_command", metavar="ACTION")
    add = actions.add_parser("add", help="create a worker token (printed once, or written to --out)")
    add.add_argument("name", help="the worker (host) it is for: letters, digits, . _ @ -")
    add.add_argument("--out", metavar="FILE", help="write the token to this new file (mode 0600) instead of printing it")
    add.set_defaults(func=cmd_add)
    listing = actions.add_parser("list", help="list worker tokens and their last use")
    listing.set_defaults(func=cmd_list)
    revoke = actions.add_parser("revoke", help="revoke a worker token (its worker is refused from the next call)")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_revoke)
    for parser in (add, listing, revoke):
        parser.add_argument("--config", default=None, metavar="FILE", help="settings file (default: ./anatomix-node.toml if present)")


def _missing(args: argparse.Namespace) -> int:
    raise UserError("`worker-token` needs an action: add, list or revoke (see anatomix-node worker-token --help)")


def cmd_add(args: argparse.Namespace) -> int:
    from dicom_node.api import auth

    if not _NAME.match(args.name):
        raise UserError(f"name {args.name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        raise UserError(f"--out {out}: the file exists; the token is written only to a new file")
    secret = auth.new_secret(auth.WORKER_TOKEN_PREFIX)
    store, trail = _open(args)
    try:
        try:
            store.add_worker_token(args.name, auth.secret_hash(secret), datetime.now(UTC))
        except StoreConflict as exc:
            raise UserError(str(exc)) from None
        _audit(trail, "worker_token_created", args.name)
    finally:
        store.close()
    if out is not None:
        handle = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(secret + "\n")
        print(f"worker token {args.name} written to {out}; start the worker with --token-file {out}")
        return 0
    print(f"worker token {args.name}; shown once, put it in a file and start the worker with --token-file FILE:")
    print(secret)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store, _ = _open(args)
    try:
        tokens = store.list_worker_tokens()
    finally:
        store.close()
    if not tokens:
        print("no worker tokens (add one: anatomix-node worker-token add NAME)")
    for token in tokens:
        used = f"last used {token.last_used_at:%Y-%m-%d %H:%M}" if token.last_used_at else "never used"
        state = f"revoked {token.revoked_at:%Y-%m-%d %H:%M}" if token.revoked_at else "live"
        print(f"{token.name}\t{state}\tcreated {token.created_at:%Y-%m-%d %H:%M}\t{used}")
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    store, trail = _open(args)
    try:
        if not store.revoke_worker_token(args.name, datetime.now(UTC)):
            raise UserError(f"no live worker token named {args.name!r}; see `anatomix-node worker-token list`")
        _audit(trail, "worker_token_revoked", args.name)
    finally:
        store.close()
    print(f"worker token {args.name} revoked")
    return 0
