"""A destination that accepts only uncompressed syntaxes still gets our JPEG SC and JPEG-LS SEG (decompressed)."""

from __future__ import annotations

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.delivery import _contexts_for, _send_one
from sr_writer.bundle import assemble_bundle, comprehensive_sr_fallback
from tests.sr_writer.conftest import UID_ROOT
from tests.support.net import free_port
from tests.support.results import make_result, rg1_source


def test_compressed_objects_are_decompressed_for_a_receiver_without_those_syntaxes() -> None:
    received: list[pydicom.Dataset] = []

    def on_store(event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        received.append(ds)
        return 0x0000

    scp = AE(ae_title="PLAINPACS")
    for context in AllStoragePresentationContexts:
        scp.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        source = rg1_source()
        bundle = assemble_bundle(source, make_result(source, n_findings=3), ("seg", "sc"), uid_root=UID_ROOT, analysis_version=1)
        scu = AE(ae_title="ANATOMIX")
        scu.requested_contexts = _contexts_for([built.dataset for built in bundle.objects])  # what the node's SCU proposes
        assoc = scu.associate("127.0.0.1", port, ae_title="PLAINPACS")
        assert assoc.is_established
        try:
            outcomes = [_send_one(assoc, built.dataset, comprehensive_sr_fallback) for built in bundle.objects]
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert [o.outcome for o in outcomes] == ["sent", "sent"], outcomes
    by_class = {str(ds.SOPClassUID): ds for ds in received}
    sc = by_class[bundle.objects[1].sop_class_uid]
    assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.shape == (sc.Rows, sc.Columns, 3)
    seg = by_class[bundle.objects[0].sop_class_uid]
    assert seg.pixel_array.max() == 255
    # The objects the node keeps stay compressed.
    assert str(bundle.objects[0].dataset.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.80"  # JPEG-LS Lossless
    assert str(bundle.objects[1].dataset.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.50"
