"""A streaming reader of ``multipart/related`` bodies (RFC 2046 5.1, RFC 2387) for STOW-RS.

The body is read chunk by chunk as it arrives; each part's content goes straight into its own
temporary file (in a directory the caller names: the spool's ``.tmp``, so that a stored part is
renamed into place, never copied). Memory stays bounded by one chunk plus the delimiter and one
part's headers, whatever the size of the request. The SHA-256 and size of each part are computed
on the way, so the spool needs no second read.

Caps: ``max_part_bytes`` (one instance), ``max_total_bytes`` (the whole body), ``max_parts``,
``MAX_HEADER_BYTES`` per part's headers. A body over a cap stops being read at once
(:class:`MultipartError` with status 413); a truncated or malformed one gives status 400. Either
way every temporary file of the request is deleted: a request is all parts or nothing.

Use :class:`MultipartReader` (push: ``feed``/``finish``, for a synchronous caller) or
:func:`read_parts` (an async iterator of chunks, e.g. Starlette's ``request.stream()``).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import BinaryIO

#: Largest header block of one part, in bytes (a DICOM part has two or three short headers).
MAX_HEADER_BYTES = 16 * 1024
#: RFC 2046: 1 to 70 characters from this set (a space, not last).
_BOUNDARY = re.compile(r"^[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]$")
_CRLF = b"\r\n"


class MultipartError(ValueError):
    """The body cannot be read as multipart/related: ``status`` is the HTTP status to answer
    (400 malformed or truncated, 413 over a size cap, 415 not multipart/related), ``reason`` says why."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class RelatedContentType:
    """A parsed ``multipart/related`` Content-Type."""

    boundary: str
    #: The ``type`` parameter (root media type, lower case), e.g. ``application/dicom``; "" when absent.
    type: str
    #: The ``transfer-syntax`` parameter, when the sender named one; "" when absent.
    transfer_syntax: str = ""


@dataclass
class Part:
    """One received part: its headers and its content in a temporary file the caller now owns
    (adopt it, e.g. rename it into the spool, or delete it: :meth:`discard`)."""

    #: Header names in lower case; values as sent (stripped).
    headers: dict[str, str]
    path: Path
    size: int
    sha256: str

    @property
    def content_type(self) -> str:
        """The part's media type in lower case without parameters ("" when the part named none)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def parse_related_content_type(value: str | None) -> RelatedContentType:
    """Read a request's Content-Type; MultipartError(415) unless it is multipart/related with a boundary."""
    if not value:
        raise MultipartError('no Content-Type: send multipart/related; type="application/dicom"; boundary=...', 415)
    message = Message()
    message["content-type"] = value
    if message.get_content_type() != "multipart/related":
        raise MultipartError(f'Content-Type {message.get_content_type()!r} is not multipart/related; type="application/dicom"', 415)
    boundary = message.get_param("boundary")
    if not isinstance(boundary, str) or not _BOUNDARY.match(boundary):
        raise MultipartError("multipart/related without a valid boundary parameter (1-70 characters, RFC 2046)", 400)
    root_type = message.get_param("type")
    syntax = message.get_param("transfer-syntax")
    return RelatedContentType(
        boundary=boundary,
        type=root_type.strip().lower() if isinstance(root_type, str) else "",
        transfer_syntax=syntax.strip() if isinstance(syntax, str) else "",
    )


@dataclass
class _OpenPart:
    headers: dict[str, str]
    path: Path
    handle: BinaryIO
    digest: hashlib._Hash = field(default_factory=hashlib.sha256)
    size: int = 0


