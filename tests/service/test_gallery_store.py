"""The gallery store on real files: round trips, bounds, versions, torn journals, killed or racing writers."""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from service.galleries.store import (
    IMAGES_DIR,
    JOURNAL_NAME,
    LOCK_NAME,
    GalleryCorruptError,
    GalleryFullError,
    GalleryLabelError,
    GalleryRequestTooLargeError,
    GalleryStore,
    _encode_record,
)
from tests.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
DIM = 16
ROW_BYTES = DIM * 4


def open_store(root: Path, max_entries: int = 1000, max_bytes: int = 10**7) -> GalleryStore:
    return GalleryStore(root, MODEL, max_entries=max_entries, max_bytes=max_bytes)


def vectors(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, DIM)).astype(np.float32)


def images(*names: str) -> list[bytes]:
    return [f"image bytes of {name}".encode() for name in names]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def check_consistent(store: GalleryStore, version: int) -> None:
    """Every entry has its image (the right bytes) and one row of `version`; nothing else is on disk."""
    entries = store.entries()
    image_dir = store.directory / IMAGES_DIR
    for entry in entries:
        assert hashlib.sha256((image_dir / entry.digest).read_bytes()).hexdigest() == entry.digest
    assert {p.name for p in image_dir.iterdir()} == {e.digest for e in entries}
    matrix = store.matrix(version)
    assert sorted(matrix.ids) == sorted(e.id for e in entries)
    assert matrix.pending == 0


def test_add_list_and_remove_round_trip(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        cats = store.add("cat", images("c1", "c2", "c3"))
        dogs = store.add("dog", images("d1"))
        assert store.labels() == {"cat": 3, "dog": 1}
        assert [e.id for e in store.entries("cat")] == cats
        assert len(set(cats + dogs)) == 4

        assert store.remove_id(cats[1]) is True
        assert store.remove_id(cats[1]) is False
        assert store.remove_id("../../etc/passwd") is False
        assert store.labels() == {"cat": 2, "dog": 1}

        assert store.remove_label("cat") == 2
        assert store.remove_label("cat") == 0
        assert store.labels() == {"dog": 1}
        assert [e.id for e in store.entries()] == dogs
        assert [p.name for p in (store.directory / IMAGES_DIR).iterdir()] == [store.entries()[0].digest]


def test_one_image_under_two_labels_is_stored_once_and_kept_until_its_last_entry_goes(tmp_path: Path) -> None:
    (same,) = images("shared")
    with open_store(tmp_path) as store:
        (as_cat,) = store.add("cat", [same])
        store.add("animal", [same])
        image = store.directory / IMAGES_DIR / hashlib.sha256(same).hexdigest()
        assert store.stats().image_bytes == len(same)

        store.remove_id(as_cat)
        assert image.read_bytes() == same

        store.remove_label("animal")
        assert not image.exists()
        assert store.stats().image_bytes == 0


def test_reopening_keeps_entries_labels_and_embeddings(tmp_path: Path) -> None:
    rows = vectors(3)
    with open_store(tmp_path) as store:
        ids = store.add("cat", images("a", "b"), rows[:2], version=1)
        ids += store.add("dog", images("c"), rows[2:], version=1)
        store.remove_id(ids[0])
        before = (store.entries(), store.labels(), store.matrix(1))

    with open_store(tmp_path) as reopened:
        after = (reopened.entries(), reopened.labels(), reopened.matrix(1))

    assert after[:2] == before[:2]
    assert tuple(after[2].ids) == tuple(before[2].ids) == (ids[1], ids[2])
    np.testing.assert_array_equal(after[2].vectors, before[2].vectors)
    norms = np.linalg.norm(after[2].vectors, axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)  # normalized on insert


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("", "1 to 128 characters, got 0"),
        ("x" * 129, "1 to 128 characters, got 129"),
        ("new\nline", "printable characters only"),
        ("bidi\u202eoverride", "printable characters only"),
        (" padded", "start or end with whitespace"),
        (42, "must be text, got int"),
    ],
)
def test_labels_outside_the_rules_are_refused_with_the_rule(
    tmp_path: Path, label: object, message: str
) -> None:
    with open_store(tmp_path) as store:
        with pytest.raises(GalleryLabelError, match=message) as refused:
            store.add(label, images("a"))  # type: ignore[arg-type]
        assert isinstance(refused.value, ValueError)
        assert refused.value.status_code == 422
        assert store.labels() == {}


