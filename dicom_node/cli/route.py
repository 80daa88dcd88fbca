"""``anatomix-node route add|list|update|remove|move|dry-run``: routing rules (see :mod:`dicom_node.pipeline.routing`)."""

from __future__ import annotations

import argparse
import getpass
import json
import os
import socket
from dataclasses import replace
from typing import Any

from dicom_node.cli.node import _add_config_option, _missing_action, describe_store, format_table, opened_store
from dicom_node.ops.errors import UserError
from dicom_node.pipeline.routing import (
    CONDITION_FIELDS,
    RoutingRule,
    RuleValidationError,
    add_rule,
    audit_rule_change,
    decide_routes,
    get_rule,
    list_rules,
    move_rule,
    parse_rule,
    remove_rule,
    update_rule,
)  # fmt: skip
from dicom_node.settings import load_settings
from dicom_node.store.base import StoreConflict

#: Command-line option of each condition (``--calling-ae``, ``--body-part``...).
CONDITION_OPTIONS = {name: "--" + name.replace("_", "-") for name in CONDITION_FIELDS}
_CONDITION_HELP = {
    "calling_ae": "the sender's AE title", "source": "the configured source node (name, see `ae list`) that sent the study",
    "modality": "Modality (0008,0060), e.g. DX", "body_part": "Body Part Examined (0018,0015), e.g. CHEST",
    "institution": "Institution Name (0008,0080)", "station": "Station Name (0008,1010)",
}  # fmt: skip


def register(subparsers: argparse._SubParsersAction) -> None:
    route = subparsers.add_parser("route", help="routing rules: which studies' results go where, in which profile")
    route.set_defaults(func=_missing_action("route", "add, list, update, remove, move or dry-run"))
    actions = route.add_subparsers(dest="route_command", metavar="ACTION")

    add = actions.add_parser("add", help="add a routing rule (last, or at --position)")
    _add_config_option(add)
    add.add_argument("name", help="a short name for the rule (letters, digits, . _ -)")
    _add_rule_options(add)
    add.add_argument("--position", type=int, default=None, metavar="N", help="place in the evaluation order (1 = first; default: last)")
    add.set_defaults(func=run_route_add)

    listing = actions.add_parser("list", help="the rules in evaluation order")
    _add_config_option(listing)
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=run_route_list)

    update = actions.add_parser("update", help="change a rule: options given replace that part, the others are kept")
    _add_config_option(update)
    update.add_argument("name")
    _add_rule_options(update)
    update.add_argument("--clear", action="append", default=[], choices=CONDITION_FIELDS, metavar="CONDITION",
                        help=f"drop a condition ({', '.join(CONDITION_FIELDS)}; repeatable)")  # fmt: skip
    update.add_argument("--own-profiles", action="store_true", help="drop the rule's profile: each destination's own applies")
    update.set_defaults(func=run_route_update)

    remove = actions.add_parser("remove", help="remove a rule")
    _add_config_option(remove)
    remove.add_argument("name")
    remove.set_defaults(func=run_route_remove)

    move = actions.add_parser("move", help="put a rule at another place in the evaluation order")
    _add_config_option(move)
    move.add_argument("name")
    move.add_argument("position", type=int, help="1 = evaluated first")
    move.set_defaults(func=run_route_move)

    dry = actions.add_parser("dry-run", help="which rule a received study matches and why, and where its results go")
    _add_config_option(dry)
    dry.add_argument("study_instance_uid", nargs="?", default=None, metavar="STUDY_UID", help="default: the latest study")
    dry.add_argument("--json", action="store_true")
    dry.set_defaults(func=run_route_dry_run)


def _add_rule_options(parser: argparse.ArgumentParser) -> None:
    for name, option in CONDITION_OPTIONS.items():
        parser.add_argument(option, action="append", default=None, metavar="VALUE",
                            help=f"match {_CONDITION_HELP[name]}: exact or glob (* ? [..]), any case; repeatable (any of them)")  # fmt: skip
    parser.add_argument("--to", action="append", default=None, metavar="DEST", help="send results to this destination (repeatable)")
    parser.add_argument("--profile", default=None, help="output profile for the rule's destinations (default: each destination's own)")
    parser.add_argument("--send-to-sender", action=argparse.BooleanOptionalAction, default=None,
                        help="also send results back to the node that sent the study (when it is a destination)")  # fmt: skip
    parser.add_argument("--description", default=None, metavar="TEXT")
    parser.add_argument("--enabled", action=argparse.BooleanOptionalAction, default=None, help="a disabled rule is skipped")


def _rule_from_args(args: argparse.Namespace, current: RoutingRule | None) -> RoutingRule:
    """The rule the arguments describe (over ``current`` for ``update``); UserError naming each bad field."""
    data: dict[str, Any] = current.as_dict() if current is not None else {"name": args.name, "match": {}, "action": {}}
    data.pop("position", None)
    match, action = data["match"], data["action"]
    for name in getattr(args, "clear", []):
        match.pop(name, None)
    for name in CONDITION_FIELDS:
        values = getattr(args, name)
        if values is not None:
            match[name] = values
    if args.to is not None:
        action["destinations"] = args.to
    if args.profile is not None:
        action["profile"] = args.profile
    if getattr(args, "own_profiles", False):
        action["profile"] = None
    if args.send_to_sender is not None:
        action["send_to_sender"] = args.send_to_sender
    if args.description is not None:
        data["description"] = args.description
    if args.enabled is not None:
        data["enabled"] = args.enabled
    return parse_rule(data)


