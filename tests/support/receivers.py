"""A real pynetdicom Storage SCP standing in for a destination PACS, on any loopback address.

It accepts every storage SOP class (or only those given), answers ``status`` to each C-STORE and keeps
what it stored, so a test can say exactly which objects reached which host.
"""

from __future__ import annotations

import threading

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.support.net import free_port


class StorageReceiver:
    """``StorageReceiver(host="127.0.0.2")``: listening at once; ``stop()`` when done."""

    def __init__(self, host: str = "127.0.0.1", ae_title: str = "RECEIVER", sop_classes: tuple[str, ...] | None = None,
                 status: int = 0x0000) -> None:  # fmt: skip
        self.host, self.ae_title, self.status = host, ae_title, status
        self.port = free_port()
        self.received: list[Dataset] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=ae_title)
        classes = sop_classes or tuple(cx.abstract_syntax for cx in AllStoragePresentationContexts)
        for sop_class in classes:
            ae.add_supported_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server((host, self.port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: evt.Event) -> int:
        if self.status == 0x0000:
            dataset = event.dataset
            dataset.file_meta = event.file_meta  # with the transfer syntax it came in
            with self._lock:
                self.received.append(dataset)
        return self.status

    def sop_instance_uids(self) -> list[str]:
        with self._lock:
            return [str(ds.SOPInstanceUID) for ds in self.received]

    def stop(self) -> None:
        self.server.shutdown()
