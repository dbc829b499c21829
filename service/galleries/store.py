"""One model's gallery on disk: example images, their labels, and their embeddings per model version.

Layout of `<root>/<model>/`:

    lock              an empty file; writers hold `fcntl.flock` on it
    embedder.lock     an empty file; the one process embedding entries for a version holds it
    journal           the append-only journal: every change ever made, as checksummed records
    images/<sha256>   each example image, content-addressed (the sha256 of its bytes)

Why a journal rather than rewriting a manifest per change: a gallery of 10^5 entries holds ~500 MB of
embeddings (1280 float32 per entry and version), far too much to rewrite on every add. Each change (add,
remove, embed for a version, drop a version) is one record, appended and fsynced before the call
returns; its checksum makes it all or nothing. Opening the store replays the journal; a record cut short
by a crash (or failing its checksum) ends the replay, and the next writer truncates it away, so a crash
keeps every change that returned, and the one under way only if its whole record was written. When
removals have made the journal more than twice the live content, a writer compacts it: it writes the
live state as a new journal and renames it over the old one (file fsynced, then the directory), so a
crash during compaction keeps the old journal.

Images are written (temporary file, fsync, rename, directory fsync) before the record that names
them, so a committed entry always has its image; an image whose entry is removed is deleted after
the removal is committed, and files left by a crash between the two are deleted at open.

Several processes (uvicorn workers, replicas on a shared volume whose filesystem honours `flock`: a
local disk; on NFS, Linux turns `flock` into NFS byte-range locks) may use one directory: writers take
the lock, catch up with the journal, check the bounds, then append, so no add is lost and no bound is
overshot. Readers take no lock: before each read they `os.stat` the journal and apply only the records
appended since (or reload if a compaction replaced the file); a record still being written is not yet
complete, so it is left for the next read.

Versions never mix: embeddings are held per model version, and a query for version V sees only V's
rows (`matrix`). Entries without a V embedding are pending; `missing(V)` hands out their images to be
embedded and `set_embeddings` stores the result. Embeddings are float32 on disk and in memory: 4 * D
bytes per entry and version (5 KiB for D=1280). Measured with D=1280, a store holds ~6.5 KB per entry
(rows, spare rows, ids, labels), and opening replays the journal at ~100 MB/s (5 s for 10^5 entries,
peaking at twice the rows' size while the matrix grows). float16 would halve the rows but not the
search cost (see `search.py`).

Bounds (`max_entries`, `max_bytes`: image bytes plus embedding bytes of every version held) are
checked under the lock before anything is written; the journal itself stays below about twice the
live content, by compaction.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import struct
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, overload

import numpy as np

from service.errors import InsufficientStorageError, InvalidInputError, PayloadTooLargeError
from service.galleries.search import GalleryMatrix, normalize_rows

MAX_LABEL_CHARS = 128
JOURNAL_NAME = "journal"
LOCK_NAME = "lock"
EMBEDDER_LOCK_NAME = "embedder.lock"
IMAGES_DIR = "images"
_TEMP_PREFIX = ".tmp-"

_MAGIC = b"GJR1"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, payload bytes, crc32 of the payload
_JSON_HEAD = struct.Struct("<I")  # bytes of the JSON part of a payload; float32 rows follow
_ROW_DTYPE = np.dtype("<f4")
_ID_PATTERN = re.compile(r"[0-9a-f]{16}")
# Compaction writes entries and rows in records of this many entries, to bound a record's size.
_COMPACT_CHUNK = 4096
# Estimated journal bytes of one entry's add record without embeddings (JSON fields).
_ENTRY_RECORD_BYTES = 160
# A journal below this size is never compacted: rewriting it would save little.
_COMPACT_MIN_BYTES = 1024 * 1024


class GalleryLabelError(InvalidInputError, ValueError):
    """A label the gallery does not accept (empty, too long, control characters)."""


class GalleryRequestTooLargeError(PayloadTooLargeError):
    """One add or embed holds more entries or bytes than a whole gallery may: it can never fit."""


class GalleryFullError(InsufficientStorageError):
    """The gallery has no room for this add or embed: it would exceed max_entries or max_bytes."""


class GalleryCorruptError(RuntimeError):
    """The gallery directory holds something this code did not write; the message says what."""


@dataclass(frozen=True, slots=True)
class GalleryEntry:
    """One example: an image under a label."""

    id: str
    label: str
    digest: str
    """sha256 of the image bytes, hex; the image's file name under `images/`."""
    size: int
    """Image bytes."""
    added_at: float
    """Seconds since the epoch."""


