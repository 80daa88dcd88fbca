"""The file `init` writes is generated from the settings dataclasses: it parses, loads to exactly the
defaults (as written, and with every commented key uncommented), and documents every setting."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields, replace
from pathlib import Path

import pytest

from dicom_node.cli.node import DEFAULT_CONFIG_TOML
from dicom_node.config_template import ACTIVE_KEYS, field_docs, render_config_template, undocumented_fields
from dicom_node.settings import CONFIG_FILE_NAME, Settings, load_settings, section_types

REPO = Path(__file__).resolve().parents[2]
_KEY_LINE = re.compile(r"^# (\w+) = ")
_SECTION_LINE = re.compile(r"^\[(\w+)\]$")


def uncomment_keys(text: str) -> str:
    """``text`` with every commented ``key = value`` line of a known key uncommented (doc lines stay)."""
    sections, current, out = section_types(), None, []
    for line in text.splitlines():
        if match := _SECTION_LINE.match(line):
            current = sections[match.group(1)]
        match = _KEY_LINE.match(line)
        known = current is not None and match is not None and match.group(1) in {f.name for f in fields(current)}
        out.append(line[2:] if known else line)
    return "\n".join(out) + "\n"


def load(tmp_path: Path, text: str) -> Settings:
    path = tmp_path / CONFIG_FILE_NAME
    path.write_text(text, encoding="utf-8")
    settings = load_settings(path, env={})
    # data_dir is resolved next to the file; everything else must be the built-in default
    assert settings.storage.data_dir == (tmp_path / "var").resolve()
    return replace(settings, storage=replace(settings.storage, data_dir=Path("var")), source="defaults")


def test_init_writes_the_generated_template() -> None:
    assert DEFAULT_CONFIG_TOML == render_config_template()


def test_the_template_loads_to_exactly_the_defaults(tmp_path: Path) -> None:
    tomllib.loads(DEFAULT_CONFIG_TOML)
    assert load(tmp_path, DEFAULT_CONFIG_TOML) == Settings()


def test_uncommenting_every_key_changes_nothing(tmp_path: Path) -> None:
    uncommented = uncomment_keys(DEFAULT_CONFIG_TOML)
    raw = tomllib.loads(uncommented)
    assert {section: set(values) for section, values in raw.items()} == {section: {f.name for f in fields(cls)} for section, cls in section_types().items()}
    assert load(tmp_path, uncommented) == Settings()


def test_every_setting_is_in_the_template_with_its_doc() -> None:
    assert undocumented_fields() == []
    for section, cls in section_types().items():
        block = DEFAULT_CONFIG_TOML.split(f"\n[{section}]\n", 1)[1].split("\n[", 1)[0]
        for field in fields(cls):
            key = f"{section}.{field.name}"
            assert re.search(rf"^(# )?{field.name} = ", block, re.M), key
            assert (f"\n{field.name} = " in "\n" + block) == (key in ACTIVE_KEYS), key
            first_words = " ".join(field_docs(cls)[field.name].replace("``", "`").split()[:4])
            assert first_words in " ".join(line.lstrip("# ") for line in block.splitlines()), key
    # init replaces this line when given --data-dir
    assert 'data_dir = "var"' in DEFAULT_CONFIG_TOML.splitlines()


def test_a_new_setting_appears_in_the_template_by_itself() -> None:
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Extra:
        #: A setting added tomorrow.
        knob: int = 3
        undocumented: str = "x"

    assert field_docs(Extra) == {"knob": "A setting added tomorrow."}


@pytest.mark.parametrize("example", sorted(p.name for p in (REPO / "deploy").rglob("*.toml")))
def test_the_deploy_examples_load(example: str) -> None:
    [path] = [p for p in (REPO / "deploy").rglob("*.toml") if p.name == example]
    load_settings(path, env={})
