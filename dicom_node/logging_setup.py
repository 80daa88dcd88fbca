"""One log format for every process of the node; level from settings (or --log-level).

Log lines never carry pixel data or patient identifiers (names, IDs, birth dates): modules log
UIDs, AE titles, hosts, sizes and reasons only. pynetdicom's own per-PDU/DIMSE chatter is kept at
WARNING unless the node runs at DEBUG, because its "standard" handlers dump whole requests.
"""

from __future__ import annotations

import logging
import os
import re
import sys

LOG_FORMAT = "%(asctime)s %(levelname)-7s [%(process)d] %(name)s: %(message)s"

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """``text`` with control characters (newline, ESC, NUL, ...) written as ``\\xNN``: one message, one line."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text)


class EscapingFormatter(logging.Formatter):
    """Escapes control characters in the message (a peer's AE title must not forge log lines).

    Tracebacks are appended after this step and keep their own line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.message)
        return super().formatMessage(record)


def configure_logging(level: str, stream=None) -> None:
    """Install the node's single handler on the root logger (idempotent, safe after fork)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    root.addHandler(handler)
    numeric = logging.getLevelName(level.upper())
    root.setLevel(numeric)
    pynetdicom_level = logging.DEBUG if numeric <= logging.DEBUG and os.environ.get("ANATOMIX_PYNETDICOM_DEBUG") else logging.WARNING
    logging.getLogger("pynetdicom").setLevel(pynetdicom_level)
