"""The kinds table is the only table of result object kinds: the bundle, the builders, settings and
delivery read it, and no second copy may appear in sr_writer or dicom_node."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from dicom_node.pipeline.delivery import OutgoingObject, sort_for_sending
from dicom_node.settings import DEFAULT_PROFILES, OBJECT_KINDS
from sr_writer import bundle
from sr_writer.kinds import KINDS, SEND_ORDER, send_rank

REPO = Path(__file__).resolve().parents[2]


def test_the_table_is_consistent() -> None:
    assert SEND_ORDER == tuple(sorted(KINDS, key=send_rank))
    assert len({k.series_number for k in KINDS.values()}) == len(KINDS)
    assert len({k.title for k in KINDS.values()}) == len(KINDS)
    assert len({k.send_rank for k in KINDS.values()}) == len(KINDS)
    # Referenced objects go before the objects that reference them; the KOS references every other one.
    for referencing in ("gsps", "sc"):
        assert send_rank("sr") < send_rank(referencing) and send_rank("seg") < send_rank(referencing)
    assert [k.name for k in KINDS.values() if k.needs == "results"] == [SEND_ORDER[-1]]
    for kind in KINDS.values():
        assert callable(kind.builder()), kind.builder_path


def test_settings_delivery_and_bundle_read_the_table() -> None:
    assert OBJECT_KINDS == SEND_ORDER
    assert bundle.SEND_ORDER == SEND_ORDER
    assert set(bundle._BUILDERS) == set(KINDS)
    for profile in DEFAULT_PROFILES.values():
        assert set(profile) <= set(KINDS)
    shuffled = [OutgoingObject(f"1.2.3.{i}", "1.2.3", kind, Path(kind)) for i, kind in enumerate(reversed(SEND_ORDER))]
    assert [o.kind for o in sort_for_sending(shuffled)] == list(SEND_ORDER)
    assert bundle.check_kinds(list(reversed(SEND_ORDER))) == list(SEND_ORDER)


def test_each_object_carries_the_series_number_and_title_of_its_kind(case) -> None:
    for built in case.bundle.objects:
        assert built.dataset.SeriesNumber == KINDS[built.kind].series_number
        assert KINDS[built.kind].title in built.dataset.SeriesDescription


def kind_tables(path: Path) -> list[int]:
    """Lines of literals that restate the kinds: a sequence naming every kind, or a dict keyed by three or more."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            if set(KINDS) <= {e.value for e in node.elts if isinstance(e, ast.Constant)}:
                hits.append(node.lineno)
        elif isinstance(node, ast.Dict):
            if len({k.value for k in node.keys if isinstance(k, ast.Constant)} & set(KINDS)) >= 3:
                hits.append(node.lineno)
    return hits


def test_no_second_table_of_kinds() -> None:
    found = [
        f"{path.relative_to(REPO)}:{line}"
        for package in ("sr_writer", "dicom_node")
        for path in sorted((REPO / package).rglob("*.py"))
        for line in kind_tables(path)
    ]
    assert not found, f"a second table of object kinds at {found}: read sr_writer.kinds instead"


@pytest.mark.parametrize("text", [
    'ORDER = ("sr", "seg", "anatomy_seg", "text_sr", "gsps", "sc", "kos")\n',
    'NUMBERS = {"sr": 1, "seg": 2, "kos": 3}\n',
])  # fmt: skip
def test_the_scan_sees_a_copy(tmp_path: Path, text: str) -> None:
    copy = tmp_path / "copy.py"
    copy.write_text(text)
    assert kind_tables(copy) == [1]
