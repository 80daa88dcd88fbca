"""``anatomix-node route``: run as a user runs it (the installed script in a subprocess)."""

from __future__ import annotations

import json
from pathlib import Path

from dicom_node.settings import load_settings
from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord
from tests.dicom_node.test_cli_node import assert_one_line_error, node, site  # noqa: F401 (fixture)
from tests.dicom_node.test_store import T0


def add_nodes(site: Path) -> None:
    for args in (("ward", "--ae-title", "WARD", "--host", "127.0.0.1", "--role", "source"),
                 ("pacs-dx", "--ae-title", "PACSDX", "--host", "127.0.0.1", "--port", "11120", "--role", "destination"),
                 ("pacs-cr", "--ae-title", "PACSCR", "--host", "127.0.0.1", "--port", "11121", "--role", "destination")):  # fmt: skip
        result = node(site, "ae", "add", *args)
        assert result.returncode == 0, result.stderr


def rules(site: Path) -> list[dict]:
    result = node(site, "route", "list", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_add_list_update_move_remove(site: Path) -> None:
    add_nodes(site)
    assert "no routing rules" in node(site, "route", "list").stdout
    added = node(site, "route", "add", "dx", "--source", "ward", "--modality", "DX", "--modality", "D?", "--to", "pacs-dx")
    assert added.returncode == 0 and "added rule 1 dx: source=ward; modality=DX,D? -> pacs-dx" in added.stdout, added.stderr
    first = node(site, "route", "add", "cr", "--modality", "cr", "--to", "pacs-cr", "--profile", "sr-only", "--position", "1")
    assert first.returncode == 0, first.stderr
    assert [(r["name"], r["position"]) for r in rules(site)] == [("cr", 1), ("dx", 2)]
    listing = node(site, "route", "list").stdout
    assert "sr-only" in listing and "source=ward; modality=DX,D?" in listing
    changed = node(site, "route", "update", "dx", "--clear", "source", "--body-part", "CHEST", "--no-enabled", "--send-to-sender")
    assert changed.returncode == 0, changed.stderr
    [_, dx] = rules(site)
    assert dx["match"] == {"modality": ["DX", "D?"], "body_part": ["CHEST"]} and dx["enabled"] is False
    assert dx["action"] == {"destinations": ["pacs-dx"], "profile": None, "send_to_sender": True} and dx["position"] == 2
    assert "nothing to change" in node(site, "route", "update", "dx", "--body-part", "CHEST").stdout
    assert node(site, "route", "move", "dx", "1").returncode == 0
    assert [r["name"] for r in rules(site)] == ["dx", "cr"]
    assert node(site, "route", "remove", "cr").returncode == 0
    assert [r["name"] for r in rules(site)] == ["dx"]
    store = open_store(load_settings(site / "anatomix-node.toml", env={}).database_url)
    try:  # every change audited: who, what, before and after
        events = list(reversed(store.list_audit_events("routing_rule_changed")))
    finally:
        store.close()
    assert [(e.detail["change"], e.detail["rule"]) for e in events] == [("add", "dx"), ("add", "cr"), ("update", "dx"), ("move", "dx"), ("remove", "cr")]
    update = events[2].detail
    assert update["before"]["enabled"] is True and update["after"]["enabled"] is False and update["user"]
    assert events[4].detail["after"] is None and events[4].detail["before"]["action"]["profile"] == "sr-only"


def test_mistakes_are_one_line_naming_the_field(site: Path) -> None:
    add_nodes(site)
    assert_one_line_error(node(site, "route", "add", "x", "--to", "pacs-dx"), "routing rule not saved", "match: a rule needs at least one condition")
    assert_one_line_error(node(site, "route", "add", "x", "--modality", "[DX", "--to", "pacs-dx"), "match.modality[0]", "never closed")
    assert_one_line_error(node(site, "route", "add", "x", "--modality", "DX", "--to", "ward", "--to", "pacs-zz", "--profile", "nope"),
                          "action.destinations[0]", "source only", "action.destinations[1]", "'pacs-zz'", "action.profile", "'nope'")  # fmt: skip
    assert_one_line_error(node(site, "route", "add", "x", "--source", "nobody", "--to", "pacs-dx"), "match.source[0]", "'nobody'")
    assert rules(site) == []  # nothing half-saved
    assert node(site, "route", "add", "dx", "--modality", "DX", "--to", "pacs-dx").returncode == 0
    assert_one_line_error(node(site, "route", "add", "dx", "--modality", "CR", "--to", "pacs-cr"), "already exists", "route update dx")
    assert_one_line_error(node(site, "route", "update", "dx", "--to", "pacs-qq"), "action.destinations[0]", "'pacs-qq'")
    assert_one_line_error(node(site, "route", "update", "nope", "--modality", "CR"), "no routing rule named 'nope'")
    assert_one_line_error(node(site, "route", "move", "dx", "3"), "position 3", "1 to 1")
    assert_one_line_error(node(site, "route", "remove", "nope"), "no routing rule named 'nope'")
    assert_one_line_error(node(site, "route", "dry-run"), "no studies received yet")
    assert_one_line_error(node(site, "route", "dry-run", "1.2.3"), "no study 1.2.3")
    assert rules(site)[0]["action"]["destinations"] == ["pacs-dx"]  # the failed update changed nothing


def test_dry_run_without_rules_explains_the_default(site: Path) -> None:
    add_nodes(site)
    settings = load_settings(site / "anatomix-node.toml", env={})
    store = open_store(settings.database_url)
    try:  # a study whose spooled file is gone (purged): header values are absent, the default still applies
        store.record_instance(InstanceRecord("5.1", "1.2.840.10008.5.1.4.1.1.1", "5.0", "5.0.1", "1.2.840.10008.1.2.1",
                                             "5.0/5.1.dcm", 10, "f" * 64, "WARD", T0), source_node="ward", source_host="127.0.0.1")  # fmt: skip
    finally:
        store.close()
    dry = node(site, "route", "dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "study 5.0 v1 (receiving) from WARD@127.0.0.1, source node ward" in dry.stdout
    assert "header: modality (absent); body part (absent)" in dry.stdout
    assert "no routing rules: the default applies" in dry.stdout and "results go to: no destination" in dry.stdout
    assert node(site, "route", "add", "w", "--calling-ae", "ward", "--to", "pacs-cr").returncode == 0
    explained = json.loads(node(site, "route", "dry-run", "5.0", "--json").stdout)
    assert explained["rule"] == "w" and explained["destinations"] == [{"name": "pacs-cr", "profile": "full", "reason": "rule w"}]
    assert explained["rules"][0]["conditions"] == [{"field": "calling_ae", "patterns": ["ward"], "values": ["WARD"], "held": True}]
