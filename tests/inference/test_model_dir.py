"""Model directory: layout, manifest, digest caching, device UID."""

from __future__ import annotations

import json
import os
import re
import shutil

import pytest

from inference.model_dir import DIGEST_CACHE, ModelDir, ModelDirError, device_uid_from_digest


@pytest.fixture(scope="module")
def demo(tiny_model_dir):
    return tiny_model_dir(0)


def test_demo_directory_resolves_with_manifest(demo) -> None:
    directory = ModelDir.open(demo)
    assert directory.demo is True and directory.version == "demo-tiny-seed0"
    assert directory.apm.name == "apm.pth" and directory.lm.name == "lm.pt" and directory.base.name == "medgemma"
    assert {p.name for p in directory.weight_files()} >= {"apm.pth", "lm.pt", "config.json", "model.safetensors", "tokenizer.json", "emb_db.pt"}


def test_incomplete_directory_names_every_missing_part(tmp_path) -> None:
    (tmp_path / "medgemma").mkdir()
    with pytest.raises(ModelDirError) as error:
        ModelDir.open(tmp_path)
    message = str(error.value)
    for part in ("apm (apm.pth)", "lm (lm.pt)", "retrieval_db (emb_db.pt)", "medgemma/config.json", "demo-weights"):
        assert part in message


def test_manifest_file_names_are_honoured_and_authors_layout_needs_no_manifest(tmp_path, demo) -> None:
    root = tmp_path / "authors"
    shutil.copytree(demo, root)
    (root / "model.json").unlink()
    (root / "apm.pth").rename(root / "anatomix_apm_best.pth")
    (root / "emb_db.pt").rename(root / "emb_db_test.pt")
    with pytest.raises(ModelDirError, match=r"retrieval_db \(emb_db.pt\)"):
        ModelDir.open(root)
    (root / "model.json").write_text(json.dumps({"files": {"retrieval_db": "emb_db_test.pt"}}))
    directory = ModelDir.open(root)
    assert directory.apm.name == "anatomix_apm_best.pth"  # the single .pth is found without naming it
    assert directory.retrieval_db.name == "emb_db_test.pt" and directory.demo is False
    (root / "model.json").write_text("{not json")
    with pytest.raises(ModelDirError, match="not valid JSON"):
        ModelDir.open(root)


def test_digest_is_cached_and_follows_the_files(tmp_path, demo) -> None:
    root = tmp_path / "m"
    shutil.copytree(demo, root)
    directory = ModelDir.open(root)
    first = directory.weights_digest()
    assert re.fullmatch(r"[0-9a-f]{64}", first)
    assert json.loads((root / DIGEST_CACHE).read_text())["digest"] == first
    # a poisoned cache entry is returned only while the stamp matches: proves the cache is used ...
    cache = json.loads((root / DIGEST_CACHE).read_text())
    (root / DIGEST_CACHE).write_text(json.dumps({**cache, "digest": "0" * 64}))
    assert directory.weights_digest() == "0" * 64
    # ... and that a changed file is hashed again
    with (root / "emb_db.pt").open("ab") as handle:
        handle.write(b"\0")
    os.utime(root / "emb_db.pt", ns=(1, 1))
    second = directory.weights_digest()
    assert second not in (first, "0" * 64)


def test_device_uid_is_a_valid_dicom_uid() -> None:
    uid = device_uid_from_digest("f" * 64)
    assert uid.startswith("2.25.") and len(uid) <= 64 and re.fullmatch(r"2\.25\.[1-9]\d*", uid)
    assert device_uid_from_digest("a" * 64) != uid


def test_cli_model_info_reports_identity_and_names_a_broken_key(tmp_path, demo, capsys) -> None:
    import torch

    from dicom_node.cli.main import main
    from inference.lm.layout import lora_key

    assert main(["model", "info", str(demo), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ok"] and info["demo"] and info["version"] == "demo-tiny-seed0"
    assert info["weights_digest"] == ModelDir.open(demo).weights_digest()
    assert info["lm"]["missing"] == [] and info["lm"]["unexpected"] == [] and info["lm"]["lora_pairs"] == 42

    root = tmp_path / "broken"
    shutil.copytree(demo, root)
    checkpoint = torch.load(root / "lm.pt", weights_only=True)
    del checkpoint["LM"]["core_model"][lora_key(1, "q_proj", "A")]
    torch.save(checkpoint, root / "lm.pt")
    assert main(["model", "info", str(root)]) == 1
    captured = capsys.readouterr()
    assert f"problem: lm.pt:{lora_key(1, 'q_proj', 'A')}" in captured.out
    assert "cannot be loaded" in captured.err


def test_cli_demo_weights_refuses_a_non_empty_directory(tmp_path, capsys) -> None:
    from dicom_node.cli.main import main

    (tmp_path / "keep.txt").write_text("x")
    assert main(["model", "demo-weights", "--out", str(tmp_path)]) == 2
    assert "not an empty directory" in capsys.readouterr().err
