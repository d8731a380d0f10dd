"""The msgpack wire format every role speaks: named numpy arrays as raw bytes.

A message is a msgpack map:
    {"format": "dqn-wire", "version": 3, "kind": <str>,
     "meta": {<str>: int | float | str | bool | None | [those]},
     "arrays": {<name>: {"dtype": <numpy dtype name>, "shape": [<int>, ...], "data": <bin>,
                         optional "codec": "zstd"}}}
`data` is the array's C-order bytes, little-endian, or with "codec" those bytes as one zstd
frame that declares their size. Decoding never executes code and checks every field, so a
truncated or forged message raises `WireError` naming what is wrong.
"""
from __future__ import annotations

import math
import struct
import threading
from typing import NamedTuple

import msgpack
import numpy as np
import zstandard

FORMAT = "dqn-wire"
TRANSITIONS = "transitions"  # actor -> replay: new frames, n-step transitions naming them
BATCH = "batch"  # replay -> learner: distinct frames once, index arrays, weights, keys
PRIORITIES = "priorities"  # learner -> replay: new priorities by transition key
VERSION = 3  # 3: arrays may be zstd-compressed
ALLOWED_DTYPES = frozenset(
    {"uint8", "int8", "int32", "int64", "uint32", "float16", "float32", "float64", "bool"})
MAX_MESSAGE_BYTES = 1 << 31
CODEC = "zstd"
COMPRESSION_LEVEL = 1  # an actor's chunk of Breakout frames: ~100x smaller in ~0.1 ms
_codecs = threading.local()  # zstd (de)compressors are not safe to share between threads


class WireError(ValueError):
    """A message is not a valid dqn-wire message."""


class Gather(NamedTuple):
    """An array given as rows of another, `source[index]`: `encode` gathers the rows straight
    into the message instead of into a temporary first (a replay batch's frames)."""
    source: np.ndarray
    index: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self.source.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    @property
    def nbytes(self) -> int:
        return len(self.index) * self.source[:1].nbytes


def encode(kind: str, arrays: dict[str, np.ndarray | Gather], meta: dict | None = None,
           compress: tuple[str, ...] = ()) -> memoryview:
    """One message, as a bytes-like view of an exactly sized buffer (`bytes(message)` copies
    it into a bytes object). Each array's bytes are written once, straight into place:
    msgpack's own packb grows its buffer by reallocation, several copies of a large batch.
    The arrays named in `compress` go as zstd frames where that makes them smaller."""
    parts: list = [_map_header(5)]
    for key, value in (("format", FORMAT), ("version", VERSION), ("kind", kind),
                       ("meta", meta or {})):
        parts += [_pack(key), _pack(value)]
    parts += [_pack("arrays"), _map_header(len(arrays))]
    for name, array in arrays.items():
        if not isinstance(array, Gather):
            array = np.asarray(array)
        dtype = np.dtype(array.dtype)
        if dtype.name not in ALLOWED_DTYPES:
            raise WireError(f"array {name!r} has dtype {dtype.name}, "
                            f"not one of {sorted(ALLOWED_DTYPES)}")
        shape = list(array.shape)
        nbytes = array.nbytes
        codec: list = []
        if name in compress and nbytes:
            rows = array.source[array.index] if isinstance(array, Gather) else array
            packed = _compressor().compress(np.ascontiguousarray(rows, dtype.newbyteorder("<")))
            if len(packed) < nbytes:
                array, nbytes, codec = packed, len(packed), [_pack("codec"), _pack(CODEC)]
        parts += [_pack(name), _map_header(3 + len(codec) // 2), *codec,
                  _pack("dtype"), _pack(dtype.name), _pack("shape"), _pack(shape),
                  _pack("data"), b"\xc6" + nbytes.to_bytes(4, "big"), array]  # bin 32
    sizes = [len(p) if isinstance(p, bytes) else p.nbytes for p in parts]
    out = np.empty(sum(sizes), np.uint8)
    position = 0
    for part, size in zip(parts, sizes):
        target = out[position:position + size]
        if isinstance(part, bytes):
            target[:] = np.frombuffer(part, np.uint8)
        elif isinstance(part, Gather):
            little = part.source.dtype.newbyteorder("<")
            # mode="clip": with mode="raise" numpy buffers `out`, a whole extra copy.
            np.take(part.source, part.index, axis=0, mode="clip",
                    out=target.view(little).reshape(part.shape))
        else:
            target.view(part.dtype.newbyteorder("<")).reshape(part.shape)[...] = part
        position += size
    return out.data


def for_ray(message) -> np.ndarray:
    """The same bytes as a uint8 array, for sending through Ray: Ray moves numpy arrays out
    of band (one copy into the object store, read in place by the receiver) but pickles
    `bytes` (two more copies). An 18 MB batch: about 148 transfers/s against 65 here."""
    return np.frombuffer(message, np.uint8)


def _compressor() -> zstandard.ZstdCompressor:
    if not hasattr(_codecs, "compressor"):
        _codecs.compressor = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
    return _codecs.compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_codecs, "decompressor"):
        _codecs.decompressor = zstandard.ZstdDecompressor()
    return _codecs.decompressor


