"""Routing rules: which studies' results go to which destinations, in which output profile.

A rule is declarative data, never code: ``match`` holds conditions, ``action`` says where results go.

* ``match``: ``calling_ae`` (the sender's AE title), ``source`` (the configured remote node that
  sent the study, as matched at acceptance by AE title and host), and four header values read from
  the study's spooled instances, header only: ``modality`` (0008,0060), ``body_part`` (0018,0015),
  ``institution`` (0008,0080), ``station`` (0008,1010). Each condition is a list of exact values or
  globs (``*``, ``?``, ``[...]``), compared case-insensitively; a condition holds when any value of
  the study matches any of its patterns (a study's instances may differ). All the conditions a rule
  names must hold; a rule must name at least one.
* ``action``: ``destinations`` (names of configured destinations), ``profile`` (an output profile
  for all of them; none: each destination's own), ``send_to_sender`` (also back to the node that
  sent the study when it is a destination, as the default does).

Rules are evaluated in order (position 1 first); the first enabled rule that matches decides, and
no other destination gets the results. When none matches, the default applies: today's behaviour,
the sender (when it is also a destination) plus every ``default_destination``, each in its own
profile. Rules are validated on save (:func:`validate_rule`), each error naming its field.

The CLI (``anatomix-node route``) and the HTTP API share the functions here and the store's
``routing_rules`` table. :func:`decide_routes` is the one place deliveries are planned.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.store.base import NO_DESTINATION, InstanceRecord, RemoteNode, RoutingRuleRecord, Store, StudyRecord

if TYPE_CHECKING:
    from dicom_node.settings import OutputSettings, Settings

LOG = logging.getLogger(__name__)

#: Condition names, in the order they are checked and shown.
CONDITION_FIELDS = ("calling_ae", "source", "modality", "body_part", "institution", "station")
#: Conditions read from the instances' headers, and their DICOM keywords.
HEADER_KEYWORDS = {"modality": "Modality", "body_part": "BodyPartExamined", "institution": "InstitutionName", "station": "StationName"}
#: Longest value each condition can meet (the VR's length: AE/CS/SH 16, LO 64; node names 64).
MAX_LENGTH = {"calling_ae": 16, "source": 64, "modality": 16, "body_part": 16, "institution": 64, "station": 16}
LABELS = {"calling_ae": "calling AE", "source": "source", "modality": "modality", "body_part": "body part",
          "institution": "institution", "station": "station"}  # fmt: skip
ACTION_FIELDS = ("destinations", "profile", "send_to_sender")
RULE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_GLOB_CHARS = set("*?[")


#: A ``done`` study's note when its results went to no destination at all (the study's outcome is
#: then ``undelivered``: :func:`dicom_node.ops.studies.study_outcome`).
NO_DESTINATION_NOTE = (
    NO_DESTINATION + " (no routing rule names one, the sender is not a destination and no node is a default destination; "
    "`anatomix-node route dry-run UID` explains; after `anatomix-node ae update NAME --default-destination`, "
    "`anatomix-node resend UID` sends them)"
)


# ---- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RouteMatch:
    calling_ae: tuple[str, ...] = ()
    source: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    institution: tuple[str, ...] = ()
    station: tuple[str, ...] = ()

    def conditions(self) -> list[tuple[str, tuple[str, ...]]]:
        """The conditions this rule names, in check order."""
        return [(name, getattr(self, name)) for name in CONDITION_FIELDS if getattr(self, name)]

    def as_dict(self) -> dict[str, list[str]]:
        return {name: list(patterns) for name, patterns in self.conditions()}


@dataclass(frozen=True)
class RouteAction:
    destinations: tuple[str, ...] = ()
    #: Output profile for every destination of the rule; None: each destination's own profile.
    profile: str | None = None
    send_to_sender: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"destinations": list(self.destinations), "profile": self.profile, "send_to_sender": self.send_to_sender}


@dataclass(frozen=True)
class RoutingRule:
    name: str
    match: RouteMatch
    action: RouteAction
    description: str = ""
    enabled: bool = True
    #: 1-based place in the evaluation order (0: not stored yet).
    position: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "position": self.position, "enabled": self.enabled, "description": self.description,
                "match": self.match.as_dict(), "action": self.action.as_dict()}  # fmt: skip

    def to_record(self) -> RoutingRuleRecord:
        return RoutingRuleRecord(self.name, self.position, self.match.as_dict(), self.action.as_dict(), self.description, self.enabled)

    @classmethod
    def from_record(cls, record: RoutingRuleRecord) -> RoutingRule:
        rule = parse_rule({"name": record.name, "match": record.match, "action": record.action,
                           "description": record.description, "enabled": record.enabled})  # fmt: skip
        return replace(rule, position=record.position)


@dataclass(frozen=True)
class FieldError:
    field: str
    message: str


class RuleValidationError(ValueError):
    """A rule that cannot be saved; ``errors`` names each bad field (for the CLI's line and the API's problem details)."""

    def __init__(self, errors: Sequence[FieldError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(f"{e.field}: {e.message}" for e in self.errors))


# ---- parsing and validation ------------------------------------------------------------------------


def parse_rule(data: Mapping[str, Any]) -> RoutingRule:
    """A rule from JSON-ready data (an API body, a stored row); RuleValidationError on wrong shapes.

    This checks the shape only; :func:`validate_rule` checks it against the configuration.
    """
    errors: list[FieldError] = []
    for key in data:
        if key not in ("name", "match", "action", "description", "enabled", "position"):
            errors.append(FieldError(str(key), "unknown field; a rule has name, match, action, description, enabled"))
    name = data.get("name")
    if not isinstance(name, str) or not RULE_NAME.match(name):
        errors.append(FieldError("name", f"{name!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"))
    match_data = data.get("match") or {}
    action_data = data.get("action") or {}
    if not isinstance(match_data, Mapping):
        errors.append(FieldError("match", "must be an object of conditions"))
        match_data = {}
    if not isinstance(action_data, Mapping):
        errors.append(FieldError("action", "must be an object (destinations, profile, send_to_sender)"))
        action_data = {}
    conditions: dict[str, tuple[str, ...]] = {}
    for key, value in match_data.items():
        if key not in CONDITION_FIELDS:
            errors.append(FieldError(f"match.{key}", f"unknown condition; known: {', '.join(CONDITION_FIELDS)}"))
            continue
        conditions[key] = _string_list(f"match.{key}", value, errors)
    for key in action_data:
        if key not in ACTION_FIELDS:
            errors.append(FieldError(f"action.{key}", f"unknown field; known: {', '.join(ACTION_FIELDS)}"))
    destinations = _string_list("action.destinations", action_data.get("destinations", ()), errors)
    profile = action_data.get("profile")
    if profile is not None and (not isinstance(profile, str) or not profile.strip()):
        errors.append(FieldError("action.profile", f"{profile!r}: give a profile name, or leave it out for each destination's own"))
        profile = None
    send_to_sender = action_data.get("send_to_sender", False)
    if not isinstance(send_to_sender, bool):
        errors.append(FieldError("action.send_to_sender", f"{send_to_sender!r}: true or false"))
        send_to_sender = False
    description = data.get("description") or ""
    if not isinstance(description, str) or len(description) > 256:
        errors.append(FieldError("description", "text of at most 256 characters"))
        description = ""
    enabled = data.get("enabled", True)
    if not isinstance(enabled, bool):
        errors.append(FieldError("enabled", f"{enabled!r}: true or false"))
    if errors:
        raise RuleValidationError(errors)
    return RoutingRule(
        name=str(name), match=RouteMatch(**conditions), description=description, enabled=bool(enabled),
        action=RouteAction(destinations=destinations, profile=profile.strip() if profile else None, send_to_sender=send_to_sender),
    )  # fmt: skip


def _string_list(where: str, value: Any, errors: list[FieldError]) -> tuple[str, ...]:
    """A list of non-empty strings (a single string is a list of one), stripped, duplicates dropped."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        errors.append(FieldError(where, f"{value!r}: give a list of text values"))
        return ()
    return tuple(dict.fromkeys(v.strip() for v in value))


