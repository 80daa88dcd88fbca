"""A destination that takes only uncompressed syntaxes gets our RLE SEG and JPEG SC decompressed, under
the UIDs the node recorded: pydicom's ``decompress`` makes a new SOP Instance UID unless told not to,
which would leave a second copy in the PACS at each delivery and break the delivery records."""

from __future__ import annotations

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE

from dicom_node.pipeline.delivery import _contexts_for, _send_one
from sr_writer.bundle import assemble_bundle, comprehensive_sr_fallback
from tests.sr_writer.conftest import UID_ROOT
from tests.support.receivers import StorageReceiver
from tests.support.results import make_result, rg1_source


def test_decompressed_objects_keep_their_sop_instance_uids() -> None:
    pacs = StorageReceiver(ae_title="PLAINPACS")  # explicit and implicit VR little endian only
    try:
        source = rg1_source()
        bundle = assemble_bundle(source, make_result(source, n_findings=2), ("seg", "sc"), uid_root=UID_ROOT, analysis_version=1)
        scu = AE(ae_title="ANATOMIX")
        scu.requested_contexts = _contexts_for([built.dataset for built in bundle.objects])
        assoc = scu.associate(pacs.host, pacs.port, ae_title="PLAINPACS")
        assert assoc.is_established
        try:
            outcomes = [_send_one(assoc, built.dataset, comprehensive_sr_fallback) for built in bundle.objects]
        finally:
            assoc.release()
    finally:
        pacs.stop()
    received = pacs.received
    syntaxes = [str(ds.file_meta.TransferSyntaxUID) for ds in received]
    assert [o.outcome for o in outcomes] == ["sent", "sent"], outcomes
    assert set(syntaxes) <= {ExplicitVRLittleEndian, ImplicitVRLittleEndian} and len(syntaxes) == 2  # both decompressed
    assert [str(ds.SOPInstanceUID) for ds in received] == [built.sop_instance_uid for built in bundle.objects]
    assert [o.sop_instance_uid for o in outcomes] == [built.sop_instance_uid for built in bundle.objects]
