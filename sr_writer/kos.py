"""Key Object Selection: flags the analysed image and its AI results so a PACS can hang or flag them."""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from highdicom.sr import DeviceObserverIdentifyingAttributes, ObserverContext
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes as dcm_codes

from sr_writer import codes
from sr_writer.context import BundleContext
from sr_writer.equipment import MANUFACTURER, apply_common_attributes
from sr_writer.text import truncate


def build_kos(ctx: BundleContext, results: Sequence[Dataset], kind: str = "kos") -> Dataset:
    """KOS "Of Interest" referencing the source image and every result object already built."""
    referenced = [ctx.source, *results]
    model = ctx.result.model
    observer = ObserverContext(
        observer_type=dcm_codes.cid270.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=model.device_uid, name=ctx.algorithm_name, manufacturer_name=MANUFACTURER, model_name=ctx.algorithm_version
        ),
    )
    description = f"{len(results)} AI result objects for this image" + (" (DEMO WEIGHTS - NOT FOR CLINICAL USE)" if ctx.demo else "")
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
