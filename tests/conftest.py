"""Top-level test configuration. Peer fixtures live in tests/support and per-package conftest files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

#: Where tests leave files worth looking at (rendered PNGs, logs): test-output/ in the checkout.
OUTPUT_DIR = Path(os.environ.get("ANATOMIX_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output"))


@pytest.fixture(scope="session")
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUTPUT_DIR


# ---- parallel runs (`make test`: pytest-xdist) --------------------------------------------------------------
#
# `make test` runs the suite in two passes: every test not marked `solo` on several xdist workers, then the
# `solo` tests alone (they time the product under an attack or a slow DNS answer, and other tests' load would be
# measured too). Plain `pytest` still runs everything in one process, in the usual order.
#
# The unit of scheduling is a test file (`--dist loadfile`): all its tests run on one worker, in order, so module
# fixtures (a serve, an Orthanc, a Redis) start once, as in a serial run. Files that must never overlap form one
# unit, below. (pytest-xdist's own `xdist_group` marks do not work with pytest 9.2: xdist 3.8 renames the test
# by assigning `item._nodeid`, which pytest 9.2 no longer reads, so the marks are ignored silently. The scheduler
# below works on the controller's test ids, which every version has.)

#: Files that share one worker, one after the other. "browser": the tests that drive chromium; they install into
#: the shared `.cache` (npm's axe-core for the console, the OHIF dist) and each needs much memory and CPU.
GROUPS = {
    "tests/console/test_console_rules.py": "browser",
    "tests/console/test_console_scenario.py": "browser",
    "tests/console/test_console_dicomweb.py": "browser",
    "tests/viewer/test_ohif.py": "browser",
    "tests/viewer/test_ohif_on_node.py": "browser",
}
#: Units handed out first (the longest; xdist hands out units in collection order with --no-loadscope-reorder),
#: so that none of them starts near the end while the other workers are idle.
LONG_FIRST = ("browser", "tests/integration/test_api_fuzz.py")


def scheduling_unit(nodeid: str) -> str:
    """The unit of scheduling of a test id: its file, or the group its file belongs to."""
    path = nodeid.split("::", 1)[0]
    return GROUPS.get(path, path)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: plain pytest without xdist loads this file too
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FilesAndGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return scheduling_unit(nodeid)

    return FilesAndGroups(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node) -> None:
    """The controller's terminal variables, for the worker (execnet starts workers with COLUMNS=80)."""
    node.workerinput["terminal_environ"] = {name: os.environ.get(name) for name in ("COLUMNS", "LINES")}


def pytest_configure(config: pytest.Config) -> None:
    """A worker's commands see the terminal environment a serial run sees: `studies` prints full lines
    when COLUMNS is unset and stdout is no terminal, and the tests read those lines whole."""
    for name, value in getattr(config, "workerinput", {}).get("terminal_environ", {}).items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under xdist, the longest units first (every worker sorts the same way, as xdist requires)."""
    if not hasattr(config, "workerinput"):
        return

    def rank(item: pytest.Item) -> int:
        unit = scheduling_unit(item.nodeid)
        return LONG_FIRST.index(unit) if unit in LONG_FIRST else len(LONG_FIRST)

    items.sort(key=rank)  # stable: files, and the tests in each file, keep their order otherwise
