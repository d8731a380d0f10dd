"""Replay snapshots: exact round trips, consistency while inserts go on, refusal of bad files."""
import hashlib
import json
import pickle
import threading

import msgpack
import numpy as np
import pytest

from common import wire
from replay_server import snapshot as snapshot_module
from replay_server.snapshot import SnapshotError, read_snapshot, write_snapshot
from tests.test_replay import (
    insert_all,
    interleaved_chunks,
    make_buffer,
    make_server,
    sampled_items,
    state_fingerprint,
)


def filled_buffer(capacity=200, seed=0):
    chunks, _ = interleaved_chunks(np.random.default_rng(seed), senders=3, envs=2, steps=60)
    buffer = make_buffer(capacity, alpha=0.6, seed=seed)
    insert_all(buffer, chunks[:-6])
    keys = np.arange(buffer.total_added - 50, buffer.total_added)
    buffer.update_priorities(keys, np.linspace(0.1, 3.0, 50))
    return buffer, chunks[-6:]


def test_snapshot_then_restore_is_exact(tmp_path):
    buffer, _ = filled_buffer()
    path = tmp_path / "shard.msgpack"
    lock = threading.Lock()
    # The extra state is read under the lock, with the buffer's: both of one moment.
    written = write_snapshot(buffer, path, lock, extra_state=lambda: {"note": 7,
                                                                   "locked": lock.locked()})
    assert written["transitions"] == 200 and path.stat().st_size == written["bytes"]
    assert not (tmp_path / "shard.msgpack.tmp").exists()
    restored, extra = read_snapshot(path, buffer.spec, seed=99)
    assert extra == {"note": 7, "locked": True}
    assert state_fingerprint(restored) == state_fingerprint(buffer)
    # Same state, same random stream: the next batches are identical.
    assert make_copy_sample(restored) == make_copy_sample(buffer)


def test_inserts_during_a_snapshot_do_not_change_what_it_holds(tmp_path, monkeypatch):
    """Inserts land between the pieces of frames being written, overwriting frames not yet
    saved; the file still holds the state at the moment the snapshot began."""
    buffer, more_chunks = filled_buffer(capacity=60)
    reference_state = state_fingerprint(buffer)
    reference_sample = make_copy_sample(buffer)
    lock = threading.Lock()
    monkeypatch.setattr(snapshot_module, "PIECE_BYTES", 36 * 8)  # 8 frames a piece
    original = snapshot_module.SnapshotWriter.write_array
    pending = list(more_chunks)

    def write_then_insert(self, name, start, array):
        original(self, name, start, array)
        if name == "frames" and pending:
            arrays, meta = wire.decode(pending.pop(0), expect_kind=wire.TRANSITIONS)
            with lock:
                buffer.add(arrays, meta)

    monkeypatch.setattr(snapshot_module.SnapshotWriter, "write_array", write_then_insert)
    rescue, rescued = snapshot_module.FrameSaver.rescue, []

    def counting_rescue(self, lost_from, lost_to):
        before = self.next
        rescue(self, lost_from, lost_to)
        rescued.append(self.next - before)

    monkeypatch.setattr(snapshot_module.FrameSaver, "rescue", counting_rescue)
    write_snapshot(buffer, tmp_path / "s.msgpack", lock)
    assert not pending  # every insert happened while the snapshot was being written
    assert sum(rescued) > 0  # and some overwrote frames the snapshot had not saved yet
    assert state_fingerprint(buffer) != reference_state
    restored, _ = read_snapshot(tmp_path / "s.msgpack", buffer.spec)
    assert state_fingerprint(restored) == reference_state
    assert make_copy_sample(restored) == reference_sample


def test_an_insert_just_after_the_lock_is_released_does_not_reach_the_header(tmp_path,
                                                                             monkeypatch):
    """The header is packed after the lock is released; an insert landing in that moment
    must not change what it holds (it once did: the stream table's ranges went in as the
    live lists, a restarted shard found them past the frames written and could not start)."""
    buffer, more_chunks = filled_buffer(capacity=60)
    reference_state = state_fingerprint(buffer)
    lock = threading.Lock()
    original = snapshot_module.SnapshotWriter.__init__

    def insert_then_open(self, path, header):
        for chunk in more_chunks:
            arrays, meta = wire.decode(chunk, expect_kind=wire.TRANSITIONS)
            with lock:
                buffer.add(arrays, meta)
        original(self, path, header)

    monkeypatch.setattr(snapshot_module.SnapshotWriter, "__init__", insert_then_open)
    write_snapshot(buffer, tmp_path / "s.msgpack", lock)
    assert state_fingerprint(buffer) != reference_state
    restored, _ = read_snapshot(tmp_path / "s.msgpack", buffer.spec)
    assert state_fingerprint(restored) == reference_state