def is_glob(pattern: str) -> bool:
    return any(c in _GLOB_CHARS for c in pattern)


def glob_problem(pattern: str, max_length: int) -> str | None:
    """Why ``pattern`` is not a usable exact value or glob, or None."""
    if not pattern:
        return "empty value"
    if len(pattern) > max_length:
        return f"{pattern!r} is longer than {max_length} characters, so it can never match"
    if "\\" in pattern or any(ord(c) < 32 for c in pattern):
        return f"{pattern!r}: backslashes and control characters never occur in these values"
    i = 0
    while i < len(pattern):
        if pattern[i] != "[":
            i += 1
            continue
        j = i + 1
        if j < len(pattern) and pattern[j] == "!":
            j += 1
        if j < len(pattern) and pattern[j] == "]":  # a ']' first in a class is a literal
            j += 1
        close = pattern.find("]", j)
        if close < 0:
            return f"{pattern!r}: '[' at position {i + 1} is never closed (a class is [AB] or [A-Z]; '*' and '?' are the wildcards)"
        body = pattern[i + 1 : close].lstrip("!")
        for start, end in re.findall(r"(.)-(.)", body):
            if start > end:
                return f"{pattern!r}: the range {start}-{end} is reversed, so it matches nothing"
        i = close + 1
    return None


