"""A TCP relay in front of a DICOM peer that can hold a C-STORE in flight (fault tests).

:class:`StallingRelay` forwards whole PDUs from the node to the peer and bytes back. The first
connection's first P-DATA-TF PDU (the C-STORE request, once the association is up) is held: the
node is then mid-delivery, waiting for the response. ``stalled`` is set at that moment; after
``release()`` that connection is dropped without forwarding the PDU (the peer stores nothing from
it) and every later connection passes through untouched.
"""

from __future__ import annotations

import contextlib
import socket
import threading

P_DATA_TF = 0x04


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class StallingRelay:
    def __init__(self, upstream_port: int, host: str = "127.0.0.1") -> None:
        self.upstream = (host, upstream_port)
        self.listener = socket.create_server((host, 0))
        self.port = int(self.listener.getsockname()[1])
        self.stalled = threading.Event()
        self.released = threading.Event()
        self.connections = 0
        self._closed = False
        threading.Thread(target=self._accept, name="stalling-relay", daemon=True).start()

    def release(self) -> None:
        self.released.set()

    def close(self) -> None:
        self._closed = True
        self.released.set()
        with contextlib.suppress(OSError):
            self.listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            try:
                upstream = socket.create_connection(self.upstream, timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            stall = self.connections == 1
            threading.Thread(target=self._pdus, args=(client, upstream, stall), daemon=True).start()
            threading.Thread(target=self._bytes, args=(upstream, client), daemon=True).start()

    def _pdus(self, source: socket.socket, target: socket.socket, stall: bool) -> None:
        try:
            while True:
                header = _recv_exact(source, 6)
                body = None if header is None else _recv_exact(source, int.from_bytes(header[2:6], "big"))
                if header is None or body is None:
                    break
                if stall and header[0] == P_DATA_TF:
                    self.stalled.set()
                    self.released.wait(600)
                    break  # never forwarded: the peer sees the connection close, with nothing stored
                target.sendall(header + body)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()

    @staticmethod
    def _bytes(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, target):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
