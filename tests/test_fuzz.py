"""Fuzzing what the replay service reads from the wire and from disk: inserts, sampled batches
(the learner's side), priority updates and snapshots, each mutated byte by byte and in its
decoded structure: every field of a message, at every level, replaced by a value of each
msgpack type, deleted, or joined by an unknown one, and random structures seeded likewise.
Every mutation is either refused with the format's own error, leaving the stored data as it
was, or accepted as exactly what a valid message would have done; memory stays bounded
throughout. Seeded, so a failure reproduces."""
import copy
import dataclasses
import io
import math
import threading
import zlib

import msgpack
import numpy as np
import psutil
import pytest
import zstandard

from common import wire
from replay_server.records import ReplayStats
from replay_server.snapshot import SnapshotError, write_snapshot
from tests.test_replay import interleaved_chunks, make_server, state_fingerprint
from tests.test_wire import zeros_frame

MAX_RSS_GROWTH = 50 << 20
# One zstd frame of 64 MiB of zeros, a few KB: a mutation that declares a huge array gets
# data that honestly decompresses to it.
BOMB_BYTES = 64 << 20
SPECIAL_VALUES = [99, -5, 7.0, np.nan, np.inf, -1, 2**31 - 1, 2**40]
HUGE_SIZES = [2**31, 2**40, 2**63, -1, BOMB_BYTES]


@pytest.fixture(scope="module")
def bomb():
    """A compressed array of about BOMB_BYTES shaped like `array` (its trailing sizes kept)."""
    def make(dtype: str, shape: list) -> tuple[list, bytes]:
        row = np.dtype(dtype).itemsize * math.prod(shape[1:])
        rows = BOMB_BYTES // max(1, row)
        return [rows, *shape[1:]], zeros_frame(rows * row)
    return make


def special(rng, dtype: np.dtype):
    """A value an attacker would try, as `dtype` holds it (wrapped, if it must be)."""
    value = rng.choice(SPECIAL_VALUES)
    if not np.isfinite(value) and dtype.kind != "f":
        value = 99
    return np.array(int(value) if dtype.kind != "f" else value).astype(dtype)


def mutate_bytes(data: bytes, rng) -> bytes:
    data = bytearray(data)
    what = rng.integers(4)
    if what == 0:
        for _ in range(rng.integers(1, 4)):
            data[rng.integers(len(data))] = rng.integers(256)
    elif what == 1:
        del data[rng.integers(len(data)):]
    elif what == 2:
        at = rng.integers(len(data) + 1)
        data[at:at] = rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8).tobytes()
    else:
        at = rng.integers(len(data))
        del data[at:at + rng.integers(1, 9)]
    return bytes(data)


def mutate_structure(body: dict, rng, bomb: bytes) -> dict:
    """One change to a decoded message: an array's dtype, shape, data or values, a meta
    value, an array dropped or added."""
    body = copy.deepcopy(body)
    arrays = body["arrays"]
    name = list(arrays)[rng.integers(len(arrays))]
    array = arrays[name]
    what = rng.integers(8)
    if what == 0:
        array["dtype"] = str(rng.choice(sorted(wire.ALLOWED_DTYPES) + ["object", "<U8"]))
    elif what == 1:
        shape = list(array["shape"]) or [1]
        shape[rng.integers(len(shape))] = int(rng.choice(HUGE_SIZES + [0, 1, 3]))
        array["shape"] = shape if rng.random() < 0.8 else shape + [2] * int(rng.integers(1, 70))
    elif what == 2 and array["shape"]:  # a bomb that declares exactly what its shape needs
        shape, data = bomb(array["dtype"], array["shape"])
        array.update(shape=shape, data=data, codec="zstd")
    elif what == 3 and "codec" not in array and array["data"]:
        values = np.frombuffer(array["data"], array["dtype"]).copy()
        values.reshape(-1)[rng.integers(values.size)] = special(rng, values.dtype)
        array["data"] = values.tobytes()
    elif what == 4:
        del arrays[name]
    elif what == 5:
        arrays["extra"] = {"dtype": "uint8", "shape": [3], "data": b"abc"}
    elif what == 6 and body["meta"]:
        key = list(body["meta"])[rng.integers(len(body["meta"]))]
        body["meta"][key] = [None, -1, 2**63, "x", 1.5, [3, "x"], [2**40, 2**40],
                             body["meta"][key]][rng.integers(8)]
    else:
        array["codec"] = str(rng.choice(["zstd", "lz4", ""]))
    return body