def validate_rule(rule: RoutingRule, nodes: Sequence[RemoteNode], output: OutputSettings) -> None:
    """Raise RuleValidationError naming each field that cannot work with this configuration."""
    from dicom_node.settings import SettingsError

    errors: list[FieldError] = []
    conditions = rule.match.conditions()
    if not conditions:
        errors.append(FieldError("match", f"a rule needs at least one condition ({', '.join(CONDITION_FIELDS)}); "
                                          "results of every study go to destinations marked default_destination"))  # fmt: skip
    by_name = {node.name: node for node in nodes}
    for name, patterns in conditions:
        for index, pattern in enumerate(patterns):
            where = f"match.{name}[{index}]"
            problem = glob_problem(pattern, MAX_LENGTH[name])
            if problem:
                errors.append(FieldError(where, problem))
            elif name == "source" and not is_glob(pattern):
                node = by_name.get(pattern)
                if node is None:
                    errors.append(FieldError(where, f"no remote node named {pattern!r}; see `anatomix-node ae list`"))
                elif not node.is_source:
                    errors.append(FieldError(where, f"{pattern!r} is a {node.role}, not a source: it sends us no studies"))
    action = rule.action
    if not action.destinations and not action.send_to_sender:
        errors.append(FieldError("action.destinations", "the rule sends results nowhere: name a destination or set send_to_sender"))
    for index, name in enumerate(action.destinations):
        node = by_name.get(name)
        if node is None:
            errors.append(FieldError(f"action.destinations[{index}]", f"no remote node named {name!r}; see `anatomix-node ae list`"))
        elif not node.is_destination:
            errors.append(FieldError(f"action.destinations[{index}]", f"{name!r} is a source only; make it a destination with "
                                                                      f"`anatomix-node ae update {name} --role both`"))  # fmt: skip
    if action.profile is not None:
        try:
            output.profile(action.profile)
        except SettingsError as exc:
            errors.append(FieldError("action.profile", str(exc)))
    if errors:
        raise RuleValidationError(errors)


# ---- stored rules: the operations the CLI and the API share -------------------------------------------


def list_rules(store: Store) -> list[RoutingRule]:
    return [RoutingRule.from_record(record) for record in store.list_routing_rules()]


def get_rule(store: Store, name: str) -> RoutingRule | None:
    record = store.get_routing_rule(name)
    return None if record is None else RoutingRule.from_record(record)


def add_rule(store: Store, settings: Settings, rule: RoutingRule, position: int | None = None) -> RoutingRule:
    """Validate and store (StoreConflict if the name exists); returns it with its position."""
    validate_rule(rule, store.list_remote_nodes(), settings.output)
    return RoutingRule.from_record(store.add_routing_rule(rule.to_record(), position))


