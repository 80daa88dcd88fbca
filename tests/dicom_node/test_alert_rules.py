"""The example alerting rules in deploy/prometheus: valid for Prometheus (``promtool check rules``),
firing as their unit tests say (``promtool test rules``), and naming only metrics the node exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"


def promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    if tool is None:
        pytest.fail("promtool is not installed (Debian package prometheus; deploy/install-peers.sh installs it)")
    return subprocess.run([tool, *args], cwd=RULES, capture_output=True, text=True, timeout=60)


def test_promtool_checks_the_rules_and_their_unit_tests_pass() -> None:
    checked = promtool("check", "rules", "anatomix-alerts.yml")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 5 rules found" in checked.stdout
    tested = promtool("test", "rules", "anatomix-alerts.test.yml")
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_the_rules_name_only_metrics_the_node_exports() -> None:
    source = (Path(__file__).resolve().parents[2] / "dicom_node" / "api" / "metrics.py").read_text()
    rules = (RULES / "anatomix-alerts.yml").read_text()
    named = set(re.findall(r"\banatomix_[a-z_]+", rules))
    assert {"anatomix_destination_up", "anatomix_destination_waiting_objects", "anatomix_studies_undelivered"} <= named
    assert all(f'"{name}"' in source for name in named), sorted(n for n in named if f'"{n}"' not in source)
