"""Admin commands: ``init``, ``config show``, ``ae add|list|remove``, ``echo``, ``studies``.

Every command takes ``--config FILE`` (default: ./anatomix-node.toml when present, else built-in
defaults), loads :class:`~dicom_node.settings.Settings` and opens the state store named by
``settings.database_url``. Mistakes a user can make raise :class:`~dicom_node.cli.main.UserError`, which
the dispatcher prints as one line (exit status 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicom_node.audit import trail as audit
from dicom_node.cli.dicomweb_options import CLI_LABELS as DICOMWEB_CLI_LABELS
from dicom_node.cli.dicomweb_options import add_dicomweb_options, dicomweb_values
from dicom_node.cli.source_token import register_ae_token
from dicom_node.ops.errors import UserError
from dicom_node.ops.remotes import (
    SOURCE_DEFAULT_PORT,
    describe_remote,
    destination_health,
    echo_remote,
    remote_node_warnings,
    require_remote_node,
    unknown_node_message,
    unreached_destination_warning,
    validated_remote_node,
    where_results_go,
)
from dicom_node.ops.studies import acting_user, delivery_summary, study_summary
from dicom_node.settings import (
    CONFIG_FILE_NAME,
    SYSTEM_CONFIG_DIR,
    SYSTEM_DATA_DIR,
    Settings,
    load_settings,
    settings_as_dict,
)
from dicom_node.store import open_store
from dicom_node.store.base import CLIENT_CERTIFICATE_RULES, STUDY_STATES, RemoteNode, Store, StoreConflict

#: How the shared validation's messages name each field: by its ``ae add`` option.
CLI_LABELS = {"name": "name", "ae_title": "--ae-title", "host": "--host", "port": "--port", "quiet_period_s": "--quiet-period", **DICOMWEB_CLI_LABELS}


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser("init", help="write a commented default anatomix-node.toml (embedded mode)")
    init.add_argument("--dir", default=".", help="directory for the config file (created if missing; default: .)")
    init.add_argument("--data-dir", default=None, metavar="DIR",
                      help=f"storage.data_dir for spool, database and results (default: {SYSTEM_DATA_DIR} when DIR is "
                           f"under /etc, else var next to the config file)")  # fmt: skip
    init.add_argument("--force", action="store_true", help="overwrite an existing config file")
    init.set_defaults(func=run_init)

    config_parser = subparsers.add_parser("config", help="inspect settings")
    config_parser.set_defaults(func=_missing_action("config", "show"))
    config = config_parser.add_subparsers(dest="config_command", metavar="ACTION")
    show = config.add_parser("show", help="print the effective settings (file + ANATOMIX_* environment)")
    _add_config_option(show)
    show.add_argument("--json", action="store_true", help="JSON instead of TOML")
    show.set_defaults(func=run_config_show)

    ae = subparsers.add_parser("ae", help="remote DICOM nodes: sources that send to us, destinations for results")
    ae.set_defaults(func=_missing_action("ae", "add, update, list, remove or token"))
    ae_actions = ae.add_subparsers(dest="ae_command", metavar="ACTION")
    register_ae_token(ae_actions)
    add = ae_actions.add_parser("add", help="add a remote node")
    _add_config_option(add)
    add.add_argument("name", help="a short name for the node (letters, digits, . _ -)")
    add.add_argument("--ae-title", default=None, help="its AE title (1-16 characters; a DICOMweb destination needs none)")
    add.add_argument("--host", default=None, help="its host name or IP address ('*' = any host, sources only; with --url: the URL's)")
    add.add_argument(
        "--port", default=None, help=f"its DICOM port, 1-65535 (needed for a destination; a source's is used only by `echo`, default {SOURCE_DEFAULT_PORT})"
    )
    add.add_argument("--role", default=None, choices=("source", "destination", "both"), help="(with --url: default destination)")
    add.add_argument("--profile", default=None, help="output profile for results sent to it (default: output.default_profile)")
    add.add_argument("--quiet-period", type=float, default=None, metavar="S", help="seconds of silence that end a study from this source")
    add.add_argument("--complete-on-release", action="store_true", help="a study is complete when this source releases its association")
    add.add_argument("--default-destination", action="store_true", help="send results of every study here")
    _add_tls_options(add, update=False)
    add_dicomweb_options(add, update=False)
    add.set_defaults(func=run_ae_add)
    update = ae_actions.add_parser("update", help="change some settings of a remote node (the others are kept)")
    _add_config_option(update)
    update.add_argument("name")
    update.add_argument("--ae-title", default=None)
    update.add_argument("--host", default=None)
    update.add_argument("--port", default=None)
    update.add_argument("--role", default=None, choices=("source", "destination", "both"))
    update.add_argument("--profile", default=None)
    update.add_argument("--quiet-period", type=float, default=None, metavar="S")
    update.add_argument("--complete-on-release", action=argparse.BooleanOptionalAction, default=None)
    update.add_argument("--default-destination", action=argparse.BooleanOptionalAction, default=None)
    _add_tls_options(update, update=True)
    add_dicomweb_options(update, update=True)
    update.set_defaults(func=run_ae_update)
    listing = ae_actions.add_parser("list", help="list remote nodes")
    _add_config_option(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run_ae_list)
    remove = ae_actions.add_parser("remove", help="remove a remote node")
    _add_config_option(remove)
    remove.add_argument("name")
    remove.set_defaults(func=run_ae_remove)

    echo = subparsers.add_parser("echo", help="C-ECHO a configured remote node (QIDO-RS for a DICOMweb one) and print the round-trip time")
    _add_config_option(echo)
    echo.add_argument("name", help="the remote node's name (see `ae list`)")
    echo.add_argument("--timeout", type=float, default=None, metavar="S", help="seconds to wait (default: delivery.timeout_s)")
    echo.set_defaults(func=run_echo)

    studies = subparsers.add_parser("studies", help="received studies: state, counts, skip reasons, stage times")
    _add_config_option(studies)
    studies.add_argument("--json", action="store_true")
    studies.add_argument("--state", action="append", choices=STUDY_STATES, help="only studies in this state (repeatable)")
    studies.add_argument("--limit", type=int, default=100, help="at most this many studies, newest first (default 100)")
    studies.set_defaults(func=run_studies)

    purge = subparsers.add_parser("purge", help="remove finished studies older than the retention period (images, results, rows; a tombstone stays)")
    _add_config_option(purge)
    purge.add_argument("--older-than-days", type=float, default=None, metavar="DAYS", help="retention period for this run (default: storage.retention_days)")
    purge.add_argument("--dry-run", action="store_true", help="only list the studies that would be purged")
    purge.add_argument("--limit", type=int, default=500, help="at most this many studies per run (default 500)")
    purge.set_defaults(func=run_purge)


def _add_tls_options(parser: argparse.ArgumentParser, update: bool) -> None:
    """DICOM TLS when we connect to it (docs/security.md, "DICOM TLS"); ``ae update`` keeps what is not given."""
    switch: dict[str, Any] = {"action": argparse.BooleanOptionalAction} if update else {"action": "store_const", "const": True}
    parser.add_argument("--tls", default=None, help="connect to it with DICOM TLS", **switch)
    parser.add_argument("--tls-ca", default=None, metavar="PEM", help="CAs trusted for its certificate (default: the system's)")
    parser.add_argument("--tls-cert", default=None, metavar="PEM", help="our client certificate for it")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="the private key of --tls-cert (unencrypted)")
    if update:
        parser.add_argument("--tls-verify", action=argparse.BooleanOptionalAction, default=None,
                            help="verify its certificate and host name")  # fmt: skip
    else:
        parser.add_argument("--no-tls-verify", dest="tls_verify", action="store_const", const=False, default=None,
                            help="do not verify its certificate and host name (default: verify)")  # fmt: skip
    hostname: dict[str, Any] = {"action": argparse.BooleanOptionalAction} if update else \
        {"dest": "tls_hostname_check", "action": "store_const", "const": False}  # fmt: skip
    parser.add_argument("--tls-hostname-check" if update else "--no-tls-hostname-check", default=None, **hostname,
                        help="check that its certificate names --host (off: the certificate chain is still verified)")  # fmt: skip
    parser.add_argument("--tls-client-certificate", choices=CLIENT_CERTIFICATE_RULES, default=None,
                        help="as a source: required = refuse its associations unless it presents a trusted client "
                        "certificate on the TLS port (default optional: the port's rule)")  # fmt: skip


def _tls_fields(args: argparse.Namespace, current: RemoteNode | None) -> dict[str, Any]:
    """The TLS columns from ``--tls*`` over ``current`` (absolute paths); UserError for a missing file."""
    base = current or RemoteNode(name="", ae_title="", host="", port=1)
    values: dict[str, Any] = {
        "tls": base.tls if args.tls is None else args.tls,
        "tls_verify_peer": base.tls_verify_peer if args.tls_verify is None else args.tls_verify,
        "tls_check_hostname": base.tls_check_hostname if args.tls_hostname_check is None else args.tls_hostname_check,
        "tls_client_certificate": args.tls_client_certificate or base.tls_client_certificate,
    }
    for option, key in (("tls_ca", "tls_ca_file"), ("tls_cert", "tls_cert_file"), ("tls_key", "tls_key_file")):
        given = getattr(args, option)
        if given is None:
            values[key] = getattr(base, key)
        elif given == "":
            values[key] = None  # --tls-ca "" clears it
        else:
            path = Path(given).expanduser().resolve()
            if not path.is_file():
                raise UserError(f"--{option.replace('_', '-')} {given}: no such file")
            values[key] = str(path)
    if bool(values["tls_cert_file"]) != bool(values["tls_key_file"]):
        raise UserError("--tls-cert and --tls-key go together: our client certificate and its private key")
    if any(values[k] for k in ("tls_ca_file", "tls_cert_file")) and not values["tls"]:
        raise UserError("--tls-ca/--tls-cert/--tls-key need --tls (connect to it with TLS)")
    return values


def _missing_action(command: str, actions: str) -> Any:
    def complain(args: argparse.Namespace) -> int:
        raise UserError(f"`{command}` needs an action: {actions} (see anatomix-node {command} --help)")

    return complain


def _add_config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, metavar="FILE",
                        help=f"settings file (default: ./{CONFIG_FILE_NAME}, else {SYSTEM_CONFIG_DIR / CONFIG_FILE_NAME}, if present)")  # fmt: skip


def sqlite_path(database_url: str) -> Path | None:
    """The database file of an SQLite URL (None for PostgreSQL)."""
    return Path(database_url.removeprefix("sqlite:///")) if database_url.startswith("sqlite:///") else None


def describe_store(settings: Settings) -> str:
    """``settings FILE, state store WHERE`` for messages (passwords masked)."""
    from dicom_node.store.postgres import redact_url

    path = sqlite_path(settings.database_url)
    where = f"SQLite {path}" if path is not None else redact_url(settings.database_url)
    return f"settings {settings_origin(settings)}, state store {where}"


def settings_origin(settings: Settings) -> str:
    if settings.source != "defaults":
        return settings.source
    return f"built-in defaults: no --config, no ./{CONFIG_FILE_NAME}, no {SYSTEM_CONFIG_DIR / CONFIG_FILE_NAME}"


@contextmanager
def opened_store(settings: Settings) -> Iterator[Store]:
    """The node's existing state store. Only ``init`` and ``serve`` create one: any other command
    that finds no SQLite database where the settings point says so instead of starting an empty one."""
    path = sqlite_path(settings.database_url)
    if path is not None and not path.is_file():
        raise UserError(
            f"no state store at {path} (settings: {settings_origin(settings)}); give --config FILE of your node, or set up a new one with `anatomix-node init`"
        )
    store = open_store(settings.database_url)
    try:
        yield store
    finally:
        store.close()


# ---- retention ----------------------------------------------------------------------------------------


def run_purge(args: argparse.Namespace) -> int:
    from dicom_node.audit.trail import open_audit_trail
    from dicom_node.pipeline.retention import purge_expired

    settings = load_settings(args.config)
    days = settings.storage.retention_days if args.older_than_days is None else args.older_than_days
    if args.older_than_days is None and days <= 0:
        raise UserError("storage.retention_days is 0 (keep everything): give --older-than-days DAYS to purge anyway")
    if days < 0:
        raise UserError(f"--older-than-days {days}: must be >= 0")
    if args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    with opened_store(settings) as store:
        trail = open_audit_trail(store, settings.logging.audit_file)
        report = purge_expired(settings, store, trail, days=days, dry_run=args.dry_run, limit=args.limit)
    states = " or ".join(settings.storage.retention_states)
    cutoff = report.cutoff.isoformat(timespec="seconds")
    if args.dry_run:
        print(f"{len(report.candidates)} studies {states} and unchanged since {cutoff} would be purged")
        for uid in report.candidates:
            print(f"  {uid}")
        return 0
    print(
        f"purged {len(report.purged)} studies {states} and unchanged since {cutoff}: "
        f"{sum(p.instances for p in report.purged)} instances, {sum(p.produced_objects for p in report.purged)} result objects, "
        f"{report.bytes / 1e6:.1f} MB"
    )
    return 0


# ---- init and config ---------------------------------------------------------------------------------


def default_data_dir(config_dir: Path) -> str:
    """Where ``init`` puts the data: FHS for a system install (config under /etc -> /var/lib/anatomix,
    which the systemd units may write), else ``var`` next to the config file."""
    resolved = config_dir.absolute()
    return str(SYSTEM_DATA_DIR) if resolved == Path("/etc") or Path("/etc") in resolved.parents else "var"


def run_init(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    target = directory / CONFIG_FILE_NAME
    if target.exists() and not args.force:
        raise UserError(f"{target} already exists; edit it, or pass --force to replace it with the defaults")
    data_dir = args.data_dir or default_data_dir(directory)
    text = DEFAULT_CONFIG_TOML
    replaced = target.read_text(encoding="utf-8", errors="replace") if target.exists() else None
    if replaced is not None:  # for the audit: URLs' passwords masked
        replaced = re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1***@", replaced)
    if data_dir != "var":
        text = text.replace('data_dir = "var"', f"data_dir = {json.dumps(data_dir)}", 1)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {target}: {exc.strerror or exc}") from None
    settings = load_settings(target)
    try:  # the one command besides serve that creates the state store (so `ae add` can follow)
        settings.storage.data_dir.mkdir(parents=True, exist_ok=True)
        store = open_store(settings.database_url)
        try:  # the settings file is configuration: who wrote it, and what it replaced (--force)
            audit.record_settings_file(store, settings, acting_user(), "settings.init", str(target.resolve()), replaced, text)
            destinations, nowhere = where_results_go(store.list_remote_nodes(), store.list_routing_rules())
        finally:
            store.close()
    except OSError as exc:
        raise UserError(f"wrote {target}, but cannot create storage.data_dir {settings.storage.data_dir}: {exc.strerror or exc}") from None
    print(f"wrote {target}; data (spool, results, database) in {settings.storage.data_dir}")
    for line in destinations:
        print(f"results go to: {line}")
    print(f"next: anatomix-node ae add NAME --ae-title T --host H --role source --config {target}")
    if nowhere:  # a fresh node: say where results will go before the first study is analysed
        print("results: none will leave the node until a destination is set; add one with "
              f"`anatomix-node ae add pacs --ae-title PACS --host H --port P --role destination --default-destination --config {target}`")  # fmt: skip
    return 0


def run_config_show(args: argparse.Namespace) -> int:
    from dicom_node.store.postgres import redact_url  # psycopg loads only for this command

    settings = load_settings(args.config)
    values = settings_as_dict(settings)
    values.pop("source", None)
    values["database"]["url"] = redact_url(values["database"]["url"])
    values["queue"]["broker_url"] = redact_url(values["queue"]["broker_url"])
    if args.json:
        print(json.dumps({"source": settings.source, "database_url": redact_url(settings.database_url), **values}, indent=2))
    else:
        print(f"# effective settings: {settings.source}, with ANATOMIX_* environment overrides")
        print(f"# state store: {redact_url(settings.database_url)}")
        print(render_toml(values))
    return 0


def render_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Settings sections as TOML (unset optional values appear as comments)."""
    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        tables = {k: v for k, v in values.items() if isinstance(v, dict)}
        for key, value in values.items():
            if key in tables:
                continue
            lines.append(f"# {key} = (not set)" if value is None else f"{key} = {json.dumps(value)}")
        for key, table in tables.items():
            lines.append(f"[{section}.{key}]")
            lines.extend(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in table.items())
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ---- remote nodes -------------------------------------------------------------------------------