def mutations(messages: list[bytes], count: int, rng, bomb: bytes):
    bodies = [msgpack.unpackb(message) for message in messages]
    for trial in range(count):
        which = rng.integers(len(messages))
        if trial % 2:
            yield mutate_bytes(messages[which], rng)
        else:
            yield msgpack.packb(mutate_structure(bodies[which], rng, bomb), use_bin_type=True)


def canonical(message: bytes, kind: str) -> memoryview:
    """The message this build's encoder writes for what `message` decodes to."""
    arrays, meta = wire.decode(message, expect_kind=kind)
    return wire.encode(kind, arrays, meta)


def rss() -> int:
    return psutil.Process().memory_info().rss


def shard_state(server) -> tuple:
    """What a refused message must leave as it was: the stored data and the limiter's counts."""
    return state_fingerprint(server.buffer), server.limiter.inserts, server.limiter.samples


def fuzz_server(make, mutated_messages, apply, kind):
    """Apply each of `mutated_messages` to a server from `make()`: a refusal is a WireError,
    counted, leaving the server's data as it was; an acceptance does exactly what the
    canonical encoding of what was accepted does to another fresh server."""
    server, accepted = make(), 0
    before = shard_state(server)
    for mutated in mutated_messages:
        rejected = server.stats().rejected_messages
        try:
            result = apply(server, mutated)
        except wire.WireError:
            assert shard_state(server) == before
            assert server.stats().rejected_messages == rejected + 1
            continue
        accepted += 1
        twin = make()
        assert apply(twin, canonical(mutated, kind)) == result
        assert state_fingerprint(twin.buffer) == state_fingerprint(server.buffer)
        assert same_counts(twin.stats()) == same_counts(server.stats())
        server = make()
    return accepted


def same_counts(stats: ReplayStats) -> ReplayStats:
    """What a valid message would change alike (a parked mutation's size is its own)."""
    return dataclasses.replace(stats, rejected_messages=0, parked_bytes=0)


def test_mutated_inserts_and_priority_updates_are_refused_or_equal_to_valid_ones(bomb):
    chunks, _ = interleaved_chunks(np.random.default_rng(0), senders=1, envs=2, steps=12)

    def make():
        server = make_server(capacity=200, priority_exponent=0.6)
        server.insert(chunks[0])
        return server

    keys = np.arange(16)
    priorities = wire.encode_priorities(keys, np.linspace(0.5, 2.0, 16))
    grown = rss()
    accepted = fuzz_server(make, mutations([bytes(chunks[1]), bytes(chunks[2])], 10_000,
                                           np.random.default_rng(1), bomb),
                           insert, wire.TRANSITIONS)
    accepted_priorities = fuzz_server(make, mutations([bytes(priorities)], 2_000,
                                                      np.random.default_rng(2), bomb),
                                      update_priorities, wire.PRIORITIES)
    grown = rss() - grown
    assert grown < MAX_RSS_GROWTH, f"RSS grew by {grown >> 20} MiB"
    assert 0 < accepted < 10_000 and 0 < accepted_priorities < 2_000


def insert(server, message):
    return server.insert(message)


def update_priorities(server, message):
    return server.update_priorities(message)


def sampled_batches() -> list[bytes]:
    """A batch a shard sampled, and one like it whose frames went compressed."""
    server = make_server(capacity=200)
    for chunk in interleaved_chunks(np.random.default_rng(3), senders=1, envs=2, steps=30)[0]:
        server.insert(chunk)
    sampled = bytes(server.sample(8, num_batches=2))
    arrays, meta = wire.decode(sampled, expect_kind=wire.BATCH)
    frames = np.zeros_like(arrays["frames"])  # compressible, as Atari frames are
    frames[:, 0, 0] = np.arange(len(frames))
    compressed = bytes(wire.encode(wire.BATCH, {**arrays, "frames": frames}, meta,
                                   compress=("frames",)))
    assert msgpack.unpackb(compressed)["arrays"]["frames"]["codec"] == "zstd"
    return [sampled, compressed]