class MultipartReader:
    """Push parser: ``feed`` chunks, then ``finish``; complete parts collect in :attr:`parts`.

    On any error (raised by ``feed``/``finish``) every temporary file of the request, finished
    parts included, is already deleted. Use it as a context manager so an error of the caller
    (a dropped connection) deletes them too: on leaving with an exception, or without ``finish``
    having succeeded, :meth:`discard` runs. After success the parts' files belong to the caller.
    """

    def __init__(self, boundary: str, temp_dir: Path, max_part_bytes: int, max_total_bytes: int, max_parts: int = 10_000) -> None:
        self.temp_dir = temp_dir
        self.max_part_bytes = max_part_bytes
        self.max_total_bytes = max_total_bytes
        self.max_parts = max_parts
        # The first delimiter may open the body: read as if a CRLF came before it (RFC 2046's grammar).
        self._delimiter = _CRLF + b"--" + boundary.encode("ascii")
        self._buffer = bytearray(_CRLF)
        self._state = "preamble"  # preamble -> after_delimiter -> headers -> body -> after_delimiter ... -> epilogue
        self._current: _OpenPart | None = None
        self.parts: list[Part] = []
        self.total_bytes = 0
        self._finished = False

    # ---- context manager ---------------------------------------------------------------------
    def __enter__(self) -> MultipartReader:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._finished:
            self.discard()

    def discard(self) -> None:
        """Delete every temporary file of this request (open and finished parts)."""
        if self._current is not None:
            self._current.handle.close()
            self._current.path.unlink(missing_ok=True)
            self._current = None
        for part in self.parts:
            part.discard()
        self.parts = []

    # ---- parsing -----------------------------------------------------------------------------
    def feed(self, chunk: bytes) -> None:
        if self._finished:
            raise RuntimeError("feed after finish")
        self.total_bytes += len(chunk)
        try:
            if self.total_bytes > self.max_total_bytes:
                raise MultipartError(f"the request body is over the size cap of {self.max_total_bytes} bytes", 413)
            if self._state == "epilogue":
                return  # RFC 2046: whatever follows the close delimiter is ignored
            self._buffer += chunk
            self._advance()
        except BaseException:
            self.discard()
            raise

    def finish(self) -> list[Part]:
        """The body has ended: the parts, or MultipartError(400) when it ended before the close delimiter."""
        try:
            if self._state != "epilogue":
                where = {"preamble": "before the first boundary", "headers": "inside a part's headers", "body": "inside a part"}
                raise MultipartError(
                    f"the multipart body is truncated: it ends {where.get(self._state, 'after a boundary')} "
                    f"(after {self.total_bytes} bytes, {len(self.parts)} complete part(s)) without the closing boundary",
                    400,
                )
            if not self.parts:
                raise MultipartError("the multipart body holds no part", 400)
        except BaseException:
            self.discard()
            raise
        self._finished = True
        return self.parts

    def _advance(self) -> None:
        while True:
            if self._state == "preamble":
                found = self._buffer.find(self._delimiter)
                if found < 0:
                    # Keep only what may still begin the delimiter; the preamble is ignored.
                    keep = len(self._delimiter) - 1
                    if len(self._buffer) > keep:
                        del self._buffer[: len(self._buffer) - keep]
                    if self.total_bytes > MAX_HEADER_BYTES:
                        raise MultipartError(f"no boundary within the first {MAX_HEADER_BYTES} bytes: the body is not the multipart it says", 400)
                    return
                del self._buffer[: found + len(self._delimiter)]
                self._state = "after_delimiter"
            elif self._state == "after_delimiter":
                if not self._after_delimiter():
                    return
            elif self._state == "headers":
                # A part without headers: the blank line follows the boundary line at once.
                if self._buffer[:2] == _CRLF:
                    end, block = 2, b""
                else:
                    found = self._buffer.find(b"\r\n\r\n")
                    if found < 0:
                        if len(self._buffer) > MAX_HEADER_BYTES:
                            raise MultipartError(f"part {len(self.parts) + 1}: headers longer than {MAX_HEADER_BYTES} bytes", 400)
                        return
                    end, block = found + 4, bytes(self._buffer[:found])
                headers = _parse_headers(block, len(self.parts) + 1)
                del self._buffer[:end]
                self._open_part(headers)
                self._state = "body"
            elif self._state == "body":
                if not self._body():
                    return
            else:  # epilogue
                self._buffer.clear()
                return

    def _after_delimiter(self) -> bool:
        """After a delimiter: ``--`` closes the body, else optional padding and CRLF start a part."""
        if len(self._buffer) < 2:
            return False
        if self._buffer[:2] == b"--":
            self._buffer.clear()
            self._state = "epilogue"
            return True
        line_end = self._buffer.find(_CRLF)
        if line_end < 0:
            if len(self._buffer) > 1024:
                raise MultipartError("a boundary is followed by neither CRLF nor '--'", 400)
            return False
        if self._buffer[:line_end].strip(b" \t"):
            raise MultipartError("a boundary is followed by text other than transport padding", 400)
        del self._buffer[: line_end + 2]
        if len(self.parts) >= self.max_parts:
            raise MultipartError(f"more than {self.max_parts} parts in one request", 413)
        self._state = "headers"
        return True

    def _body(self) -> bool:
        """Write the part's content up to the next delimiter; True when the part is complete."""
        assert self._current is not None
        found = self._buffer.find(self._delimiter)
        if found < 0:
            # Everything but a possible delimiter prefix at the end is content.
            safe = len(self._buffer) - (len(self._delimiter) - 1)
            if safe > 0:
                self._write(memoryview(self._buffer)[:safe])
                del self._buffer[:safe]
            return False
        self._write(memoryview(self._buffer)[:found])
        del self._buffer[: found + len(self._delimiter)]
        self._close_part()
        self._state = "after_delimiter"
        return True

    def _open_part(self, headers: dict[str, str]) -> None:
        path = self.temp_dir / f"stow-{secrets.token_hex(8)}.part"
        handle = open(path, "xb")  # closed in _close_part or discard
        self._current = _OpenPart(headers, path, handle)

    def _write(self, data: memoryview) -> None:
        current = self._current
        assert current is not None
        with data:
            current.size += len(data)
            if current.size > self.max_part_bytes:
                raise MultipartError(f"part {len(self.parts) + 1} is over the size cap of {self.max_part_bytes} bytes per instance", 413)
            current.digest.update(data)
            current.handle.write(data)

    def _close_part(self) -> None:
        current = self._current
        assert current is not None
        current.handle.close()
        self._current = None
        self.parts.append(Part(current.headers, current.path, current.size, current.digest.hexdigest()))


