"""A destination that accepts only uncompressed syntaxes still gets our JPEG SC and JPEG-LS SEG (decompressed)."""

from __future__ import annotations

from pynetdicom import AE

from dicom_node.pipeline.delivery import _contexts_for, _send_one
from sr_writer.bundle import assemble_bundle, comprehensive_sr_fallback
from tests.sr_writer.conftest import UID_ROOT
from tests.support.receivers import StorageReceiver
from tests.support.results import make_result, rg1_source


def test_compressed_objects_are_decompressed_for_a_receiver_without_those_syntaxes() -> None:
    pacs = StorageReceiver(ae_title="PLAINPACS")  # explicit and implicit VR little endian only
    try:
        source = rg1_source()
        bundle = assemble_bundle(source, make_result(source, n_findings=3), ("seg", "sc"), uid_root=UID_ROOT, analysis_version=1)
        scu = AE(ae_title="ANATOMIX")
        scu.requested_contexts = _contexts_for([built.dataset for built in bundle.objects])  # what the node's SCU proposes
        assoc = scu.associate(pacs.host, pacs.port, ae_title="PLAINPACS")
        assert assoc.is_established
        try:
            outcomes = [_send_one(assoc, built.dataset, comprehensive_sr_fallback) for built in bundle.objects]
        finally:
            assoc.release()
    finally:
        pacs.stop()
    received = pacs.received
    assert [o.outcome for o in outcomes] == ["sent", "sent"], outcomes
    by_class = {str(ds.SOPClassUID): ds for ds in received}
    sc = by_class[bundle.objects[1].sop_class_uid]
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    seg = by_class[bundle.objects[0].sop_class_uid]
    assert seg.pixel_array.max() == 255
    # The objects the node keeps stay compressed.
    assert str(bundle.objects[0].dataset.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"  # JPEG-LS Lossless
    assert str(bundle.objects[1].dataset.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
