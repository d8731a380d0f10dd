"""The msgpack wire format: exact round trips, and a clear refusal of anything else."""
import functools
import tracemalloc

import msgpack
import numpy as np
import pytest
import zstandard

from common import wire


@pytest.mark.parametrize("dtype", sorted(wire.ALLOWED_DTYPES))
def test_round_trip_is_exact_for_every_dtype(dtype):
    rng = np.random.default_rng(0)
    array = (rng.random((3, 5, 2)) * 100).astype(dtype)
    arrays, meta = wire.decode(wire.encode("batch", {"x": array}, {"n": 3}), "batch")
    assert arrays["x"].dtype == array.dtype and arrays["x"].shape == array.shape
    np.testing.assert_array_equal(arrays["x"], array)
    assert meta == {"n": 3}


def test_round_trip_keeps_special_values_and_empty_and_noncontiguous_arrays():
    floats = np.array([np.nan, np.inf, -0.0, 1e-38], np.float32)
    frames = np.arange(2 * 4 * 84 * 84, dtype=np.uint8).reshape(2, 4, 84, 84)[:, ::2]
    arrays, _ = wire.decode(wire.encode("k", {"f": floats, "e": np.zeros((0, 4)), "s": frames}))
    np.testing.assert_array_equal(arrays["f"], floats)
    assert arrays["e"].shape == (0, 4)
    np.testing.assert_array_equal(arrays["s"], frames)


def test_gathered_rows_encode_like_the_rows_themselves():
    source = np.arange(10 * 3, dtype=np.float32).reshape(10, 3)
    index = np.array([7, 2, 2, 9])
    gathered = wire.encode("k", {"x": wire.Gather(source, index)}, {"n": 1})
    assert bytes(gathered) == bytes(wire.encode("k", {"x": source[index]}, {"n": 1}))


def test_compressed_arrays_round_trip_and_shrink_and_incompressible_ones_go_raw():
    frames = np.zeros((64, 84, 84), np.uint8)
    frames[:, 70:74, 30:46] = 200  # a paddle on black, as Atari frames mostly are
    noise = np.random.default_rng(0).integers(0, 256, (64, 8), dtype=np.uint8)
    kept = np.arange(5, dtype=np.int64)
    message = wire.encode("k", {"frames": frames, "noise": noise, "kept": kept},
                          compress=("frames", "noise"))
    body = msgpack.unpackb(message)
    assert body["arrays"]["frames"]["codec"] == "zstd" and "codec" not in body["arrays"]["noise"]
    assert len(message) < frames.nbytes / 50
    arrays, _ = wire.decode(message)
    for name, array in (("frames", frames), ("noise", noise), ("kept", kept)):
        assert arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(arrays[name], array)
    gathered = wire.encode("k", {"frames": wire.Gather(frames, np.array([3, 1]))},
                           compress=("frames",))
    np.testing.assert_array_equal(wire.decode(gathered)[0]["frames"], frames[[3, 1]])


def test_an_actors_chunk_goes_compressed():
    frames = np.zeros((64, 84, 84), np.uint8)
    refs = np.zeros((64, 4), np.int64)
    message = wire.encode_transitions(frames, refs, refs, np.zeros(64), np.zeros(64),
                                      np.zeros(64), stream=1, first_frame=0)
    assert len(message) < 8_000  # Ray sends it inline (< 100 KB), not via the object store
    np.testing.assert_array_equal(wire.decode(message)[0]["frames"], frames)


def test_batch_decoder_rebuilds_into_a_ring_of_reused_arrays():
    frames = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)
    decode = wire.BatchDecoder(ring=2)
    results = []
    for shift in range(3):
        index = (np.array([[[0, 1], [4, 5]]], np.int32) + shift) % 6
        message = wire.encode(wire.BATCH, {"frames": frames, "obs_frames": index,
                                           "next_obs_frames": index}, {"obs_shape": [2, 2, 2]})
        batch, _ = decode(message)
        np.testing.assert_array_equal(batch["obs"][0, 1], frames[(np.array([4, 5]) + shift) % 6])
        results.append(batch["obs"])
    assert results[2] is results[0] and results[1] is not results[0]  # the ring wrapped


