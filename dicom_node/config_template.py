"""The commented ``anatomix-node.toml`` that ``init`` writes, generated from :mod:`dicom_node.settings`.

Each section comes from one settings dataclass, in the order of :class:`~dicom_node.settings.Settings`;
its comment from the class docstring, each key's comment from the ``#:`` lines above the field (the
Sphinx convention, so the docs read in the source are the docs in the file), its value from the
field's default. Nothing is restated, so the template cannot drift from the defaults:
``tests/dicom_node/test_config_template.py`` checks that the file loads to exactly ``Settings()``,
also with every commented key uncommented, and that every field is documented.

A few keys are written active (``ACTIVE_KEYS``: what an admin edits first; ``init`` replaces
``data_dir``); the rest are commented, with the default as value, so uncommenting a line changes
nothing until its value is edited. Examples go into the comments (``e.g. ...``), never as values.
"""

from __future__ import annotations

import inspect
import json
import re
import textwrap
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from dicom_node.settings import section_types

#: Keys written uncommented: the ones a first-time admin looks for.
ACTIVE_KEYS = frozenset({"node.ae_title", "node.port", "storage.data_dir", "database.url", "queue.broker_url"})

HEADER = """\
# AnatomiX node settings (embedded mode: no external services needed).
# Every key may also be set from the environment: ANATOMIX_<SECTION>_<KEY>, e.g. ANATOMIX_NODE_PORT=11113.
# Check the effective values with: anatomix-node config show --config THIS_FILE
# Every value below is the built-in default: a commented line changes nothing until it is uncommented and edited.
"""

_WIDTH = 110
_FIELD = re.compile(r"^\s+(\w+)\s*:")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> the text of the ``#:`` comment lines right above it in ``cls``'s source."""
    docs: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines()[1:]:
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = _FIELD.match(line)
        if match and pending:
            docs[match.group(1)] = " ".join(pending)
        pending = []
    return docs


def toml_value(value: Any) -> str:
    """``value`` as a TOML literal (None, for an optional path, is the empty string: "not set")."""
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (str, Path)):
        return json.dumps(str(value), ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"no TOML form for the setting value {value!r}")  # a new field type: teach it here


def _comment(text: str) -> list[str]:
    text = text.replace("``", "`")  # reST literals read as Markdown ones in a plain-text file
    return textwrap.wrap(text, _WIDTH - 2, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False)


def _default(field: Any) -> Any:
    return field.default if field.default is not MISSING else field.default_factory()


def render_config_template() -> str:
    """The whole file, for ``anatomix-node init``."""
    parts = [HEADER]
    for section, cls in section_types().items():
        lines = [f"[{section}]"]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            lines += _comment(" ".join(inspect.cleandoc(cls.__doc__).split("\n\n")[0].split()))
        docs = field_docs(cls)
        for field in fields(cls):
            if field.name in docs:
                lines += _comment(docs[field.name])
            assignment = f"{field.name} = {toml_value(_default(field))}"
            lines.append(assignment if f"{section}.{field.name}" in ACTIVE_KEYS else f"# {assignment}")
        parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def undocumented_fields() -> list[str]:
    """``section.key`` of every settings field without a ``#:`` comment (the test wants none)."""
    return [f"{section}.{field.name}" for section, cls in section_types().items() for field in fields(cls) if field.name not in field_docs(cls)]
