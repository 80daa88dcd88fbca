"""``anatomix-node worker-token`` and the refusals of ``worker --api-url`` (issue 23), in-process on a SQLite node."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from dicom_node.api import auth
from dicom_node.cli.main import main
from dicom_node.settings import load_settings
from dicom_node.store import open_store


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "anatomix-node.toml"
    path.write_text(f'[storage]\ndata_dir = "{tmp_path / "data"}"\n')
    (tmp_path / "data").mkdir()
    open_store(load_settings(path, env={}).database_url).close()
    return path


def test_worker_tokens_are_added_listed_and_revoked_and_only_their_hash_is_stored(config: Path, tmp_path: Path, capsys) -> None:
    assert main(["worker-token", "add", "gpu-box-1", "--config", str(config)]) == 0
    secret = capsys.readouterr().out.splitlines()[-1]
    assert secret.startswith(auth.WORKER_TOKEN_PREFIX) and len(secret) > 40
    out = tmp_path / "box2.token"
    assert main(["worker-token", "add", "gpu-box-2", "--out", str(out), "--config", str(config)]) == 0
    assert out.stat().st_mode & 0o777 == 0o600 and out.read_text().strip().startswith(auth.WORKER_TOKEN_PREFIX)
    assert main(["worker-token", "add", "gpu-box-3", "--out", str(out), "--config", str(config)]) == 2  # never overwrites a file
    assert "the file exists" in capsys.readouterr().err
    assert main(["worker-token", "add", "gpu-box-1", "--config", str(config)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["worker-token", "add", "bad name!", "--config", str(config)]) == 2

    store = open_store(load_settings(config, env={}).database_url)
    try:
        assert store.find_worker_token(auth.secret_hash(secret), datetime.now(UTC)) is not None
        assert secret not in (tmp_path / "data" / "anatomix.db").read_bytes().decode("latin-1")
    finally:
        store.close()
    capsys.readouterr()
    assert main(["worker-token", "list", "--config", str(config)]) == 0
    listing = capsys.readouterr().out
    assert "gpu-box-1\tlive" in listing and "gpu-box-2\tlive\t" in listing and "never used" in listing
    assert main(["worker-token", "revoke", "gpu-box-1", "--config", str(config)]) == 0
    assert main(["worker-token", "revoke", "gpu-box-1", "--config", str(config)]) == 2
    assert "no live worker token named 'gpu-box-1'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--api-url", "http://node:8080", "--queues", "analyze"], "needs both --api-url and --token-file"),
        (["--api-url", "http://node:8080", "--token-file", "t", "--queues", "analyze,deliver", "--broker-url", "redis://node:6379/0"],
         "takes only the analyze queue"),
        (["--api-url", "http://node:8080", "--token-file", "t", "--queues", "analyze"], "needs the node's broker"),
        (["--api-url", "http://127.0.0.1:9", "--token-file", "missing.token", "--queues", "analyze", "--broker-url", "redis://node:6379/0"],
         "--token-file"),
        (["--api-url", "http://127.0.0.1:9", "--token-file", "worker.token", "--queues", "analyze", "--broker-url", "redis://node:6379/0"],
         "the node at http://127.0.0.1:9 cannot be used"),
    ],
)  # fmt: skip
def test_a_worker_over_http_refuses_to_start_in_one_line(config: Path, tmp_path: Path, monkeypatch, capsys, argv: list[str], words: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "worker.token").write_text(auth.new_secret(auth.WORKER_TOKEN_PREFIX))
    code = main(["worker", *argv, "--config", str(config)])
    err = capsys.readouterr().err
    assert code != 0 and words in err and "Traceback" not in err, err
