"""The msgpack wire format every role speaks: named numpy arrays as raw bytes.

A message is a msgpack map:
    {"format": "dqn-wire", "version": 3, "kind": <str>,
     "meta": {<str>: int | float | str | bool | None | [those]},
     "arrays": {<name>: {"dtype": <numpy dtype name>, "shape": [<int>, ...], "data": <bin>,
                         optional "codec": "zstd"}}}
`data` is the array's C-order bytes, little-endian, or with "codec" those bytes as one zstd
frame that declares their size. Decoding never executes code and checks every field, so a
truncated or forged message raises `WireError` naming what is wrong.

Memory is bounded per message: every array's dtype, shape and (compressed) declared size are
read from the message and checked, against a `Schema` when the receiver has one, before
anything is decompressed; the sizes together must fit the message's decoding budget, and each
frame is decompressed into at most the size its array needs.
"""
from __future__ import annotations

import math
import struct
import threading
from dataclasses import dataclass, field
from typing import Mapping, NamedTuple, TypeAlias, TypeGuard

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
MAX_MESSAGE_BYTES = 1 << 31  # also the default decoding budget: all arrays' bytes together
MAX_DIMENSIONS = 32  # numpy allows 64; no array of this project has more than 5
MAX_ELEMENTS = 1 << 59  # numpy sizes an array of up to 2^63 bytes, 8-byte items included
CODEC = "zstd"
COMPRESSION_LEVEL = 1  # zstd's fastest: Atari frames, mostly background, shrink well already
_codecs = threading.local()  # zstd (de)compressors are not safe to share between threads


# A message's bytes as they travel: `encode`'s view, a copy of it, or the uint8 array that Ray
# hands a receiver (`for_ray`).
Message: TypeAlias = "bytes | memoryview | np.ndarray"


class WireError(ValueError):
    """A message is not a valid dqn-wire message."""


@dataclass(frozen=True)
class Field:
    """One array of a message: exactly `dtype`, and a shape given dimension by dimension: an
    int is that size; a str names a size, the same wherever the name appears in the schema
    and at most the schema's limit for it."""
    dtype: str
    shape: tuple[int | str, ...]


@dataclass(frozen=True)
class Schema:
    """The arrays one kind of message carries. A message is checked against it from its
    header, before anything is decompressed, so decoding it takes at most `max_bytes`."""
    kind: str
    fields: dict[str, Field]
    limits: dict[str, int]  # the largest each named size may be
    optional: frozenset[str] = field(default_factory=frozenset)
    why: dict[str, str] = field(default_factory=dict)  # where a limit comes from, to say so

    @property
    def max_bytes(self) -> int:
        return sum(math.prod(self.limits[d] if isinstance(d, str) else d for d in f.shape)
                   * np.dtype(f.dtype).itemsize for f in self.fields.values())

    def check(self, arrays: dict) -> None:
        """Raises WireError unless `arrays` (anything with .dtype and .shape: numpy arrays or
        a message's declared arrays) fit the schema."""
        required = set(self.fields) - self.optional
        if not required <= set(arrays) <= set(self.fields):
            optional = f" (and optionally {_names(self.optional)})" if self.optional else ""
            raise WireError(f"a {self.kind} message must have fields {_names(required)}"
                            f"{optional}, got {sorted(arrays)}")
        sizes: dict[str, int] = {}
        for name, array in arrays.items():
            expected, shape = self.fields[name], tuple(array.shape)
            if np.dtype(array.dtype) != np.dtype(expected.dtype):
                raise WireError(f"{name!r} has dtype {np.dtype(array.dtype).name}, expected "
                                f"{expected.dtype}")
            pattern = ", ".join(map(str, expected.shape))
            if len(shape) != len(expected.shape) or any(
                    isinstance(want, int) and size != want
                    for size, want in zip(shape, expected.shape)):
                raise WireError(f"{name!r} has shape {shape}, expected ({pattern})")
            for size, want in zip(shape, expected.shape):
                if isinstance(want, str) and sizes.setdefault(want, size) != size:
                    raise WireError(f"{name!r} has shape {shape}: {size} {want}, but another "
                                    f"field has {sizes[want]}")
                if isinstance(want, str) and size > self.limits[want]:
                    why = f" ({self.why[want]})" if want in self.why else ""
                    raise WireError(f"{name!r} has shape {shape}: {size} {want}, more than "
                                    f"the {self.limits[want]} a message may hold{why}")