def test_transitions_message_decodes_to_the_insert_schema():
    frames = np.zeros((3, 84, 84), np.uint8)
    refs = np.array([[0, 0, 0, 0], [0, 0, 0, 1]])
    arrays, meta = wire.decode(wire.encode_transitions(
        frames, refs, refs + 1, np.array([0, 1]), np.array([1.0, 0.5]), np.array([0.99, 0.0]),
        stream=2**62 + 5, first_frame=40), expect_kind=wire.TRANSITIONS)
    assert meta == {"stream": 2**62 + 5, "first_frame": 40}
    assert arrays["obs_frames"].dtype == np.int64 and arrays["action"].dtype == np.int32
    assert arrays["reward"].dtype == np.float32 and "priority" not in arrays


def test_batch_message_rebuilds_stacks_from_distinct_frames():
    frames = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    obs_index = np.array([[[0, 1, 2], [2, 3, 4]]], np.int32)  # 1 batch of 2, stack 3
    next_index = obs_index + np.array([0, 0, 0])
    message = wire.encode(wire.BATCH, {"frames": frames, "obs_frames": obs_index,
                                       "next_obs_frames": next_index,
                                       "action": np.zeros((1, 2), np.int32)},
                          {"obs_shape": [3, 2, 2]})
    batch, _ = wire.decode_batch(message)
    assert batch["obs"].shape == (1, 2, 3, 2, 2)
    np.testing.assert_array_equal(batch["obs"][0, 1], frames[[2, 3, 4]])
    bad = wire.encode(wire.BATCH, {"frames": frames, "obs_frames": obs_index + 3,
                                   "next_obs_frames": next_index}, {"obs_shape": [3, 2, 2]})
    with pytest.raises(wire.WireError, match="indexes outside the batch's 5 frames"):
        wire.decode_batch(bad)


def valid_message():
    return wire.encode("batch", {"x": np.arange(6, dtype=np.int32).reshape(2, 3)})


def forged(**changes):
    body = msgpack.unpackb(valid_message())
    for key, value in changes.items():
        if key.startswith("x_"):
            body["arrays"]["x"][key[2:]] = value
        else:
            body[key] = value
    return msgpack.packb(body, use_bin_type=True)


def compressed(data: bytes, shape: list[int], codec: str = "zstd") -> bytes:
    """A message whose array x [shape] of uint8 carries `data` under `codec`."""
    body = {"format": wire.FORMAT, "version": wire.VERSION, "kind": "batch", "meta": {},
            "arrays": {"x": {"dtype": "uint8", "shape": shape, "data": data, "codec": codec}}}
    return msgpack.packb(body, use_bin_type=True)


ZEROS_4K = zstandard.ZstdCompressor().compress(bytes(4096))


