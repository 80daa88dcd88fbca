"""What an admin's ``serve`` log holds after a session: a real node (embedded mode, tiny demo
weights) runs for a while, receives one pushed chest CR, analyses it and delivers the results to a
local PACS stand-in, then stops on SIGTERM. Prints the log's lines counted by logger and level,
and the lines that are not in the node's format (banners, tracebacks).

    PYTHONPATH=$PWD .venv/bin/python benchmarks/admin_log.py --seconds 120 [--keep DIR]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tests.support.admin_log import count_lines, run_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--keep", type=Path, help="run in this folder and keep it")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="anatomix-admin-log-"))
    text, status, state = run_session(root, args.seconds)
    counts, other = count_lines(text)
    print(f"{sum(counts.values()) + len(other)} lines in {root / 'serve.log'} ({args.seconds:.0f} s, one push: study {state}; serve exit {status})")
    for (logger, level), count in sorted(counts.items(), key=lambda item: (-item[1], item[0])):
        print(f"{count:5d}  {level:<8} {logger}")
    if other:
        print(f"{len(other):5d}  lines not in the log format:")
        for line in other[:20]:
            print(f"       {line[:150]}")


if __name__ == "__main__":
    main()