def test_adding_past_max_entries_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    with open_store(tmp_path, max_entries=3) as store:
        store.add("cat", images("a", "b"), vectors(2), version=1)
        on_disk = files_under(store.directory)

        with pytest.raises(
            GalleryFullError, match="holds 2 of at most 3 entries, no room for 2 more"
        ) as full:
            store.add("dog", images("c", "d"), vectors(2, seed=1), version=1)

        assert full.value.status_code == 507
        assert files_under(store.directory) == on_disk
        assert store.add("dog", images("c")) != []  # one more still fits
        assert store.stats().entries == 3


def test_adding_past_max_bytes_is_refused_and_writes_nothing(tmp_path: Path) -> None:
    big = [b"x" * 600, b"y" * 600]
    with open_store(tmp_path, max_bytes=1000 + ROW_BYTES) as store:
        store.add("cat", big[:1], vectors(1), version=1)
        on_disk = files_under(store.directory)

        with pytest.raises(GalleryFullError, match="over its limit of 1064; remove entries"):
            store.add("dog", big[1:], vectors(1), version=1)

        assert files_under(store.directory) == on_disk
        assert store.stats().bytes == 600 + ROW_BYTES


def test_one_add_larger_than_a_whole_gallery_is_refused_as_too_large(tmp_path: Path) -> None:
    with open_store(tmp_path, max_entries=2, max_bytes=100) as store:
        with pytest.raises(
            GalleryRequestTooLargeError, match="more than a whole gallery may hold"
        ) as refused:
            store.add("cat", images("a", "b", "c"))
        assert refused.value.status_code == 413
        with pytest.raises(GalleryRequestTooLargeError, match="101 bytes"):
            store.add("cat", [b"z" * 101])
        assert files_under(store.directory / IMAGES_DIR) == {}


def test_embeddings_of_one_version_are_never_served_for_another(tmp_path: Path) -> None:
    first, second = vectors(3, seed=1), vectors(3, seed=2)
    with open_store(tmp_path) as store:
        ids = store.add("cat", images("a", "b", "c"), first, version=1)

        fresh = store.matrix(2)
        assert (len(fresh), fresh.pending) == (0, 3)
        todo = store.missing(2, limit=10)
        assert [entry_id for entry_id, _ in todo] == ids
        assert [image for _, image in todo] == images("a", "b", "c")
        assert store.missing(2, limit=2) == todo[:2]

        assert store.set_embeddings(2, [ids[2], ids[0]], second[[2, 0]]) == 2
        partial = store.matrix(2)
        assert (tuple(partial.ids), partial.pending) == ((ids[2], ids[0]), 1)
        assert [entry_id for entry_id, _ in store.missing(2, limit=10)] == [ids[1]]
        np.testing.assert_allclose(partial.vectors[0], second[2] / np.linalg.norm(second[2]), rtol=1e-6)
        np.testing.assert_allclose(
            store.matrix(1).vectors, first / np.linalg.norm(first, axis=1)[:, None], rtol=1e-6
        )

        assert store.set_embeddings(2, [ids[0]], second[[0]]) == 0  # already embedded for version 2
        assert store.drop_version(1) is True
        assert len(store.matrix(1)) == 0
        assert store.stats().rows_per_version == {2: 2}