@dataclass(frozen=True)
class GalleryStats:
    """What a gallery holds and what it may hold."""

    entries: int
    labels: int
    image_bytes: int
    embedding_bytes: int
    journal_bytes: int
    rows_per_version: dict[int, int]
    max_entries: int
    max_bytes: int

    @property
    def bytes(self) -> int:
        """What counts against max_bytes: images plus embeddings of every version held."""
        return self.image_bytes + self.embedding_bytes


def check_label(label: object) -> str:
    """`label` if the gallery accepts it: 1 to 128 printable characters, no surrounding whitespace, no `/`."""
    if not isinstance(label, str):
        raise GalleryLabelError(f"a label must be text, got {type(label).__name__}")
    if not 1 <= len(label) <= MAX_LABEL_CHARS:
        raise GalleryLabelError(f"a label must have 1 to {MAX_LABEL_CHARS} characters, got {len(label)}")
    if not label.isprintable():
        raise GalleryLabelError(
            "a label may hold printable characters only (no control or format characters)"
        )
    if label != label.strip():
        raise GalleryLabelError("a label may not start or end with whitespace")
    if "/" in label:
        # A label is one path segment of the API (`DELETE /v1/models/{model}/gallery/{label}`).
        raise GalleryLabelError("a label may not contain `/`; use another separator, e.g. `dog:husky`")
    return label


class _Prefix(Sequence[str]):
    """The first `length` items of a list that is only ever appended to: a view that stays valid,
    and costs nothing to make, while the list grows."""

    def __init__(self, items: list[str], length: int) -> None:
        self._items = items
        self._length = length

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return self._items[: self._length][index]
        if not -self._length <= index < self._length:
            raise IndexError(f"row {index} of {self._length}")
        return self._items[index % self._length]


