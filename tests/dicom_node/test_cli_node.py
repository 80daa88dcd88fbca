"""The admin commands, run as a user runs them: the installed ``anatomix-node`` script in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from dicom_node.settings import Settings, load_settings
from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord
from tests.support.dcmtk import StoreScp
from tests.support.net import free_port

SCRIPT = Path(sys.executable).parent / "anatomix-node"
STUDY = "1.2.826.0.1.3680043.10.1431.9.7"


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any ANATOMIX_* settings of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANATOMIX_")}
    return {**env, "TCP_NODELAY": "1", **extra}


def node(cwd: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(SCRIPT), *args], cwd=cwd, env=env or clean_env(), capture_output=True, text=True, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A directory initialised with `anatomix-node init` (the config found from the current directory)."""
    result = node(tmp_path, "init", "--dir", ".")
    assert result.returncode == 0, result.stderr
    return tmp_path


def test_init_writes_a_loadable_default_config_and_refuses_to_overwrite(tmp_path: Path) -> None:
    result = node(tmp_path, "init", "--dir", "site")
    assert result.returncode == 0, result.stderr
    config = tmp_path / "site" / "anatomix-node.toml"
    text = config.read_text()
    assert text.count("#") > 30  # commented for the admin who edits it
    settings = load_settings(config, env={})
    # Every value in the file is the built-in default; data_dir is resolved next to the file.
    assert replace(settings, storage=replace(settings.storage, data_dir=Path("var")), source="defaults") == Settings()
    assert settings.storage.data_dir == (tmp_path / "site" / "var").resolve()

    config.write_text(text + "\n# edited by the admin\n")
    assert_one_line_error(node(tmp_path, "init", "--dir", "site"), "already exists", "--force")
    assert config.read_text().endswith("# edited by the admin\n")
    assert node(tmp_path, "init", "--dir", "site", "--force").returncode == 0
    assert config.read_text() == text


