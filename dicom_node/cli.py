"""``anatomix-node`` command line: one parser, sub-commands registered by their own modules.

Each command module exposes ``register(subparsers)`` and sets ``func(args) -> int`` on its parsers.
Human errors (bad config, unknown names, port in use) print one clear line and exit non-zero,
never a traceback: raise :class:`CliError` (or let a SettingsError/StoreError through).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from dicom_node.settings import SettingsError

#: Modules that contribute sub-commands, in help order.
COMMAND_MODULES = (
    "dicom_node.cli_node",  # init, config, ae, echo, studies, purge
    "dicom_node.cli_serve",  # serve
    "dicom_node.cli_pipeline",  # worker, analyze, resend, demo
    "dicom_node.cli_model",  # model demo-weights
    "dicom_node.cli_user",  # user add|list|remove|password|token (operations API accounts)
)


class CliError(RuntimeError):
    """A user-facing error: printed as one line, exit status ``code``."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="anatomix-node", description="AnatomiX DICOM node for chest X-ray AI results")
    parser.add_argument("--log-level", default=None, help="DEBUG, INFO, WARNING or ERROR (default: from settings)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # that command group is not part of this build
                continue
            raise
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if args.log_level:
        logging.basicConfig(level=args.log_level.upper())
    try:
        return int(args.func(args) or 0)
    except CliError as exc:
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
    # Run through the imported module so CliError is the same class the command modules raise.
    from dicom_node.cli import main as _main

    sys.exit(_main())
