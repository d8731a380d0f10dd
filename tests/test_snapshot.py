"""Replay snapshots: exact round trips, consistency while inserts go on, refusal of bad files."""
import collections
import errno
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
from tests.conftest import PAGE, fill, fill_inodes, leftovers
from tests.test_replay import (
    good_chunk,
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


def set_state(value, *keys):
    """An edit setting the header's state[keys[0]][keys[1]]... to `value`."""
    def edit(header, pieces):
        target = header["state"]
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return edit


def delete_state(*keys):
    def edit(header, pieces):
        target = header["state"]
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return edit


def set_rows(name, value):
    """An edit setting every stored row of array `name` to `value`."""
    def edit(header, pieces):
        values = np.frombuffer(pieces[name]["data"], header["arrays"][name]["dtype"]).copy()
        values[:] = value
        pieces[name]["data"] = values.tobytes()
    return edit


def set_streams(*ranges_at_end):
    """An edit replacing the stream table by streams 1, 2, ... each with one range of frames
    numbered 0..count-1 and written at serial frames_written - `back`: (count, back) pairs."""
    def edit(header, pieces):
        written = header["state"]["frames_written"]
        streams = [(stream, *pair) for stream, pair in enumerate(ranges_at_end, 1)]
        header["state"]["streams"] = {
            "ranges": [[stream, [0], [count], [written - back]]
                       for stream, count, back in streams],
            "next_numbers": [[stream, count] for stream, count, _ in streams]}
    return edit


def refused_restore(server, path) -> str:
    """The one-line refusal of restoring `path`, asserting the shard kept its state."""
    before = (state_fingerprint(server.buffer), server.limiter.inserts, server.limiter.samples,
              server.rejected)
    with pytest.raises(SnapshotError) as error:
        server.restore(path)
    assert "\n" not in str(error.value) and path in str(error.value)
    assert before == (state_fingerprint(server.buffer), server.limiter.inserts,
                      server.limiter.samples, server.rejected)
    return str(error.value)


@pytest.mark.parametrize("edit, needle", [
    (set_state("-1", "rng", "state", "inc"),
     "rng state 'inc' must be an integer in [0, 2**128) written in decimal, got '-1'"),
    (set_state(str(2**128), "rng", "state", "inc"), "rng state 'inc' must be an integer"),
    (set_state("2", "rng", "state", "inc"), "rng state 'inc' 2 is even"),
    (set_state(" 12", "rng", "state", "state"), "rng state 'state' must be an integer"),
    (set_state(12, "rng", "state", "state"), "rng state 'state' must be an integer"),
    (set_state("1" * 5000, "rng", "state", "state"), "rng state 'state' must be an integer"),
    (set_state(2, "rng", "has_uint32"), "rng state 'has_uint32' must be 0 or 1, got 2"),
    (set_state(-1, "rng", "uinteger"), "rng state 'uinteger' must be an integer in [0, 2**32)"),
    (set_state(2**32, "rng", "uinteger"), "rng state 'uinteger' must be an integer"),
    (set_state("MT19937", "rng", "bit_generator"),
     "rng state 'bit_generator' is 'MT19937', not 'PCG64'"),
    (set_state([], "rng"), "rng state must be a map with keys"),
    (delete_state("rng", "uinteger"), "rng state must be a map with keys"),
    (set_state({"state": "1"}, "rng", "state"),
     "rng state 'state' must be a map with keys ['inc', 'state']"),
])
def test_a_forged_random_state_is_refused_naming_the_field(tmp_path, edit, needle):
    """numpy raised OverflowError (inc -1), TypeError or KeyError, past every restore path."""
    server = make_server(capacity=200, priority_exponent=0.6)
    server.insert(make_more_chunk())
    refusal = refused_restore(server, forged_snapshot(tmp_path, edit))
    assert f"invalid snapshot content: {needle}" in refusal
    assert server.insert(make_more_chunk()).inserted > 0  # still serving


def test_a_restarted_shard_whose_snapshot_has_a_forged_random_state_starts_empty(tmp_path):
    from common.checkpoints import CheckpointStore, shard_part
    store = CheckpointStore(str(tmp_path / "checkpoints"))
    server = make_server(capacity=200)
    for chunk in interleaved_chunks(np.random.default_rng(5), senders=1, envs=2, steps=40)[0]:
        server.insert(chunk)
    with store.writing(f"{store.staging(1)}/{shard_part(0)}") as path:
        server.snapshot(path)
    store.commit(1, keep=2)
    part = tmp_path / "checkpoints" / "ckpt-00000001" / shard_part(0)
    forged = forged_snapshot(tmp_path, set_state("-1", "rng", "state", "inc"), part)
    rewrite_part(part.parent, shard_part(0), open(forged, "rb").read())
    fresh = make_server(capacity=200)
    name, why = fresh.restore_latest(store)
    assert name is None and "rng state 'inc' must be an integer in [0, 2**128)" in why
    assert fresh.stats() == make_server(capacity=200).stats()  # empty, counters at 0


# What a running shard relies on, each broken alone in a snapshot whose checksums hold
# (filled_buffer: capacity 200, exponent 0.6, priorities up to 3, 312 transitions written,
# 340 frames, 3 streams; make_server: 8 samples per insert, at least 10 stored, tolerance 192).
@pytest.mark.parametrize("edit, needle", [
    (set_value("leaves", 1e308), "leaf priorities must lie in [0.000251189, 1.93318]"),
    (set_rows("leaves", 1e308), "the sum-tree's total inf is not finite"),
    (set_value("leaves", 1e-300), "leaf priorities must lie in [0.000251189, "),
    (set_state(1e308, "max_priority"), "max_priority 1e+308 is not in [1, 1e+06]"),
    (set_state(0.5, "max_priority"), "max_priority 0.5 is not in [1, 1e+06]"),
    (set_state(1.0, "max_priority"), "leaf priorities must lie in [0.000251189, 1]"),
    (set_state(2**64 - 1, "extra", "limiter_samples"),
     "the shard's counters {'limiter_inserts': 312, 'limiter_samples': 18446744073709551615"),
    (set_state(10**6, "extra", "limiter_samples"),
     "rate limiter: 1000000 samples after 312 inserts: more than 8.0 per insert allows"),
    (set_state(5, "extra", "limiter_inserts"),
     "the rate limiter counts 5 inserts, the buffer 312"),
    (set_rows("obs_slots", 0), "'s frame slots [0, 0, 0, 0] + "),
    (set_value("oldest_frame", -5), "oldest_frame -5 is not a frame serial"),
    (set_value("oldest_frame", 0), "are not frames of its transition"),
    (set_streams((10, 20), (10, 15)), "two ranges claim the same frames"),
    (set_streams((10, 10), (10, 20)), "streams are not in the order they last sent frames"),
    (lambda header, pieces: header["state"]["streams"]["next_numbers"].append(
        header["state"]["streams"]["next_numbers"][0]), "a stream's next number is listed twice"),
    (lambda header, pieces: (header["state"]["streams"]["ranges"].append(
        header["state"]["streams"]["ranges"][-1]),
        header["state"]["streams"]["next_numbers"].append([99, 0])), "is listed twice"),
    (set_state(312, "scan_key"), "a row below scan_key (found dead) has a priority"),
    (set_state(0, "scan_key"), "scan_key 0 is outside [112, 312]"),
    (set_state(2**64 - 1, "frames_written"), "frames_written 18446744073709551615 is not a "
                                             "count below 2**62"),
    (set_state(-1, "stale_dropped"), "stale_dropped -1 is not a count below 2**62"),
])
def test_forged_state_a_shard_could_not_go_on_from_is_refused(tmp_path, edit, needle):
    """Accepted before: the shard then sampled NaN weights, sampled nothing (the limiter's
    samples, the sum-tree's total), sampled frames of other transitions (slots, streams), or
    refused every insert."""
    server = make_server(capacity=200, priority_exponent=0.6)
    server.insert(make_more_chunk())
    refusal = refused_restore(server, forged_snapshot(tmp_path, edit))
    assert "invalid snapshot content: " in refusal and needle in refusal
    assert server.insert(make_more_chunk()).inserted > 0  # still serving


@pytest.mark.parametrize("edit, needle", [
    (set_value("leaves", 0.5), "leaf priorities must lie in [1, 1]"),
    (set_state(2.0, "max_priority"), "max_priority 2.0 is not in [1, 1e+06] (exactly 1 under "
                                     "uniform sampling)"),
])
def test_forged_priorities_of_a_uniform_shard_are_refused(tmp_path, edit, needle):
    buffer = make_buffer(200, alpha=0.0)
    insert_all(buffer, interleaved_chunks(np.random.default_rng(0), senders=2, steps=40)[0])
    good = tmp_path / "good.msgpack"
    write_snapshot(buffer, good, threading.Lock())
    server = make_server(capacity=200)
    assert needle in refused_restore(server, forged_snapshot(tmp_path, edit, good))


@pytest.mark.parametrize("alpha, capacity", [(0.0, 300), (0.6, 120), (1.0, 60)])
def test_every_state_a_shard_reaches_holds_its_invariants_and_restores(tmp_path, alpha,
                                                                       capacity):
    """The other side of refusing forged state: nothing a running shard does (interleaved
    senders, both rings wrapping, samples, priority updates) leaves a state the checks
    refuse, so no honest snapshot is ever refused."""
    server = make_server(capacity=capacity, priority_exponent=alpha, samples_per_insert=1.0)
    chunks, _ = interleaved_chunks(np.random.default_rng(8), senders=3, envs=2, steps=120)
    rng = np.random.default_rng(9)
    for number, chunk in enumerate(chunks):
        server.insert(chunk)
        if server.limiter.can_sample(16):
            batch, _ = wire.decode_batch(server.sample(16))
            server.update_priorities(wire.encode(wire.PRIORITIES, {
                "key": batch["key"].reshape(-1),
                "priority": rng.exponential(2.0, 16).astype(np.float32)}))
        server.buffer.check_invariants()
        server.limiter.check()
        if number % 15 == 0:
            path = str(tmp_path / "shard.msgpack")
            server.snapshot(path)
            fresh = make_server(capacity=capacity, priority_exponent=alpha,
                                samples_per_insert=1.0)
            fresh.restore(path)
            assert state_fingerprint(fresh.buffer) == state_fingerprint(server.buffer)
    assert server.buffer.frames_written > server.buffer.spec.frame_capacity  # rings wrapped


def test_a_transition_naming_a_frame_its_stream_forgot_is_dropped_as_stale():
    """A stream's table keeps its last MAX_RANGES_PER_STREAM chunks. Before the frame ring
    wrapped, a frame older than those resolved to EVICTED (-1), which counted as still held:
    the row was stored with oldest frame -1 and a slot never written, a state the restore
    refuses."""
    from replay_server.streams import MAX_RANGES_PER_STREAM
    (arrays, meta), _ = good_chunk()
    buffer = make_buffer(1000)

    def chunk(first: int, reference: int):
        refs = np.full((1, 4), reference, np.int64)
        return ({"frames": arrays["frames"][:1], "obs_frames": refs, "next_obs_frames": refs,
                 "action": np.zeros(1, np.int32), "reward": np.zeros(1, np.float32),
                 "discount": np.zeros(1, np.float32)}, {"stream": 5, "first_frame": first})
    for first in range(MAX_RANGES_PER_STREAM + 2):
        assert buffer.add(*chunk(first, first)) == 1
    assert buffer.add(*chunk(MAX_RANGES_PER_STREAM + 2, 0)) == 0
    assert buffer.stale_dropped == 1
    buffer.check_invariants()


# --- State-invariant fuzz: snapshots forged field by field, checksums recomputed ---------------

FUZZ_VALUES = [None, True, False, 0, 1, -1, 2, 2**31, 2**62, 2**63 - 1, 2**64 - 1, -2**63, 0.0,
               -0.0, 0.5, 1.0, 3.0, 1e6, 1e308, -1e308, float("nan"), float("inf"), "", "0",
               "-1", "1" * 40, "x", b"", b"\x00", [], [0], [[0, 0]], [[1, [0], [1], [0]]], {},
               {"a": 1}]


def random_place(rng, root):
    """(parent, key) of a place in a msgpack document, containers included, reached by
    descending at random: each level's keys are as likely, however large their contents."""
    parent, key = None, None
    node = root
    while isinstance(node, (dict, list)) and node and (parent is None or rng.random() < 0.7):
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        parent, key = node, keys[rng.integers(len(keys))]
        node = parent[key]
    return parent, key


def mutate_field(rng, header):
    """One place of the header (mostly of its state) replaced by a value of another msgpack
    type, a near value of the same type, or removed."""
    state = header.get("state")
    root = state if rng.random() < 0.8 and isinstance(state, (dict, list)) and state \
        else header
    parent, key = random_place(rng, root)
    value = parent[key]
    choice = rng.random()
    if choice < 0.1 and isinstance(parent, dict):
        del parent[key]
    elif choice < 0.2 and isinstance(parent, list):
        parent.append(value)  # e.g. a stream listed twice
    elif choice < 0.6 and isinstance(value, int) and not isinstance(value, bool):
        near = [v for v in (value + 1, value - 1, value * 2, value // 2, 0, -value,
                            value + 10**6) if -2**63 <= v < 2**64]  # what msgpack holds
        parent[key] = near[rng.integers(len(near))]
    elif choice < 0.6 and isinstance(value, str) and value.isdigit():
        parent[key] = str(int(value) + int(rng.integers(-2, 3)))  # rng words
    else:
        parent[key] = FUZZ_VALUES[rng.integers(len(FUZZ_VALUES))]


def mutate_rows(rng, pieces):
    """Some values of one stored array set to an extreme value, shuffled, or copied."""
    name = str(rng.choice([*snapshot_module.ROW_ARRAYS, "leaves", "leaves", "frames"]))
    dtype = {"reward": np.float32, "discount": np.float32, "leaves": np.float64,
             "oldest_frame": np.int64, "frames": np.uint8}.get(name, np.int32)
    values = np.frombuffer(pieces[name]["data"], dtype).copy()
    rows = rng.integers(len(values), size=rng.integers(1, 4))
    choice = rng.random()
    if choice < 0.2:
        rng.shuffle(values)
    elif choice < 0.4:
        values[rows] = values[rng.integers(len(values))]
    else:
        extremes = [0, 1, 2, -1, -5, 10**6, 1e-300, 1e308, float("nan"), float("inf"), 3.4e38]
        with np.errstate(invalid="ignore", over="ignore"):
            candidates = np.array(extremes).astype(dtype)
        values[rows] = candidates[rng.integers(len(candidates))]
    pieces[name]["data"] = values.tobytes()


def test_randomly_forged_snapshots_are_refused_or_leave_a_shard_that_works(tmp_path):
    """Each forged snapshot is refused with one line, the shard unchanged, or the restored
    shard holds every invariant and samples (finite weights), updates and inserts."""
    from replay_server.rate_limiter import RateLimiter
    rng = np.random.default_rng(30)
    source, _ = filled_buffer()
    good = tmp_path / "good.msgpack"
    write_snapshot(source, good, threading.Lock())
    server = make_server(capacity=200, priority_exponent=0.6)
    server.restore(str(good))
    server.sample(8)
    server.snapshot(str(good))  # with the limiter's counters
    first_chunk, later_chunk = make_more_chunk(), make_more_chunk()
    outcomes = collections.Counter()
    for _ in range(400):
        def edit(header, pieces):
            for _ in range(rng.integers(1, 3)):
                if rng.random() < 0.7:
                    mutate_field(rng, header)
                else:
                    mutate_rows(rng, pieces)
        path = forged_snapshot(tmp_path, edit, good)
        server = make_server(capacity=200, priority_exponent=0.6)
        server.insert(first_chunk)
        try:
            server.restore(path)
        except SnapshotError:
            refused_restore(server, path)  # again, to see the shard unchanged and one line
            outcomes["refused"] += 1
            continue
        outcomes["accepted"] += 1
        server.buffer.check_invariants()
        server.limiter.check()
        assert isinstance(server.limiter, RateLimiter)
        if server.buffer.size:
            batch = server.buffer.sample(32, 2, beta=1.0)
            assert np.isfinite(batch["weight"]).all() and (batch["weight"] > 0).all()
            server.buffer.update_priorities(batch["key"].reshape(-1), np.linspace(0, 9, 64))
        assert server.insert(later_chunk).inserted > 0
        server.buffer.check_invariants()
        if server.limiter.can_sample(8):
            assert server.sample(8) is not None
    assert outcomes["refused"] > 100 and outcomes["accepted"] > 20, outcomes


# --- Full disks: a real small filesystem (tests/test_checkpoints.py mounts it) -----------------

@pytest.mark.parametrize("leave_pages", [0, 4])  # fails as pieces are written, at the close
def test_a_snapshot_on_a_full_disk_keeps_the_previous_one_and_leaves_no_temporary(
        small_disk, leave_pages):
    """The writer's abort closed the file first, which failed again (its buffer could not be
    flushed either), and the temporary file was left behind."""
    disk = small_disk(256)
    buffer, more_chunks = filled_buffer()
    path, lock = disk / "shard.msgpack", threading.Lock()
    write_snapshot(buffer, path, lock)
    previous = path.read_bytes()
    insert_all(buffer, more_chunks)
    fill(disk, leave_pages * PAGE)
    with pytest.raises(OSError) as error:
        write_snapshot(buffer, path, lock)
    assert error.value.errno == errno.ENOSPC
    assert leftovers(disk) == [] and path.read_bytes() == previous
    assert buffer.snapshot_hook is None


def test_a_snapshot_that_cannot_create_its_file_stops_rescuing_frames(
        small_disk):
    """Opening the file failed outside the writer's error handling: the buffer kept the
    snapshot's hook and copied aside every frame an insert overwrote, for ever."""
    disk = small_disk(256, inodes=64)
    buffer, more_chunks = filled_buffer()
    fill_inodes(disk)
    with pytest.raises(OSError) as error:
        write_snapshot(buffer, disk / "shard.msgpack", threading.Lock())
    assert error.value.errno == errno.ENOSPC
    assert buffer.snapshot_hook is None and leftovers(disk) == []