def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _map_header(size: int) -> bytes:
    return b"\xdf" + size.to_bytes(4, "big")  # msgpack map 32


def decode(message: bytes, expect_kind: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Return (arrays, meta). Arrays are read-only views into `message` (compressed ones into
    their decompressed bytes): copy to keep them."""
    if isinstance(message, np.ndarray):
        if message.dtype != np.uint8 or message.ndim != 1:
            raise WireError(f"an array message must be 1-d uint8, got {message.dtype}"
                            f"{list(message.shape)}")
    elif not isinstance(message, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(message).__name__}")
    if len(message) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
    body = _unpack(memoryview(message).cast("B"))
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise WireError(f"not a {FORMAT} message (no 'format': '{FORMAT}' field)")
    if body.get("version") != VERSION:
        raise WireError(f"unsupported {FORMAT} version {body.get('version')!r}; "
                        f"this build reads version {VERSION}")
    kind = body.get("kind")
    if expect_kind is not None and kind != expect_kind:
        raise WireError(f"expected a {expect_kind!r} message, got {kind!r}")
    meta = body.get("meta")
    if not isinstance(meta, dict):
        raise WireError("field 'meta' must be a map")
    raw_arrays = body.get("arrays")
    if not isinstance(raw_arrays, dict):
        raise WireError("field 'arrays' must be a map")
    return {name: _decode_array(name, spec) for name, spec in raw_arrays.items()}, meta


class _Truncated(Exception):
    pass


def _unpack(data: memoryview):
    """msgpack, decoded without copying binaries: `bin` values come back as memoryviews into
    `data`, so a frame array becomes a numpy view in place (msgpack's own unpackb copies
    every binary into a new bytes object: a whole extra copy of each batch). Only the types
    this format uses; extension types are refused; every length is checked against what is
    left, and nesting is bounded."""
    try:
        value, end = _unpack_at(data, 0, depth=0)
    except _Truncated:
        raise WireError("not a msgpack message: truncated") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise WireError(f"not a msgpack message: {error}") from None
    if end != len(data):
        raise WireError(f"not a msgpack message: {len(data) - end} bytes after the end")
    return value


_INT_FORMATS = {0xcc: ">B", 0xcd: ">H", 0xce: ">I", 0xcf: ">Q",
                0xd0: ">b", 0xd1: ">h", 0xd2: ">i", 0xd3: ">q", 0xca: ">f", 0xcb: ">d"}
_LENGTH_FORMATS = {0xd9: ">B", 0xda: ">H", 0xdb: ">I", 0xc4: ">B", 0xc5: ">H", 0xc6: ">I",
                   0xdc: ">H", 0xdd: ">I", 0xde: ">H", 0xdf: ">I"}


def _read(data: memoryview, position: int, size: int) -> memoryview:
    if position + size > len(data):
        raise _Truncated
    return data[position:position + size]


def _unpack_at(data: memoryview, position: int, depth: int):
    if depth > 32:
        raise ValueError("nested too deeply")
    tag = _read(data, position, 1)[0]
    position += 1
    if tag <= 0x7f:
        return tag, position
    if tag >= 0xe0:
        return tag - 0x100, position
    if tag in (0xc0, 0xc2, 0xc3):
        return {0xc0: None, 0xc2: False, 0xc3: True}[tag], position
    if tag in _INT_FORMATS:
        fmt = _INT_FORMATS[tag]
        size = struct.calcsize(fmt)
        return struct.unpack(fmt, _read(data, position, size))[0], position + size
    if 0xa0 <= tag <= 0xbf or 0x90 <= tag <= 0x9f or 0x80 <= tag <= 0x8f:
        length = tag & (0x1f if tag >= 0xa0 else 0x0f)
        kind = "str" if tag >= 0xa0 else "array" if tag >= 0x90 else "map"
    elif tag in _LENGTH_FORMATS:
        fmt = _LENGTH_FORMATS[tag]
        size = struct.calcsize(fmt)
        length = struct.unpack(fmt, _read(data, position, size))[0]
        position += size
        kind = ("str" if tag in (0xd9, 0xda, 0xdb) else "bin" if tag in (0xc4, 0xc5, 0xc6)
                else "array" if tag in (0xdc, 0xdd) else "map")
    else:
        raise ValueError(f"unsupported msgpack type 0x{tag:02x}")
    if kind in ("str", "bin"):
        raw = _read(data, position, length)
        return (str(raw, "utf-8") if kind == "str" else raw), position + length
    if length > len(data) - position:  # each element takes at least one byte
        raise _Truncated
    if kind == "array":
        items = []
        for _ in range(length):
            item, position = _unpack_at(data, position, depth + 1)
            items.append(item)
        return items, position
    mapping = {}
    for _ in range(length):
        key, position = _unpack_at(data, position, depth + 1)
        if not isinstance(key, str):
            raise ValueError(f"map key {key!r} is not a string")
        mapping[key], position = _unpack_at(data, position, depth + 1)
    return mapping, position


def _decode_array(name: str, spec) -> np.ndarray:
    if not isinstance(spec, dict) or set(spec) - {"codec"} != {"dtype", "shape", "data"}:
        raise WireError(f"array {name!r} must be a map with exactly dtype, shape, data "
                        f"(and optionally codec)")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if dtype not in ALLOWED_DTYPES:
        raise WireError(f"array {name!r} has dtype {dtype!r}, not one of {sorted(ALLOWED_DTYPES)}")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError(f"array {name!r} has invalid shape {shape!r}")
    if not isinstance(data, memoryview):
        raise WireError(f"array {name!r} data must be binary")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if "codec" in spec:
        data = _decompress(name, spec["codec"], data, expected)
    if len(data) != expected:
        raise WireError(f"array {name!r} of {dtype}{shape} needs {expected} bytes, "
                        f"got {len(data)}")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def _decompress(name: str, codec, data: memoryview, expected: int) -> bytes:
    """A compressed array's bytes, refused unless its frame declares exactly the size its
    dtype and shape need (so a forged size allocates nothing), and no larger than a whole
    message may be (so a small message cannot make the receiver allocate without bound)."""
    if codec != CODEC:
        raise WireError(f"array {name!r} has codec {codec!r}, not {CODEC!r}")
    if expected > MAX_MESSAGE_BYTES:
        raise WireError(f"array {name!r} would decompress to {expected} bytes, more than the "
                        f"{MAX_MESSAGE_BYTES} a message may hold")
    try:
        declared = zstandard.frame_content_size(data)
        if declared != expected:
            raise WireError(f"array {name!r} declares {declared} bytes uncompressed; its "
                            f"dtype and shape need {expected}")
        return _decompressor().decompress(data)
    except zstandard.ZstdError as error:
        raise WireError(f"array {name!r} is not valid zstd data: {error}") from None


def encode_transitions(frames: np.ndarray, obs_frames: np.ndarray, next_obs_frames: np.ndarray,
                       action: np.ndarray, reward: np.ndarray, discount: np.ndarray, *,
                       stream: int, first_frame: int,
                       priority: np.ndarray | None = None) -> memoryview:
    """The insert message an actor sends to a replay shard: `frames` are the sender's frames
    numbered first_frame, first_frame + 1, ... in its `stream`; each transition names the
    frames of its observation stack and next observation stack by those numbers."""
    arrays = {"frames": frames, "obs_frames": obs_frames.astype(np.int64, copy=False),
              "next_obs_frames": next_obs_frames.astype(np.int64, copy=False),
              "action": action.astype(np.int32, copy=False),
              "reward": reward.astype(np.float32, copy=False),
              "discount": discount.astype(np.float32, copy=False)}
    if priority is not None:
        arrays["priority"] = priority.astype(np.float32, copy=False)
    # Compressed, a chunk of Atari frames is small enough that Ray sends it inline with the
    # call instead of through its object store, which costs ~4 CPU-ms more per message.
    return encode(TRANSITIONS, arrays, {"stream": stream, "first_frame": first_frame},
                  compress=("frames",))


def decode_batch(message, out: dict[str, np.ndarray] | None = None
                 ) -> tuple[dict[str, np.ndarray], dict]:
    """A replay batch with its stacks rebuilt: `obs` and `next_obs` [k, B, *obs_shape] from the
    distinct frames and the per-item frame indices; the other fields as sent. `out` may hold
    arrays of the right shape to rebuild into (see BatchDecoder)."""
    arrays, meta = decode(message, expect_kind=BATCH)
    frames = arrays.pop("frames")
    obs_shape = meta.get("obs_shape")
    if not isinstance(obs_shape, list):
        raise WireError("batch meta needs 'obs_shape'")
    for name in ("obs_frames", "next_obs_frames"):
        index = arrays.pop(name)
        if index.size and (index.min() < 0 or index.max() >= len(frames)):
            raise WireError(f"{name!r} indexes outside the batch's {len(frames)} frames")
        field, shape = name.replace("_frames", ""), (*index.shape[:2], *obs_shape)
        target = None if out is None else out.get(field)
        if target is not None and target.shape == shape and target.dtype == frames.dtype:
            # mode="clip" (indices were checked above): with "raise" numpy buffers `out`.
            np.take(frames, index, axis=0, mode="clip",
                    out=target.reshape(*index.shape, *frames.shape[1:]))
            arrays[field] = target
        else:
            arrays[field] = np.take(frames, index, axis=0).reshape(shape)
    return arrays, meta


class BatchDecoder:
    """Decodes batches into a ring of `ring` reused sets of stack arrays. Rebuilding a batch
    of 512 stacks writes about 29 MB; into fresh memory every time that costs several times
    the copy itself here (page faults), into the same memory it does not. A consumer must be
    done with a batch before `ring` more have been decoded (a prefetch queue of depth d and
    one batch in training: ring = d + 2)."""

    def __init__(self, ring: int):
        self.ring = [dict() for _ in range(ring)]
        self.next = 0

    def __call__(self, message) -> tuple[dict[str, np.ndarray], dict]:
        out = self.ring[self.next]
        self.next = (self.next + 1) % len(self.ring)
        batch, meta = decode_batch(message, out)
        out.update(obs=batch["obs"], next_obs=batch["next_obs"])  # reuse from now on
        return batch, meta


def encode_priorities(key: np.ndarray, priority: np.ndarray) -> memoryview:
    return encode(PRIORITIES, {"key": key.astype(np.int64, copy=False).reshape(-1),
                               "priority": priority.astype(np.float32, copy=False).reshape(-1)})
