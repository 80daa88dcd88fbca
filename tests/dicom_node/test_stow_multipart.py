"""The streaming multipart/related reader of STOW-RS: parts as the sender framed them whatever the
chunking, every truncation refused with no file left, the caps refusing early, memory bounded."""

from __future__ import annotations

import hashlib
import os
import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from urllib3 import encode_multipart_formdata

from dicom_node.dicomweb.multipart import (
    MAX_HEADER_BYTES,
    MultipartError,
    MultipartReader,
    parse_related_content_type,
    read_chunks,
)

BOUNDARY = "stow-boundary-7d3f"
MiB = 1024 * 1024


def body(contents: list[bytes], boundary: str = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    """A multipart/related body; a preamble must end with CRLF (it belongs to the first delimiter)."""
    out = [preamble]
    for number, content in enumerate(contents):
        lead = b"--" if number == 0 else b"\r\n--"
        out += [lead, boundary.encode(), b"\r\nContent-Type: application/dicom\r\n\r\n", content]
    out += [b"\r\n--", boundary.encode(), b"--\r\n", epilogue]
    return b"".join(out)


def reader(tmp_path: Path, part_cap: int = 64 * MiB, total_cap: int = 256 * MiB, max_parts: int = 100) -> MultipartReader:
    return MultipartReader(BOUNDARY, tmp_path, max_part_bytes=part_cap, max_total_bytes=total_cap, max_parts=max_parts)


def split(data: bytes, rng: random.Random, largest: int) -> Iterator[bytes]:
    at = 0
    while at < len(data):
        step = rng.randint(1, largest)
        yield data[at : at + step]
        at += step


def leftovers(tmp_path: Path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# Contents that look like the delimiter but are not: the reader must never cut a part there.
TRICKY = [
    b"DICM" + os.urandom(3000),
    b"\r\n--" + BOUNDARY[:-1].encode() + b"X\r\n--" + BOUNDARY.encode()[:5],
    b"",
    b"\r\n\r\n--\r\n" * 50,
]


@pytest.mark.parametrize("largest", [1, 7, 80, 4096])
def test_parts_come_back_exactly_whatever_the_chunking(tmp_path: Path, largest: int) -> None:
    data = body(TRICKY, preamble=b"this is a preamble\r\n", epilogue=b"an epilogue, ignored")
    with reader(tmp_path) as r:
        parts = read_chunks(r, split(data, random.Random(largest), largest))
    assert [p.path.read_bytes() for p in parts] == TRICKY
    assert [p.size for p in parts] == [len(c) for c in TRICKY]
    assert [p.sha256 for p in parts] == [hashlib.sha256(c).hexdigest() for c in TRICKY]
    assert {p.content_type for p in parts} == {"application/dicom"}
    assert all(p.path.parent == tmp_path for p in parts)


def test_a_body_framed_by_another_encoder_reads_back(tmp_path: Path) -> None:
    """An independent encoder (urllib3's multipart writer: its own random boundary and part headers)."""
    contents = [os.urandom(5000), b"second part"]
    encoded, form_type = encode_multipart_formdata([(f"p{i}", ("x.dcm", c, "application/dicom")) for i, c in enumerate(contents)])
    boundary = form_type.split("boundary=", 1)[1]
    parsed = parse_related_content_type(f'multipart/related; type="application/dicom"; boundary={boundary}')
    with MultipartReader(parsed.boundary, tmp_path, max_part_bytes=MiB, max_total_bytes=MiB) as r:
        parts = read_chunks(r, [encoded])
    assert [p.path.read_bytes() for p in parts] == contents
    assert {p.content_type for p in parts} == {"application/dicom"}


def test_transport_padding_and_a_part_without_headers(tmp_path: Path) -> None:
    data = b"--" + BOUNDARY.encode() + b"  \t\r\n\r\nno headers\r\n--" + BOUNDARY.encode() + b"--"
    with reader(tmp_path) as r:
        (part,) = read_chunks(r, [data])
    assert part.headers == {} and part.content_type == "" and part.path.read_bytes() == b"no headers"


def test_every_truncation_is_refused_and_leaves_no_file(tmp_path: Path) -> None:
    data = body([b"A" * 300, b"B" * 200])
    close_at = data.rindex(b"--" + BOUNDARY.encode() + b"--") + len(BOUNDARY) + 4
    for cut in range(0, close_at):
        r = reader(tmp_path)
        r.feed(data[:cut])
        with pytest.raises(MultipartError) as caught:
            r.finish()
        assert caught.value.status == 400, cut
        assert "truncated" in caught.value.reason or "no part" in caught.value.reason
        assert leftovers(tmp_path) == [], cut
    with reader(tmp_path) as r:
        assert len(read_chunks(r, [data[:close_at]])) == 2


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"\x00\x01 not a multipart body at all" * 1000, "no boundary"),
        (b"--" + BOUNDARY.encode() + b"\r\nContent-Type application/dicom\r\n\r\nx", "malformed header"),
        (b"--" + BOUNDARY.encode() + b"\r\nX: " + b"y" * MAX_HEADER_BYTES + b"\r\n", "headers longer"),
        (b"--" + BOUNDARY.encode() + b"garbage\r\n\r\n", "other than transport padding"),
    ],
)
def test_malformed_bodies_are_400_with_the_reason(tmp_path: Path, data: bytes, words: str) -> None:
    with pytest.raises(MultipartError) as caught, reader(tmp_path) as r:
        read_chunks(r, [data, body([b"later part"])])
    assert caught.value.status == 400 and words in caught.value.reason
    assert leftovers(tmp_path) == []


