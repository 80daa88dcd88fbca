"""Schemathesis against the OpenAPI schema a real ``anatomix-node serve`` publishes, as an admin:
generated valid and invalid requests to every operation (coverage, fuzzing and stateful phases,
at most 15 examples per operation): no answer may be a 5xx, and every status code, content
type and response body must be the one the schema documents."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from pydicom.uid import generate_uid

from dicom_node.settings import load_settings
from dicom_node.store.base import RemoteNode
from tests.integration.test_delivery import seed_study
from tests.support.api import api_node, http_url, make_accounts, wait_for_http

#: Revoking tokens would let the run revoke its own (ids are small integers): covered by test_api.
EXCLUDED_OPERATION = "revoke_token_api_tokens__token_id__delete"


def schemathesis_command() -> list[str]:
    exe = Path(sys.executable).parent / "schemathesis"
    return [str(exe)] if exe.exists() else [shutil.which("schemathesis") or "schemathesis"]


def test_schemathesis_finds_no_server_error(tmp_path, output_dir):
    node = api_node(tmp_path / "node")
    node.write_config()
    store = node.open_store()
    try:  # something to find: a source, a destination (nothing listens: echo fails, no 5xx), a study
        store.add_remote_node(RemoteNode("modality", "MODALITY", "127.0.0.1", 104, role="source"))
        store.add_remote_node(RemoteNode("pacs", "PACS", "127.0.0.1", 9, role="destination", default_destination=True))
        seed_study(store, load_settings(node.config_path), generate_uid(), 1)
    finally:
        store.close()
    accounts = make_accounts(node, ("admin",))
    node.start()
    try:
        wait_for_http(node)
        run = subprocess.run(
            [*schemathesis_command(), "run", http_url(node) + "/openapi.json", "-H", f"Authorization: Bearer {accounts.tokens['admin']}",
             "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
             "--max-examples", "15", "--seed", "20261130", "--request-timeout", "60",
             "--exclude-operation-id", EXCLUDED_OPERATION, "--generation-database", "none"],
            capture_output=True, text=True, timeout=600, cwd=tmp_path,  # its .schemathesis cache stays out of the checkout
        )  # fmt: skip
        (output_dir / "schemathesis-api.txt").write_text(run.stdout + run.stderr)
        summary = re.search(r"(\d+) generated, (\d+) passed", run.stdout)
        assert run.returncode == 0 and summary, run.stdout[-6000:] + run.stderr[-2000:]
        generated, passed = map(int, summary.groups())
        tested = re.search(r"Tested: (\d+)", run.stdout)
        print(f"schemathesis: {generated} test cases, {passed} passed, operations tested: {tested.group(1) if tested else '?'}")
        assert generated == passed and generated >= 200
        assert " 500 " not in node.log_text() and "Traceback" not in node.log_text()
    finally:
        node.stop()