def update_rule(store: Store, settings: Settings, rule: RoutingRule) -> RoutingRule:
    """Validate and replace the rule of that name (KeyError if unknown); its position stays."""
    validate_rule(rule, store.list_remote_nodes(), settings.output)
    store.update_routing_rule(rule.to_record())
    stored = get_rule(store, rule.name)
    if stored is None:
        raise KeyError(rule.name)
    return stored


def move_rule(store: Store, name: str, position: int) -> RoutingRule:
    return RoutingRule.from_record(store.move_routing_rule(name, position))


def remove_rule(store: Store, name: str) -> bool:
    return store.remove_routing_rule(name)


#: Audit event of every change to the rules (who, what, before and after).
RULE_CHANGE_EVENT = "routing_rule_changed"


def audit_rule_change(
    store: Store, settings: Settings, change: str, before: RoutingRule | None, after: RoutingRule | None, *, user: str, host: str | None
) -> None:
    """One audit event for an admin's change (``add``, ``update``, ``move``, ``remove``), with the
    rule as it was and as it is (the CLI passes the OS user, the API its account)."""
    from dicom_node.audit.trail import Peer, open_audit_trail

    changed = after or before
    name = changed.name if changed else None
    open_audit_trail(store, settings.logging.audit_file).record(
        RULE_CHANGE_EVENT, Peer(None, None, host), change=change, rule=name, user=user,
        before=before.as_dict() if before else None, after=after.as_dict() if after else None,
    )  # fmt: skip


# ---- what is known about a study -----------------------------------------------------------------------


@dataclass(frozen=True)
class StudyFacts:
    """The values rules are matched against (headers: the distinct values over the version's instances)."""

    study_instance_uid: str
    version: int
    calling_ae: str
    source_node: str | None
    source_host: str | None
    modality: tuple[str, ...] = ()
    body_part: tuple[str, ...] = ()
    institution: tuple[str, ...] = ()
    station: tuple[str, ...] = ()

    def values(self, name: str) -> tuple[str, ...]:
        if name == "calling_ae":
            return (self.calling_ae,)
        if name == "source":
            return (self.source_node,) if self.source_node else ()
        return getattr(self, name)

    def as_dict(self) -> dict[str, Any]:
        return {"study_instance_uid": self.study_instance_uid, "version": self.version, "calling_ae": self.calling_ae,
                "source_node": self.source_node, "source_host": self.source_host,
                **{name: list(getattr(self, name)) for name in HEADER_KEYWORDS}}  # fmt: skip


def read_header_values(spool_dir: Path, instances: Sequence[InstanceRecord]) -> dict[str, tuple[str, ...]]:
    """Modality, body part, institution, station: the distinct non-empty values over the instances
    (header only, as ``studies`` reads them; an unreadable or purged file is passed over)."""
    import pydicom

    found: dict[str, dict[str, None]] = {name: {} for name in HEADER_KEYWORDS}
    for instance in instances:
        try:
            ds = pydicom.dcmread(spool_dir / instance.path, stop_before_pixels=True, specific_tags=list(HEADER_KEYWORDS.values()))
        except Exception:  # a purged or unreadable file: its values are unknown, the others still count
            continue
        for name, keyword in HEADER_KEYWORDS.items():
            text = str(ds.get(keyword, "") or "").strip()
            if text:
                found[name][text] = None
    return {name: tuple(values) for name, values in found.items()}


def study_facts(store: Store, spool_dir: Path | None, study: StudyRecord) -> StudyFacts:
    """The facts of the study's current version; header values only when ``spool_dir`` is given."""
    headers: dict[str, tuple[str, ...]] = {}
    if spool_dir is not None:
        headers = read_header_values(spool_dir, store.list_instances(study.study_instance_uid, study.version))
    return StudyFacts(study.study_instance_uid, study.version, study.source_ae, study.source_node, study.source_host, **headers)


# ---- evaluation ---------------------------------------------------------------------------------------


