"""How the CLI starts the node's own commands as child processes (``serve`` starts workers, ``demo`` starts ``serve``)."""

from __future__ import annotations

import sys


def node_command(*args: str) -> list[str]:
    """``anatomix-node ARGS`` with this interpreter (works in a venv that is not on PATH).

    Not ``python -m dicom_node.cli.main``: that would load the CLI module twice (as ``__main__`` too), and
    its error class would not catch the other copy's errors.
    """
    return [sys.executable, "-c", "import sys; from dicom_node.cli.main import main; sys.exit(main(sys.argv[1:]))", *args]
