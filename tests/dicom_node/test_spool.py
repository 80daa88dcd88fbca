"""The durable spool on real file systems: content addressing, duplicates, sweeping, ENOSPC cleanup."""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path

import pytest

from dicom_node.spool import (
    SpoolFull,
    check_free_space,
    free_bytes,
    instance_relative_path,
    is_valid_uid,
    prepare_spool,
    write_instance,
)

STUDY = "1.2.826.0.1.3680043.8.498.20"
SOP = STUDY + ".1"


def test_write_is_content_addressed_and_a_repeat_is_not_rewritten(tmp_path: Path) -> None:
    prepare_spool(tmp_path)
    first = write_instance(tmp_path, STUDY, SOP, [b"META", b"DATA"])
    assert first.created and first.size == 8
    assert first.relative_path == instance_relative_path(STUDY, SOP, first.sha256)
    assert (tmp_path / first.relative_path).read_bytes() == b"METADATA"
    mtime = (tmp_path / first.relative_path).stat().st_mtime_ns
    again = write_instance(tmp_path, STUDY, SOP, [b"META", b"DATA"])
    assert again == type(first)(first.relative_path, 8, first.sha256, created=False)
    assert (tmp_path / first.relative_path).stat().st_mtime_ns == mtime
    other = write_instance(tmp_path, STUDY, SOP, [b"META", b"OTHER"])
    assert other.created and other.relative_path != first.relative_path  # a second version, both kept
    assert sorted(p.name for p in (tmp_path / STUDY).iterdir()) == sorted(
        Path(r).name for r in (first.relative_path, other.relative_path)
    )
    assert list((tmp_path / ".tmp").iterdir()) == []


def test_prepare_spool_sweeps_partial_writes_only(tmp_path: Path) -> None:
    prepare_spool(tmp_path)
    kept = write_instance(tmp_path, STUDY, SOP, [b"X"])
    (tmp_path / ".tmp" / "abc.part").write_bytes(b"half")
    assert prepare_spool(tmp_path) == 1
    assert list((tmp_path / ".tmp").iterdir()) == []
    assert (tmp_path / kept.relative_path).exists()


def test_watermark_check(tmp_path: Path) -> None:
    available = free_bytes(tmp_path)
    check_free_space(tmp_path, 0, 1024)
    with pytest.raises(SpoolFull, match="storage.min_free_bytes"):
        check_free_space(tmp_path, available, 1024)


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.1", "0"])
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)


@pytest.mark.parametrize("uid", ["", "1.2.abc", "../../etc", "1.2/3", "1." * 40, "1..2", "1.2."])
def test_invalid_uids_never_become_paths(uid: str) -> None:
    assert not is_valid_uid(uid)


def test_enospc_mid_write_leaves_no_partial_file(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(spool)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({result.stderr.strip()}); needs root or CAP_SYS_ADMIN")
    try:
        prepare_spool(spool)
        with pytest.raises(OSError) as raised:
            write_instance(spool, STUDY, SOP, [b"\0" * 512 * 1024, b"\1" * 1024 * 1024])  # 1.5 MB into 1 MB
        assert raised.value.errno == errno.ENOSPC
        assert list((spool / ".tmp").iterdir()) == []
        assert not (spool / STUDY).exists()
        assert free_bytes(spool) == 1024 * 1024  # every byte of the partial write released
    finally:
        subprocess.run(["umount", str(spool)], check=False)
