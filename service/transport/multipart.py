"""multipart/form-data bodies -> the uploaded files' bytes, in memory, with parts counted as they come.

Text fields (parts without a file name) are counted and dropped, unless the caller asks for them
(`read_form(..., keep_fields=True)`, for a gallery's `label`): then each is kept as UTF-8 text, at
most `MAX_FIELD_BYTES` each and `max_fields` of them, both checked while the part arrives.

python-multipart's streaming parser is driven directly. Starlette's form parser, which this
replaces on the upload path, puts every file into a SpooledTemporaryFile behind an UploadFile (a
temporary file on disk past 1 MiB, written from a thread pool) only for the route to read it back;
here each file's bytes are joined once when its part ends. The whole body is already bounded by
`BodyLimits`, so holding it in memory costs nothing the limit did not allow.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.errors import BadRequestError, PayloadTooLargeError
from service.textsafety import printable

MAX_FIELD_BYTES = 1 << 20
"""Largest non-file field, bytes (fields are mostly ignored, but must not grow without bound)."""
MAX_PART_HEADERS = 16
"""Header lines one part may carry, a count (clients send two or three)."""
MAX_PART_HEADER_BYTES = 8192
"""Longest header line of a part, in bytes: python-multipart parses part heads byte by byte in
Python, so without these two limits a 60 MB part head would cost seconds of event-loop CPU."""


@dataclass(frozen=True)
class FilePart:
    """One file field of the form: its field name, the file name the client gave (may be empty), bytes."""

    field: str
    filename: str
    data: bytes


@dataclass(frozen=True)
class Form:
    """A multipart body as parsed: its files in order, and its text fields if they were asked for."""

    files: list[FilePart]
    fields: dict[str, list[str]]
    """Each text field's values, in order (empty unless `keep_fields`)."""


@dataclass
class _Part:
    headers: dict[bytes, bytes] = field(default_factory=dict)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    field: str = ""
    filename: str | None = None


class _Collector:
    """python-multipart callbacks: files kept, other fields counted and dropped (or kept)."""

    def __init__(self, max_files: int, max_fields: int, keep_fields: bool = False) -> None:
        self.files: list[FilePart] = []
        self.fields: dict[str, list[str]] = {}
        self._max_files, self._max_fields = max_files, max_fields
        self._keep_fields = keep_fields
        self._fields = 0
        self._part = _Part()
        self._header_name = bytearray()
        self._header_value = bytearray()

    def on_part_begin(self) -> None:
        self._part = _Part()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._part.headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._part.headers.get(b"content-disposition", b""))
        if b"name" not in options:
            raise BadRequestError(
                'malformed multipart body: a part has no Content-Disposition "name"; send '
                'Content-Disposition: form-data; name="file"; filename="cat.jpg"'
            )
        self._part.field = options[b"name"].decode("utf-8", "replace")
        if b"filename" in options:
            if len(self.files) >= self._max_files:
                raise PayloadTooLargeError(
                    f"the request carries more than {self._max_files} images (CONVSERVE_MAX_QUEUE_SIZE); "
                    "split it"
                )
            self._part.filename = options[b"filename"].decode("utf-8", "replace")
        else:
            self._fields += 1
            if self._fields > self._max_fields:
                raise BadRequestError(
                    f"malformed multipart body: more than {self._max_fields} non-file fields"
                )

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self._part
        part.size += end - start
        if part.filename is None:
            if part.size > MAX_FIELD_BYTES:
                raise BadRequestError(
                    f"malformed multipart body: a non-file field is over {MAX_FIELD_BYTES} bytes; send "
                    "images as file fields"
                )
            if not self._keep_fields:
                return  # only files are used
        part.chunks.append(data[start:end])

    def on_part_end(self) -> None:
        part = self._part
        if part.filename is not None:
            data = part.chunks[0] if len(part.chunks) == 1 else b"".join(part.chunks)
            self.files.append(FilePart(part.field, part.filename, data))
        elif self._keep_fields:
            try:
                text = b"".join(part.chunks).decode("utf-8")
            except UnicodeDecodeError:
                raise BadRequestError(
                    f"malformed multipart body: the text field {printable(part.field, 64)!r} is not UTF-8"
                ) from None
            self.fields.setdefault(part.field, []).append(text)
        self._part = _Part()


async def read_files(
    chunks: AsyncIterable[bytes], content_type: str, *, max_files: int, max_fields: int
) -> list[FilePart]:
    """Every file part of a multipart/form-data body, in order; 400 if malformed, 413 past `max_files`."""
    form = await read_form(chunks, content_type, max_files=max_files, max_fields=max_fields)
    return form.files


async def read_form(
    chunks: AsyncIterable[bytes],
    content_type: str,
    *,
    max_files: int,
    max_fields: int,
    keep_fields: bool = False,
) -> Form:
    """The file parts of a multipart/form-data body, in order, and with `keep_fields` its text fields;
    400 if malformed (a text field that is not UTF-8 too), 413 past `max_files`."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequestError(
            "malformed multipart body: the Content-Type has no boundary; let the HTTP client build the "
            "multipart body (e.g. `curl -F image=@cat.jpg`)"
        )
    collector = _Collector(max_files, max_fields, keep_fields)
    callbacks = {
        "on_part_begin": collector.on_part_begin,
        "on_header_field": collector.on_header_field,
        "on_header_value": collector.on_header_value,
        "on_header_end": collector.on_header_end,
        "on_headers_finished": collector.on_headers_finished,
        "on_part_data": collector.on_part_data,
        "on_part_end": collector.on_part_end,
    }
    try:
        parser = MultipartParser(
            boundary,
            callbacks,  # type: ignore[arg-type]
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )
        async for chunk in chunks:
            parser.write(chunk)
        parser.finalize()
    except FormParserError as exc:
        raise BadRequestError(f"malformed multipart body: {exc}") from None
    return Form(collector.files, collector.fields)
