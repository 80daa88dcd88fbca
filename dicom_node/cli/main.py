"""``anatomix-node`` command line: one parser, sub-commands registered by their own modules.

Each command module exposes ``register(subparsers)`` and sets ``func(args) -> int`` on its parsers.
Human errors (bad config, unknown names, port in use) print one clear line and exit non-zero,
never a traceback: raise :class:`UserError` (or let a SettingsError/StoreError through).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from dicom_node.ops.errors import UserError
from dicom_node.settings import SettingsError

#: Modules that contribute sub-commands, in help order.
COMMAND_MODULES = (
    "dicom_node.cli.node",  # init, config, ae, echo, studies, purge
    "dicom_node.cli.serve",  # serve
    "dicom_node.cli.pipeline",  # worker, analyze, resend, demo
    "dicom_node.cli.model",  # model demo-weights
    "dicom_node.cli.user",  # user add|list|remove|password|token (operations API accounts)
    "dicom_node.cli.worker_tokens",  # worker-token add|list|revoke (workers on other hosts)
    "dicom_node.cli.route",  # route add|list|update|remove|move|dry-run
    "dicom_node.cli.audit",  # audit
    "dicom_node.cli.tls",  # tls status
)

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def node_version() -> str:
    """The installed package's version (the source tree's when run from a checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("anatomix-node")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _log_level(text: str) -> str:
    if text.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r}: use {', '.join(LOG_LEVELS)}")
    return text.upper()


def _add_log_level(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("--log-level", type=_log_level, default=default, metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (default: logging.level from settings)")  # fmt: skip


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every sub-command parser below ``parser`` (``ae add``, ``model info``, ...), depth first."""
    found = []
    for action in parser._actions:  # argparse has no public walk over sub-parsers
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += [child, *_subcommand_parsers(child)]
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anatomix-node", description="AnatomiX DICOM node for chest X-ray AI results")
    parser.add_argument("--version", action="version", version=f"anatomix-node {node_version()}")
    _add_log_level(parser, None)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command group is not part of this build
                continue
            raise
        module.register(subparsers)
    # `anatomix-node studies --log-level DEBUG` as well as `anatomix-node --log-level DEBUG studies`;
    # SUPPRESS keeps a value given before the sub-command when none is given after it.
    for child in _subcommand_parsers(parser):
        if not any("--log-level" in action.option_strings for action in child._actions):
            _add_log_level(child, argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.log_level:
        from dicom_node.logging_setup import configure_logging

        configure_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except UserError as exc:
        print(f"anatomix-node: error: {exc}", file=sys.stderr)
        return exc.code
    except SettingsError as exc:
        print(f"anatomix-node: configuration error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # process boundary: store/engine errors that a user must see plainly
        from dicom_node.store.base import StoreError

        if isinstance(exc, StoreError):
            print(f"anatomix-node: state store error: {exc}", file=sys.stderr)
            return 3
        raise


if __name__ == "__main__":
    # Run through the imported module so UserError is the same class the command modules raise.
    from dicom_node.cli.main import main as _main

    sys.exit(_main())