def matches(pattern: str, value: str) -> bool:
    """Exact or glob, case-insensitive (``dx`` matches ``DX``; ``ward-*`` matches ``WARD-A``)."""
    return fnmatch.fnmatchcase(value.upper(), pattern.upper())


@dataclass(frozen=True)
class ConditionCheck:
    field: str
    patterns: tuple[str, ...]
    values: tuple[str, ...]
    held: bool

    def describe(self) -> str:
        label = LABELS[self.field]
        shown = ", ".join(self.values) if self.values else ("(unknown sender)" if self.field == "source" else "(absent)")
        wanted = ", ".join(self.patterns)
        return f"{label} {shown} {'matches' if self.held else 'does not match'} {wanted}"


@dataclass(frozen=True)
class RuleCheck:
    rule: RoutingRule
    #: Every condition of the rule, each checked (so a dry run can say which held and which failed).
    checks: tuple[ConditionCheck, ...]
    #: ``matched``, ``failed``, ``disabled`` or ``not reached`` (an earlier rule matched).
    outcome: str

    def describe(self) -> str:
        head = f"rule {self.rule.position} {self.rule.name}"
        if self.outcome == "disabled":
            return f"{head}: disabled"
        if self.outcome == "not reached":
            return f"{head}: not evaluated (an earlier rule matched)"
        held = [c.describe() for c in self.checks if c.held]
        if self.outcome == "matched":
            return f"{head}: MATCHED: " + "; ".join(held)
        failed = [c.describe() for c in self.checks if not c.held]
        return f"{head}: no match: " + "; ".join(failed) + (f" (held: {'; '.join(held)})" if held else "")


@dataclass(frozen=True)
class Route:
    """One destination of a study, in the profile to use, and why it was chosen."""

    node: RemoteNode
    reason: str


@dataclass
class RoutingDecision:
    facts: StudyFacts
    #: The rule that decided, None: the default applied.
    rule: RoutingRule | None
    checks: list[RuleCheck] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    #: Problems found while routing (a destination removed since the rule was saved...).
    warnings: list[str] = field(default_factory=list)

    def explain(self) -> list[str]:
        lines = [check.describe() for check in self.checks]
        if self.rule is None:
            lines.append(("no rule matched" if self.checks else "no routing rules") +
                         ": the default applies (the sender when it is a destination, plus every default destination)")  # fmt: skip
        lines += [f"warning: {w}" for w in self.warnings]
        if self.routes:
            lines.append("results go to: " + ", ".join(f"{r.node.name} (profile {r.node.profile}; {r.reason})" for r in self.routes))
        else:
            lines.append("results go to: no destination")
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "study": self.facts.as_dict(),
            "rule": self.rule.name if self.rule else None,
            "rules": [
                {
                    "name": c.rule.name,
                    "position": c.rule.position,
                    "outcome": c.outcome,
                    "conditions": [{"field": x.field, "patterns": list(x.patterns), "values": list(x.values), "held": x.held} for x in c.checks],
                }
                for c in self.checks
            ],  # fmt: skip
            "destinations": [{"name": r.node.name, "profile": r.node.profile, "reason": r.reason} for r in self.routes],
            "warnings": list(self.warnings),
            "explanation": self.explain(),
        }


def check_rule(rule: RoutingRule, facts: StudyFacts) -> tuple[ConditionCheck, ...]:
    checks = []
    for name, patterns in rule.match.conditions():
        values = facts.values(name)
        checks.append(ConditionCheck(name, patterns, values, any(matches(p, v) for p in patterns for v in values)))
    return tuple(checks)