@pytest.mark.parametrize("message, needle", [
    (compressed(ZEROS_4K, [4096], codec="lz4"), "codec 'lz4', not 'zstd'"),
    (compressed(b"not zstd at all", [15]), "is not valid zstd data"),
    (compressed(ZEROS_4K[:-3], [4096]), "is not valid zstd data"),
    (compressed(ZEROS_4K, [16]), "declares 4096 bytes uncompressed; its dtype and shape need 16"),
    (compressed(zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64)), [64]),
     "declares -1 bytes uncompressed"),
    (compressed(ZEROS_4K, [1 << 20, 1 << 12]), "its dtype and shape need 4294967296"),
    (b"", "not a msgpack message"),
    (b"\xc1\xff garbage", "not a msgpack message"),
    (valid_message()[:-7], "not a msgpack message"),
    (msgpack.packb([1, 2, 3]), "not a dqn-wire message"),
    (forged(format="other"), "not a dqn-wire message"),
    (forged(version=99), "unsupported dqn-wire version 99"),
    (forged(version=1), "unsupported dqn-wire version 1"),
    (forged(kind="transitions"), "expected a 'batch' message"),
    (forged(arrays=[1]), "'arrays' must be a map"),
    (forged(meta="x"), "'meta' must be a map"),
    (forged(x_dtype="object"), "dtype 'object'"),
    (forged(x_shape=[2, -3]), "invalid shape"),
    (forged(x_shape=[1] * 65), "invalid shape [1, 1,"),
    (forged(x_shape=[0, 2**63]), "invalid shape [0, 9223372036854775808]"),
    (forged(x_shape=[0, 2**40]), "invalid shape [0, 1099511627776]"),
    (forged(x_shape=[4, 3]), "needs 48 bytes, got 24"),
    (forged(x_data="text"), "data must be binary"),
    (forged(x_extra=1), "exactly dtype, shape, data"),
    ("a string", "message must be bytes"),
    # Fields of the wrong msgpack type, where a set lookup or a hash would raise TypeError.
    (forged(x_dtype=["int32"]), "has dtype ['int32'], not one of"),
    (forged(x_dtype={"int32": 1}), "has dtype {'int32': 1}, not one of"),
    (forged(x_codec=["zstd"]), "has codec ['zstd'], not 'zstd'"),
    (forged(kind=["batch"]), "field 'kind' must be a string, got ['batch']"),
    (forged(version=[3]), "unsupported dqn-wire version [3]"),
    (forged(version=3.0), "unsupported dqn-wire version 3.0"),
    (forged(meta={"n": {"a": 1}}), "meta 'n' is {'a': 1}: a meta value must be nil"),
    (forged(meta={"n": b"x"}), "meta 'n' is bin[1]: a meta value must be nil"),
    # Empty, but numpy could not size it: a ValueError of numpy's, not the wire's.
    (forged(x_shape=[0, 2**31, 2**31]), "invalid shape [0, 2147483648, 2147483648]"),
    (forged(x_dtype="int32" * 100), "int32i..., not one of"),
    (np.arange(40, dtype=np.uint8)[::2], "message must be contiguous bytes"),
])
def test_garbage_is_refused_with_a_reason(message, needle):
    with pytest.raises(wire.WireError, match=None) as error:
        wire.decode(message, expect_kind="batch")
    assert needle in str(error.value)


def test_encode_refuses_object_arrays():
    with pytest.raises(wire.WireError, match="dtype object"):
        wire.encode("k", {"x": np.array([{}, None], dtype=object)})


def test_mutated_messages_only_ever_raise_wire_errors():
    """Random truncations and byte flips of a valid message: each decodes or is refused with
    WireError, never another exception (the decoder reads untrusted bytes)."""
    rng = np.random.default_rng(0)
    message = bytes(wire.encode("batch", {"x": np.arange(12, dtype=np.int32).reshape(3, 4),
                                          "y": np.ones(2, np.float64),
                                          "z": np.zeros((4, 84), np.uint8)},
                                {"n": 3, "name": "z", "shape": [1, 2], "f": 0.5},
                                compress=("z",)))
    for trial in range(3000):
        mutated = bytearray(message)
        if trial % 3 == 0:
            mutated = mutated[:rng.integers(0, len(mutated))]
        for _ in range(rng.integers(1, 4)):
            if mutated:
                mutated[rng.integers(0, len(mutated))] = rng.integers(0, 256)
        try:
            wire.decode(bytes(mutated))
        except wire.WireError:
            pass


def test_msgpack_library_messages_decode_the_same():
    """The decoder reads any msgpack encoding of a message, not only ours."""
    array = np.arange(6, dtype=np.uint32).reshape(2, 3)
    body = {"format": wire.FORMAT, "version": wire.VERSION, "kind": "k",
            "meta": {"a": -3, "b": None, "c": True, "d": 1.5, "e": [1, "x"], "f": 2**40},
            "arrays": {"v": {"dtype": "uint32", "shape": [2, 3], "data": array.tobytes()}}}
    arrays, meta = wire.decode(msgpack.packb(body, use_bin_type=True))
    np.testing.assert_array_equal(arrays["v"], array)
    assert meta == body["meta"]


