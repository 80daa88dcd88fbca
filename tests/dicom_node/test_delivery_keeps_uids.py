"""A destination that takes only uncompressed syntaxes gets our RLE SEG and JPEG SC decompressed, under
the UIDs the node recorded: pydicom's ``decompress`` makes a new SOP Instance UID unless told not to,
which would leave a second copy in the PACS at each delivery and break the delivery records."""

from __future__ import annotations

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicom_node.delivery import _contexts_for, _send_one
from sr_writer.bundle import assemble_bundle, comprehensive_sr_fallback
from tests.sr_writer.conftest import UID_ROOT
from tests.support.net import free_port
from tests.support.results import make_result, rg1_source


def test_decompressed_objects_keep_their_sop_instance_uids() -> None:
    received: list[pydicom.Dataset] = []
    syntaxes: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.dataset)
        syntaxes.append(str(event.context.transfer_syntax))
        return 0x0000

    scp = AE(ae_title="PLAINPACS")
    for context in AllStoragePresentationContexts:
        scp.add_supported_context(context.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    port = free_port()
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        source = rg1_source()
        bundle = assemble_bundle(source, make_result(source, n_findings=2), ("seg", "sc"), uid_root=UID_ROOT, analysis_version=1)
        scu = AE(ae_title="ANATOMIX")
        scu.requested_contexts = _contexts_for([built.dataset for built in bundle.objects])
        assoc = scu.associate("127.0.0.1", port, ae_title="PLAINPACS")
        assert assoc.is_established
        try:
            outcomes = [_send_one(assoc, built.dataset, comprehensive_sr_fallback) for built in bundle.objects]
        finally:
            assoc.release()
    finally:
        server.shutdown()
    assert [o.outcome for o in outcomes] == ["sent", "sent"], outcomes
    assert set(syntaxes) <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian} and len(syntaxes) == 2  # both decompressed
    assert [str(ds.SOPInstanceUID) for ds in received] == [built.sop_instance_uid for built in bundle.objects]
    assert [o.sop_instance_uid for o in outcomes] == [built.sop_instance_uid for built in bundle.objects]
