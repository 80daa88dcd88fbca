"""``anatomix-node user``: accounts of the operations API (add, list, remove, password, token).

There is no default account and no default password: the first admin is made here, on the box,
e.g. ``anatomix-node user add alice --role admin``, which prints a generated one-time password
(or reads one from stdin with ``--password-stdin``). Every change is audited with the OS user.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import socket
import sys
from datetime import UTC, datetime

from dicom_node.ops.errors import UserError
from dicom_node.settings import load_settings
from dicom_node.store.base import API_ROLES, StoreConflict

_USER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


def register(subparsers: argparse._SubParsersAction) -> None:
    user = subparsers.add_parser("user", help="accounts of the operations API (HTTP): add, list, remove, password, token")
    user.set_defaults(func=_missing)
    actions = user.add_subparsers(dest="user_command", metavar="ACTION")
    add = actions.add_parser("add", help="add an account; prints a one-time password unless --password-stdin")
    add.add_argument("name", help="user name (letters, digits, . _ @ -)")
    add.add_argument("--role", required=True, choices=API_ROLES)
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input (one line)")
    add.set_defaults(func=cmd_add)
    listing = actions.add_parser("list", help="list accounts")
    listing.set_defaults(func=cmd_list)
    remove = actions.add_parser("remove", help="remove an account and its tokens")
    remove.add_argument("name")
    remove.set_defaults(func=cmd_remove)
    password = actions.add_parser("password", help="set a new password (generated and printed, or --password-stdin)")
    password.add_argument("name")
    password.add_argument("--password-stdin", action="store_true")
    password.set_defaults(func=cmd_password)
    token = actions.add_parser("token", help="create an API token for an account (printed once)")
    token.add_argument("name")
    token.add_argument("--label", default="cli", help="what the token is for (default: cli)")
    token.set_defaults(func=cmd_token)
    for parser in (add, listing, remove, password, token):
        parser.add_argument("--config", default=None, metavar="FILE", help="settings file (default: ./anatomix-node.toml if present)")


def _missing(args: argparse.Namespace) -> int:
    raise UserError("`user` needs an action: add, list, remove, password or token (see anatomix-node user --help)")


def _open(args: argparse.Namespace):
    from dicom_node.audit.trail import open_audit_trail
    from dicom_node.store import open_store

    settings = load_settings(args.config)
    store = open_store(settings.database_url)
    return store, open_audit_trail(store, settings.logging.audit_file)


def _audit(trail, action: str, name: str, **detail: object) -> None:
    from dicom_node.api.deps import API_CHANGE
    from dicom_node.audit.trail import Peer

    try:
        who = getpass.getuser()
    except (KeyError, OSError):
        who = f"uid {os.getuid()}"
    trail.record(API_CHANGE, Peer(None, None, socket.gethostname()), user=who, via="cli", action=action, target=name, **detail)


def _read_password(problem_check) -> str:
    line = sys.stdin.readline().rstrip("\r\n")
    problem = problem_check(line)
    if problem:
        raise UserError(f"password from stdin: {problem}")
    return line


def cmd_add(args: argparse.Namespace) -> int:
    from dicom_node.api import auth

    if not _USER_NAME.match(args.name):
        raise UserError(f"name {args.name!r}: use 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit")
    password = _read_password(auth.password_problem) if args.password_stdin else auth.generate_password()
    store, trail = _open(args)
    try:
        try:
            store.add_api_user(auth.new_user(args.name, args.role, password, must_change_password=not args.password_stdin))
        except StoreConflict:
            raise UserError(f"an account named {args.name!r} already exists (`user password {args.name}` sets a new password)") from None
        _audit(trail, "user_added", args.name, after={"role": args.role})
    finally:
        store.close()
    print(f"added {args.name} ({args.role})")
    if not args.password_stdin:
        print(f"one-time password: {password}")
        print("it is not shown again and must be changed at the first login (console, or POST /api/auth/password)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    store, _ = _open(args)
    try:
        users = store.list_api_users()
        tokens = store.list_api_tokens()
    finally:
        store.close()
    if not users:
        print("no accounts; add one with `anatomix-node user add NAME --role admin`")
        return 0
    for u in users:
        live = sum(1 for t in tokens if t.user_name == u.name and t.revoked_at is None)
        state = ("disabled" if u.disabled else "enabled") + (", one-time password not yet changed" if u.must_change_password else "")
        print(f"{u.name}\t{u.role}\t{state}\t{live} token(s)\tcreated {u.created_at:%Y-%m-%d %H:%M}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    store, trail = _open(args)
    try:
        user = store.get_api_user(args.name)
        if user is None or not store.remove_api_user(args.name):
            raise UserError(f"no account named {args.name!r}; see `anatomix-node user list`")
        _audit(trail, "user_removed", args.name, before={"role": user.role})
    finally:
        store.close()
    print(f"removed {args.name}")
    return 0


def cmd_password(args: argparse.Namespace) -> int:
    from dicom_node.api import auth

    password = _read_password(auth.password_problem) if args.password_stdin else auth.generate_password()
    store, trail = _open(args)
    try:
        if not store.update_api_user(args.name, password_hash=auth.hash_password(password), must_change_password=not args.password_stdin):
            raise UserError(f"no account named {args.name!r}; see `anatomix-node user list`")
        _audit(trail, "user_password_set", args.name)
    finally:
        store.close()
    print(f"password of {args.name} changed; its sessions ended")
    if not args.password_stdin:
        print(f"one-time password: {password}")
        print("it must be changed at the next login")
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    from dicom_node.api import auth

    secret = auth.new_secret(auth.TOKEN_PREFIX)
    store, trail = _open(args)
    try:
        try:
            token = store.add_api_token(args.name, args.label, auth.secret_hash(secret), datetime.now(UTC))
        except KeyError:
            raise UserError(f"no account named {args.name!r}; see `anatomix-node user list`") from None
        _audit(trail, "token_created", args.name, after={"id": token.id, "label": token.label})
    finally:
        store.close()
    print(f"token {token.id} for {args.name} ({args.label}); shown once, send it as 'Authorization: Bearer <token>':")
    print(secret)
    return 0
