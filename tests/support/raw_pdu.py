"""Hand-made DICOM Upper Layer PDUs and raw sockets, for clients that misbehave on purpose.

pynetdicom's own SCU cannot send a half PDU, an A-ASSOCIATE-RQ that declares 256 MiB, or a
P-DATA-TF over the negotiated maximum; these helpers can. Encodings follow PS3.8 9.3.
"""

from __future__ import annotations

import selectors
import socket
import struct
import threading
import time

VERIFICATION = "1.2.840.10008.1.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"


def _item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def _ae(title: str | bytes) -> bytes:
    raw = title.encode("latin-1") if isinstance(title, str) else title
    return raw[:16].ljust(16, b" ")


def associate_rq(calling: str | bytes, called: str = "ANATOMIX", max_pdu: int = 16384) -> bytes:
    """A complete A-ASSOCIATE-RQ proposing Verification in Implicit VR Little Endian."""
    presentation = bytes([1, 0, 0, 0]) + _item(0x30, VERIFICATION.encode()) + _item(0x40, IMPLICIT_LE.encode())
    user_info = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, b"1.2.826.0.1.3680043.9.9999")
    body = (
        struct.pack(">HH", 1, 0)
        + _ae(called)
        + _ae(calling)
        + bytes(32)
        + _item(0x10, APPLICATION_CONTEXT.encode())
        + _item(0x20, presentation)
        + _item(0x50, user_info)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


def connect_from(source_host: str, port: int, timeout: float = 5.0) -> socket.socket:
    """A TCP connection to 127.0.0.1:port from ``source_host`` (any 127.x.y.z address on Linux)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.bind((source_host, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def read_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """The next whole PDU as (type, body), or None when the peer closed first (bounded by ``timeout``)."""
    deadline = time.monotonic() + timeout
    header = _read(sock, 6, deadline)
    if header is None:
        return None
    pdu_type, _, length = struct.unpack(">BBL", header)
    body = _read(sock, length, deadline)
    return None if body is None else (pdu_type, body)


def _read(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no complete PDU within the timeout ({len(data)} of {size} bytes)")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(size - len(data))
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        data += chunk
    return bytes(data)


def wait_closed(sock: socket.socket, timeout: float) -> float | None:
    """Seconds until the peer closed ``sock`` (EOF or reset), discarding data; None if still open at ``timeout``."""
    start = time.monotonic()
    deadline = start + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return None
        sock.settimeout(remaining)
        try:
            if not sock.recv(65536):
                return time.monotonic() - start
        except (ConnectionResetError, BrokenPipeError):
            return time.monotonic() - start
        except TimeoutError:
            return None


def vm_rss_bytes(pid: int) -> int:
    """Resident set size of a process (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux /proc)."""
    children: list[int] = []
    for task in _tasks(pid):
        try:
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as handle:
                children += [int(p) for p in handle.read().split()]
        except FileNotFoundError:
            continue
    return children


def _tasks(pid: int) -> list[str]:
    import os

    return os.listdir(f"/proc/{pid}/task")


class Refresher:
    """``count`` idle sockets from ``host``, each re-opened as soon as the node closes it (one thread, bounded)."""

    def __init__(self, host: str, port: int, count: int) -> None:
        self.host, self.port, self.count = host, port, count
        self.reopened = 0
        self.failed_connects = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refresher", daemon=True)

    def start(self) -> Refresher:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            raise RuntimeError("the refresher did not stop")

    def _open(self, selector) -> None:
        try:
            sock = connect_from(self.host, self.port, timeout=5)
        except OSError:
            self.failed_connects += 1
            return
        selector.register(sock, selectors.EVENT_READ)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            for _ in range(self.count):
                self._open(selector)
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.2):
                    sock = key.fileobj
                    try:
                        data = sock.recv(4096)
                    except OSError:
                        data = b""
                    if data:
                        continue  # an A-ABORT or the like: wait for the close
                    selector.unregister(sock)
                    sock.close()
                    self.reopened += 1
                    self._open(selector)
                missing = self.count - len(selector.get_map())
                for _ in range(missing):  # connects that failed: try again (never more than ``count`` open)
                    self._open(selector)
            for key in list(selector.get_map().values()):
                key.fileobj.close()