def test_ae_add_list_remove(site: Path) -> None:
    added = node(site, "ae", "add", "ct-room", "--ae-title", "CR01", "--host", "*", "--port", "104", "--role", "source",
                 "--quiet-period", "5", "--complete-on-release")  # fmt: skip
    assert added.returncode == 0, added.stderr
    assert node(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "4242",
                "--role", "destination", "--profile", "ohif", "--default-destination").returncode == 0  # fmt: skip
    listed = node(site, "ae", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    nodes = {n["name"]: n for n in json.loads(listed.stdout)}
    assert nodes["ct-room"] == {
        "name": "ct-room", "ae_title": "CR01", "host": "*", "port": 104, "role": "source", "profile": "full",
        "quiet_period_s": 5.0, "complete_on_release": True, "default_destination": False, "tls": False,
        "tls_ca_file": None, "tls_cert_file": None, "tls_key_file": None, "tls_verify_peer": True,
        "tls_check_hostname": True, "tls_client_certificate": "optional",
        "url": None, "auth_token_file": None, "basic_auth_file": None,
    }  # fmt: skip
    assert (nodes["pacs"]["profile"], nodes["pacs"]["default_destination"]) == ("ohif", True)
    table = node(site, "ae", "list").stdout
    assert "ct-room" in table and "complete-on-release" in table and "default-destination" in table

    assert node(site, "ae", "remove", "ct-room").returncode == 0
    assert [n["name"] for n in json.loads(node(site, "ae", "list", "--json").stdout)] == ["pacs"]
    # the data really is in the state store the settings name
    store = open_store(load_settings(site / "anatomix-node.toml", env={}).database_url)
    assert [n.name for n in store.list_remote_nodes()] == ["pacs"]
    store.close()


def test_ae_update_changes_only_what_is_given(site: Path) -> None:
    assert node(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "4242", "--role", "destination",
                "--profile", "ohif", "--default-destination").returncode == 0  # fmt: skip
    updated = node(site, "ae", "update", "pacs", "--port", "4343", "--role", "both", "--no-default-destination")
    assert updated.returncode == 0, updated.stderr
    assert "port 4242 -> 4343" in updated.stdout and "default_destination True -> False" in updated.stdout
    [pacs] = json.loads(node(site, "ae", "list", "--json").stdout)
    # A destination carries its health (never tried yet: unused, nothing waiting).
    health = pacs.pop("health")
    assert {k: health[k] for k in ("name", "state", "waiting", "last_success_at")} == {
        "name": "pacs", "state": "unused", "waiting": 0, "last_success_at": None}  # fmt: skip
    assert pacs == {
        "name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4343, "role": "both", "profile": "ohif",
        "quiet_period_s": None, "complete_on_release": False, "default_destination": False, "tls": False,
        "tls_ca_file": None, "tls_cert_file": None, "tls_key_file": None, "tls_verify_peer": True,
        "tls_check_hostname": True, "tls_client_certificate": "optional",
        "url": None, "auth_token_file": None, "basic_auth_file": None,
    }  # fmt: skip
    assert "nothing to change" in node(site, "ae", "update", "pacs", "--port", "4343").stdout
    assert_one_line_error(node(site, "ae", "update", "nobody", "--port", "1"), "no remote node named 'nobody'")
    assert_one_line_error(node(site, "ae", "update", "pacs", "--port", "0"), "--port 0")
    assert_one_line_error(node(site, "ae", "update", "pacs", "--role", "destination", "--host", "*"), "'*' only suits a source")
    assert json.loads(node(site, "ae", "list", "--json").stdout)[0]["port"] == 4343  # refused updates changed nothing


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (("ae", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "4242", "--role", "both"), ("'pacs' already exists",)),
        (
            ("ae", "add", "x", "--ae-title", "WAY_TOO_LONG_AE_TITLE", "--host", "h", "--port", "104", "--role", "source"),
            ("--ae-title", "WAY_TOO_LONG_AE_TITLE"),
        ),
        (("ae", "add", "x", "--ae-title", "A", "--host", "h", "--port", "70000", "--role", "source"), ("--port 70000", "1-65535")),
        (("ae", "add", "x", "--ae-title", "A", "--host", "h", "--port", "abc", "--role", "source"), ("--port 'abc'",)),
        (("ae", "add", "x", "--ae-title", "A", "--host", "*", "--port", "104", "--role", "destination"), ("'*' only suits a source",)),
        (("ae", "add", "x", "--ae-title", "A", "--host", "h", "--port", "104", "--role", "both", "--profile", "nope"), ("'nope'", "known profiles")),
        (("ae", "add", "bad name", "--ae-title", "A", "--host", "h", "--port", "104", "--role", "source"), ("name 'bad name'",)),
        (("ae", "remove", "nobody"), ("no remote node named 'nobody'",)),
        (("echo", "nobody"), ("no remote node named 'nobody'",)),
        (("studies", "--config", "missing.toml"), ("missing.toml", "does not exist")),
        (("ae",), ("`ae` needs an action", "add, update, list, remove or token")),
    ],
)
def test_human_errors_are_one_line_without_traceback(site: Path, args: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    if "'pacs' already exists" in fragments:
        assert node(site, *args).returncode == 0
    assert_one_line_error(node(site, *args), *fragments)


def test_bad_config_value_names_key_and_value(site: Path) -> None:
    config = site / "anatomix-node.toml"
    config.write_text(config.read_text().replace("port = 11112", "port = 70000"))
    assert_one_line_error(node(site, "ae", "list"), "node.port = 70000")
    assert_one_line_error(node(site, "ae", "list", env=clean_env(ANATOMIX_NODE_PORT="11112", ANATOMIX_LOGGING_LEVEL="LOUD")), "logging.level", "LOUD")


def test_config_show_reflects_file_and_environment_and_hides_passwords(site: Path) -> None:
    env = clean_env(ANATOMIX_NODE_AE_TITLE="NODE7", ANATOMIX_DATABASE_URL="postgresql://anatomix:s3cret@db:5432/anatomix")
    shown = node(site, "config", "show", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    values = json.loads(shown.stdout)
    assert values["node"]["ae_title"] == "NODE7" and values["node"]["port"] == 11112
    assert values["source"].endswith("anatomix-node.toml")
    assert "s3cret" not in shown.stdout and values["database"]["url"] == "postgresql://anatomix:***@db:5432/anatomix"
    toml = node(site, "config", "show", env=env)
    assert toml.returncode == 0 and 'ae_title = "NODE7"' in toml.stdout and "s3cret" not in toml.stdout
    import tomllib

    assert tomllib.loads(toml.stdout)["node"]["ae_title"] == "NODE7"  # the TOML rendering parses back


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[int]:
    """DCMTK storescp (a real third-party SCP, the Debian binary) on a free port, AE title PACS.

    Ready when storescp itself listens (its socket in /proc), not after a fixed connect poll; a port
    taken meanwhile by another test makes it exit, and it is started again on another port.
    """
    scp = StoreScp(tmp_path / "storescp", ae_title="PACS").start()
    try:
        yield scp.port
    finally:
        scp.stop()


def test_echo_a_real_dcmtk_storescp(site: Path, storescp: int) -> None:
    assert node(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", str(storescp), "--role", "destination").returncode == 0
    echoed = node(site, "echo", "pacs")
    assert echoed.returncode == 0, echoed.stderr
    assert "C-ECHO success" in echoed.stdout and " ms round trip" in echoed.stdout


def test_storescp_peer_starts_on_another_port_when_its_port_was_taken(tmp_path: Path) -> None:
    """The race behind the fixture's old 30 s failures: between free_port() and storescp's bind,
    another process (any outgoing connection gets an ephemeral port) holds the port; storescp
    exits. The peer must notice the exit at once and start again elsewhere, not wait for a port
    that nobody will ever listen on."""
    import socket

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # bound, not listening: nothing answers, but bind() fails
        taken = holder.getsockname()[1]
        scp = StoreScp(tmp_path / "storescp", ae_title="PACS", port=taken).start()
        try:
            assert scp.port != taken
            echo = AE(ae_title="ECHO")
            echo.add_requested_context(Verification)
            assoc = echo.associate("127.0.0.1", scp.port, ae_title="PACS")
            assert assoc.is_established
            assert assoc.send_c_echo().Status == 0x0000
            assoc.release()
        finally:
            scp.stop()


def test_echo_reports_rejection_and_refusal_in_one_line(site: Path) -> None:
    picky = AE(ae_title="PICKY")
    picky.add_supported_context(Verification)
    picky.require_called_aet = True  # rejects an association addressed to another AE title
    port = free_port()
    server = picky.start_server(("127.0.0.1", port), block=False)
    try:
        node(site, "ae", "add", "wrong-aet", "--ae-title", "NOTPICKY", "--host", "127.0.0.1", "--port", str(port), "--role", "destination")
        assert_one_line_error(node(site, "echo", "wrong-aet"), "association rejected", "Called AE title not recognised")
    finally:
        server.shutdown()
    node(site, "ae", "add", "closed", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", str(free_port()), "--role", "destination")
    assert_one_line_error(node(site, "echo", "closed", "--timeout", "5"), "cannot connect", "Connection refused")


def test_studies_json_shows_state_counts_reasons_and_stage_times(site: Path) -> None:
    store = open_store(load_settings(site / "anatomix-node.toml", env={}).database_url)
    t0 = datetime.now(UTC) - timedelta(minutes=1)
    ids = []
    for n in range(3):
        record = InstanceRecord(f"{STUDY}.{n}", "1.2.840.10008.5.1.4.1.1.1", STUDY, STUDY + ".1", "1.2.840.10008.1.2.1",
                                f"spool/{n}.dcm", 100, f"{n:064x}", "CR01", t0 + timedelta(seconds=n))  # fmt: skip
        ids.append(store.record_instance(record).instance.id)
    store.set_instance_state(ids[0], "selected")
    store.set_instance_state(ids[1], "skipped", "lateral view (ViewPosition LL)")
    store.set_instance_state(ids[2], "skipped", "lateral view (ViewPosition LL)")
    assert store.transition_study(STUDY, 1, ("receiving",), "stable")
    assert store.transition_study(STUDY, 1, ("stable",), "queued")
    store.close()

    result = node(site, "studies", "--json")
    assert result.returncode == 0, result.stderr
    [study] = json.loads(result.stdout)
    assert (study["study_instance_uid"], study["state"], study["version"], study["source_ae"]) == (STUDY, "queued", 1, "CR01")
    assert study["instance_count"] == 3 and study["instance_states"] == {"selected": 1, "skipped": 2}
    assert study["skip_reasons"] == {"lateral view (ViewPosition LL)": 2}
    assert [s["state"] for s in study["stages"]] == ["receiving", "stable", "queued"]
    assert all(s["seconds"] is not None and s["seconds"] >= 0 for s in study["stages"])
    assert set(study["state_times"]) == {"receiving", "stable", "queued"}

    assert json.loads(node(site, "studies", "--json", "--state", "done").stdout) == []
    table = node(site, "studies")
    assert STUDY in table.stdout and "2x lateral view (ViewPosition LL)" in table.stdout