def sender_destinations(study: StudyRecord | StudyFacts, destinations: Sequence[RemoteNode]) -> list[RemoteNode]:
    """The node that sent the study when it is also a destination.

    "The sender" is the remote node matched at acceptance by AE title *and* host (recorded on the
    study), never any node that merely shares its AE title: two modalities called ``CR01`` on two
    hosts each get their own results only. A sender accepted without a configured node
    (``accept_unknown_sources``) gets results only from a destination with its AE title *and* host.
    Studies recorded before the sender was kept fall back to the AE title when it names one node.
    """
    source_ae = study.source_ae if isinstance(study, StudyRecord) else study.calling_ae
    if study.source_node is not None:
        return [n for n in destinations if n.name == study.source_node]
    if study.source_host is not None:
        return [n for n in destinations if n.ae_title == source_ae and n.host.lower() == study.source_host.lower()]
    same_title = [n for n in destinations if n.ae_title == source_ae]
    return same_title if len(same_title) == 1 else []


def evaluate_rules(rules: Sequence[RoutingRule], facts: StudyFacts, nodes: Sequence[RemoteNode], output: OutputSettings | None = None) -> RoutingDecision:
    """The first enabled rule that matches decides; none: the default. Pure: no I/O."""
    decision = RoutingDecision(facts, None)
    for rule in rules:
        if decision.rule is not None:
            decision.checks.append(RuleCheck(rule, (), "not reached"))
            continue
        if not rule.enabled:
            decision.checks.append(RuleCheck(rule, (), "disabled"))
            continue
        checks = check_rule(rule, facts)
        held = bool(checks) and all(c.held for c in checks)
        decision.checks.append(RuleCheck(rule, checks, "matched" if held else "failed"))
        if held:
            decision.rule = rule
    destinations = [n for n in nodes if n.is_destination]
    chosen: dict[str, Route] = {}
    if decision.rule is None:
        for node in sender_destinations(facts, destinations):
            chosen.setdefault(node.name, Route(node, "sender"))
        for node in destinations:
            if node.default_destination:
                chosen.setdefault(node.name, Route(node, "default destination"))
    else:
        rule = decision.rule
        by_name = {n.name: n for n in destinations}
        profile = _usable_profile(rule, output, decision.warnings)
        for name in rule.action.destinations:
            target = by_name.get(name)
            if target is None:
                decision.warnings.append(f"rule {rule.name}: destination {name!r} is no longer configured as a destination; skipped")
                continue
            chosen.setdefault(name, Route(replace(target, profile=profile or target.profile), f"rule {rule.name}"))
        if rule.action.send_to_sender:
            for node in sender_destinations(facts, destinations):
                chosen.setdefault(node.name, Route(replace(node, profile=profile or node.profile), f"rule {rule.name}, sender"))
    decision.routes = list(chosen.values())
    return decision


def _usable_profile(rule: RoutingRule, output: OutputSettings | None, warnings: list[str]) -> str | None:
    """The rule's profile, unless the settings no longer define it (then each destination's own)."""
    if rule.action.profile is None or output is None:
        return rule.action.profile
    from dicom_node.settings import SettingsError

    try:
        output.profile(rule.action.profile)
    except SettingsError:
        warnings.append(f"rule {rule.name}: output profile {rule.action.profile!r} is no longer defined; "
                        "each destination's own profile is used")  # fmt: skip
        return None
    return rule.action.profile


def needs_headers(rules: Sequence[RoutingRule]) -> bool:
    return any(rule.enabled and any(name in HEADER_KEYWORDS for name, _ in rule.match.conditions()) for rule in rules)


def decide_routes(store: Store, settings: Settings, study: StudyRecord, *, read_headers: bool | None = None) -> RoutingDecision:
    """Where the results of the study's current version go, and why (rules from the store, header
    values from the spool; the headers are read only when a rule needs them, or when asked)."""
    rules = list_rules(store)
    if read_headers is None:
        read_headers = needs_headers(rules)
    facts = study_facts(store, settings.storage.spool_dir if read_headers else None, study)
    decision = evaluate_rules(rules, facts, store.list_remote_nodes(), settings.output)
    for warning in decision.warnings:
        LOG.warning("study %s v%d: %s", study.study_instance_uid, study.version, warning)
    if decision.rule is not None:
        LOG.debug("study %s v%d: routing rule %s: %s", study.study_instance_uid, study.version, decision.rule.name,
                  ", ".join(r.node.name for r in decision.routes))  # fmt: skip
    return decision