def test_embeddings_of_another_dimension_are_refused_for_a_version(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add("cat", images("a"), vectors(1), version=1)
        with pytest.raises(
            ValueError, match="version 1 embeddings have 16 dimensions in this gallery, got 8"
        ):
            store.add("cat", images("b"), np.ones((1, 8), np.float32), version=1)
        with pytest.raises(ValueError, match="expected 2 embedding rows"):
            store.add("cat", images("b", "c"), vectors(1), version=1)
        assert store.stats().entries == 1


def test_a_matrix_handed_out_keeps_its_rows_while_the_gallery_changes(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        ids = store.add("cat", images(*"abcd"), vectors(4), version=1)
        held = store.matrix(1)
        copy = held.vectors.copy()

        store.add("dog", images(*"efghijklmnopqrstuvwxyz"), vectors(22, seed=3), version=1)
        store.remove_id(ids[0])

        np.testing.assert_array_equal(held.vectors, copy)
        assert tuple(held.ids) == tuple(ids)
        assert tuple(held.labels) == ("cat",) * 4
        assert held.ids[-1] == ids[3]
        with pytest.raises(IndexError):
            held.ids[4]  # a row added after the matrix was handed out is not part of it
        assert len(store.matrix(1)) == 25


def test_a_torn_record_at_the_end_is_cut_off_and_later_adds_survive(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        kept = store.add("cat", images("a", "b"), vectors(2), version=1)
        journal = store.directory / JOURNAL_NAME
        whole = journal.read_bytes()
        store.add("dog", images("c"), vectors(1, seed=1), version=1)
        last_record = journal.read_bytes()[len(whole) :]
    # A crash part-way through appending the last record: only its first half reached the disk.
    journal.write_bytes(whole + last_record[: len(last_record) // 2])

    with open_store(tmp_path) as store:
        assert [e.id for e in store.entries()] == kept
        check_consistent(store, version=1)
        later = store.add("fox", images("d"), vectors(1, seed=2), version=1)

    with open_store(tmp_path) as store:
        assert [e.id for e in store.entries()] == kept + later
        check_consistent(store, version=1)


def test_a_record_failing_its_checksum_ends_the_replay(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        kept = store.add("cat", images("a"))
        journal = store.directory / JOURNAL_NAME
        good = len(journal.read_bytes())
        store.add("dog", images("b"))
    damaged = bytearray(journal.read_bytes())
    damaged[-1] ^= 0xFF
    journal.write_bytes(bytes(damaged))

    with open_store(tmp_path) as store:
        assert [e.id for e in store.entries()] == kept
    assert len(journal.read_bytes()) == good


def test_a_reader_cuts_off_a_torn_record_once_no_writer_holds_the_lock(tmp_path: Path) -> None:
    image = b"image of a dog"
    digest = hashlib.sha256(image).hexdigest()
    entry = {"id": "0123456789abcdef", "label": "dog", "digest": digest, "size": len(image), "added_at": 0.0}
    record = _encode_record({"op": "add", "entries": [entry], "version": None, "dim": None})
    with open_store(tmp_path) as store:
        store.add("cat", images("a"))
        journal = store.directory / JOURNAL_NAME
        good = journal.stat().st_size
        (store.directory / IMAGES_DIR / digest).write_bytes(image)
        lock_fd = os.open(store.directory / LOCK_NAME, os.O_RDWR)
        try:
            # A writer in another process, half-way through its append, holding the lock.
            fcntl.flock(lock_fd, fcntl.LOCK_EX)
            with open(journal, "ab") as file:
                file.write(record[:25])
            assert store.labels() == {"cat": 1}
            assert journal.stat().st_size == good + 25  # left alone: the append may still finish

            with open(journal, "ab") as file:
                file.write(record[25:])
            assert store.labels() == {"cat": 1, "dog": 1}

            # The same writer dies half-way through its next append; its lock goes with it.
            with open(journal, "ab") as file:
                file.write(record[:25])
        finally:
            os.close(lock_fd)
        assert store.labels() == {"cat": 1, "dog": 1}
        assert journal.stat().st_size == good + len(record)  # the torn record is cut off by the reader


def test_files_a_crash_left_behind_are_deleted_at_open(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add("cat", images("a"))
        image_dir = store.directory / IMAGES_DIR
    # An add killed after writing its image but before its record, and one killed mid-image.
    (image_dir / hashlib.sha256(b"never committed").hexdigest()).write_bytes(b"never committed")
    (image_dir / ".tmp-0123456789abcdef").write_bytes(b"half an ima")
    (tmp_path / MODEL / ".tmp-journal").write_bytes(b"half a compaction")

    with open_store(tmp_path) as store:
        assert [p.name for p in image_dir.iterdir()] == [store.entries()[0].digest]
        assert not (tmp_path / MODEL / ".tmp-journal").exists()


def test_removals_compact_the_journal_and_keep_the_live_state(tmp_path: Path) -> None:
    dim = 1280  # ~5 KiB a row: 300 rows pass the 1 MiB below which the journal is never compacted
    rows = np.random.default_rng(0).standard_normal((300, dim)).astype(np.float32)
    with open_store(tmp_path, max_bytes=10**8) as store:
        ids = store.add("many", [f"{i}".encode() for i in range(300)], rows, version=1)
        kept = store.add("few", images("a", "b"), rows[:2], version=1)
        journal = store.directory / JOURNAL_NAME
        grown = journal.stat().st_size
        matrix_before = store.matrix(1)

        assert store.remove_label("many") == 300

        assert journal.stat().st_size < grown / 10
        assert store.stats().journal_bytes == journal.stat().st_size
        assert [e.id for e in store.entries()] == kept
        assert not set(ids) & set(store.matrix(1).ids)
        assert len(matrix_before) == 302  # a matrix handed out before stays whole

    with open_store(tmp_path) as reopened:
        assert [e.id for e in reopened.entries()] == kept
        check_consistent(reopened, version=1)
        np.testing.assert_allclose(reopened.matrix(1).vectors, normalize(rows[:2]), rtol=1e-6)


def test_a_second_store_on_the_directory_sees_adds_removals_and_compactions(tmp_path: Path) -> None:
    dim = 1280
    rows = np.random.default_rng(0).standard_normal((250, dim)).astype(np.float32)
    with open_store(tmp_path, max_bytes=10**8) as writer, open_store(tmp_path, max_bytes=10**8) as reader:
        assert reader.labels() == {}
        writer.add("many", [f"{i}".encode() for i in range(250)], rows, version=1)
        assert reader.labels() == {"many": 250}
        assert len(reader.matrix(1)) == 250

        (kept,) = reader.add("one", images("a"), rows[:1], version=1)
        writer.remove_label("many")  # compacts: the reader's open journal is replaced under it

        assert reader.labels() == {"one": 1}
        assert tuple(reader.matrix(1).ids) == (kept,)


def normalize(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


# Writers in other processes: each adds one entry per step and prints `committed <count>` once the add
# has returned (so is durable). Arguments: root, label, adds (0: forever), max_entries, go-file.
WRITER = """
import pathlib, sys, time
import numpy as np
from service.galleries.store import GalleryStore, GalleryFullError
root, label, adds, max_entries, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
store = GalleryStore(pathlib.Path(root), "tiny", max_entries=max_entries, max_bytes=10**9)
rng = np.random.default_rng()
print("ready", flush=True)
while not pathlib.Path(go).exists():
    time.sleep(0.001)
committed = refused = 0
while adds == 0 or committed + refused < adds:
    image = label.encode() + rng.bytes(32 * 1024)
    try:
        store.add(label, [image], rng.standard_normal((1, 1280)).astype(np.float32), version=1)
    except GalleryFullError:
        refused += 1
        continue
    committed += 1
    print("committed", committed, flush=True)
print("refused", refused, flush=True)
"""


def start_writer(
    root: Path, label: str, adds: int, go: Path, max_entries: int = 10**6
) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root), label, str(adds), str(max_entries), str(go)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdout.readline() == "ready\n"
    return process


def test_a_writer_killed_mid_add_loses_no_committed_entry(tmp_path: Path) -> None:
    go = tmp_path / "go"
    go.touch()
    writer = start_writer(tmp_path, "cat", 0, go)
    assert writer.stdout is not None
    try:
        # Wait until 30 adds have returned; the writer is adding more while it is killed.
        committed = 0
        while committed < 30:
            line = writer.stdout.readline()
            assert line.startswith("committed"), f"the writer stopped: {line!r}"
            committed = int(line.split()[1])
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        writer.stdout.close()
    assert writer.returncode == -signal.SIGKILL

    with open_store(tmp_path, max_bytes=10**9) as store:
        assert store.labels()["cat"] >= 30
        check_consistent(store, version=1)
        store.add("dog", images("after"))
        assert store.stats().entries == store.labels()["cat"] + 1


def blocked_on_a_lock(pid: int) -> bool:
    """Whether process `pid` waits for a file lock (a `->` line of /proc/locks names the waiters)."""
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "->" and fields[5] == str(pid):
            return True
    return False


def race(root: Path, adds: int, max_entries: int) -> list[str]:
    """Two writer processes adding `adds` entries each, released together once both wait for the lock
    the test holds (so they contend from their first add on); returns their outputs."""
    reader = open_store(root)  # opened first: opening takes the lock
    go = root / "go"
    writers = [start_writer(root, label, adds, go, max_entries) for label in ("left", "right")]
    lock_fd = os.open(root / MODEL / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        go.touch()
        for writer in writers:
            wait_until(
                lambda pid=writer.pid: blocked_on_a_lock(pid), f"writer {writer.pid} waits for the lock"
            )
        assert reader.labels() == {}  # nothing is written while another process holds the lock
        os.close(lock_fd)  # releases the lock
        lock_fd = -1
        outputs = [writer.communicate(timeout=120)[0] for writer in writers]
    finally:
        if lock_fd >= 0:
            os.close(lock_fd)
        reader.close()
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
            writer.communicate()
    assert [writer.returncode for writer in writers] == [0, 0], outputs
    return outputs


def test_two_processes_adding_at_once_lose_nothing(tmp_path: Path) -> None:
    race(tmp_path, adds=100, max_entries=10**6)

    with open_store(tmp_path, max_bytes=10**9) as store:
        assert store.labels() == {"left": 100, "right": 100}
        check_consistent(store, version=1)


def test_two_processes_adding_at_once_never_overshoot_the_entry_limit(tmp_path: Path) -> None:
    outputs = race(tmp_path, adds=30, max_entries=45)

    refused = sum(int(output.split("refused")[1]) for output in outputs)
    assert refused == 60 - 45
    with open_store(tmp_path, max_bytes=10**9) as store:
        assert store.stats().entries == 45
        check_consistent(store, version=1)


def test_a_closed_store_refuses_reads_and_writes(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    store.close()
    with pytest.raises(RuntimeError, match="the gallery of 'tiny' is closed"):
        store.add("cat", images("a"))
    with pytest.raises(RuntimeError, match="closed"):
        store.labels()


def test_threads_adding_to_one_store_lose_nothing(tmp_path: Path) -> None:
    def add(step: int) -> str:
        return store.add(f"t{step % 4}", [f"image {step}".encode()], vectors(1, seed=step), version=1)[0]

    with open_store(tmp_path) as store, ThreadPoolExecutor(max_workers=4) as pool:
        ids = list(pool.map(add, range(80)))

    with open_store(tmp_path) as reopened:
        assert reopened.labels() == {"t0": 20, "t1": 20, "t2": 20, "t3": 20}
        assert sorted(e.id for e in reopened.entries()) == sorted(ids)
        check_consistent(reopened, version=1)


def test_a_record_this_code_cannot_read_stops_the_store_with_the_reason(tmp_path: Path) -> None:
    with open_store(tmp_path) as store:
        store.add("cat", images("a"))
        journal = store.directory / JOURNAL_NAME
    # A complete, checksummed record of a kind this code does not know (as a newer release might write).
    with open(journal, "ab") as file:
        file.write(_encode_record({"op": "rename", "label": "cat"}))

    with pytest.raises(GalleryCorruptError, match=r"op='rename'.*written by a newer convserve"):
        open_store(tmp_path)