@functools.lru_cache(maxsize=None)
def zeros_frame(size: int) -> bytes:
    """One zstd frame of `size` zero bytes that says so (a few KB per 100 MB), built without
    holding them."""
    compressor = zstandard.ZstdCompressor(level=3).compressobj(size=size)
    zeros = bytes(1 << 20)
    return b"".join(compressor.compress(zeros[:min(1 << 20, size - at)])
                    for at in range(0, size, 1 << 20)) + compressor.flush()


def message_of(arrays: dict, meta: dict | None = None, kind: str = "batch") -> bytes:
    """A message of arrays given as {name: (dtype, shape, data, compressed)}."""
    body = {"format": wire.FORMAT, "version": wire.VERSION, "kind": kind, "meta": meta or {},
            "arrays": {name: {"dtype": dtype, "shape": shape, "data": data,
                              **({"codec": "zstd"} if compressed else {})}
                       for name, (dtype, shape, data, compressed) in arrays.items()}}
    return msgpack.packb(body, use_bin_type=True)


def refusal_and_peak(call, error=wire.WireError) -> tuple[str, int]:
    """The refusal `call` raises, and the bytes allocated at the peak while it ran (numpy's
    and zstd's output included)."""
    tracemalloc.start()
    try:
        with pytest.raises(error) as refused:
            call()
        return str(refused.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_decompression_bombs_are_refused_before_anything_is_allocated():
    """Six arrays of 128 MiB in 25 KB, each frame declaring its size honestly: a budget or a
    schema refuses them from the header; so does the default budget for 2.25 GiB in 3 arrays."""
    bomb = zeros_frame(128 << 20)
    six = message_of({f"a{i}": ("uint8", [128 << 20], bomb, True) for i in range(6)})
    assert len(six) < 30_000
    schema = wire.Schema("batch", {f"a{i}": wire.Field("uint8", ("n",)) for i in range(6)},
                         limits={"n": 1 << 20})
    huge = zeros_frame(768 << 20)
    three = message_of({f"a{i}": ("uint8", [768 << 20], huge, True) for i in range(3)})
    for decode, needle in [
            (lambda: wire.decode(six, max_bytes=64 << 20),
             "message would decode to 805306368 bytes, more than its budget of 67108864"),
            (lambda: wire.decode(six, schema=schema),
             "'a0' has shape (134217728,): 134217728 n, more than the 1048576 a message may"),
            (lambda: wire.decode(three), "would decode to 2415919104 bytes")]:
        refusal, peak = refusal_and_peak(decode)
        assert needle in refusal and peak < 1 << 20


def test_a_schema_names_what_does_not_fit():
    schema = wire.Schema("pairs", {"a": wire.Field("int32", ("n", 2)),
                                   "b": wire.Field("float32", ("n",)),
                                   "c": wire.Field("uint8", ("n",))},
                         limits={"n": 10}, optional=frozenset({"c"}))
    assert schema.max_bytes == 10 * 2 * 4 + 10 * 4 + 10
    good = {"a": np.zeros((3, 2), np.int32), "b": np.zeros(3, np.float32)}
    schema.check(good)
    for arrays, needle in [
            ({"a": good["a"]}, "a pairs message must have fields a and b (and optionally c)"),
            ({**good, "d": good["b"]}, "got ['a', 'b', 'd']"),
            ({**good, "b": np.zeros(3)}, "'b' has dtype float64, expected float32"),
            ({**good, "a": np.zeros((3, 3), np.int32)}, "'a' has shape (3, 3), expected (n, 2)"),
            ({**good, "b": np.zeros(4, np.float32)}, "4 n, but another field has 3"),
            ({"a": np.zeros((11, 2), np.int32), "b": np.zeros(11, np.float32)},
             "11 n, more than the 10 a message may hold")]:
        with pytest.raises(wire.WireError, match=None) as error:
            schema.check(arrays)
        assert needle in str(error.value)
    message = wire.encode("pairs", {**good, "b": np.zeros(3, np.float64)})
    with pytest.raises(wire.WireError, match="'b' has dtype float64"):
        wire.decode(message, schema=schema)


def batch_arrays():
    index = np.array([[[0, 1], [1, 2]]], np.int32)
    return {"frames": np.arange(3 * 4, dtype=np.uint8).reshape(3, 2, 2), "obs_frames": index,
            "next_obs_frames": index, "action": np.zeros((1, 2), np.int32)}


@pytest.mark.parametrize("changes, meta, needle", [
    ({"frames": None}, {"obs_shape": [2, 2, 2]}, "a batch needs arrays ['frames']"),
    ({"next_obs_frames": None}, {"obs_shape": [2, 2, 2]}, "needs arrays ['next_obs_frames']"),
    ({}, {}, "batch meta 'obs_shape' None is not 2 frames of shape [2, 2]"),
    ({}, {"obs_shape": ["x"]}, "batch meta 'obs_shape' ['x'] is not 2 frames"),
    ({}, {"obs_shape": [5, 5]}, "batch meta 'obs_shape' [5, 5] is not 2 frames"),
    ({}, {"obs_shape": [True, 8]}, "is not 2 frames"),
    ({"obs_frames": np.zeros((1, 2, 2), np.float32)}, {"obs_shape": [2, 2, 2]},
     "batch 'obs_frames' must be integers [k, B, stack]"),
    ({"obs_frames": np.zeros((1, 2), np.int32)}, {"obs_shape": [2, 2, 2]},
     "batch 'obs_frames' must be integers [k, B, stack]"),
    ({"action": np.zeros((1, 3), np.int32)}, {"obs_shape": [2, 2, 2]},
     "batch 'action' has shape [1, 3], not the [1, 2] of its items"),
    ({"frames": np.zeros((9, 2, 2), np.uint8)}, {"obs_shape": [2, 2, 2]},
     "a batch of 8 stack frames carries 9 distinct frames"),
    ({"frames": np.zeros(3, np.uint8)}, {"obs_shape": [2, 2, 2]}, "is not 2 frames of shape []"),
    ({}, {"obs_shape": {"2": 2}}, "meta 'obs_shape' is {'2': 2}: a meta value must be nil"),
    # Frames of no bytes: stacks as large as numpy cannot size, yet of no bytes either.
    ({"frames": np.zeros((3, 0), np.uint8)}, {"obs_shape": [2, 0, 2**31, 2**31]},
     "batch meta 'obs_shape' [2, 0, 2147483648, 2147483648] is not 2 frames of shape [0]"),
])
def test_malformed_batches_are_refused_with_a_reason(changes, meta, needle):
    arrays = {**batch_arrays(), **changes}
    message = wire.encode(wire.BATCH, {k: v for k, v in arrays.items() if v is not None}, meta)
    with pytest.raises(wire.WireError, match=None) as error:
        wire.decode_batch(message)
    assert needle in str(error.value)


def test_a_batch_that_would_rebuild_too_much_is_refused_before_decompressing():
    """Index arrays of 16M zeros (two zstd frames of a few KB) would rebuild 2 x 16M stacks of
    a 64 KB frame: refused from the header, nothing allocated."""
    index = zeros_frame(4 << 24)
    message = message_of({"frames": ("uint8", [1, 1 << 16], bytes(1 << 16), False),
                          "obs_frames": ("int32", [1, 1 << 24, 1], index, True),
                          "next_obs_frames": ("int32", [1, 1 << 24, 1], index, True)},
                         {"obs_shape": [1 << 16]})
    refusal, peak = refusal_and_peak(lambda: wire.decode_batch(message))
    assert "more than its budget" in refusal and peak < 1 << 20