def test_mutated_batches_are_refused_or_decode_like_valid_ones(bomb):
    batches = sampled_batches()
    grown = rss()
    accepted = fuzz_batches(mutations(batches, 3_000, np.random.default_rng(4), bomb))
    grown = rss() - grown
    assert grown < MAX_RSS_GROWTH, f"RSS grew by {grown >> 20} MiB"
    assert 0 < accepted < 3_000


def packed(value) -> bytes:
    """`value` as msgpack: equal for equal values, NaN included."""
    return msgpack.packb(value, use_bin_type=True)


def fuzz_batches(mutated_messages) -> int:
    """Decode each as a batch: refused with a WireError, or decoded as its canonical
    encoding is; returns how many were accepted."""
    accepted = 0
    for mutated in mutated_messages:
        try:
            batch, meta = wire.decode_batch(mutated)
        except wire.WireError:
            continue
        accepted += 1
        again, again_meta = wire.decode_batch(canonical(mutated, wire.BATCH))
        assert packed(meta) == packed(again_meta) and set(batch) == set(again)
        for name, array in batch.items():
            np.testing.assert_array_equal(array, again[name])
    return accepted


# A value of each msgpack type, with the edges a decoder mishandles: the extreme integers,
# non-finite floats, empty and nested containers, strings that are valid elsewhere.
MSGPACK_VALUES = [None, True, False, 0, 1, -1, 2**64 - 1, -2**63, 0.5, math.nan, math.inf,
                  -math.inf, "", "uint8", "zstd", "transitions", b"", bytes(8), [], [1, "x"],
                  ["uint8"], [[[2]]], {}, {"k": 1}, {"uint8": None},
                  {"dtype": "uint8", "shape": [1], "data": b"\x00"}, {"a": {"b": [None, {}]}}]


def field_paths(node, path: tuple = ()):
    """The path of every field under `node` (map keys and list indices), depth first."""
    items = node.items() if isinstance(node, dict) else \
        enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        yield path + (key,)
        yield from field_paths(value, path + (key,))


def at(body, path: tuple):
    for key in path:
        body = body[key]
    return body


def with_change(body: dict, path: tuple, change) -> bytes:
    """`body` re-encoded with `change(parent, key)` applied to the field at `path`."""
    body = copy.deepcopy(body)
    change(at(body, path[:-1]), path[-1])
    return msgpack.packb(body, use_bin_type=True)


def replace_by(value):
    def change(parent, key):
        parent[key] = copy.deepcopy(value)
    return change


def delete(parent, key):
    del parent[key]


def structure_mutations(message: bytes):
    """Every field at every level (format, version, kind, meta and each of its keys, arrays,
    each array and its dtype, shape, each size, data, codec) replaced by each of
    MSGPACK_VALUES, and deleted; an unknown field added to every map."""
    body = msgpack.unpackb(message)
    paths = list(field_paths(body))
    for path in paths:
        for value in MSGPACK_VALUES:
            yield with_change(body, path, replace_by(value))
        yield with_change(body, path, delete)
    for path in [()] + [p for p in paths if isinstance(at(body, p), dict)]:
        for value in (1, {}, [b"x"]):
            yield with_change(body, path + ("unknown",), replace_by(value))


