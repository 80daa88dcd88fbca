"""The result object kinds: the one table that says what sr_writer can build and how each kind is sent.

Everything else reads it: the bundle (which builder, what a kind needs, the order), the builders
(series number and title), ``dicom_node.settings`` (which kinds a profile may name) and
``dicom_node.pipeline.delivery`` (send order). ``tests/sr_writer/test_kinds.py`` fails when a second
table of kinds appears in either package.

Send order: SR and SEG first, then the objects that may reference them (GSPS, SC), the KOS last
because it references all the others. The Basic Text SR references nothing and goes after the SEG.

This module imports nothing (builders are named, and imported when first asked for), so settings
can read it without loading highdicom.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

#: What a kind needs from the result besides the source image: nothing more, the report text, at
#: least one box inside the image, at least one finding box inside the image, or the other objects of
#: the bundle (which it references).
Needs = Literal["nothing", "report", "boxes", "finding_boxes", "results"]


@dataclass(frozen=True)
class ObjectKind:
    """One kind of result object."""

    name: str
    #: ``module:function`` of the builder, called as ``builder(ctx)`` (``builder(ctx, results)`` for ``results``).
    builder_path: str
    #: Series Number of its series in the source study (fixed per kind, so viewers sort them stably).
    series_number: int
    #: Series Description, first (the kind, so OHIF's narrow study browser tells series apart), then the mark.
    title: str
    needs: Needs
    #: Position in the send order (lower goes first).
    send_rank: int

    def builder(self) -> Callable[..., Any]:
        module, _, function = self.builder_path.partition(":")
        return getattr(importlib.import_module(module), function)


_KINDS = (
    ObjectKind("sr", "sr_writer.tid1500:build_tid1500_sr", 9901, "Findings SR", "nothing", 0),
    ObjectKind("text_sr", "sr_writer.text_sr:build_text_sr", 9902, "Report text SR", "report", 3),
    ObjectKind("seg", "sr_writer.seg:build_seg", 9903, "Findings SEG", "finding_boxes", 1),
    ObjectKind("anatomy_seg", "sr_writer.seg:build_anatomy_seg", 9907, "Anatomy SEG", "boxes", 2),
    ObjectKind("gsps", "sr_writer.gsps:build_gsps", 9904, "Overlay GSPS", "boxes", 4),
    ObjectKind("sc", "sr_writer.sc:build_sc", 9905, "Overlay image SC", "boxes", 5),
    ObjectKind("kos", "sr_writer.kos:build_kos", 9906, "Key objects KOS", "results", 6),
)

#: Kind name -> its entry, in send order.
KINDS: dict[str, ObjectKind] = {kind.name: kind for kind in sorted(_KINDS, key=lambda k: k.send_rank)}
#: Every kind sr_writer can build, in send order.
SEND_ORDER: tuple[str, ...] = tuple(KINDS)


#: What the TID 1500 SR's measurement groups hold besides the findings' boxes. "findings" (the default):
#: nothing more: OHIF draws every group with its label, so a first opening shows the findings only;
#: "grounded": also the regions a located finding is grounded to; "all": every located region. The full
#: anatomy is in the anatomy SEG (kind ``anatomy_seg``) and the GSPS's ANATOMY layer either way, and
#: every region sentence in the text SR.
SR_ANATOMY_MODES: tuple[str, ...] = ("findings", "grounded", "all")


def send_rank(name: str) -> int:
    """Where a kind goes in the send order; an unknown kind goes after every known one."""
    kind = KINDS.get(name)
    return kind.send_rank if kind is not None else len(KINDS)
