"""Settings: TOML file, ANATOMIX_* environment overrides, and validation messages naming key and value."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dicom_node.settings import CONFIG_FILE_NAME, Settings, SettingsError, find_config_file, load_settings, settings_as_dict


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / CONFIG_FILE_NAME
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no anatomix-node.toml here
    settings = load_settings(env={})
    assert settings == Settings()
    assert settings.source == "defaults" and settings.embedded
    assert settings.database_url == f"sqlite:///{(tmp_path / 'var' / 'anatomix.db').resolve()}"


def test_toml_values_are_read_and_typed(tmp_path: Path) -> None:
    config = write_config(
        tmp_path,
        """
[node]
ae_title = "NODE1"
port = 11113
accept_unknown_sources = true
[storage]
data_dir = "data"
[database]
url = "postgresql://anatomix@127.0.0.1:5432/anatomix"
[queue]
broker_url = "redis://127.0.0.1:6379/0"
[assembly]
quiet_period_s = 3
[model]
tasks = ["report"]
[output]
default_profile = "mine"
[output.profiles]
mine = ["sr", "seg"]
""",
    )
    settings = load_settings(config, env={})
    assert (settings.node.ae_title, settings.node.port, settings.node.accept_unknown_sources) == ("NODE1", 11113, True)
    assert settings.storage.data_dir == tmp_path.resolve() / "data"  # relative to the config file
    assert settings.database_url == "postgresql://anatomix@127.0.0.1:5432/anatomix"
    assert not settings.embedded
    assert settings.assembly.quiet_period_s == 3.0 and isinstance(settings.assembly.quiet_period_s, float)
    assert settings.model.tasks == ("report",)
    assert settings.output.profile("mine") == ("sr", "seg")
    assert settings.output.profile("full")  # built-in profiles stay available
    assert settings.source == str(config)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[node]\nport = 11113\nae_title = "FROMFILE"\n[storage]\ndata_dir = "/srv/anatomix"\n')
    env = {
        "ANATOMIX_NODE_PORT": "12000",
        "ANATOMIX_NODE_ACCEPT_UNKNOWN_SOURCES": "yes",
        "ANATOMIX_MODEL_TASKS": "report, anatomy_grounding",
        "ANATOMIX_MODEL_DIR": "/models/anatomix",
        "ANATOMIX_TEST_SOMETHING": "ignored: not a settings section",
        "PATH": "/usr/bin",
    }
    settings = load_settings(config, env=env)
    assert settings.node.port == 12000 and settings.node.ae_title == "FROMFILE"
    assert settings.node.accept_unknown_sources is True
    assert settings.model.tasks == ("report", "anatomy_grounding")
    assert settings.model.dir == Path("/models/anatomix")
    assert settings.storage.data_dir == Path("/srv/anatomix")  # absolute paths are kept


def test_config_file_is_found_in_the_current_directory(tmp_path: Path) -> None:
    assert find_config_file(None, cwd=tmp_path) is None
    config = write_config(tmp_path, "[node]\nport = 104\n")
    assert find_config_file(None, cwd=tmp_path) == config
    with pytest.raises(SettingsError, match="does not exist"):
        find_config_file(tmp_path / "other.toml")


def test_with_overrides_validates() -> None:
    settings = Settings().with_overrides(node={"port": 2000, "ae_title": "X"})
    assert (settings.node.port, settings.node.ae_title) == (2000, "X")
    with pytest.raises(SettingsError, match="node.port = 0"):
        Settings().with_overrides(node={"port": 0})


def test_settings_as_dict_is_json() -> None:
    values = settings_as_dict(Settings())
    assert json.loads(json.dumps(values))["node"]["port"] == 11112


# Each bad value, from the file: the message names the key and the value.
BAD_VALUES = [
    ('[node]\nae_title = "A\\\\B"', "node.ae_title", "A\\\\B"),
    ('[node]\nae_title = "SEVENTEEN_CHARSXX"', "node.ae_title", "SEVENTEEN_CHARSXX"),
    ('[node]\nae_title = "   "', "node.ae_title", "'   '"),
    ("[node]\nport = 0", "node.port", "0"),
    ("[node]\nport = 70000", "node.port", "70000"),
    ('[node]\nport = "eleven"', "node.port", "eleven"),
    ("[node]\nmax_pdu = 1000", "node.max_pdu", "1000"),
    ("[node]\nscp_processes = 0", "node.scp_processes", "0"),
    ('[node]\naccept_unknown_sources = "maybe"', "node.accept_unknown_sources", "maybe"),
    ("[storage]\nmin_free_bytes = -1", "storage.min_free_bytes", "-1"),
    ('[database]\nurl = "mysql://db/anatomix"', "database.url", "mysql://db/anatomix"),
    ('[queue]\nbroker_url = "amqp://mq"', "queue.broker_url", "amqp://mq"),
    ("[queue]\nvisibility_timeout_s = 100", "queue.visibility_timeout_s", "100"),
    ("[assembly]\nquiet_period_s = -1", "assembly.quiet_period_s", "-1"),
    ("[assembly]\nquiet_period_s = 30\nhard_cap_s = 5", "assembly.hard_cap_s", "5"),
    ('[model]\nbackend = "tensorflow"', "model.backend", "tensorflow"),
    ('[model]\ndevice = "gpu"', "model.device", "gpu"),
    ("[model]\nmax_new_tokens = 0", "model.max_new_tokens", "0"),
    ('[model]\ntasks = ["report", "dance"]', "model.tasks", "dance"),
    ('[output]\nuid_root = "1.2.abc."', "output.uid_root", "1.2.abc."),
    ('[output]\nuid_root = "1.2.3"', "output.uid_root", "1.2.3"),
    ('[output]\ndefault_profile = "nope"', "output.default_profile", "nope"),
    ('[output.profiles]\nmine = ["sr", "pdf"]', "output.profiles.mine", "pdf"),
    ('[output]\nsr_anatomy = "some"', "output.sr_anatomy", "some"),
    ("[delivery]\nmax_attempts = 0", "delivery.max_attempts", "0"),
    ('[logging]\nlevel = "LOUD"', "logging.level", "LOUD"),
    ("[node]\nportt = 1", "portt", "[node]"),
    ("[nodes]\nport = 1", "nodes", "unknown section"),
    ('node = "x"', "[node]", "'x'"),
]


@pytest.mark.parametrize(("toml", "key", "value"), BAD_VALUES, ids=[b[1] + "=" + b[2] for b in BAD_VALUES])
def test_each_bad_value_is_named_with_its_key(tmp_path: Path, toml: str, key: str, value: str) -> None:
    config = write_config(tmp_path, toml + "\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config, env={})
    message = str(caught.value)
    assert key in message and value in message, message


@pytest.mark.parametrize(
    ("env", "fragments"),
    [
        ({"ANATOMIX_NODE_PORT": "abc"}, ("node.port", "'abc'")),
        ({"ANATOMIX_NODE_PORTT": "1"}, ("ANATOMIX_NODE_PORTT", "'portt'")),
        ({"ANATOMIX_DELIVERY_MAX_ATTEMPTS": "-3"}, ("delivery.max_attempts", "-3")),
        ({"ANATOMIX_NODE_AE_TITLE": ""}, ("node.ae_title", "''")),
    ],
)
def test_bad_environment_values_are_named(tmp_path: Path, env: dict[str, str], fragments: tuple[str, ...]) -> None:
    config = write_config(tmp_path, "[node]\nport = 11112\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(config, env=env)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    config = write_config(tmp_path, "[node\nport = \n")
    with pytest.raises(SettingsError, match="not valid TOML") as caught:
        load_settings(config, env={})
    assert str(config) in str(caught.value)


def test_the_production_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "deploy" / "anatomix-node.example.toml"
    settings = load_settings(example, env={})
    assert settings.database_url.startswith("postgresql://") and settings.queue.broker_url.startswith("redis://")
    assert not settings.embedded and not settings.node.accept_unknown_sources
    assert settings.output.profile(settings.output.default_profile)