def random_value(rng, depth: int = 0):
    """A random msgpack value: a scalar of any type, or a container of random values."""
    kind = rng.integers(9 if depth < 3 else 7)
    if kind == 7:
        return [random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    if kind == 8:
        return {one_of(rng, ["dtype", "shape", "data", "codec", "stream", "x"]):
                random_value(rng, depth + 1) for _ in range(rng.integers(0, 4))}
    if kind == 6:
        return int(rng.integers(-3, 300))
    if kind == 5:
        return bytes(int(rng.integers(0, 40)))
    return one_of(rng, RANDOM_SCALARS[kind])


# Per kind of random_value's scalars: nil, bools, integers, floats, strings.
RANDOM_SCALARS = [[None], [True, False], [0, 1, 3, 7, 255, 2**31, 2**63 - 1, 2**64 - 1, -1, -2**63],
                  [0.0, -1.5, 1e308, math.nan, math.inf, -math.inf],
                  ["", "uint8", "int64", "float32", "zstd", "frames", "batch", "transitions",
                   "dqn-wire", "\u00e9"]]


def one_of(rng, values: list):
    """One of `values`, as it is (numpy's choice would convert them to one dtype)."""
    return values[rng.integers(len(values))]


def random_structure_mutations(messages: list[bytes], count: int, rng):
    """`count` messages, each with one to three random fields replaced by random structures,
    deleted, or added."""
    bodies = [msgpack.unpackb(message) for message in messages]
    for _ in range(count):
        body = copy.deepcopy(bodies[rng.integers(len(bodies))])
        for _ in range(rng.integers(1, 4)):
            paths = list(field_paths(body))
            path = paths[rng.integers(len(paths))]
            what = rng.integers(3)
            if what == 0:
                at(body, path[:-1])[path[-1]] = random_value(rng)
            elif what == 1:
                del at(body, path[:-1])[path[-1]]
            elif isinstance(at(body, path), dict):
                at(body, path)[str(rng.choice(["extra", "dtype", "codec"]))] = random_value(rng)
        yield msgpack.packb(body, use_bin_type=True)


def decoded_or_refused(messages):
    """Each message through `wire.decode` without a schema: it decodes, or a WireError says
    why; passes the messages on."""
    for message in messages:
        try:
            wire.decode(message)
        except wire.WireError:
            pass
        yield message


def insert_and_priorities_fuzzing():
    """A shard holding a chunk, the stream's next chunk (its frames compressed) and a
    priority update, as the structure-aware tests fuzz them."""
    chunks, _ = interleaved_chunks(np.random.default_rng(0), senders=1, envs=2, steps=12)

    def make():
        server = make_server(capacity=200, priority_exponent=0.6)
        server.insert(chunks[0])
        return server

    arrays, meta = wire.decode(chunks[1], expect_kind=wire.TRANSITIONS)
    frames = np.zeros_like(arrays["frames"])  # compressible, as Atari frames are
    frames[:, 0, 0] = np.arange(len(frames))
    chunk = bytes(wire.encode_transitions(
        frames, arrays["obs_frames"], arrays["next_obs_frames"], arrays["action"],
        arrays["reward"], arrays["discount"], priority=np.linspace(0.1, 3.0, 8), **meta))
    assert "codec" in msgpack.unpackb(chunk)["arrays"]["frames"]
    priorities = wire.encode_priorities(np.arange(16), np.linspace(0.5, 2.0, 16))
    return make, chunk, bytes(priorities)


def test_every_field_of_an_insert_and_a_priority_update_replaced_by_each_msgpack_type():
    """Each mutation is refused with a WireError (never TypeError, OverflowError, KeyError...),
    counted, the shard unchanged; or accepted like its canonical encoding."""
    make, chunk, priorities = insert_and_priorities_fuzzing()
    mutated = list(structure_mutations(chunk))
    assert len(mutated) > 1_000
    accepted = fuzz_server(make, decoded_or_refused(mutated), insert, wire.TRANSITIONS)
    assert 0 < accepted < len(mutated)
    mutated = list(structure_mutations(priorities))
    accepted = fuzz_server(make, decoded_or_refused(mutated), update_priorities,
                           wire.PRIORITIES)
    assert 0 < accepted < len(mutated)


def test_every_field_of_a_batch_replaced_by_each_msgpack_type():
    messages = sampled_batches()
    mutated = [m for message in messages for m in structure_mutations(message)]
    assert 0 < fuzz_batches(decoded_or_refused(mutated)) < len(mutated)


def test_random_structures_in_every_field_are_refused_or_accepted_like_valid_messages():
    make, chunk, priorities = insert_and_priorities_fuzzing()
    rng = np.random.default_rng(7)
    accepted = fuzz_server(make, decoded_or_refused(random_structure_mutations(
        [chunk], 3_000, rng)), insert, wire.TRANSITIONS)
    accepted_priorities = fuzz_server(make, decoded_or_refused(random_structure_mutations(
        [priorities], 1_000, rng)), update_priorities, wire.PRIORITIES)
    accepted_batches = fuzz_batches(decoded_or_refused(random_structure_mutations(
        sampled_batches(), 1_000, rng)))
    assert accepted < 3_000 and accepted_priorities < 1_000 and accepted_batches < 1_000


def snapshot_objects(data: bytes) -> list:
    return list(msgpack.Unpacker(io.BytesIO(data), raw=False))


def mutate_snapshot(objects: list, rng, bomb: bytes) -> list:
    """One change to a snapshot's decoded objects: a declaration's dtype, shape or rows; a
    piece's rows, codec, data or values (with its checksum made right); a counter."""
    objects = copy.deepcopy(objects)
    header, pieces = objects[0], objects[1:-1]
    what = rng.integers(5)
    if what == 0:
        info = header["arrays"][str(rng.choice(sorted(header["arrays"])))]
        key = str(rng.choice(["dtype", "shape", "rows", "first"]))
        info[key] = {"dtype": rng.choice(["float64", "int64", "uint8", "object"]),
                     "shape": [int(rng.choice(HUGE_SIZES))],
                     "rows": int(rng.choice(HUGE_SIZES)), "first": -1}[key]
    elif what == 1:
        piece = pieces[rng.integers(len(pieces))]
        declared = header["arrays"][piece["array"]]
        shape, data = bomb(declared["dtype"], [1, *declared["shape"]])
        piece.update(rows=shape[0] if rng.random() < 0.5 else int(rng.choice(HUGE_SIZES)),
                     codec="zstd", data=data, crc32=zlib.crc32(b""))
    elif what == 2:
        piece = pieces[rng.integers(len(pieces))]
        dtype = header["arrays"][piece["array"]]["dtype"]
        raw = piece["data"] if piece["codec"] == "raw" else \
            zstandard.ZstdDecompressor().decompress(piece["data"])
        values = np.frombuffer(raw, dtype).copy()
        values.reshape(-1)[rng.integers(values.size)] = special(rng, values.dtype)
        piece.update(codec="raw", data=values.tobytes(), crc32=zlib.crc32(values.tobytes()))
    elif what == 3:
        key = str(rng.choice(["frames_written", "transitions_written", "scan_key",
                              "max_priority", "stale_dropped", "streams", "rng", "extra"]))
        header["state"][key] = [None, -1, 2**63, "x", 1.5, [[1, 2]], {}][rng.integers(7)]
    else:
        objects.insert(int(rng.integers(1, len(objects))), copy.deepcopy(
            pieces[rng.integers(len(pieces))]))
    return objects


def test_mutated_snapshots_are_refused_or_restore_a_valid_state(tmp_path, bomb):
    from tests.test_snapshot import filled_buffer
    buffer, _ = filled_buffer()
    good = tmp_path / "good.msgpack"
    write_snapshot(buffer, good, threading.Lock(), extra_state=lambda: {"rejected": 3})
    data = good.read_bytes()
    objects = snapshot_objects(data)

    chunk = interleaved_chunks(np.random.default_rng(5), senders=1, envs=2, steps=8)[0][0]

    def make():
        server = make_server(capacity=200, priority_exponent=0.6)
        server.insert(chunk)
        return server

    rng, server, accepted, grown = np.random.default_rng(6), make(), 0, rss()
    before = state_fingerprint(server.buffer)
    path = tmp_path / "mutated.msgpack"
    for trial in range(1_000):
        if trial % 2:
            path.write_bytes(mutate_bytes(data, rng))
        else:
            path.write_bytes(b"".join(msgpack.packb(o, use_bin_type=True)
                                      for o in mutate_snapshot(objects, rng, bomb)))
        try:
            server.restore(str(path))
        except SnapshotError as error:
            assert str(path) in str(error) and "\n" not in str(error)
            assert state_fingerprint(server.buffer) == before
            continue
        accepted += 1
        again = make()
        again.restore(server.snapshot(str(tmp_path / "again.msgpack"))["path"])
        assert state_fingerprint(again.buffer) == state_fingerprint(server.buffer)
        server.buffer.check_invariants()  # what every accepted restore must leave
        batch, _ = wire.decode_batch(server.sample(8))  # and it serves
        assert np.isfinite(batch["weight"]).all() and (batch["weight"] > 0).all()
        server = make()
    grown = rss() - grown
    assert grown < MAX_RSS_GROWTH, f"RSS grew by {grown >> 20} MiB"
    assert accepted < 1_000