class Gather(NamedTuple):
    """An array given as rows of another, `source[rows]`: `encode` gathers the rows straight
    into the message instead of into a temporary first (a replay batch's frames)."""
    source: np.ndarray
    rows: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.source.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.source.dtype

    @property
    def nbytes(self) -> int:
        return len(self.rows) * self.source[:1].nbytes


def encode(kind: str, arrays: Mapping[str, np.ndarray | Gather], meta: dict | None = None,
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
        data: np.ndarray | Gather | bytes = array
        if name in compress and nbytes:
            rows = array.source[array.rows] if isinstance(array, Gather) else array
            packed = _compressor().compress(
                np.ascontiguousarray(rows, dtype.newbyteorder("<")).data)
            if len(packed) < nbytes:
                data, nbytes, codec = packed, len(packed), [_pack("codec"), _pack(CODEC)]
        parts += [_pack(name), _map_header(3 + len(codec) // 2), *codec,
                  _pack("dtype"), _pack(dtype.name), _pack("shape"), _pack(shape),
                  _pack("data"), b"\xc6" + nbytes.to_bytes(4, "big"), data]  # bin 32
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
            np.take(part.source, part.rows, axis=0, mode="clip",
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


def decode(message: Message, expect_kind: str | None = None, schema: Schema | None = None,
           max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict[str, np.ndarray], dict]:
    """Return (arrays, meta). Arrays are read-only views into `message` (compressed ones into
    their decompressed bytes): copy to keep them. With a `schema`, the arrays must fit it;
    without one, they may decode to `max_bytes` together."""
    declared, meta = read_header(message, expect_kind)
    if schema is not None:
        schema.check(declared)
    return decode_arrays(declared, max_bytes), meta


def _names(names) -> str:
    *others, last = sorted(names)
    return f"{', '.join(others)} and {last}" if others else last


class Declared(NamedTuple):
    """An array as a message declares it, checked but not yet decompressed."""
    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    compressed: bool

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize


def read_header(message, expect_kind: str | None = None) -> tuple[dict[str, Declared], dict]:
    """A message's declared arrays and its meta, every field checked, nothing decompressed."""
    if isinstance(message, np.ndarray):
        if message.dtype != np.uint8 or message.ndim != 1:
            raise WireError(f"an array message must be 1-d uint8, got {message.dtype}"
                            f"{list(message.shape)}")
    elif not isinstance(message, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(message).__name__}")
    view = memoryview(message)
    if not view.c_contiguous:  # a strided view of someone's buffer, not a message
        raise WireError("message must be contiguous bytes")
    if view.nbytes > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {view.nbytes} bytes exceeds {MAX_MESSAGE_BYTES}")
    body = _unpack(view.cast("B"))
    # Each field's type is checked before its value is compared, hashed or used as a key: a
    # list where a string belongs must be refused like any other wrong value.
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        raise WireError(f"not a {FORMAT} message (no 'format': '{FORMAT}' field)")
    version = body.get("version")
    if not _is_int(version) or version != VERSION:
        raise WireError(f"unsupported {FORMAT} version {clip(version)}; "
                        f"this build reads version {VERSION}")
    kind = body.get("kind")
    if not isinstance(kind, str):
        raise WireError(f"field 'kind' must be a string, got {clip(kind)}")
    if expect_kind is not None and kind != expect_kind:
        raise WireError(f"expected a {expect_kind!r} message, got {clip(kind)}")
    meta = body.get("meta")
    if not isinstance(meta, dict):
        raise WireError("field 'meta' must be a map")
    for key, value in meta.items():
        if not (isinstance(value, _META_SCALARS) or isinstance(value, list)
                and all(isinstance(item, _META_SCALARS) for item in value)):
            raise WireError(f"meta {clip(key)} is {clip(value)}: a meta value must be nil, "
                            f"a bool, a number, a string or a list of those")
    raw_arrays = body.get("arrays")
    if not isinstance(raw_arrays, dict):
        raise WireError("field 'arrays' must be a map")
    return {name: _declare(name, spec) for name, spec in raw_arrays.items()}, meta


_META_SCALARS = (type(None), bool, int, float, str)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(shape) -> TypeGuard[list[int]]:
    """A list of at most MAX_DIMENSIONS sizes in [0, MAX_MESSAGE_BYTES] whose nonzero ones
    multiply to less than MAX_ELEMENTS. (Only an empty array needs that check here: numpy
    refuses one whose other sizes overflow its index type; a nonempty one must bring its
    bytes.)"""
    return (isinstance(shape, list) and len(shape) <= MAX_DIMENSIONS
            and all(_is_int(d) and 0 <= d <= MAX_MESSAGE_BYTES for d in shape)
            and math.prod(d for d in shape if d) < MAX_ELEMENTS)


def decode_arrays(declared: dict[str, Declared], max_bytes: int = MAX_MESSAGE_BYTES
                  ) -> dict[str, np.ndarray]:
    """The arrays themselves, once their sizes together are known to fit `max_bytes`."""
    total = sum(array.nbytes for array in declared.values())
    if total > max_bytes:
        raise WireError(f"message would decode to {total} bytes, more than its budget of "
                        f"{max_bytes}")
    return {name: _decode_array(name, array) for name, array in declared.items()}


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


def _declare(name: str, spec) -> Declared:
    """Checks an array's declaration; a compressed one's zstd frame must declare exactly the
    size its dtype and shape need (read from the frame header only)."""
    if not isinstance(spec, dict) or set(spec) - {"codec"} != {"dtype", "shape", "data"}:
        raise WireError(f"array {name!r} must be a map with exactly dtype, shape, data "
                        f"(and optionally codec)")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if not isinstance(dtype, str) or dtype not in ALLOWED_DTYPES:
        raise WireError(f"array {name!r} has dtype {clip(dtype)}, "
                        f"not one of {sorted(ALLOWED_DTYPES)}")
    if not _is_shape(shape):
        raise WireError(f"array {name!r} has invalid shape {clip(shape)} (at most "
                        f"{MAX_DIMENSIONS} sizes, each from 0 to {MAX_MESSAGE_BYTES}, the "
                        f"nonzero ones multiplying to less than {MAX_ELEMENTS})")
    if not isinstance(data, memoryview):
        raise WireError(f"array {name!r} data must be binary")
    array = Declared(dtype, tuple(shape), data, "codec" in spec)
    if array.compressed:
        if spec["codec"] != CODEC:
            raise WireError(f"array {name!r} has codec {clip(spec['codec'])}, not {CODEC!r}")
        try:
            declared = zstandard.frame_content_size(data)
        except zstandard.ZstdError as error:
            raise WireError(f"array {name!r} is not valid zstd data: {error}") from None
        if declared != array.nbytes:
            raise WireError(f"array {name!r} declares {declared} bytes uncompressed; its "
                            f"dtype and shape need {array.nbytes}")
    elif len(data) != array.nbytes:
        raise WireError(f"array {name!r} of {dtype}{shape} needs {array.nbytes} bytes, "
                        f"got {len(data)}")
    return array


def clip(value) -> str:
    """A value for an error message: one line, however large the value is."""
    text = f"bin[{value.nbytes}]" if isinstance(value, memoryview) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _decode_array(name: str, array: Declared) -> np.ndarray:
    data: memoryview | bytes = array.data
    if array.compressed:
        try:
            # Bounded twice: the frame was checked to declare exactly nbytes, and the output
            # may not grow past it whatever the frame says.
            data = _decompressor().decompress(data, max_output_size=array.nbytes,
                                              allow_extra_data=False)
        except zstandard.ZstdError as error:
            raise WireError(f"array {name!r} is not valid zstd data: {error}") from None
        if len(data) != array.nbytes:
            raise WireError(f"array {name!r} decompressed to {len(data)} bytes, not the "
                            f"{array.nbytes} it declares")
    return np.frombuffer(data, np.dtype(array.dtype).newbyteorder("<")).reshape(array.shape)


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
    # call instead of through its object store, which costs more CPU per message.
    return encode(TRANSITIONS, arrays, {"stream": stream, "first_frame": first_frame},
                  compress=("frames",))


def decode_batch(message: Message, out: dict[str, np.ndarray] | None = None,
                 max_bytes: int = MAX_MESSAGE_BYTES) -> tuple[dict[str, np.ndarray], dict]:
    """A replay batch with its stacks rebuilt: `obs` and `next_obs` [k, B, *obs_shape] from the
    distinct frames and the per-item frame indices; the other fields as sent. `out` may hold
    arrays of the right shape to rebuild into (see BatchDecoder). The arrays and the stacks
    rebuilt from them may take `max_bytes` together."""
    declared, meta = read_header(message, expect_kind=BATCH)
    obs_shape, stack_bytes = _check_batch(declared, meta)
    arrays = decode_arrays(declared, max_bytes - 2 * stack_bytes)
    frames = arrays.pop("frames")
    for name in ("obs_frames", "next_obs_frames"):
        index = arrays.pop(name)
        if index.size and (index.min() < 0 or index.max() >= len(frames)):
            raise WireError(f"{name!r} indexes outside the batch's {len(frames)} frames")
        stacks, shape = name.replace("_frames", ""), (*index.shape[:2], *obs_shape)
        target = None if out is None else out.get(stacks)
        if target is not None and target.shape == shape and target.dtype == frames.dtype:
            # mode="clip" (indices were checked above): with "raise" numpy buffers `out`.
            np.take(frames, index, axis=0, mode="clip",
                    out=target.reshape(*index.shape, *frames.shape[1:]))
            arrays[stacks] = target
        else:
            arrays[stacks] = np.take(frames, index, axis=0).reshape(shape)
    return arrays, meta


def _check_batch(declared: dict[str, Declared], meta: dict) -> tuple[list[int], int]:
    """A batch's structure, from its header: every per-item array [k, B], the stacks' frame
    indices [k, B, stack]; returns (obs_shape, bytes of the obs stacks it rebuilds)."""
    missing = {"frames", "obs_frames", "next_obs_frames"} - set(declared)
    if missing:
        raise WireError(f"a batch needs arrays {sorted(missing)}")
    frames, index = declared["frames"], declared["obs_frames"]
    if not frames.shape:
        raise WireError("batch 'frames' must have a leading frame axis")
    for name in ("obs_frames", "next_obs_frames"):
        array = declared[name]
        if np.dtype(array.dtype).kind not in "iu" or len(array.shape) != 3 \
                or array.shape != index.shape:
            raise WireError(f"batch {name!r} must be integers [k, B, stack] like 'obs_frames', "
                            f"got {array.dtype}{list(array.shape)}")
    for name, array in declared.items():
        if name not in ("frames", "obs_frames", "next_obs_frames") \
                and array.shape != index.shape[:2]:
            raise WireError(f"batch {name!r} has shape {list(array.shape)}, not the "
                            f"{list(index.shape[:2])} of its items")
    slots, frame_size = math.prod(index.shape), math.prod(frames.shape[1:])
    obs_shape = meta.get("obs_shape")
    if (not _is_shape(obs_shape) or not _is_shape([*index.shape[:2], *obs_shape])
            or math.prod(obs_shape) != index.shape[2] * frame_size):
        raise WireError(f"batch meta 'obs_shape' {clip(obs_shape)} is not {index.shape[2]} "
                        f"frames of shape {list(frames.shape[1:])}")
    if frames.shape[0] > 2 * slots:  # the sender sends each frame the stacks name, once
        raise WireError(f"a batch of {2 * slots} stack frames carries {frames.shape[0]} "
                        f"distinct frames")
    return obs_shape, slots * frame_size * np.dtype(frames.dtype).itemsize


class BatchDecoder:
    """Decodes batches into a ring of `ring` reused sets of stack arrays. Rebuilding a batch
    of 512 stacks writes about 29 MB; into fresh memory every time that costs several times
    the copy itself here (page faults), into the same memory it does not. A consumer must be
    done with a batch before `ring` more have been decoded (a prefetch queue of depth d and
    one batch in training: ring = d + 2)."""

    def __init__(self, ring: int):
        self.ring: list[dict[str, np.ndarray]] = [{} for _ in range(ring)]
        self.next = 0

    def __call__(self, message: Message) -> tuple[dict[str, np.ndarray], dict]:
        out = self.ring[self.next]
        self.next = (self.next + 1) % len(self.ring)
        batch, meta = decode_batch(message, out)
        out.update(obs=batch["obs"], next_obs=batch["next_obs"])  # reuse from now on
        return batch, meta


def encode_priorities(key: np.ndarray, priority: np.ndarray) -> memoryview:
    return encode(PRIORITIES, {"key": key.astype(np.int64, copy=False).reshape(-1),
                               "priority": priority.astype(np.float32, copy=False).reshape(-1)})
