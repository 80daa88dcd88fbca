"""Key Object Selection: flags the analysed image and its AI results so a PACS can hang or flag them."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset

from sr_writer import codes
from sr_writer.context import BundleContext
from sr_writer.equipment import apply_common_attributes, device_observer
from sr_writer.identity import DEMO_MARK
from sr_writer.text import truncate


def build_kos(ctx: BundleContext, results: Sequence[Dataset], kind: str = "kos") -> Dataset:
    """KOS "Of Interest" referencing the source image and every result object already built."""
    referenced = [ctx.source, *results]
    observer = device_observer(ctx)
    description = f"{len(results)} AI result objects for this image" + (f" ({DEMO_MARK})" if ctx.demo else "")
    content = hd.ko.KeyObjectSelection(
        document_title=codes.OF_INTEREST,
        referenced_objects=referenced,
        observer_device_context=observer,
        description=truncate(description, "ST"),
    )
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=referenced,
        content=content,
        **ctx.new_instance_identity(kind),
        institution_name=ctx.institution_name or None,
    )
    kos.SeriesDescription = ctx.series_description(kind)
    return apply_common_attributes(kos, ctx)
