"""The upload path's multipart reader on real multipart bodies, fed in chunks of every size."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from service.errors import BadRequestError, PayloadTooLargeError
from service.transport.multipart import MAX_FIELD_BYTES, FilePart, read_files, read_form
from tests.photos import jpeg

BOUNDARY = "----convserve-test-boundary"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"


def body(*parts: tuple[str, str | None, bytes]) -> bytes:
    """A multipart body of (field, filename or None for a plain field, bytes) parts."""
    out = b""
    for name, filename, data in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if filename is not None:
            out += b"Content-Type: image/jpeg\r\n"
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def read(data: bytes, size: int = 65536, content_type: str = CONTENT_TYPE, **limits: int) -> list[FilePart]:
    bounds = {"max_files": 8, "max_fields": 4, **limits}
    return asyncio.run(read_files(_chunks(data, size), content_type, **bounds))


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 1 << 20])
def test_files_come_back_whole_in_order_whatever_the_chunking(chunk_size: int) -> None:
    cat, cup = jpeg("chelsea"), jpeg("coffee")
    data = body(("image", "cat.jpg", cat), ("note", None, b"ignored"), ("other", "", cup))
    files = read(data, chunk_size)
    assert files == [FilePart("image", "cat.jpg", cat), FilePart("other", "", cup)]


@pytest.mark.parametrize("chunk_size", [1, 7, 1 << 20])
def test_text_fields_are_kept_only_when_asked_for(chunk_size: int) -> None:
    cat = jpeg("chelsea")
    data = body(("label", None, "chat tigré".encode()), ("image", "cat.jpg", cat), ("label", None, b"2"))
    bounds = {"max_files": 8, "max_fields": 4}
    kept = asyncio.run(read_form(_chunks(data, chunk_size), CONTENT_TYPE, keep_fields=True, **bounds))
    assert kept.files == [FilePart("image", "cat.jpg", cat)]
    assert kept.fields == {"label": ["chat tigré", "2"]}
    assert asyncio.run(read_form(_chunks(data, chunk_size), CONTENT_TYPE, **bounds)).fields == {}


@pytest.mark.parametrize(
    ("field", "message"),
    [(b"\xff\xfe", "not UTF-8"), (b"x" * (MAX_FIELD_BYTES + 1), "non-file field is over")],
)
def test_kept_text_fields_are_bounded_and_utf8(field: bytes, message: str) -> None:
    data = body(("label", None, field), ("image", "a.jpg", b"x"))
    with pytest.raises(BadRequestError, match=message):
        asyncio.run(read_form(_chunks(data, 4096), CONTENT_TYPE, max_files=8, max_fields=4, keep_fields=True))


@pytest.mark.parametrize(
    ("data", "content_type", "limits", "error", "message"),
    [
        (body(("a", "a.jpg", b"x")), "multipart/form-data", {}, BadRequestError, "no boundary"),
        (
            body(*[("f", f"{i}.jpg", b"x") for i in range(3)]),
            CONTENT_TYPE,
            {"max_files": 2},
            PayloadTooLargeError,
            "more than 2 images",
        ),
        (
            body(*[("f", None, b"x") for _ in range(3)]),
            CONTENT_TYPE,
            {"max_fields": 2},
            BadRequestError,
            "more than 2 non-file",
        ),
        (
            body(("f", None, b"x" * (MAX_FIELD_BYTES + 1))),
            CONTENT_TYPE,
            {},
            BadRequestError,
            "non-file field is over",
        ),
        (body(("f", "a.jpg", b"x")).replace(b'name="f"; ', b""), CONTENT_TYPE, {}, BadRequestError, '"name"'),
        (
            f"--{BOUNDARY}\r\nbroken header line without colon\r\n\r\n".encode(),
            CONTENT_TYPE,
            {},
            BadRequestError,
            "malformed",
        ),
    ],
    ids=["no-boundary", "too-many-files", "too-many-fields", "huge-field", "no-name", "bad-header"],
)
def test_malformed_or_oversized_forms_are_refused_with_a_reason(
    data: bytes, content_type: str, limits: dict[str, int], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        read(data, 1000, content_type, **limits)


@pytest.mark.parametrize(
    "part_head",
    [
        pytest.param(b"X-Long: " + b"a" * (4 << 20) + b"\r\n", id="one 4 MB header line"),
        pytest.param(b"a: b\r\n" * 100_000, id="100,000 header lines"),
    ],
)
def test_oversized_part_heads_are_refused_as_they_arrive(part_head: bytes) -> None:
    # python-multipart parses part heads byte by byte in Python: these limits bound that work.
    data = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="f"; filename="a.jpg"\r\n'.encode()
        + part_head
        + b"\r\n"
        + jpeg("chelsea")
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )
    started = time.process_time()
    with pytest.raises(BadRequestError, match="malformed multipart body: Maximum header"):
        read(data)
    assert time.process_time() - started < 0.5  # measured ~0.001 s; each case is ~1 s parsed whole
