"""A new site's first week (issue 9), run as an admin runs it: the real ``anatomix-node`` process.

Each test checks the exit status, the one line printed and that no traceback appears.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

from dicom_node.cli.main import build_parser
from dicom_node.pipeline.analysis import StudyAnalysis
from dicom_node.settings import CONFIG_FILE_NAME, load_settings
from dicom_node.store import open_store
from dicom_node.store.base import InstanceRecord
from tests.dicom_node.test_cli_node import assert_one_line_error, clean_env, node
from tests.support.node import NODE_COMMAND, READY_LINE, REPO_ROOT, NodeProcess
from tests.support.workers import DEMO_WEIGHTS_CACHE

STUDY = "1.2.826.0.1.3680043.10.1431.9.8"
CHEST_CR = Path(get_testdata_file("RG1_UNCR.dcm"))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    result = node(tmp_path, "init", "--dir", ".")
    assert result.returncode == 0, result.stderr
    return tmp_path


@pytest.fixture(scope="module")
def demo_model() -> Path:
    """The tiny demo model directory (generated once per test session, shared with the pipeline tests)."""
    from inference.demo_weights import ensure_demo_weights

    return ensure_demo_weights(DEMO_WEIGHTS_CACHE, size="tiny")


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stdout + result.stderr, result.stderr


# ---- 1: serve --demo-weights -------------------------------------------------------------------------


def start_serve(site: NodeProcess, *extra: str) -> subprocess.Popen:
    """`serve --config` (plus ``extra``) as NodeProcess would start it, returning once it listens."""
    site.write_config()
    models = site.data_dir / "models"  # the tiny weights are generated once per session, then linked
    models.parent.mkdir(parents=True, exist_ok=True)
    DEMO_WEIGHTS_CACHE.mkdir(parents=True, exist_ok=True)
    if not models.exists():
        models.symlink_to(DEMO_WEIGHTS_CACHE, target_is_directory=True)
    log = open(site.log_path, "ab")
    process = subprocess.Popen([*NODE_COMMAND, "serve", "--config", str(site.config_path), *extra], cwd=REPO_ROOT,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=clean_env())  # fmt: skip
    site.process = process
    deadline = time.monotonic() + 60
    while READY_LINE not in site.log_text():
        assert process.poll() is None, site.log_text()
        assert time.monotonic() < deadline, site.log_text()
        time.sleep(0.1)
    return process


def test_serve_accepts_demo_weights_and_says_which_model_it_uses(tmp_path: Path) -> None:
    site = NodeProcess(tmp_path / "node")
    start_serve(site, "--demo-weights")
    try:
        [ready] = [line for line in site.log_text().splitlines() if READY_LINE in line]
        assert "model: demo weights (torch, cpu)" in ready
    finally:
        assert site.stop() == 0
    assert "unrecognized arguments" not in site.log_text()


# ---- 3: analyze: one line, not a traceback ------------------------------------------------------------


def test_analyze_with_an_incomplete_model_directory_prints_one_line(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "lm.pt").write_bytes(b"not a checkpoint")
    result = node(tmp_path, "analyze", str(CHEST_CR), "--out", str(tmp_path / "out"), "--model", str(model))
    assert result.returncode == 1
    assert_one_line_error(result, "is incomplete, missing: apm", "demo-weights")


def test_analyze_on_a_cuda_device_this_host_lacks_prints_one_line(tmp_path: Path) -> None:
    result = node(tmp_path, "analyze", str(CHEST_CR), "--out", str(tmp_path / "out"), "--demo-weights", "--device", "cuda:99")
    assert result.returncode == 1
    assert_one_line_error(result, "device 'cuda:99'")
    assert not (tmp_path / "out").exists()  # refused before anything was read or generated


# ---- 4: a worker that cannot analyse does not pretend to ---------------------------------------------


def test_worker_on_a_missing_cuda_device_exits_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*NODE_COMMAND, "worker", "--queues", "analyze", "--demo-weights", "--device", "cuda:99"],
                            cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=90)  # fmt: skip
    assert result.returncode == 1
    assert_one_line_error(result, "device 'cuda:99'")


def test_worker_with_an_incomplete_model_directory_exits_with_one_line(site: Path) -> None:
    model = site / "model"
    model.mkdir()
    (model / "apm.pth").write_bytes(b"")
    env = clean_env(ANATOMIX_MODEL_DIR=str(model))
    result = subprocess.run([*NODE_COMMAND, "worker", "--queues", "analyze"], cwd=site, env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    assert_one_line_error(result, "model.dir", "is incomplete, missing: lm")
    # the deliver queue needs no model: that worker is not refused (it runs until stopped)
    deliver = subprocess.Popen([*NODE_COMMAND, "worker", "--queues", "deliver"], cwd=site, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:  # up when Celery says it is ready (the worker reports itself then), not after a guessed sleep
        store = open_store(load_settings(site / CONFIG_FILE_NAME).database_url)
        try:
            deadline = time.monotonic() + 90
            while not store.list_worker_reports() and deliver.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            assert store.list_worker_reports(), "the deliver worker never reported itself ready"
        finally:
            store.close()
        assert deliver.poll() is None
    finally:
        deliver.send_signal(signal.SIGTERM)
        out, _ = deliver.communicate(timeout=60)
    assert deliver.returncode == 0 and "Traceback" not in out


# ---- 5: no silent new database -------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("studies",), ("ae", "list"), ("echo", "pacs"), ("purge", "--older-than-days", "1"),
                                  ("ae", "remove", "pacs"),
                                  ("ae", "add", "ct", "--ae-title", "CT", "--host", "*", "--role", "source")])  # fmt: skip
def test_commands_refuse_to_create_a_new_state_store(tmp_path: Path, args: tuple[str, ...]) -> None:
    result = node(tmp_path, *args)
    assert_one_line_error(result, f"no state store at {tmp_path.resolve() / 'var' / 'anatomix.db'}", "built-in defaults", "--config", "init")
    assert list(tmp_path.iterdir()) == []


def test_studies_and_ae_list_say_which_settings_and_store_they_read(site: Path) -> None:
    config = site / CONFIG_FILE_NAME
    for args in (("studies",), ("ae", "list")):
        result = node(site, *args)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[0] == f"# settings {config}, state store SQLite {site.resolve() / 'var' / 'anatomix.db'}"


# ---- 6: platform defaults ------------------------------------------------------------------------------


def test_a_config_under_etc_keeps_its_data_in_var_lib() -> None:
    from dicom_node.cli.node import default_data_dir
    from dicom_node.settings import SYSTEM_CONFIG_DIR, SYSTEM_DATA_DIR

    assert default_data_dir(SYSTEM_CONFIG_DIR) == str(SYSTEM_DATA_DIR) == "/var/lib/anatomix"
    assert default_data_dir(Path("/etc")) == str(SYSTEM_DATA_DIR)
    assert default_data_dir(Path("/srv/anatomix")) == "var"
    assert default_data_dir(Path("site")) == "var"


def test_without_a_local_config_the_system_one_is_found(tmp_path: Path) -> None:
    from dicom_node.settings import SYSTEM_CONFIG_DIR, find_config_file

    assert SYSTEM_CONFIG_DIR == Path("/etc/anatomix")
    system = tmp_path / "etc" / "anatomix"
    system.mkdir(parents=True)
    (system / CONFIG_FILE_NAME).write_text("")
    here = tmp_path / "somewhere"
    here.mkdir()
    assert find_config_file(None, cwd=here, system_dir=system) == system / CONFIG_FILE_NAME
    (here / CONFIG_FILE_NAME).write_text("")
    assert find_config_file(None, cwd=here, system_dir=system) == here / CONFIG_FILE_NAME


def test_init_data_dir_is_written_and_the_store_created_there(tmp_path: Path) -> None:
    data = tmp_path / "lib" / "anatomix"
    result = node(tmp_path, "init", "--dir", "etc", "--data-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"wrote etc/{CONFIG_FILE_NAME}; data (spool, results, database) in {data}"
    # A fresh node says where results go (nowhere yet) and how to add a destination that gets them.
    assert "results: none will leave the node until a destination is set" in result.stdout
    assert "--role destination --default-destination --config etc/" in result.stdout
    settings = load_settings(tmp_path / "etc" / CONFIG_FILE_NAME, env={})
    assert settings.storage.data_dir == data and (data / "anatomix.db").is_file()
    assert not (tmp_path / "etc" / "var").exists()
    assert node(tmp_path, "studies", "--config", f"etc/{CONFIG_FILE_NAME}").returncode == 0


def test_systemd_units_and_example_configs_agree_with_the_system_defaults() -> None:
    from dicom_node.settings import SYSTEM_CONFIG_DIR, SYSTEM_DATA_DIR

    deploy = REPO_ROOT / "deploy"
    config = str(SYSTEM_CONFIG_DIR / CONFIG_FILE_NAME)
    units = sorted((deploy / "systemd").glob("*.service"))
    assert len(units) == 3
    for unit in units:
        text = unit.read_text()
        [exec_start] = re.findall(r"^ExecStart=(.*)$", text, re.M)
        assert f"--config {config}" in exec_start, unit.name
        assert re.findall(r"^ReadWritePaths=(.*)$", text, re.M) == [str(SYSTEM_DATA_DIR)], unit.name
        assert "ProtectSystem=strict" in text and "KillMode=mixed" in text, unit.name
    node_unit = (deploy / "systemd" / "anatomix-node.service").read_text()  # the node owns the data directory
    assert f"StateDirectory={SYSTEM_DATA_DIR.name}" in node_unit and SYSTEM_DATA_DIR.parent == Path("/var/lib")
    for example in [deploy / "anatomix-node.example.toml", *sorted((deploy / "examples").glob("*.toml"))]:
        settings = load_settings(example, env={})
        assert settings.storage.data_dir == SYSTEM_DATA_DIR, example.name


# ---- 9: a skipped study is an outcome, not an error ------------------------------------------------------


def test_studies_shows_a_study_with_nothing_to_analyse_as_skipped(site: Path) -> None:
    store = open_store(load_settings(site / CONFIG_FILE_NAME, env={}).database_url)
    reason = "lateral view (ViewPosition LL)"
    t0 = datetime.now(UTC) - timedelta(minutes=1)
    for n in range(2):
        record = InstanceRecord(f"{STUDY}.{n}", "1.2.840.10008.5.1.4.1.1.1", STUDY, STUDY + ".1", "1.2.840.10008.1.2.1",
                                f"spool/{n}.dcm", 100, f"{n:064x}", "CR01", t0 + timedelta(seconds=n))  # fmt: skip
        store.set_instance_state(store.record_instance(record).instance.id, "skipped", reason)
    for before, after in (("receiving", "stable"), ("stable", "queued"), ("queued", "analyzing")):
        assert store.transition_study(STUDY, 1, (before,), after)
    # what the analyze task records for such a study
    note = StudyAnalysis(skipped={f"{STUDY}.0": reason, f"{STUDY}.1": reason}).summary()
    assert store.transition_study(STUDY, 1, ("analyzing",), "done", error=f"nothing to analyse: {note}")
    store.close()

    table = node(site, "studies")
    assert table.returncode == 0, table.stderr
    assert "error" not in table.stdout
    assert table.stdout.count(reason) == 1
    assert f"{STUDY}: skipped, nothing to analyse: 2x {reason}" in table.stdout
    assert "done (skipped)" in table.stdout and "analyzing" not in table.stdout
    [study] = json.loads(node(site, "studies", "--json").stdout)
    assert study["outcome"] == "skipped" and study["error"] is None and study["state"] == "done"
    assert [s["state"] for s in study["stages"]] == ["receiving", "stable", "queued", "done"]


# ---- 10: one node per data directory ---------------------------------------------------------------------


def test_a_second_node_on_the_same_data_directory_is_refused(tmp_path: Path) -> None:
    first = NodeProcess(tmp_path / "first").start()
    try:
        second = NodeProcess(tmp_path / "second", settings={"storage": {"data_dir": str(first.data_dir)}})
        config = second.write_config()
        result = subprocess.run([*NODE_COMMAND, "serve", "--config", str(config)], cwd=REPO_ROOT, env=clean_env(),
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 1
        assert_one_line_error(result, f"data directory {first.data_dir} is in use", f"pid {first.process.pid}", "storage.data_dir")
        assert (first.data_dir / "anatomix-node.lock").read_text().strip() == str(first.process.pid)
        assert first.process.poll() is None
    finally:
        assert first.stop() == 0
    # the lock goes with the process: a new node starts on the same directory
    again = NodeProcess(tmp_path / "first").start()
    assert again.stop() == 0


# ---- 11: the small ones -----------------------------------------------------------------------------------


def test_ae_add_needs_no_port_for_a_source_but_does_for_a_destination(site: Path) -> None:
    added = node(site, "ae", "add", "ct-room", "--ae-title", "CR01", "--host", "*", "--role", "source")
    assert added.returncode == 0, added.stderr
    assert added.stdout.strip() == "added ct-room: CR01@* (source, profile full)" and added.stderr == ""
    refused = node(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--role", "destination")
    assert_one_line_error(refused, "--port", "destination needs the DICOM port")


def test_ae_add_warns_about_the_same_ae_and_host_and_an_unresolvable_host(site: Path) -> None:
    assert node(site, "ae", "add", "ct-room", "--ae-title", "CR01", "--host", "127.0.0.1", "--role", "source").returncode == 0
    again = node(site, "ae", "add", "ct-2", "--ae-title", "CR01", "--host", "127.0.0.1", "--role", "source")
    assert again.returncode == 0
    no_traceback(again)
    [warning] = again.stderr.strip().splitlines()
    assert warning.startswith("anatomix-node: warning: 'ct-room' has the same AE title CR01 and host 127.0.0.1")
    lost = node(site, "ae", "add", "lost", "--ae-title", "LOST", "--host", "no-such-host.invalid", "--role", "source")
    assert lost.returncode == 0
    [warning] = lost.stderr.strip().splitlines()
    assert "host 'no-such-host.invalid' does not resolve" in warning
    # A destination nothing sends to (not a default one, no rule names it) is added, with a warning saying so and how to fix it.
    unreached = node(site, "ae", "add", "pacs", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", "4242", "--role", "destination")
    assert unreached.returncode == 0
    [warning] = unreached.stderr.strip().splitlines()
    assert "pacs is a destination but will receive no results" in warning and "ae update pacs --default-destination" in warning
    quiet = node(site, "ae", "add", "archive", "--ae-title", "ARCH", "--host", "127.0.0.1", "--port", "4243", "--role", "destination",
                 "--default-destination")  # fmt: skip
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "the default destination, results of every study go here" in quiet.stdout


def test_a_duplicate_name_points_to_ae_update(site: Path) -> None:
    assert node(site, "ae", "add", "ct-room", "--ae-title", "CR01", "--host", "*", "--role", "source").returncode == 0
    assert_one_line_error(node(site, "ae", "add", "ct-room", "--ae-title", "CR02", "--host", "*", "--role", "source"),
                          "already exists", "anatomix-node ae update ct-room")  # fmt: skip


def test_version_and_log_level_after_the_subcommand(site: Path) -> None:
    from importlib.metadata import version as installed_version

    version = node(site, "--version")
    assert version.returncode == 0 and version.stdout.strip() == f"anatomix-node {installed_version('anatomix-node')}"
    after = node(site, "studies", "--log-level", "debug")
    assert after.returncode == 0, after.stderr
    assert node(site, "ae", "list", "--log-level", "WARNING").returncode == 0
    assert node(site, "--log-level", "ERROR", "ae", "list").returncode == 0
    wrong = node(site, "studies", "--log-level", "loud")
    assert wrong.returncode == 2 and "'loud': use DEBUG, INFO, WARNING, ERROR" in wrong.stderr


def test_model_info_says_what_it_is_doing(tmp_path: Path, demo_model: Path) -> None:
    result = node(tmp_path, "model", "info", str(demo_model))
    assert result.returncode == 0, result.stderr
    steps = result.stderr.splitlines()
    assert steps[0] == f"  ... opening {demo_model}"
    assert any("reading the APM checkpoint" in step for step in steps) and any("matching the LM tensors" in step for step in steps)
    quiet = node(tmp_path, "model", "info", str(demo_model), "--json")
    assert quiet.stderr == "" and json.loads(quiet.stdout)["ok"] is True


def test_model_current_says_which_model_serve_uses(site: Path, demo_model: Path) -> None:
    config = site / CONFIG_FILE_NAME
    none = node(site, "model", "current")
    assert none.returncode == 0 and none.stdout.startswith(f"no model configured ({config})")
    chosen = node(site, "model", "current", env=clean_env(ANATOMIX_MODEL_DIR=str(demo_model)))
    assert chosen.returncode == 0, chosen.stderr
    assert chosen.stdout.strip().startswith(f"serve uses AnatomiX (demo weights) demo-tiny-seed0 from {demo_model} on cpu [DEMO WEIGHTS]")
    broken = node(site, "model", "current", env=clean_env(ANATOMIX_MODEL_DIR=str(site)))
    assert_one_line_error(broken, "model.dir", "is incomplete")


def write_spooled(spool: Path, relative: str, **header: str) -> InstanceRecord:
    ds = pydicom.dcmread(CHEST_CR, stop_before_pixels=True)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    ds.StudyInstanceUID = STUDY
    target = spool / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return InstanceRecord(str(ds.SOPInstanceUID), str(ds.SOPClassUID), STUDY, str(ds.SeriesInstanceUID), "1.2.840.10008.1.2.1",
                          relative, target.stat().st_size, "0" * 64, "CR01", datetime.now(UTC))  # fmt: skip


def test_studies_shows_patient_accession_date_description_and_source_within_the_terminal(site: Path) -> None:
    assert node(site, "ae", "add", "ct-room", "--ae-title", "CR01", "--host", "*", "--role", "source").returncode == 0
    settings = load_settings(site / CONFIG_FILE_NAME, env={})
    description = "CHEST PA AND LATERAL, FOLLOW-UP AFTER PNEUMONIA, WITH PRIOR"
    record = write_spooled(settings.storage.spool_dir, "a/1.dcm", PatientID="PAT-0042", AccessionNumber="ACC778",
                           StudyDate="20260115", StudyDescription=description)  # fmt: skip
    store = open_store(settings.database_url)
    store.record_instance(record)
    store.close()

    wide = node(site, "studies", env={k: v for k, v in clean_env().items() if k != "COLUMNS"})  # a pipe: full lines
    assert wide.returncode == 0, wide.stderr
    header, row = wide.stdout.splitlines()[1:3]
    for column in ("PATIENT ID", "ACCESSION", "DATE", "DESCRIPTION", "SOURCE"):
        assert column in header
    for value in ("PAT-0042", "ACC778", "2026-01-15", description, "ct-room", STUDY):
        assert value in row
    [study] = json.loads(node(site, "studies", "--json").stdout)
    assert (study["patient_id"], study["accession_number"], study["study_date"], study["source"]) == ("PAT-0042", "ACC778", "20260115", "ct-room")

    narrow = node(site, "studies", env=clean_env(COLUMNS="100"))
    assert narrow.returncode == 0
    lines = narrow.stdout.splitlines()[1:]  # the first says which settings and store (never clipped)
    assert all(len(line) <= 100 for line in lines), lines
    assert "PAT-0042" in lines[1] and "ACC778" in lines[1] and "…" in lines[1]
    uid_cell = lines[1].split()[0]
    assert uid_cell.startswith("…") and STUDY.endswith(uid_cell[1:])  # a UID keeps its distinct end


def test_library_wording_does_not_reach_the_admin(site: Path) -> None:
    port = node(site, "studies", env=clean_env(ANATOMIX_NODE_PORT="eleven"))
    assert_one_line_error(port, "node.port = 'eleven': expected a whole number")
    assert "invalid literal" not in port.stderr
    junk = site / "notes.dcm"
    junk.write_text("not an image")
    result = node(site, "analyze", str(junk), "--out", str(site / "out"), "--demo-weights")
    no_traceback(result)
    assert "notes.dcm: not a DICOM file" in result.stdout
    assert "force" not in result.stdout + result.stderr


# ---- the command tables of the docs are --help ------------------------------------------------------------


def help_commands() -> dict[str, set[str]]:
    """Every leaf command of `--help` (``ae add``, ``studies``...) with its options, as --help prints them."""
    parser = build_parser()
    common = {"-h", "--help", "--log-level", "--config"}
    found: dict[str, set[str]] = {}

    def walk(current, path: tuple[str, ...]) -> None:
        groups = [a for a in current._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not groups:
            usage = current.format_help()
            found[" ".join(path)] = set(re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", usage.split("\n\n")[0])) - common
            return
        for name, child in groups[0].choices.items():
            walk(child, (*path, name))

    walk(parser, ())
    return found


def documented_commands() -> dict[str, set[str]]:
    """The commands of every command table (``| command | what it does |``) in README.md and docs/*.md,
    with the options each row shows. A command listed in two tables must show the same options in both."""
    found: dict[str, set[str]] = {}
    tables = 0
    for path in [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]:
        in_file: dict[str, set[str]] = {}  # a command's forms in one file (``resend UID``, ``resend --state``) together
        for table in path.read_text().split("| command | what it does |")[1:]:
            tables += 1
            for row in table.split("\n\n", 1)[0].splitlines()[2:]:
                for span in re.findall(r"`([^`]+)`", row.split(" | ")[0]):
                    words = []
                    for token in span.split():
                        if not re.fullmatch(r"[a-z][a-z-]*", token):
                            break
                        words.append(token)
                    options = set()
                    for negatable in re.findall(r"--\[no-\]([a-z0-9-]+)", span):
                        options |= {f"--{negatable}", f"--no-{negatable}"}
                    options |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", span))
                    in_file.setdefault(" ".join(words), set()).update(options)
        for command, options in in_file.items():
            assert found.get(command, options) == options, f"{path.name}: {command} differs from another file's table"
            found[command] = options
    assert tables, "no command table in README.md or docs/"
    return found


def test_command_tables_match_help() -> None:
    from_help, from_readme = help_commands(), documented_commands()
    assert sorted(from_readme) == sorted(from_help)
    for command, options in from_help.items():
        assert from_readme[command] == options, command
    top = subprocess.run([*NODE_COMMAND, "--help"], capture_output=True, text=True, timeout=60)
    listed = re.findall(r"^    ([a-z-]+)\s", top.stdout, re.M)
    assert top.returncode == 0 and set(listed) == {command.split()[0] for command in from_help}


# ---- 12 (and 11: what stopping waits for): an admin's log -----------------------------------------------


def test_a_serve_session_log_holds_the_nodes_own_lines(tmp_path: Path) -> None:
    from tests.support.admin_log import count_lines, run_session

    text, status, state = run_session(tmp_path / "site", seconds=0)
    assert state == "done" and status == 0, text[-3000:]
    counts, other = count_lines(text)
    library = {key: n for key, n in counts.items() if key[0].split(".")[0] not in ("dicom_node", "inference", "sr_writer")}
    assert library == {}, library  # highdicom notes, Celery task lines, pynetdicom's expected-event errors
    assert other == [], other  # no banner, no "worker: Warm shutdown", no traceback, no raw warning
    assert not [key for key in counts if key[1] in ("ERROR", "CRITICAL")], counts
    assert "%h" not in text and "Traceback" not in text
    assert "model: demo weights" in text
    assert re.search(r"stopping: waiting for 1 SCP process\(es\) to finish open associations", text)
    assert re.search(r"stopping: waiting for embedded worker\(s\) pid \d+, pid \d+ to finish the running task", text)
    assert re.search(r"AnatomiX node stopped in \d+\.\d s", text)


def test_pynetdicom_errors_for_expected_events_stay_out_of_the_log(site: Path) -> None:
    from tests.support.net import free_port

    closed = free_port()
    assert node(site, "ae", "add", "closed", "--ae-title", "PACS", "--host", "127.0.0.1", "--port", str(closed), "--role", "destination").returncode == 0
    result = node(site, "--log-level", "INFO", "echo", "closed", "--timeout", "5")
    assert_one_line_error(result, "cannot connect", "Connection refused")  # ours, not pynetdicom's two ERROR lines
    debug = node(site, "--log-level", "DEBUG", "echo", "closed", "--timeout", "5")
    assert "pynetdicom" in debug.stderr and "Traceback" not in debug.stderr  # at DEBUG the library speaks


def test_worker_whose_checkpoint_does_not_load_stops_with_one_line(site: Path) -> None:
    """Every file is there (the start-up check passes) but the APM checkpoint is corrupt: the pool
    process finds it at warm-up, and the worker stops with status 1 and the reason in one line,
    instead of running on and analysing nothing."""
    model = site / "model"
    made = subprocess.run([*NODE_COMMAND, "model", "demo-weights", "--out", str(model), "--size", "tiny"], cwd=site,
                          env=clean_env(), capture_output=True, text=True, timeout=300)  # fmt: skip
    assert made.returncode == 0, made.stderr
    checkpoint = model / "apm.pth"
    checkpoint.write_bytes(checkpoint.read_bytes()[:4096])  # truncated: a broken copy
    result = subprocess.run([*NODE_COMMAND, "worker", "--queues", "analyze"], cwd=site, env=clean_env(ANATOMIX_MODEL_DIR=str(model)),
                            capture_output=True, text=True, timeout=240)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("anatomix-node: error: model unusable, this worker stopped without taking a task:"), result.stderr
    assert sum("model unusable" in line for line in result.stderr.splitlines()) == 1, result.stderr