def endless_part(chunk: int = MiB) -> Iterator[bytes]:
    """A 2 GB study as a sender would stream it, generated on the fly (never on disk, never whole)."""
    yield b"--" + BOUNDARY.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n"
    block = os.urandom(chunk)
    for _ in range(2 * 1024**3 // chunk):
        yield block


def test_a_2gb_part_stops_at_the_instance_cap_with_bounded_memory(tmp_path: Path) -> None:
    fed = 0
    tracemalloc.start()
    try:
        with pytest.raises(MultipartError) as caught, reader(tmp_path, part_cap=16 * MiB, total_cap=4 * 1024**3) as r:
            for chunk in endless_part():
                fed += len(chunk)
                r.feed(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert caught.value.status == 413 and "per instance" in caught.value.reason
    assert fed <= 16 * MiB + 2 * MiB  # refused at the cap, not at the end of the stream
    assert peak < 4 * MiB  # a chunk, the delimiter tail, the hash: never the part
    assert leftovers(tmp_path) == []


def test_the_request_cap_stops_many_parts_early(tmp_path: Path) -> None:
    one = body([b"x" * 100_000])
    with pytest.raises(MultipartError) as caught, reader(tmp_path, total_cap=MiB) as r:
        for _ in range(10_000):
            r.feed(one[:-4])  # parts keep coming; the close delimiter never does
    assert caught.value.status == 413 and "request body" in caught.value.reason
    assert r.total_bytes <= MiB + len(one)
    assert leftovers(tmp_path) == []


def test_too_many_parts(tmp_path: Path) -> None:
    with pytest.raises(MultipartError) as caught, reader(tmp_path, max_parts=3) as r:
        read_chunks(r, [body([b"a"] * 4)])
    assert caught.value.status == 413 and "more than 3 parts" in caught.value.reason
    assert leftovers(tmp_path) == []


def test_an_error_of_the_caller_deletes_the_finished_parts_too(tmp_path: Path) -> None:
    data = body([b"one", b"two"])
    with pytest.raises(ConnectionResetError), reader(tmp_path) as r:
        r.feed(data[:-27])  # inside the second part
        assert len(r.parts) == 1 and len(leftovers(tmp_path)) == 2
        raise ConnectionResetError("client went away")
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("value", "status"),
    [
        (None, 415),
        ("application/dicom", 415),
        ("application/json", 415),
        ("multipart/mixed; boundary=x", 415),
        ('multipart/related; type="application/dicom"', 400),
        ('multipart/related; type="application/dicom"; boundary="' + "x" * 71 + '"', 400),
    ],
)
def test_content_types_that_are_refused(value: str | None, status: int) -> None:
    with pytest.raises(MultipartError) as caught:
        parse_related_content_type(value)
    assert caught.value.status == status


def test_content_type_parameters() -> None:
    parsed = parse_related_content_type('Multipart/Related; type="Application/DICOM"; boundary="a b:c"; transfer-syntax=1.2.840.10008.1.2.1')
    assert (parsed.boundary, parsed.type, parsed.transfer_syntax) == ("a b:c", "application/dicom", "1.2.840.10008.1.2.1")
    assert parse_related_content_type("multipart/related; boundary=abc").type == ""
