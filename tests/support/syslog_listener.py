"""A real syslog receiver for the ATNA tests: TCP (RFC 6587 octet counting) or TLS (RFC 5425).

It reads each connection to its end, splits the stream by octet counting (a frame that is not
``MSG-LEN SP MSG`` is recorded as a framing error, never guessed at), and closes its side at the
client's EOF, as rsyslog does. ``stall()`` makes it accept connections and read nothing (a hung
repository); ``resume()`` lets it read again. :func:`parse_rfc5424` checks one message's header
fields against RFC 5424's grammar.
"""

from __future__ import annotations

import re
import socket
import ssl
import threading
from dataclasses import dataclass, field


@dataclass
class Frame:
    raw: bytes
    peer: str


@dataclass
class SyslogListener:
    port: int
    ssl_context: ssl.SSLContext | None = None
    frames: list[Frame] = field(default_factory=list)
    framing_errors: list[str] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._reading = threading.Event()
        self._reading.set()
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> SyslogListener:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        server.settimeout(0.2)
        self._server = server
        self._stop.clear()
        thread = threading.Thread(target=self._accept_loop, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._reading.set()
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        if self._server is not None:
            self._server.close()
            self._server = None

    def stall(self) -> None:
        self._reading.clear()

    def resume(self) -> None:
        self._reading.set()

    def messages(self) -> list[bytes]:
        with self._lock:
            return [f.raw for f in self.frames]

    def _accept_loop(self) -> None:
        assert self._server is not None
        while not self._stop.is_set():
            try:
                conn, address = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
            thread = threading.Thread(target=self._serve, args=(conn, f"{address[0]}:{address[1]}"), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket, peer: str) -> None:
        try:
            while not self._reading.wait(0.2) or self._stop.is_set():  # stalled: hold the connection, read nothing
                if self._stop.is_set():
                    return  # a stalled repository that dies: what was sent is never read
            conn.settimeout(30)
            stream = self.ssl_context.wrap_socket(conn, server_side=True) if self.ssl_context else conn
            buffer = b""
            while True:
                try:
                    chunk = stream.recv(65536)
                except ssl.SSLZeroReturnError:  # the client's close_notify
                    chunk = b""
                if not chunk:
                    break
                buffer += chunk
                buffer = self._split(buffer, peer)
            if buffer:
                with self._lock:
                    self.framing_errors.append(f"{len(buffer)} trailing bytes from {peer}: {buffer[:40]!r}")
            if self.ssl_context:
                stream = stream.unwrap()  # answer the close_notify, then close
        except (OSError, ssl.SSLError) as exc:
            with self._lock:
                self.framing_errors.append(f"connection from {peer}: {exc}")
        finally:
            conn.close()

    def _split(self, buffer: bytes, peer: str) -> bytes:
        """Take every complete ``MSG-LEN SP MSG`` frame off the front of ``buffer``."""
        while buffer:
            match = re.match(rb"([1-9][0-9]{0,8}) ", buffer)
            if match is None:
                if len(buffer) > 10 or not buffer[:10].isdigit():
                    raise OSError(f"not octet-counted: {buffer[:40]!r}")
                return buffer
            length = int(match.group(1))
            start = match.end()
            if len(buffer) < start + length:
                return buffer
            with self._lock:
                self.frames.append(Frame(buffer[start : start + length], peer))
            buffer = buffer[start + length :]
        return buffer


# ---- RFC 5424 ---------------------------------------------------------------------------------------

_HEADER = re.compile(
    rb"^<(?P<pri>[0-9]{1,3})>(?P<version>[1-9][0-9]{0,2}) (?P<timestamp>\S+) (?P<hostname>[!-~]{1,255}) "
    rb"(?P<app>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) (?P<msgid>[!-~]{1,32}) "
)
_TIMESTAMP = re.compile(r"^(-|\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|[+-]\d{2}:\d{2}))$")
_SD_NAME = rb"[!#-<>-Z\\^-~]{1,32}"  # PRINTUSASCII except '=', ' ', ']', '"'
_SD_PARAM = rb" (" + _SD_NAME + rb')="((?:[^"\\\]]|\\["\\\]])*)"'


@dataclass
class Rfc5424Message:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: dict[str, dict[str, str]]
    msg: bytes

    @property
    def facility(self) -> int:
        return self.pri // 8

    @property
    def severity(self) -> int:
        return self.pri % 8


def parse_rfc5424(raw: bytes) -> Rfc5424Message:
    """Parse one SYSLOG-MSG by RFC 5424's ABNF; raise ValueError saying what does not conform."""
    header = _HEADER.match(raw)
    if header is None:
        raise ValueError(f"header does not match RFC 5424: {raw[:120]!r}")
    pri = int(header["pri"])
    if pri > 191:
        raise ValueError(f"PRI {pri} > 191")
    timestamp = header["timestamp"].decode("ascii")
    if not _TIMESTAMP.match(timestamp):
        raise ValueError(f"TIMESTAMP {timestamp!r} is not RFC 3339 as RFC 5424 restricts it")
    rest = raw[header.end() :]
    sd: dict[str, dict[str, str]] = {}
    if rest.startswith(b"-"):
        rest = rest[1:]
    else:
        while rest.startswith(b"["):
            element = re.match(rb"\[(" + _SD_NAME + rb")((?:" + _SD_PARAM + rb")*)\]", rest)
            if element is None:
                raise ValueError(f"malformed STRUCTURED-DATA: {rest[:120]!r}")
            params = {name.decode(): re.sub(rb'\\(["\\\]])', rb"\1", value).decode("utf-8") for name, value in re.findall(_SD_PARAM, element.group(2))}
            sd[element.group(1).decode()] = params
            rest = rest[element.end() :]
        if not sd:
            raise ValueError(f"no STRUCTURED-DATA: {rest[:80]!r}")
    if rest and not rest.startswith(b" "):
        raise ValueError(f"no SP before MSG: {rest[:40]!r}")
    msg = rest[1:]
    return Rfc5424Message(
        pri,
        int(header["version"]),
        timestamp,
        header["hostname"].decode(),
        header["app"].decode(),
        header["procid"].decode(),
        header["msgid"].decode(),
        sd,
        msg,
    )
