"""Versioned schema migrations: numbered SQL files, one folder per dialect.

``migrations/<dialect>/NNNN_name.sql`` is applied once, in number order, inside the transaction that
holds the migration lock (a PostgreSQL advisory lock, or SQLite's write lock), and recorded in the
``schema_version`` table. Applying twice is a no-op; concurrent starters wait for each other.
A new migration is a new file with the next number, written for both dialects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources

from dicom_node.store.base import StoreError

DIALECTS = ("sqlite", "postgres")
_FILE_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    #: The file's SQL, split into single statements (drivers run one statement per call).
    statements: tuple[str, ...]


def load_migrations(dialect: str) -> list[Migration]:
    """The migrations of one dialect, in version order; numbers start at 1, each used once."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}; known: {', '.join(DIALECTS)}")
    folder = resources.files("dicom_node.store") / "migrations" / dialect
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_NAME.match(entry.name)
        if match is None:
            continue
        found.append(Migration(int(match.group(1)), match.group(2), split_statements(entry.read_text(encoding="utf-8"))))
    found.sort(key=lambda m: m.version)
    numbers = [m.version for m in found]
    # Numbers are handed out per feature branch ahead of time, so a build may lack one (migrate()
    # applies every file not yet recorded, whatever its number); the same number twice is an
    # authoring mistake: refuse rather than apply two schemas under one version.
    if len(set(numbers)) != len(numbers) or (numbers and numbers[0] != 1):
        raise StoreError(f"migrations for {dialect} are numbered {numbers}: each number once, starting at 1")
    return found


def split_statements(sql: str) -> tuple[str, ...]:
    """Split a migration file into statements at ``;`` line ends, dropping ``--`` comment lines.

    Migration files keep one statement per ``;``-terminated line group and no semicolons inside
    literals, so this simple split is exact (checked by the store tests applying every file).
    """
    statements: list[str] = []
    current: list[str] = []
    for line in sql.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("--"):
            continue
        current.append(line)
        if stripped.endswith(";"):
            statements.append("\n".join(current).rstrip().rstrip(";"))
            current = []
    if current:
        raise StoreError(f"migration ends with an unterminated statement: {' '.join(current)[:80]!r}")
    return tuple(statements)