def make_copy_sample(buffer):
    """The next batch, leaving the buffer's random state as it was."""
    state = buffer.rng.bit_generator.state
    batch = sampled_items(buffer, 8, beta=0.5)
    buffer.rng.bit_generator.state = state
    return {name: array.tolist() for name, array in batch.items()}


def corruptions(data: bytes):
    header_end = len(msgpack.packb(next(msgpack.Unpacker(__import__("io").BytesIO(data)))))
    middle = len(data) // 2
    flipped = bytearray(data)
    flipped[middle] ^= 0xFF
    yield "truncated", data[:middle]
    yield "truncated", data[:-3]
    yield "no footer", data[:header_end]
    yield "flipped byte", bytes(flipped)
    yield "empty", b""
    yield "pickle", pickle.dumps({"format": "dqn-replay-snapshot"})
    yield "garbage", b"\x00\x01garbage" * 100


def test_corrupt_snapshots_are_refused_and_the_running_shard_is_untouched(tmp_path):
    source, _ = filled_buffer()
    good = tmp_path / "good.msgpack"
    write_snapshot(source, good, threading.Lock())
    data = good.read_bytes()
    server = make_server(capacity=200)
    chunks, _ = interleaved_chunks(np.random.default_rng(3), senders=1, envs=2, steps=20)
    for chunk in chunks:
        server.insert(chunk)
    before = state_fingerprint(server.buffer)
    for what, corrupt in corruptions(data):
        path = tmp_path / "bad.msgpack"
        path.write_bytes(corrupt)
        with pytest.raises(SnapshotError) as error:
            server.restore(str(path))
        assert str(path) in str(error.value), what
        assert state_fingerprint(server.buffer) == before, what
    with pytest.raises(SnapshotError, match="cannot open"):
        server.restore(str(tmp_path / "missing.msgpack"))
    server.insert(make_more_chunk())  # still serving
    assert state_fingerprint(server.buffer) != before


def make_more_chunk():
    chunks, _ = interleaved_chunks(np.random.default_rng(4), senders=1, envs=2, steps=8)
    return chunks[0]


def test_a_snapshot_of_another_kind_of_shard_is_refused(tmp_path):
    buffer, _ = filled_buffer()
    path = tmp_path / "s.msgpack"
    write_snapshot(buffer, path, threading.Lock())
    other = make_buffer(capacity=400, alpha=0.6)
    with pytest.raises(SnapshotError, match="holds a shard with spec"):
        read_snapshot(path, other.spec)


def test_server_snapshot_and_restore_keep_the_rate_limiter(tmp_path):
    server = make_server(capacity=200)
    chunks, _ = interleaved_chunks(np.random.default_rng(5), senders=1, envs=2, steps=40)
    for chunk in chunks:
        server.insert(chunk)
    server.sample(8)
    written = server.snapshot(str(tmp_path / "shard.msgpack"))
    fresh = make_server(capacity=200)
    restored = fresh.restore(written["path"])
    assert restored["transitions"] == server.buffer.size
    assert (fresh.limiter.inserts, fresh.limiter.samples) == (server.limiter.inserts,
                                                               server.limiter.samples)
    assert fresh.stats() == server.stats()