def run_ae_add(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    node = remote_node_from_args(args, settings)
    if not node.url:
        node = replace(node, **_tls_fields(args, None))
    with opened_store(settings) as store:
        if store.get_remote_node(node.name) is not None:
            raise UserError(f"a remote node named {node.name!r} already exists; change it with "
                           f"`anatomix-node ae update {node.name} --OPTION VALUE`, or pick another name")  # fmt: skip
        warnings = remote_node_warnings(node, store.list_remote_nodes())
        try:
            store.add_remote_node(node)
        except StoreConflict:
            raise UserError(f"a remote node named {node.name!r} already exists; change it with `anatomix-node ae update {node.name}`") from None
        audit.record_admin_change(store, settings, acting_user(), "remote_node.add", node.name, None, node)
        rules = store.list_routing_rules()
    unreached = unreached_destination_warning(node, rules)
    print(f"added {node.name}: {describe_remote(node)} ({node.role}, profile {node.profile})"
          + (": the default destination, results of every study go here" if node.is_destination and node.default_destination else ""))  # fmt: skip
    print_warnings(warnings + ([unreached] if unreached else []))
    return 0


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        print(f"anatomix-node: warning: {warning}", file=sys.stderr)


def run_ae_update(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        current = require_remote_node(store, args.name)
        given = {"ae_title": args.ae_title, "host": args.host, "port": args.port, "role": args.role, "profile": args.profile,
                 "quiet_period_s": args.quiet_period, "complete_on_release": args.complete_on_release,
                 "default_destination": args.default_destination}  # fmt: skip
        fields = {key: getattr(current, key) if value is None else value for key, value in given.items()}
        web = dicomweb_values(args, current)
        if web["url"]:  # a DICOMweb node's host and port are its URL's: only those given are checked against it
            fields.update(host=args.host, port=args.port)
        node = validated_remote_node(settings, name=current.name, labels=CLI_LABELS, **fields, **web)
        if not node.url:
            node = replace(node, **_tls_fields(args, current if not current.url else None))
        if node == current:
            print(f"{node.name}: nothing to change")
            return 0
        warnings = remote_node_warnings(node, store.list_remote_nodes()) if (node.host, node.ae_title) != (current.host, current.ae_title) else []
        store.update_remote_node(node)
        audit.record_admin_change(store, settings, acting_user(), "remote_node.update", node.name, current, node)
    changed = [f"{key} {getattr(current, key)!r} -> {getattr(node, key)!r}" for key in asdict(node) if getattr(current, key) != getattr(node, key)]
    print(f"updated {node.name}: " + "; ".join(changed))
    print_warnings(warnings)
    return 0


def remote_node_from_args(args: argparse.Namespace, settings: Settings) -> RemoteNode:
    """The ``ae add`` arguments as a checked RemoteNode; UserError naming the bad option."""
    web = dicomweb_values(args, None)
    if not web["url"]:
        missing = [option for option, value in (("--ae-title", args.ae_title), ("--host", args.host), ("--role", args.role)) if value is None]
        if missing:
            raise UserError(f"ae add needs {', '.join(missing)} (or --url BASE_URL for a DICOMweb destination)")
    return validated_remote_node(
        settings,
        **web,
        name=args.name,
        ae_title=args.ae_title or "",
        host=args.host or "",
        port=args.port,
        role=args.role or "destination",
        profile=args.profile,
        quiet_period_s=args.quiet_period,
        complete_on_release=args.complete_on_release,
        default_destination=args.default_destination,
        labels=CLI_LABELS,
    )


def run_ae_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        nodes = store.list_remote_nodes()
        health = {row["name"]: row for row in destination_health(store)}
        _, nowhere = where_results_go(nodes, store.list_routing_rules())
    if args.json:  # a destination carries its health: last success and failure, objects waiting, next try
        print(json.dumps([asdict(node) | ({"health": health.get(node.name)} if node.is_destination else {}) for node in nodes], indent=2))
        return 0
    print(f"# {describe_store(settings)}")
    if not nodes:
        print("no remote nodes; add one with `anatomix-node ae add`")
        return 0
    rows = [("NAME", "AE TITLE", "HOST", "PORT", "ROLE", "PROFILE", "OPTIONS")]
    for n in nodes:
        options = [f"quiet {n.quiet_period_s:g}s"] if n.quiet_period_s is not None else []
        options += ["complete-on-release"] * n.complete_on_release + ["default-destination"] * n.default_destination
        options += ["tls" + ("" if n.tls_verify_peer else " (unverified)")] * n.tls
        options += [describe_remote(n)] * bool(n.url)
        rows.append((n.name, n.ae_title or "-", n.host, str(n.port), n.role, n.profile, ", ".join(options)))
    print(format_table(rows))
    print_destination_health(list(health.values()))
    if nowhere:
        print(f"warning: {nowhere}")
    return 0


def print_destination_health(health: list[dict[str, Any]]) -> None:
    """The destinations' health under ``ae list``: state, last success, last failure and why, waiting, next try."""
    if not health:
        return

    def when(value: str | None) -> str:
        return value[:19].replace("T", " ") if value else "-"

    rows = [("DESTINATION", "STATE", "LAST SUCCESS (UTC)", "LAST FAILURE (UTC)", "WAITING", "GIVEN UP", "NEXT TRY (UTC)", "LAST FAILURE REASON")]
    for h in health:
        rows.append((h["name"] + ("" if h["configured"] else " (removed)"), h["state"].upper() if h["state"] == "down" else h["state"],
                     when(h["last_success_at"]), when(h["last_failure_at"]), str(h["waiting"]), str(h["given_up"]),
                     when(h["next_attempt_at"]), h["last_failure_reason"] or ""))  # fmt: skip
    print()
    print(format_table(rows, max_width=terminal_width(), shrinkable=(7,)))


def run_ae_remove(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        before = store.get_remote_node(args.name)
        if not store.remove_remote_node(args.name):
            raise UserError(unknown_node_message(args.name))
        audit.record_admin_change(store, settings, acting_user(), "remote_node.remove", args.name, before, None)
    print(f"removed {args.name}")
    return 0


def format_table(rows: Sequence[tuple[str, ...]], max_width: int | None = None, shrinkable: tuple[int, ...] = (), keep_tail: tuple[int, ...] = ()) -> str:
    """Aligned columns. With ``max_width``, the ``shrinkable`` columns (in that order) are clipped
    with an ellipsis until a line fits (``keep_tail`` ones keep their end: a UID's distinct part);
    the others keep their width."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    if max_width is not None:
        excess = sum(widths) + 2 * (len(widths) - 1) - max_width
        for index in shrinkable:
            if excess <= 0:
                break
            floor = min(widths[index], max(len(rows[0][index]), 6))
            cut = min(excess, widths[index] - floor)
            widths[index] -= cut
            excess -= cut
    lines = (
        "  ".join(_clip(cell, width, tail=index in keep_tail and n > 0).ljust(width) for index, (cell, width) in enumerate(zip(row, widths))).rstrip()
        for n, row in enumerate(rows)
    )
    return "\n".join(_clip(line, max_width) for line in lines)


def _clip(text: str, width: int | None, tail: bool = False) -> str:
    if width is None or len(text) <= width:
        return text
    return "…" + text[len(text) - width + 1 :] if tail else text[: max(width - 1, 0)] + "…"


# ---- echo ---------------------------------------------------------------------------------------


def run_echo(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        node = require_remote_node(store, args.name)
    timeout = args.timeout if args.timeout is not None else settings.delivery.timeout_s
    elapsed_ms = echo_remote(settings.node.ae_title, node, timeout)
    if node.url:
        print(f"{node.name} ({node.url}): QIDO-RS success, {elapsed_ms:.1f} ms round trip")
    else:
        print(f"{node.name} ({node.ae_title}@{node.host}:{node.port}): C-ECHO success, {elapsed_ms:.1f} ms round trip")
    return 0


# ---- studies ------------------------------------------------------------------------------------


def run_studies(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    if args.limit < 1:
        raise UserError(f"--limit {args.limit}: must be at least 1")
    now = datetime.now(UTC)
    with opened_store(settings) as store:
        studies = store.list_studies(tuple(args.state) if args.state else None, limit=args.limit)
        sources = {node.ae_title: node.name for node in store.list_remote_nodes() if node.is_source}
        summaries = [study_summary(study, store, now, settings.storage.spool_dir, sources) for study in studies]
        for study, summary in zip(studies, summaries):  # delivery column: each destination's state
            summary["deliveries"] = delivery_summary(store, settings, study)
    if args.json:
        print(json.dumps(summaries, indent=2))
        return 0
    print(f"# {describe_store(settings)}")
    if not summaries:
        print("no studies" + (f" in state {', '.join(args.state)}" if args.state else ""))
        return 0
    rows = [("STUDY INSTANCE UID", "STATE", "PATIENT ID", "ACCESSION", "DATE", "DESCRIPTION", "SOURCE", "VER", "INST",
             "SEL", "SKIP", "LAST RECEIVED (UTC)", "STAGES")]  # fmt: skip
    for s in summaries:
        states = s["instance_states"]
        stages = " > ".join(f"{st['state']} {_seconds(st['seconds'])}".rstrip() for st in s["stages"])
        date = s["study_date"]
        rows.append((
            s["study_instance_uid"], s["state"] + (f" ({s['outcome']})" if s["outcome"] in ("skipped", "undelivered") else ""),
            s["patient_id"], s["accession_number"], f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 else date,
            s["study_description"], s["source"], str(s["version"]), str(s["instance_count"]),
            str(states.get("selected", 0) + states.get("analyzed", 0)), str(states.get("skipped", 0)),
            s["last_received_at"][:19].replace("T", " "), stages,
        ))  # fmt: skip
    width = terminal_width()
    print(format_table(rows, max_width=width, shrinkable=(12, 5, 0, 2, 3, 6), keep_tail=(0,)))
    for s in summaries:
        pending = [d["text"] for d in s["deliveries"] if d["retrying"]]
        if pending:
            print(_clip(f"{s['study_instance_uid']}: delivery pending: " + "; ".join(pending), width))
        line = study_notes(s)
        if line:
            print(_clip(f"{s['study_instance_uid']}: {line}", width))
    return 0


def terminal_width() -> int | None:
    """Columns of the terminal (or $COLUMNS); None when writing to a pipe or file: full lines."""
    if sys.stdout.isatty() or os.environ.get("COLUMNS"):
        return shutil.get_terminal_size().columns
    return None


def study_notes(summary: dict[str, Any]) -> str:
    """One line of what else there is to know: why images were skipped (each reason once), and the
    error of a failed study. A skip is an outcome, not an error."""
    reasons = "; ".join(f"{count}x {reason}" for reason, count in summary["skip_reasons"].items())
    if summary["outcome"] == "skipped":
        return f"skipped, nothing to analyse: {reasons or 'no images'}"
    parts = []
    if summary["outcome"] == "undelivered":
        parts.append(f"UNDELIVERED: {summary['error']}")
    elif summary["state"] == "failed" and summary["error"]:
        parts.append(f"error: {summary['error']}")
    elif summary["error"] and " failed (" in summary["error"]:
        parts.append(f"some images failed: {summary['error']}")
    if reasons:
        parts.append(f"skipped: {reasons}")
    return "; ".join(parts)


def _seconds(value: float | None) -> str:
    if value is None:
        return ""
    return f"{value:.1f}s" if value < 120 else f"{value / 60:.1f}min"


# ---- the file `init` writes ---------------------------------------------------------------------

#: Embedded mode: SQLite and the local task transport, everything under ./var next to this file.
#: Generated from the settings dataclasses and their field docs (dicom_node.config_template), so
#: every value is the built-in default and every setting is listed.
from dicom_node.config_template import render_config_template  # noqa: E402

DEFAULT_CONFIG_TOML = render_config_template()