def _invalid(exc: RuleValidationError) -> UserError:
    return UserError(f"routing rule not saved: {exc}")


def run_route_add(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        try:
            rule = add_rule(store, settings, _rule_from_args(args, None), args.position)
        except RuleValidationError as exc:
            raise _invalid(exc) from None
        except StoreConflict:
            raise UserError(f"a routing rule named {args.name!r} already exists; change it with `anatomix-node route update {args.name}`") from None
        _audit(store, settings, "add", None, rule)
    print(f"added rule {rule.position} {rule.name}: {describe_rule(rule)}")
    return 0


def run_route_update(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        current = _require_rule(store, args.name)
        try:
            changed = _rule_from_args(args, current)
            if changed == replace(current, position=0):
                print(f"{current.name}: nothing to change")
                return 0
            rule = update_rule(store, settings, changed)
        except RuleValidationError as exc:
            raise _invalid(exc) from None
        _audit(store, settings, "update", current, rule)
    print(f"updated rule {rule.position} {rule.name}: {describe_rule(rule)}")
    return 0


def run_route_list(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        rules = list_rules(store)
    if args.json:
        print(json.dumps([rule.as_dict() for rule in rules], indent=2))
        return 0
    print(f"# {describe_store(settings)}")
    if not rules:
        print("no routing rules: results go to the sender (when it is a destination) and to every default destination")
        return 0
    rows = [("#", "NAME", "MATCH", "DESTINATIONS", "PROFILE", "ENABLED")]
    for rule in rules:
        rows.append((str(rule.position), rule.name, describe_match(rule), describe_destinations(rule), rule.action.profile or "(own)",
                     "yes" if rule.enabled else "no"))  # fmt: skip
    print(format_table(rows))
    print("no rule matching: the sender (when it is a destination) and every default destination")
    return 0


def run_route_remove(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        before = _require_rule(store, args.name)
        if not remove_rule(store, args.name):
            raise UserError(_unknown_rule(args.name))
        _audit(store, settings, "remove", before, None)
    print(f"removed rule {args.name}")
    return 0


def run_route_move(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        count = len(store.list_routing_rules())
        if not 1 <= args.position <= max(count, 1):
            raise UserError(f"position {args.position}: give 1 to {count} (there are {count} rules)")
        before = _require_rule(store, args.name)
        try:
            rule = move_rule(store, args.name, args.position)
        except KeyError:
            raise UserError(_unknown_rule(args.name)) from None
        _audit(store, settings, "move", before, rule)
    print(f"moved {rule.name} to position {rule.position}")
    return 0


def run_route_dry_run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    with opened_store(settings) as store:
        if args.study_instance_uid:
            study = store.get_study(args.study_instance_uid)
            if study is None:
                raise UserError(f"no study {args.study_instance_uid}; see `anatomix-node studies`")
        else:
            latest = store.list_studies(limit=1)
            if not latest:
                raise UserError("no studies received yet: give a STUDY_UID once one has arrived")
            study = latest[0]
        decision = decide_routes(store, settings, study, read_headers=True)
    if args.json:
        print(json.dumps(decision.as_dict(), indent=2))
        return 0
    facts = decision.facts
    sender = f"{facts.calling_ae}@{facts.source_host}" if facts.source_host else facts.calling_ae
    print(f"study {facts.study_instance_uid} v{facts.version} ({study.state}) from {sender}, "
          f"source node {facts.source_node or '(none: unknown sender)'}")  # fmt: skip
    print("  header: " + "; ".join(f"{label} {', '.join(getattr(facts, name)) or '(absent)'}"
                                   for name, label in (("modality", "modality"), ("body_part", "body part"),
                                                       ("institution", "institution"), ("station", "station"))))  # fmt: skip
    for line in decision.explain():
        print(line)
    return 0


def describe_match(rule: RoutingRule) -> str:
    return "; ".join(f"{name}={','.join(patterns)}" for name, patterns in rule.match.conditions())


def describe_destinations(rule: RoutingRule) -> str:
    names = list(rule.action.destinations) + (["(sender)"] if rule.action.send_to_sender else [])
    return ", ".join(names)


def describe_rule(rule: RoutingRule) -> str:
    profile = f" in profile {rule.action.profile}" if rule.action.profile else ""
    state = "" if rule.enabled else " (disabled)"
    return f"{describe_match(rule)} -> {describe_destinations(rule)}{profile}{state}"


def _audit(store: Any, settings: Any, change: str, before: RoutingRule | None, after: RoutingRule | None) -> None:
    """Who changed which rule, before and after (audit table, and the audit file when configured)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no account name (a container): the uid
        user = f"uid {os.getuid()}"
    audit_rule_change(store, settings, change, before, after, user=user, host=socket.gethostname())


def _require_rule(store: Any, name: str) -> RoutingRule:
    rule = get_rule(store, name)
    if rule is None:
        raise UserError(_unknown_rule(name))
    return rule


def _unknown_rule(name: str) -> str:
    return f"no routing rule named {name!r}; see `anatomix-node route list`"
