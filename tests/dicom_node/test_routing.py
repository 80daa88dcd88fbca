"""Routing rules: the model's validation (each error names its field), matching and the order of
evaluation, the default (today's sender + default destinations), and the rules kept in the state
store, on SQLite and PostgreSQL (migration ``routing_rules``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.pipeline.delivery import route_destinations
from dicom_node.pipeline.routing import (
    RouteAction,
    RouteMatch,
    RoutingRule,
    RuleValidationError,
    StudyFacts,
    add_rule,
    decide_routes,
    evaluate_rules,
    glob_problem,
    list_rules,
    matches,
    move_rule,
    parse_rule,
    remove_rule,
    update_rule,
    validate_rule,
)  # fmt: skip
from dicom_node.settings import OutputSettings, load_settings
from dicom_node.store.base import RemoteNode, RoutingRuleRecord, Store, StoreConflict
from tests.dicom_node.test_store import STUDY, instance, store, store_url  # noqa: F401 (fixtures)
from tests.support.postgres import postgres_server, postgres_url  # noqa: F401 (fixtures)

NODES = [
    RemoteNode("ward-a", "MODALITY", "127.0.0.1", 104, role="both", profile="sr-only"),
    RemoteNode("ward-b", "MODALITY", "127.0.0.2", 104, role="source"),
    RemoteNode("pacs-dx", "PACSDX", "10.0.0.1", 104, role="destination", profile="full"),
    RemoteNode("pacs-cr", "PACSCR", "10.0.0.2", 104, role="destination", profile="ohif"),
    RemoteNode("archive", "ARCH", "10.0.0.3", 104, role="destination", profile="pacs-basic", default_destination=True),
]


def rule(name: str, destinations=("pacs-dx",), profile=None, send_to_sender=False, enabled=True, **match) -> RoutingRule:
    conditions = {key: tuple([value] if isinstance(value, str) else value) for key, value in match.items()}
    return RoutingRule(name, RouteMatch(**conditions), RouteAction(tuple(destinations), profile, send_to_sender), enabled=enabled)


def facts(modality=("DX",), source="ward-a", calling_ae="MODALITY", host="127.0.0.1", **headers) -> StudyFacts:
    return StudyFacts(STUDY, 1, calling_ae, source, host, modality=tuple(modality),
                      **{k: tuple([v] if isinstance(v, str) else v) for k, v in headers.items()})  # fmt: skip


def errors_of(candidate: RoutingRule | dict, nodes=NODES) -> dict[str, str]:
    with pytest.raises(RuleValidationError) as caught:
        parsed = parse_rule(candidate) if isinstance(candidate, dict) else candidate
        validate_rule(parsed, nodes, OutputSettings())
    return {e.field: e.message for e in caught.value.errors}


# ---- validation ------------------------------------------------------------------------------------


def test_a_valid_rule_passes_and_round_trips_through_its_json_form() -> None:
    good = rule("dx", modality=["DX", "d?"], source="ward-*", institution="St [AB]*", profile="sr-only", send_to_sender=True)
    validate_rule(good, NODES, OutputSettings())
    assert parse_rule(good.as_dict()) == good
    assert RoutingRule.from_record(replace(good.to_record(), position=3)) == replace(good, position=3)


def test_unknown_destination_source_only_destination_and_unknown_profile_are_named() -> None:
    errors = errors_of(rule("x", destinations=["pacs-dx", "nowhere", "ward-b"], profile="glossy", modality="DX"))
    assert set(errors) == {"action.destinations[1]", "action.destinations[2]", "action.profile"}
    assert "nowhere" in errors["action.destinations[1]"]
    assert "source only" in errors["action.destinations[2]"]
    assert "glossy" in errors["action.profile"] and "sr-only" in errors["action.profile"]  # lists the known ones


def test_an_empty_rule_and_a_rule_that_sends_nowhere_are_refused() -> None:
    assert set(errors_of(rule("x"))) == {"match"}
    assert set(errors_of(rule("x", destinations=(), modality="DX"))) == {"action.destinations"}
    assert set(errors_of({"name": "x", "match": {}, "action": {}})) == {"match", "action.destinations"}
    validate_rule(rule("x", destinations=(), send_to_sender=True, modality="DX"), NODES, OutputSettings())  # back to the sender only


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [("[DX", "never closed"), ("D[z-a]", "reversed"), ("", "empty"), ("A" * 17, "longer than 16"), ("CR\\DX", "backslash")],
)
def test_bad_globs_are_refused_naming_the_value(pattern: str, problem: str) -> None:
    errors = errors_of(rule("x", modality=["DX", pattern]))
    assert list(errors) == ["match.modality[1]"] and problem in errors["match.modality[1]"]


def test_glob_syntax_that_is_fine() -> None:
    for pattern in ("DX", "*", "D?", "[CD]R", "[!C]X", "[]]x", "[A-Z]*", "ST JAMES*"):
        assert glob_problem(pattern, 64) is None, pattern


def test_a_source_condition_names_a_configured_source_unless_it_is_a_glob() -> None:
    errors = errors_of(rule("x", source=["ward-a", "ward-z", "pacs-dx", "ward-*"]))
    assert set(errors) == {"match.source[1]", "match.source[2]"}
    assert "no remote node" in errors["match.source[1]"] and "not a source" in errors["match.source[2]"]


def test_wrong_shapes_name_their_field() -> None:
    errors = errors_of({"name": "bad name", "match": {"modality": 3, "colour": ["red"]},
                        "action": {"destinations": "pacs-dx", "send_to_sender": "yes", "extra": 1}, "when": "now"})  # fmt: skip
    assert set(errors) == {"name", "match.modality", "match.colour", "action.send_to_sender", "action.extra", "when"}
    assert parse_rule({"name": "ok", "match": {"modality": "DX"}, "action": {"destinations": "pacs-dx"}}).action.destinations == ("pacs-dx",)


# ---- matching ----------------------------------------------------------------------------------------


def test_matching_is_exact_or_glob_and_ignores_case() -> None:
    assert matches("DX", "dx") and matches("ward-*", "WARD-A") and matches("[CD]R", "CR") and matches("St*", "ST JAMES")
    assert not matches("DX", "DXA") and not matches("CR", "DX") and not matches("[!C]R", "CR")


def test_the_first_matching_rule_decides_with_its_profile_and_nothing_else_gets_results() -> None:
    rules = [replace(rule("dx", modality="DX", profile="sr-only"), position=1),
             replace(rule("cr", destinations=["pacs-cr"], modality="CR"), position=2),
             replace(rule("any-a", destinations=["archive"], source="ward-a"), position=3)]  # fmt: skip
    dx = evaluate_rules(rules, facts(("DX",)), NODES, OutputSettings())
    assert dx.rule.name == "dx"
    assert [(r.node.name, r.node.profile, r.reason) for r in dx.routes] == [("pacs-dx", "sr-only", "rule dx")]
    assert [c.outcome for c in dx.checks] == ["matched", "not reached", "not reached"]
    cr = evaluate_rules(rules, facts(("CR",)), NODES, OutputSettings())
    assert cr.rule.name == "cr"
    assert [(r.node.name, r.node.profile) for r in cr.routes] == [("pacs-cr", "ohif")]  # its own profile: the rule names none
    explanation = "\n".join(cr.explain())
    assert "rule 1 dx: no match: modality CR does not match DX" in explanation
    assert "rule 2 cr: MATCHED: modality CR matches CR" in explanation
    assert "results go to: pacs-cr (profile ohif; rule cr)" in explanation


def test_every_condition_must_hold_and_the_dry_run_says_which_held() -> None:
    both = [replace(rule("dx-from-b", modality="DX", source="ward-b"), position=1)]
    decision = evaluate_rules(both, facts(("DX",), source="ward-a"), NODES)
    assert decision.rule is None
    [line] = [line for line in decision.explain() if line.startswith("rule 1")]
    assert "source ward-a does not match ward-b" in line and "(held: modality DX matches DX)" in line


def test_any_value_of_the_study_may_match_and_absent_values_never_do() -> None:
    r = [replace(rule("chest", body_part=["CHEST", "THORAX"]), position=1)]
    assert evaluate_rules(r, facts(("CR", "KO"), body_part=("ABDOMEN", "thorax")), NODES).rule is not None
    absent = evaluate_rules(r, facts(("CR",)), NODES)
    assert absent.rule is None and "body part (absent) does not match CHEST, THORAX" in absent.explain()[0]
    unknown = evaluate_rules([replace(rule("s", source="*"), position=1)], facts(source=None), NODES)
    assert unknown.rule is None and "source (unknown sender)" in unknown.explain()[0]


def test_a_disabled_rule_is_skipped() -> None:
    rules = [replace(rule("off", modality="DX", enabled=False), position=1), replace(rule("on", destinations=["pacs-cr"], modality="D*"), position=2)]
    decision = evaluate_rules(rules, facts(("DX",)), NODES)
    assert decision.rule.name == "on" and decision.checks[0].outcome == "disabled"


def test_no_rule_matching_keeps_todays_default_the_sender_and_default_destinations() -> None:
    decision = evaluate_rules([replace(rule("cr", modality="CR"), position=1)], facts(("DX",)), NODES)
    assert [(r.node.name, r.node.profile, r.reason) for r in decision.routes] == [
        ("ward-a", "sr-only", "sender"),
        ("archive", "pacs-basic", "default destination"),
    ]
    # A namesake on another host is not the sender; an unknown sender on a known destination's host is.
    assert [r.node.name for r in evaluate_rules([], facts(source="ward-b", host="127.0.0.2"), NODES).routes] == ["archive"]
    assert [r.node.name for r in evaluate_rules([], facts(source=None, host="127.0.0.1"), NODES).routes] == ["ward-a", "archive"]


def test_send_to_sender_adds_the_sender_in_the_rules_profile() -> None:
    r = [replace(rule("back", destinations=["pacs-cr"], profile="full", send_to_sender=True, calling_ae="MOD*"), position=1)]
    routes = evaluate_rules(r, facts(), NODES, OutputSettings()).routes
    assert [(x.node.name, x.node.profile, x.reason) for x in routes] == [("pacs-cr", "full", "rule back"), ("ward-a", "full", "rule back, sender")]


def test_a_destination_removed_after_saving_is_skipped_with_a_warning() -> None:
    r = [replace(rule("dx", destinations=["gone", "pacs-dx"], modality="DX", profile="retired"), position=1)]
    decision = evaluate_rules(r, facts(), NODES, OutputSettings())
    assert [(x.node.name, x.node.profile) for x in decision.routes] == [("pacs-dx", "full")]  # own profile: "retired" is gone
    assert any("'gone'" in w for w in decision.warnings) and any("'retired'" in w for w in decision.warnings)


# ---- the store (SQLite and PostgreSQL) --------------------------------------------------------------------


def _record(name: str, modality: str = "DX") -> RoutingRuleRecord:
    return rule(name, modality=modality).to_record()


def test_rules_keep_their_order_through_add_move_remove(store: Store) -> None:
    assert store.list_routing_rules() == []
    store.add_routing_rule(_record("a"))
    store.add_routing_rule(_record("b"))
    assert store.add_routing_rule(_record("first"), position=1).position == 1
    store.add_routing_rule(_record("c"), position=99)  # past the end: last
    names = lambda: [(r.name, r.position) for r in store.list_routing_rules()]  # noqa: E731
    assert names() == [("first", 1), ("a", 2), ("b", 3), ("c", 4)]
    assert store.move_routing_rule("c", 2).position == 2
    assert names() == [("first", 1), ("c", 2), ("a", 3), ("b", 4)]
    store.move_routing_rule("first", 4)
    assert names() == [("c", 1), ("a", 2), ("b", 3), ("first", 4)]
    assert store.remove_routing_rule("a") and not store.remove_routing_rule("a")
    assert names() == [("c", 1), ("b", 2), ("first", 3)]
    with pytest.raises(KeyError):
        store.move_routing_rule("a", 1)
    with pytest.raises(StoreConflict):
        store.add_routing_rule(_record("b"))


def test_a_rule_round_trips_and_an_update_keeps_its_place(store: Store) -> None:
    saved = rule("dx", modality=["DX", "d?"], institution="St [AB]*", profile="sr-only", send_to_sender=True)
    store.add_routing_rule(_record("other"))
    store.add_routing_rule(replace(saved, description="DX to the DX PACS").to_record())
    got = store.get_routing_rule("dx")
    assert (got.position, got.description, got.enabled, got.updated_at is not None) == (2, "DX to the DX PACS", True, True)
    assert RoutingRule.from_record(got) == replace(saved, description="DX to the DX PACS", position=2)
    store.update_routing_rule(replace(saved, enabled=False, match=RouteMatch(modality=("CR",))).to_record())
    got = store.get_routing_rule("dx")
    assert (got.position, got.enabled, got.match) == (2, False, {"modality": ["CR"]})
    with pytest.raises(KeyError):
        store.update_routing_rule(_record("missing"))
    assert store.get_routing_rule("missing") is None


def test_saving_validates_against_the_configured_nodes(store: Store, tmp_path: Path) -> None:
    settings = load_settings(None, env={})
    for node in NODES:
        store.add_remote_node(node)
    with pytest.raises(RuleValidationError) as caught:
        add_rule(store, settings, rule("x", destinations=["pacs-dx", "nowhere"], modality="DX"))
    assert [e.field for e in caught.value.errors] == ["action.destinations[1]"]
    assert store.list_routing_rules() == []  # nothing saved
    add_rule(store, settings, rule("dx", modality="DX"))
    add_rule(store, settings, rule("cr", destinations=["pacs-cr"], modality="CR"), position=1)
    with pytest.raises(RuleValidationError):
        update_rule(store, settings, rule("cr", destinations=["ward-b"], modality="CR"))
    assert update_rule(store, settings, rule("cr", destinations=["archive"], modality="CR")).action.destinations == ("archive",)
    assert [(r.name, r.position) for r in list_rules(store)] == [("cr", 1), ("dx", 2)]
    assert move_rule(store, "dx", 1).position == 1 and remove_rule(store, "cr")
    assert [r.name for r in list_rules(store)] == ["dx"]


def _spool_instance(spool: Path, sop: str, modality: str, body_part: str, station: str) -> None:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.SOPClassUID, ds.SOPInstanceUID, ds.StudyInstanceUID = "1.2.840.10008.5.1.4.1.1.1", sop, STUDY
    ds.Modality, ds.BodyPartExamined, ds.StationName, ds.InstitutionName = modality, body_part, station, "St James"
    path = spool / instance(sop, sha=sop.replace(".", "")[-8:].rjust(64, "0")).path
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def test_decide_routes_reads_the_spooled_headers(store: Store, tmp_path: Path) -> None:
    config = tmp_path / "anatomix-node.toml"
    config.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    settings = load_settings(config, env={})
    for node in NODES:
        store.add_remote_node(node)
    for sop, modality, station in (("2.1", "CR", "ROOM1"), ("2.2", "KO", "ROOM1")):
        _spool_instance(settings.storage.spool_dir, sop, modality, "CHEST", station)
        store.record_instance(instance(sop, sha=sop.replace(".", "")[-8:].rjust(64, "0")), source_node="ward-a", source_host="127.0.0.1")
    study = store.get_study(STUDY)
    # No rules: today's default, headers not even read.
    assert [n.name for n in route_destinations(store, study, settings)] == ["ward-a", "archive"]
    assert decide_routes(store, settings, study).facts.modality == ()
    add_rule(store, settings, rule("room2", destinations=["pacs-dx"], station="ROOM2"))
    add_rule(store, settings, rule("cr-chest", destinations=["pacs-cr"], modality="CR", body_part="chest", institution="st j*",
                                   profile="sr-only"))  # fmt: skip
    decision = decide_routes(store, settings, study)
    assert decision.facts.modality == ("CR", "KO") and decision.facts.station == ("ROOM1",)
    assert decision.rule.name == "cr-chest"
    assert [(n.name, n.profile) for n in route_destinations(store, study, settings)] == [("pacs-cr", "sr-only")]
    assert "rule 1 room2: no match: station ROOM1 does not match ROOM2" in decision.explain()