class _VersionRows:
    """One version's embedding rows, with each row's entry id and label. Rows are only appended
    (a removal builds new arrays and lists), so a `GalleryMatrix` handed out is a view of the first
    rows that keeps its values while the gallery changes, and costs O(1) to make."""

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.buffer = np.empty((0, dim), dtype=np.float32)
        self.ids: list[str] = []
        self.labels: list[str] = []
        self.row_of: dict[str, int] = {}

    @property
    def count(self) -> int:
        return len(self.ids)

    def append(self, ids: Sequence[str], labels: Sequence[str], rows: np.ndarray) -> None:
        needed = self.count + len(ids)
        if needed > self.buffer.shape[0]:
            # Grow by a quarter: amortized copying stays linear while spare rows stay few (at 10^5
            # entries of D=1280, doubling could hold 500 MB of unused rows).
            grown = np.empty((max(needed, self.buffer.shape[0] * 5 // 4, 256), self.dim), dtype=np.float32)
            grown[: self.count] = self.buffer[: self.count]
            self.buffer = grown
        self.buffer[self.count : needed] = rows
        for entry_id, label in zip(ids, labels, strict=True):
            self.row_of[entry_id] = len(self.ids)
            self.ids.append(entry_id)
            self.labels.append(label)

    def remove(self, ids: set[str]) -> None:
        if not any(entry_id in self.row_of for entry_id in ids):
            return
        keep = [row for row, entry_id in enumerate(self.ids) if entry_id not in ids]
        self.buffer = self.buffer[keep]
        self.ids = [self.ids[row] for row in keep]
        self.labels = [self.labels[row] for row in keep]
        self.row_of = {entry_id: row for row, entry_id in enumerate(self.ids)}

    def snapshot(self, version: int, pending: int) -> GalleryMatrix:
        vectors = self.buffer[: self.count]
        vectors.flags.writeable = False
        return GalleryMatrix(
            version, _Prefix(self.ids, self.count), _Prefix(self.labels, self.count), vectors, pending
        )


class _State:
    """The gallery as replayed from the journal up to `offset`."""

    def __init__(self) -> None:
        self.entries: dict[str, GalleryEntry] = {}
        self.label_counts: dict[str, int] = {}
        self.digest_refs: dict[str, int] = {}
        self.digest_sizes: dict[str, int] = {}
        self.image_bytes = 0
        self.versions: dict[int, _VersionRows] = {}
        self.offset = 0

    @property
    def embedding_bytes(self) -> int:
        return sum(rows.count * rows.dim * _ROW_DTYPE.itemsize for rows in self.versions.values())

    def apply(self, header: dict[str, Any], rows: np.ndarray | None) -> None:
        op = header.get("op")
        if op == "add":
            self._add([_entry(fields) for fields in header["entries"]])
            if header.get("version") is not None and rows is not None:
                self._embed(int(header["version"]), [e["id"] for e in header["entries"]], rows)
        elif op == "remove":
            self._remove(set(header["ids"]))
        elif op == "embed":
            if rows is not None:
                self._embed(int(header["version"]), header["ids"], rows)
        elif op == "drop":
            self.versions.pop(int(header["version"]), None)
        else:
            raise GalleryCorruptError(
                f"the journal holds a record this code does not know (op={op!r}); was it written by a newer "
                "convserve? Serve the gallery with that version, or move the gallery directory away"
            )

    def _add(self, entries: list[GalleryEntry]) -> None:
        for entry in entries:
            self.entries[entry.id] = entry
            self.label_counts[entry.label] = self.label_counts.get(entry.label, 0) + 1
            self.digest_refs[entry.digest] = self.digest_refs.get(entry.digest, 0) + 1
            if entry.digest not in self.digest_sizes:
                self.image_bytes += entry.size
            self.digest_sizes[entry.digest] = entry.size

    def _remove(self, ids: set[str]) -> None:
        for entry_id in ids:
            entry = self.entries.pop(entry_id, None)
            if entry is None:
                continue
            self.label_counts[entry.label] -= 1
            if not self.label_counts[entry.label]:
                del self.label_counts[entry.label]
            self.digest_refs[entry.digest] -= 1
            if not self.digest_refs[entry.digest]:
                self.image_bytes -= self.digest_sizes.pop(entry.digest)
                del self.digest_refs[entry.digest]
        for rows in self.versions.values():
            rows.remove(ids)

    def _embed(self, version: int, ids: Sequence[str], matrix: np.ndarray) -> None:
        rows = self.versions.setdefault(version, _VersionRows(matrix.shape[1]))
        # Writers store only live, not yet embedded ids; the filter keeps replay exact regardless.
        fresh = [
            i for i, entry_id in enumerate(ids) if entry_id in self.entries and entry_id not in rows.row_of
        ]
        if fresh:
            fresh_ids = [ids[i] for i in fresh]
            rows.append(fresh_ids, [self.entries[entry_id].label for entry_id in fresh_ids], matrix[fresh])


def _entry(fields: dict[str, Any]) -> GalleryEntry:
    # One label string per label, not per entry: at 10^5 entries that is megabytes.
    return GalleryEntry(**{**fields, "label": sys.intern(fields["label"])})


def _encode_record(header: dict[str, Any], rows: np.ndarray | None = None) -> bytes:
    head = json.dumps(header, separators=(",", ":")).encode()
    body = b"" if rows is None else np.ascontiguousarray(rows, dtype=_ROW_DTYPE).tobytes()
    payload = _JSON_HEAD.pack(len(head)) + head + body
    return _RECORD_HEAD.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _read_record(journal: BinaryIO, position: int, size: int) -> tuple[bytes, int] | None:
    """The payload of the record at `position` and where the next begins; None when the record is
    incomplete or damaged (a crash mid-append, or an append still in progress in another process)."""
    if position + _RECORD_HEAD.size > size:
        return None
    journal.seek(position)
    magic, length, checksum = _RECORD_HEAD.unpack(journal.read(_RECORD_HEAD.size))
    end = position + _RECORD_HEAD.size + length
    if magic != _MAGIC or end > size:
        return None
    payload = journal.read(length)
    if len(payload) != length or zlib.crc32(payload) != checksum:
        return None
    return payload, end


def _decode_payload(payload: bytes) -> tuple[dict[str, Any], np.ndarray | None]:
    try:
        (head_length,) = _JSON_HEAD.unpack_from(payload)
        header = json.loads(payload[_JSON_HEAD.size : _JSON_HEAD.size + head_length])
        body = memoryview(payload)[_JSON_HEAD.size + head_length :]
        rows = np.frombuffer(body, dtype=_ROW_DTYPE).reshape(-1, int(header["dim"])) if body else None
    except (struct.error, ValueError, KeyError, TypeError) as error:
        # The checksum matched, so this is no torn write: something else wrote the journal.
        raise GalleryCorruptError(
            f"a journal record with a valid checksum cannot be read: {error}"
        ) from error
    if not isinstance(header, dict):
        raise GalleryCorruptError("a journal record with a valid checksum holds no JSON object")
    return header, rows


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    """`data` at `path`, complete or absent: a temporary file, fsynced, renamed into place."""
    temporary = path.with_name(f"{_TEMP_PREFIX}{secrets.token_hex(8)}")
    with open(temporary, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


class GalleryStore:
    """The gallery of one model, durable and bounded (see the module docstring).

    Thread-safe, and safe to use from several processes on one directory. Blocking (file I/O and
    fsync): call it off the event loop.
    """

    def __init__(self, root: Path, model: str, *, max_entries: int, max_bytes: int) -> None:
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"max_entries and max_bytes must be positive, got {max_entries}, {max_bytes}")
        self.model = model
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.directory = Path(root) / model
        self._journal_path = self.directory / JOURNAL_NAME
        self._images = self.directory / IMAGES_DIR
        self._images.mkdir(parents=True, exist_ok=True)
        # `flock` excludes other open files, not other threads using this one: `_write_lock` orders this
        # process's writers, `_state_lock` guards the in-memory state for readers and writers alike.
        self._write_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._lock_fd = os.open(self.directory / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        self._reader: BinaryIO | None = None
        self._inode = -1
        self._journal_bytes = 0
        self._state = _State()
        try:
            with self._writing():
                self._clean_orphans()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with self._state_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self._lock_fd >= 0:
                os.close(self._lock_fd)
                self._lock_fd = -1

    def __enter__(self) -> GalleryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # Reading: catch up with the journal, then answer from memory.

    def labels(self) -> dict[str, int]:
        """Every label with its number of entries, by label."""
        with self._reading() as state:
            return dict(sorted(state.label_counts.items()))

    def entries(self, label: str | None = None) -> list[GalleryEntry]:
        """The entries (of one label, if given) in the order they were added."""
        with self._reading() as state:
            return [e for e in state.entries.values() if label is None or e.label == label]

    def matrix(self, version: int) -> GalleryMatrix:
        """The embeddings of `version` to search: only rows computed by that version, never another's."""
        with self._reading() as state:
            rows = state.versions.get(version)
            if rows is None:
                return GalleryMatrix(version, (), (), np.empty((0, 0), np.float32), len(state.entries))
            return rows.snapshot(version, pending=len(state.entries) - rows.count)

    def missing(self, version: int, limit: int) -> list[tuple[str, bytes]]:
        """Up to `limit` entries with no embedding for `version` yet, oldest first, with their images."""
        with self._reading() as state:
            done = state.versions[version].row_of if version in state.versions else {}
            wanted = [(e.id, e.digest) for e in state.entries.values() if e.id not in done][:limit]
        found = []
        for entry_id, digest in wanted:
            try:
                found.append((entry_id, (self._images / digest).read_bytes()))
            except FileNotFoundError:
                continue  # removed by another process since: nothing to embed
        return found

    def stats(self) -> GalleryStats:
        with self._reading() as state:
            return GalleryStats(
                entries=len(state.entries),
                labels=len(state.label_counts),
                image_bytes=state.image_bytes,
                embedding_bytes=state.embedding_bytes,
                journal_bytes=self._journal_bytes,
                rows_per_version={v: rows.count for v, rows in sorted(state.versions.items())},
                max_entries=self.max_entries,
                max_bytes=self.max_bytes,
            )

    @contextmanager
    def embedding_claim(self) -> Iterator[bool]:
        """Whether this caller is the one that may embed pending entries now (never waits).

        `set_embeddings` keeps a row computed twice only once, but computing it twice costs the model
        time: the claim (`flock` on `embedder.lock`, held for the block) lets one process at a time,
        of all the workers and replicas sharing the directory, read `missing` and store the result.
        """
        self._check_open()
        fd = os.open(self.directory / EMBEDDER_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True  # closing the descriptor releases the lock
        finally:
            os.close(fd)

    # Writing: under the lock, caught up, bounds checked, then one record appended.

    def add(
        self,
        label: str,
        images: Sequence[bytes],
        embeddings: np.ndarray | None = None,
        version: int | None = None,
    ) -> list[str]:
        """Add one entry per image under `label`; all or nothing. Returns the new ids, in image order.

        With `embeddings` ([len(images), D], computed by model `version`), the entries are searchable
        for that version at once; otherwise they are pending for every version (see `missing`).
        """
        check_label(label)
        if not images or not all(isinstance(image, bytes) and image for image in images):
            raise ValueError("expected a non-empty list of non-empty image byte strings")
        rows = self._check_rows(embeddings, version, len(images))
        digests = [hashlib.sha256(image).hexdigest() for image in images]
        with self._writing() as state:
            new_blobs = {d: len(image) for d, image in zip(digests, images, strict=True)}
            new_blobs = {d: size for d, size in new_blobs.items() if d not in state.digest_sizes}
            added_bytes = sum(new_blobs.values()) + (0 if rows is None else rows.nbytes)
            self._check_dim(state, version, rows)
            self._check_bounds(state, len(images), added_bytes, "this add")
            for digest, image in zip(digests, images, strict=True):
                if digest in new_blobs:
                    self._store_image(digest, image)
            if new_blobs:
                _fsync_dir(self._images)  # the images' names are durable before the record naming them
            ids = self._new_ids(state, len(images))
            now = time.time()
            fields = [
                {"id": i, "label": label, "digest": d, "size": len(image), "added_at": now}
                for i, d, image in zip(ids, digests, images, strict=True)
            ]
            dim = None if rows is None else rows.shape[1]
            self._append({"op": "add", "entries": fields, "version": version, "dim": dim}, rows)
        return ids

    def set_embeddings(self, version: int, ids: Sequence[str], embeddings: np.ndarray) -> int:
        """Store `version`'s embeddings of entries `ids` ([len(ids), D]); returns how many were stored.

        Ids removed meanwhile, or already embedded for `version`, are skipped.
        """
        rows = self._check_rows(embeddings, version, len(ids))
        assert rows is not None
        with self._writing() as state:
            done = state.versions[version].row_of if version in state.versions else {}
            keep = [i for i, entry_id in enumerate(ids) if entry_id in state.entries and entry_id not in done]
            if not keep:
                return 0
            rows = rows[keep]
            self._check_dim(state, version, rows)
            self._check_bounds(state, 0, rows.nbytes, f"the embeddings of version {version}")
            header = {"op": "embed", "version": version, "dim": rows.shape[1], "ids": [ids[i] for i in keep]}
            self._append(header, rows)
        return len(keep)

    def remove_label(self, label: str) -> int:
        """Remove every entry of `label`; returns how many there were."""
        check_label(label)
        with self._writing() as state:
            ids = [e.id for e in state.entries.values() if e.label == label]
            self._remove(state, ids)
        return len(ids)

    def remove_id(self, entry_id: str) -> bool:
        """Remove one entry; False when there is none with this id."""
        if not isinstance(entry_id, str) or not _ID_PATTERN.fullmatch(entry_id):
            return False
        with self._writing() as state:
            if entry_id not in state.entries:
                return False
            self._remove(state, [entry_id])
        return True

    def drop_version(self, version: int) -> bool:
        """Forget `version`'s embeddings (once no served version needs them); False if there were none."""
        with self._writing() as state:
            if version not in state.versions:
                return False
            self._append({"op": "drop", "version": version})
            self._compact_if_worth_it(state)
        return True

    # The journal.

    @contextmanager
    def _reading(self) -> Iterator[_State]:
        with self._state_lock:
            self._check_open()
            if not self._refresh(repair=False):
                self._repair_if_idle()
            yield self._state

    @contextmanager
    def _writing(self) -> Iterator[_State]:
        with self._write_lock:
            self._check_open()
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                with self._state_lock:
                    self._refresh(repair=True)
                yield self._state
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _check_open(self) -> None:
        if self._lock_fd < 0:
            raise RuntimeError(f"the gallery of {self.model!r} is closed")

    def _repair_if_idle(self) -> None:
        """A reader met an incomplete record: cut it off now if no writer, in this process or another,
        is appending (then it is a crash's leftover), rather than re-read it on every query until the
        next write. Never waits: the record may be an append in progress."""
        if not self._write_lock.acquire(blocking=False):
            return
        try:
            try:
                fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            try:
                self._refresh(repair=True)
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._write_lock.release()

    def _refresh(self, *, repair: bool) -> bool:
        """Apply the records appended since the last call (all of them after a compaction); whether
        the journal ended with a complete record.

        With `repair` (only under the lock, where no append is in progress) an incomplete record at
        the end is a crash's leftover, and is cut off so that the next record follows a good one.
        """
        if repair and not self._journal_path.exists():
            with open(self._journal_path, "ab") as journal:
                os.fsync(journal.fileno())
            _fsync_dir(self.directory)
        status = os.stat(self._journal_path)
        if self._reader is None or status.st_ino != self._inode or status.st_size < self._state.offset:
            if self._reader is not None:
                self._reader.close()
            self._reader = open(self._journal_path, "rb")  # noqa: SIM115 (kept open between calls)
            self._inode = os.fstat(self._reader.fileno()).st_ino
            self._state = _State()
        size = os.fstat(self._reader.fileno()).st_size
        while (record := _read_record(self._reader, self._state.offset, size)) is not None:
            payload, end = record
            self._state.apply(*_decode_payload(payload))
            self._state.offset = end
        if repair and self._state.offset < size:
            os.truncate(self._journal_path, self._state.offset)
            with open(self._journal_path, "rb+") as journal:
                os.fsync(journal.fileno())
            size = self._state.offset
        self._journal_bytes = size
        return self._state.offset == size

    def _append(self, header: dict[str, Any], rows: np.ndarray | None = None) -> None:
        record = _encode_record(header, rows)
        fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND)
        try:
            view = memoryview(record)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        # The record reaches memory the way every other process's records do: by reading the journal.
        with self._state_lock:
            self._refresh(repair=False)

    def _remove(self, state: _State, ids: list[str]) -> None:
        if not ids:
            return
        digests = {state.entries[entry_id].digest for entry_id in ids}
        self._append({"op": "remove", "ids": ids})
        for digest in digests - state.digest_refs.keys():
            (self._images / digest).unlink(missing_ok=True)
        self._compact_if_worth_it(state)

    def _compact_if_worth_it(self, state: _State) -> None:
        live = state.embedding_bytes + len(state.entries) * _ENTRY_RECORD_BYTES
        if self._journal_bytes > max(2 * live, _COMPACT_MIN_BYTES):
            self._compact(state)

    def _compact(self, state: _State) -> None:
        """Rewrite the journal as the live state only; under the lock, atomic by rename."""
        temporary = self.directory / f"{_TEMP_PREFIX}{JOURNAL_NAME}"
        entries = list(state.entries.values())
        with open(temporary, "wb") as journal:
            for start in range(0, len(entries), _COMPACT_CHUNK):
                chunk = [asdict(entry) for entry in entries[start : start + _COMPACT_CHUNK]]
                journal.write(_encode_record({"op": "add", "entries": chunk, "version": None, "dim": None}))
            for version, rows in state.versions.items():
                for start in range(0, rows.count, _COMPACT_CHUNK):
                    ids = rows.ids[start : start + _COMPACT_CHUNK]
                    header = {"op": "embed", "version": version, "dim": rows.dim, "ids": ids}
                    journal.write(_encode_record(header, rows.buffer[start : start + len(ids)]))
            journal.flush()
            os.fsync(journal.fileno())
        os.replace(temporary, self._journal_path)
        _fsync_dir(self.directory)
        with self._state_lock:
            self._refresh(repair=False)

    def _clean_orphans(self) -> None:
        """Delete what a crash left behind: temporary files, and images no entry refers to."""
        for leftover in self.directory.glob(f"{_TEMP_PREFIX}*"):
            leftover.unlink(missing_ok=True)
        for image in self._images.iterdir():
            if image.name.startswith(_TEMP_PREFIX) or image.name not in self._state.digest_refs:
                image.unlink(missing_ok=True)

    # Checks and helpers of the writers.

    @staticmethod
    def _check_rows(embeddings: np.ndarray | None, version: int | None, count: int) -> np.ndarray | None:
        if embeddings is None:
            if version is not None:
                raise ValueError("a version was given without embeddings; pass both or neither")
            return None
        if not isinstance(version, int) or version < 1:
            raise ValueError(f"embeddings need the model version that computed them (>= 1), got {version!r}")
        rows = normalize_rows(embeddings)
        if rows.shape[0] != count:
            raise ValueError(f"expected {count} embedding rows (one per image or id), got {rows.shape[0]}")
        return rows

    @staticmethod
    def _check_dim(state: _State, version: int | None, rows: np.ndarray | None) -> None:
        held = state.versions.get(version) if version is not None else None
        if held is not None and rows is not None and held.dim != rows.shape[1]:
            raise ValueError(
                f"version {version} embeddings have {held.dim} dimensions in this gallery, "
                f"got {rows.shape[1]}"
            )

    def _check_bounds(self, state: _State, entries: int, added_bytes: int, what: str) -> None:
        if entries > self.max_entries or added_bytes > self.max_bytes:
            raise GalleryRequestTooLargeError(
                f"{what} holds {entries} entries and {added_bytes} bytes, more than a whole gallery may "
                f"hold ({self.max_entries} entries, {self.max_bytes} bytes); send fewer or smaller images"
            )
        total_entries = len(state.entries) + entries
        total_bytes = state.image_bytes + state.embedding_bytes + added_bytes
        if total_entries > self.max_entries:
            raise GalleryFullError(
                f"the gallery of {self.model!r} holds {len(state.entries)} of at most {self.max_entries} "
                f"entries, no room for {entries} more; remove entries or raise the entry limit"
            )
        if total_bytes > self.max_bytes:
            raise GalleryFullError(
                f"the gallery of {self.model!r} would hold {total_bytes} bytes (images and embeddings), over "
                f"its limit of {self.max_bytes}; remove entries, drop an unused version's embeddings, or "
                "raise the byte limit"
            )

    def _store_image(self, digest: str, image: bytes) -> None:
        path = self._images / digest
        if path.is_file() and path.stat().st_size == len(image):
            return  # written by an add that crashed before its record; the same bytes by construction
        _write_file(path, image)

    @staticmethod
    def _new_ids(state: _State, count: int) -> list[str]:
        ids: list[str] = []
        while len(ids) < count:
            candidate = secrets.token_hex(8)
            if candidate not in state.entries and candidate not in ids:
                ids.append(candidate)
        return ids