def _parse_headers(block: bytes, number: int) -> dict[str, str]:
    headers: dict[str, str] = {}
    if not block:
        return headers
    try:
        text = block.decode("ascii")
    except UnicodeDecodeError:
        raise MultipartError(f"part {number}: headers are not ASCII", 400) from None
    for line in text.split("\r\n"):
        if line[:1] in (" ", "\t") and headers:  # obsolete line folding
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or name != name.strip():
            raise MultipartError(f"part {number}: malformed header line (no 'Name: value')", 400)
        headers[name.lower()] = value.strip()
    return headers


def read_chunks(reader: MultipartReader, chunks: Iterable[bytes]) -> list[Part]:
    """Feed every chunk, then finish (synchronous callers)."""
    for chunk in chunks:
        reader.feed(chunk)
    return reader.finish()


async def read_parts(reader: MultipartReader, chunks: AsyncIterator[bytes]) -> list[Part]:
    """Feed an async stream of chunks (Starlette's ``request.stream()``), then finish.

    The caller wraps it in ``with reader:`` so a dropped connection deletes the temporary files.
    """
    async for chunk in chunks:
        if chunk:
            reader.feed(chunk)
    return reader.finish()


__all__ = [
    "MAX_HEADER_BYTES",
    "MultipartError",
    "MultipartReader",
    "Part",
    "RelatedContentType",
    "parse_related_content_type",
    "read_chunks",
    "read_parts",
]
