"""One log format for every process of the node; level from settings (or --log-level).

Log lines never carry pixel data or patient identifiers (names, IDs, birth dates): modules log
UIDs, AE titles, hosts, sizes and reasons only.

An admin's log holds the node's own lines (``dicom_node``, ``inference``, ``sr_writer``) at the
configured level. Libraries speak only when something is wrong with them (WARNING and above), and
their chatter (highdicom's "copy attributes" notes, Celery's task lines) appears only at DEBUG.
pynetdicom is quieter still: its ERROR lines describe events the node handles and reports itself
(an association we reject, a destination that refuses a connection), so below DEBUG only its
CRITICAL lines pass. Its per-PDU dumps need ``ANATOMIX_PYNETDICOM_DEBUG=1`` on top of DEBUG.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import warnings

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


#: Logger name prefixes of the node's own code: these pass at the configured level.
NODE_LOGGERS = ("dicom_node", "inference", "sr_writer", "__main__")
#: Third-party loggers whose ERRORs are expected events the node reports in its own words.
EXPECTED_EVENT_LOGGERS = ("pynetdicom",)


def is_node_logger(name: str) -> bool:
    return name == "root" or any(name == prefix or name.startswith(prefix + ".") for prefix in NODE_LOGGERS)


class ThirdPartyFilter(logging.Filter):
    """Below DEBUG, keep a library's record only at WARNING or above (pynetdicom: CRITICAL)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if is_node_logger(record.name):
            return True
        if record.name == "py.warnings":  # captured warnings.warn(): a library's are chatter (and may quote data values)
            return not _from_library(str(record.args[0]) if isinstance(record.args, tuple) and record.args else record.getMessage())
        if any(record.name == p or record.name.startswith(p + ".") for p in EXPECTED_EVENT_LOGGERS):
            return record.levelno >= logging.CRITICAL
        return record.levelno >= logging.WARNING


def _from_library(warning_text: str) -> bool:
    """A formatted warning (``/path/file.py:12: UserWarning: ...``) issued inside an installed package."""
    location = warning_text.split(":", 1)[0]
    return "site-packages" in location or "dist-packages" in location


def configure_logging(level: str, stream=None) -> None:
    """Install the node's single handler on the root logger (idempotent, safe after fork)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EscapingFormatter(LOG_FORMAT))
    numeric = logging.getLevelName(level.upper())
    if numeric > logging.DEBUG:
        handler.addFilter(ThirdPartyFilter())
    root.addHandler(handler)
    root.setLevel(numeric)
    pynetdicom_debug = numeric <= logging.DEBUG and os.environ.get("ANATOMIX_PYNETDICOM_DEBUG")
    # pynetdicom's "standard" handlers dump whole requests at DEBUG: keep them off unless asked.
    logging.getLogger("pynetdicom").setLevel(logging.DEBUG if pynetdicom_debug else logging.WARNING)
    logging.captureWarnings(True)  # library warnings become log lines (logger py.warnings) in the same format


def quiet_root_warning(announce: bool = True) -> None:
    """Celery warns in seven lines when a worker runs as root; the node says so once, in its own words
    (``serve`` for the workers it starts itself)."""
    try:
        from celery.exceptions import SecurityWarning
    except ImportError:  # pragma: no cover - celery is a dependency
        return
    warnings.filterwarnings("ignore", category=SecurityWarning)
    if announce and hasattr(os, "geteuid") and os.geteuid() == 0:
        logging.getLogger("dicom_node.worker").warning("running as root: run the node as its own user (the systemd units in deploy/systemd use `anatomix`)")


def quiet_worker_console(level: str) -> None:
    """Below DEBUG, Celery's console prints (``worker: Warm shutdown (MainProcess)``, written to
    ``sys.__stdout__`` past the logging system) are dropped; the node logs the shutdown itself."""
    if logging.getLevelName(level.upper()) <= logging.DEBUG:
        return
    from celery.signals import worker_shutting_down

    # typeshed marks sys.__stdout__ Final; replacing it is the point (only Celery writes there; print() uses sys.stdout)
    sys.__stdout__ = open(os.devnull, "w")  # type: ignore[misc]

    def say_shutdown(sender: object = None, how: str = "", **_: object) -> None:
        logging.getLogger("dicom_node.worker").info("worker %s: %s shutdown, finishing the running task", sender, how.lower() or "warm")

    worker_shutting_down.connect(say_shutdown, weak=False)
