"""The durable spool on real file systems: content addressing, duplicates, sweeping, ENOSPC cleanup,
and the order of the durability steps (data sync, rename, directory sync) as the OS sees them."""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicom_node.store.spool import (
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
    assert sorted(p.name for p in (tmp_path / STUDY).iterdir()) == sorted(Path(r).name for r in (first.relative_path, other.relative_path))
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
        # A margin: other processes may free space between the two calls (the parallel tests delete files).
        check_free_space(tmp_path, available + 1024**4, 1024)


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


# ---- durability order -------------------------------------------------------------------------------
#
# "Acknowledged means durable" rests on three steps in one order: the data of the temporary file
# reaches the disk (fdatasync/fsync, after every byte was written), the file is renamed to its final
# name, and the directory holding that name is fsync'd (and the spool directory too when the study
# directory is new). The recorder below wraps the real ``os`` calls (they still run) and notes each
# one that touches the spool, in the order the process made them; no timing is involved.


@dataclass(frozen=True)
class OsCall:
    #: "sync" (fsync/fdatasync of a descriptor) or "rename" (os.replace/os.rename).
    kind: str
    path: Path
    #: sync: size of the file when it was synced; rename: the new name.
    size: int | None = None
    is_dir: bool = False
    target: Path | None = None
    #: rename: whether something already existed under the new name.
    target_existed: bool = False


class OsCallRecorder:
    """Notes the durability-relevant ``os`` calls on paths under ``root`` (any thread), in order."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.calls: list[OsCall] = []
        self._lock = threading.Lock()
        #: Extra events a test interleaves with the OS calls (e.g. "recorded", "answered").
        self.marks: list[tuple[int, str]] = []

    def _under_root(self, path: Path) -> bool:
        return path == self.root or self.root in path.parents

    def _note(self, call: OsCall) -> None:
        if self._under_root(call.path):
            with self._lock:
                self.calls.append(call)

    def mark(self, label: str) -> None:
        """Put a label into the sequence after the calls noted so far."""
        with self._lock:
            self.marks.append((len(self.calls), label))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> OsCallRecorder:
        real_fsync, real_fdatasync = os.fsync, getattr(os, "fdatasync", None)
        real_replace, real_rename = os.replace, os.rename

        def synced(real):
            def sync(fd: int) -> None:
                info = os.fstat(fd)  # before the sync: what the sync is asked to make durable
                path = Path(os.readlink(f"/proc/self/fd/{fd}"))
                real(fd)
                self._note(OsCall("sync", path, size=info.st_size, is_dir=stat.S_ISDIR(info.st_mode)))

            return sync

        def renamed(real):
            def rename(src, dst, *args, **kwargs) -> None:
                source, target = Path(os.path.abspath(src)).resolve(), Path(os.path.abspath(dst)).resolve()
                existed = target.exists()
                real(src, dst, *args, **kwargs)
                self._note(OsCall("rename", source, target=target, target_existed=existed))

            return rename

        monkeypatch.setattr(os, "fsync", synced(real_fsync))
        if real_fdatasync is not None:
            monkeypatch.setattr(os, "fdatasync", synced(real_fdatasync))
        monkeypatch.setattr(os, "replace", renamed(real_replace))
        monkeypatch.setattr(os, "rename", renamed(real_rename))
        return self

    def index(self, predicate, after: int = -1) -> int:
        for position, call in enumerate(self.calls):
            if position > after and predicate(call):
                return position
        raise AssertionError(f"no such call after #{after} in {self.calls}")


@pytest.fixture
def os_calls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[OsCallRecorder]:
    yield OsCallRecorder(tmp_path).install(monkeypatch)


def assert_durably_written(calls: OsCallRecorder, spool_dir: Path, relative_path: str, size: int, new_study_dir: bool) -> int:
    """The write of ``relative_path`` went: full data synced -> renamed into place -> directory synced.

    Returns the position of the last of those calls (the point after which it may be acknowledged).
    """
    spool_dir = spool_dir.resolve()
    final = spool_dir / relative_path
    rename = calls.index(lambda c: c.kind == "rename" and c.target == final)
    renamed = calls.calls[rename]
    temp = renamed.path
    assert temp.parent == spool_dir / ".tmp" and temp.suffix == ".part", renamed
    assert not renamed.target_existed, "nothing may exist under the final name before the rename"
    data_syncs = [i for i, c in enumerate(calls.calls) if c.kind == "sync" and c.path == temp]
    assert data_syncs, f"the data of {temp.name} was never synced before the rename: {calls.calls}"
    assert data_syncs[-1] < rename, f"data synced only after the rename: {calls.calls}"
    assert calls.calls[data_syncs[-1]].size == size, "synced before every byte was written"
    directory_sync = calls.index(lambda c: c.kind == "sync" and c.is_dir and c.path == final.parent, after=rename)
    last = directory_sync
    if new_study_dir:
        last = max(last, calls.index(lambda c: c.kind == "sync" and c.is_dir and c.path == spool_dir, after=rename))
    return last


def test_spool_write_syncs_data_then_renames_then_syncs_the_directories(tmp_path: Path, os_calls: OsCallRecorder) -> None:
    spool = tmp_path / "spool"
    prepare_spool(spool)
    first = write_instance(spool, STUDY, SOP, [b"META", b"DATA" * 1000])
    assert_durably_written(os_calls, spool, first.relative_path, first.size, new_study_dir=True)
    # The study directory exists now: a second instance needs its directory synced, not the spool's.
    os_calls.calls.clear()
    second = write_instance(spool, STUDY, SOP + "1", [b"META", b"OTHER"])
    assert_durably_written(os_calls, spool, second.relative_path, second.size, new_study_dir=False)
    # A repeat of the same bytes writes nothing, so nothing is renamed or synced.
    os_calls.calls.clear()
    assert not write_instance(spool, STUDY, SOP, [b"META", b"DATA" * 1000]).created
    assert os_calls.calls == []


def test_an_adopted_stow_part_is_synced_then_renamed_then_its_directories_synced(tmp_path: Path, os_calls: OsCallRecorder) -> None:
    """STOW-RS parts arrive as files in .tmp (dicom_node.dicomweb.multipart): adopting one is the same durable step."""
    from dicom_node.store.spool import adopt_instance, ensure_adopted, temp_dir

    spool = tmp_path / "spool"
    prepare_spool(spool)
    content = b"PART10" * 500
    part = temp_dir(spool) / "stow-0001.part"
    part.write_bytes(content)
    sha = hashlib.sha256(content).hexdigest()
    adopted = adopt_instance(spool, STUDY, SOP, part, sha, len(content))
    assert adopted.created and not part.exists() and (spool / adopted.relative_path).read_bytes() == content
    assert_durably_written(os_calls, spool, adopted.relative_path, len(content), new_study_dir=True)
    # The same bytes again: nothing moves, the part stays the caller's, and a purge in between is repaired from it.
    again = temp_dir(spool) / "stow-0002.part"
    again.write_bytes(content)
    repeat = adopt_instance(spool, STUDY, SOP, again, sha, len(content))
    assert not repeat.created and again.exists()
    (spool / repeat.relative_path).unlink()
    ensure_adopted(spool, repeat, STUDY, SOP, again)
    assert (spool / repeat.relative_path).read_bytes() == content and not again.exists()