@pytest.mark.parametrize("root", ["path", "file-uri"])
def test_a_shard_restores_the_newest_intact_snapshot_or_starts_empty_saying_why(tmp_path, root):
    """What a (re)started shard does with its checkpoint store: restore its snapshot from the
    newest checkpoint whose copy is intact, saying which newer ones it passed over; none yet,
    start empty; none it can read (damaged, or refused), start empty with the reason, because
    a lost replay refills and a stopped run does not."""
    from common.checkpoints import CheckpointStore, shard_part
    folder = tmp_path / "checkpoints"
    store = CheckpointStore(str(folder) if root == "path" else f"file://{folder}")
    assert make_server(capacity=200).restore_latest(store) == (None, None)
    server = make_server(capacity=200)
    chunks, _ = interleaved_chunks(np.random.default_rng(5), senders=1, envs=2, steps=40)
    states = []
    for number, part_of_chunks in [(1, chunks[:len(chunks) // 2]),
                                   (2, chunks[len(chunks) // 2:])]:
        for chunk in part_of_chunks:
            server.insert(chunk)
        with store.writing(f"{store.staging(number)}/{shard_part(0)}") as path:
            server.snapshot(path)
        store.commit(number, keep=2)
        states.append(server.stats())
    fresh = make_server(capacity=200)
    assert fresh.restore_latest(store) == ("ckpt-00000002", None)
    assert fresh.stats() == states[1]

    latest_part = folder / "ckpt-00000002" / shard_part(0)
    intact = latest_part.read_bytes()
    damage_a_byte(latest_part)
    fresh = make_server(capacity=200)
    name, why = fresh.restore_latest(store)
    assert name == "ckpt-00000001" and fresh.stats() == states[0]
    assert f"ckpt-00000002/{shard_part(0)}: its contents differ" in why
    damage_a_byte(folder / "ckpt-00000001" / shard_part(0))
    fresh = make_server(capacity=200)
    name, why = fresh.restore_latest(store)
    assert name is None and f"ckpt-00000002/{shard_part(0)}: its contents differ" in why
    assert fresh.stats() == make_server(capacity=200).stats()  # empty, counters at 0

    # Refused content under a manifest that matches it (a writer's bug, not damage).
    (tmp_path / "good.msgpack").write_bytes(intact)
    forged = forged_snapshot(tmp_path, set_value("action", 99), tmp_path / "good.msgpack")
    rewrite_part(folder / "ckpt-00000002", shard_part(0), open(forged, "rb").read())
    name, why = make_server(capacity=200).restore_latest(store)
    assert name is None and "invalid snapshot content: 'action' outside [0, 4)" in why


def rewrite_part(checkpoint, relpath: str, data: bytes) -> None:
    """A part of a committed checkpoint replaced, its manifest updated to match."""
    (checkpoint / relpath).write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["parts"][relpath] = {"bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))


def damage_a_byte(path) -> None:
    """One byte changed; damaging a damaged file again leaves it damaged."""
    data = path.read_bytes()
    path.write_bytes(data[:100] + bytes([(data[100] + 1) % 256]) + data[101:])


def forged_snapshot(tmp_path, edit, good=None) -> str:
    """A valid shard's snapshot (`good`, or one of `filled_buffer`'s) with `edit(header,
    pieces by array name)` applied to its decoded objects, every checksum still right."""
    import io
    import zlib

    import zstandard
    if good is None:
        buffer, _ = filled_buffer()
        good = tmp_path / "good.msgpack"
        write_snapshot(buffer, good, threading.Lock())
    objects = list(msgpack.Unpacker(io.BytesIO(good.read_bytes()), raw=False))
    header, pieces = objects[0], objects[1:-1]
    for piece in pieces:  # raw pieces, so an edit can change values
        if piece["codec"] == "zstd":
            piece.update(codec="raw", data=zstandard.ZstdDecompressor().decompress(piece["data"]))
    edit(header, {piece["array"]: piece for piece in pieces})
    for piece in pieces:
        if piece["codec"] == "raw":
            piece["crc32"] = zlib.crc32(piece["data"])
    path = tmp_path / "forged.msgpack"
    path.write_bytes(b"".join(msgpack.packb(o, use_bin_type=True) for o in objects))
    return str(path)


def set_value(name, value, dtype=None):
    def edit(header, pieces):
        values = np.frombuffer(pieces[name]["data"], header["arrays"][name]["dtype"]).copy()
        values[len(values) // 2] = value
        if dtype is not None:
            values = values.astype(dtype)
            header["arrays"][name]["dtype"] = dtype
        pieces[name]["data"] = values.tobytes()
    return edit


def frames_bomb(header, pieces):
    from tests.test_wire import zeros_frame
    pieces["frames"].update(codec="zstd", data=zeros_frame(1 << 30))


def huge_rows(header, pieces):
    header["arrays"]["frames"]["rows"] = 10**12


@pytest.mark.parametrize("edit, needle", [
    (set_value("action", 99), "invalid snapshot content: 'action' outside [0, 4)"),
    (set_value("action", -5), "invalid snapshot content: 'action' outside [0, 4)"),
    (set_value("reward", np.nan), "invalid snapshot content: 'reward' holds a non-finite"),
    (set_value("discount", 7.0), "invalid snapshot content: 'discount' must lie in [0, 1]"),
    (set_value("action", 1, dtype="float64"),
     "array 'action' is declared as {'dtype': 'float64'"),
    (set_value("obs_slots", 10**6), "obs_slots outside the frame ring"),
    (set_value("oldest_frame", 10**9), "oldest_frame names a frame not yet written"),
    (set_value("leaves", -1.0), "priorities must be finite and >= 0"),
    (frames_bomb, "piece of 'frames' declares 1073741824 bytes uncompressed"),
    (huge_rows, "array 'frames' is declared as"),
])
def test_forged_snapshots_with_valid_checksums_are_refused(tmp_path, edit, needle):
    from tests.test_wire import refusal_and_peak
    path = forged_snapshot(tmp_path, edit)
    server = make_server(capacity=200, priority_exponent=0.6)
    server.insert(make_more_chunk())
    before = state_fingerprint(server.buffer)
    refusal, peak = refusal_and_peak(lambda: server.restore(path), SnapshotError)
    assert needle in refusal and "\n" not in refusal
    assert peak < 8 << 20  # the bomb's gigabyte was never allocated
    assert state_fingerprint(server.buffer) == before
    assert server.insert(make_more_chunk()).inserted > 0  # still serving
