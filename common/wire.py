"""The msgpack wire format every role speaks: named numpy arrays as raw bytes.

A message is a msgpack map:
    {"format": "dqn-wire", "version": 1, "kind": <str>,
     "meta": {<str>: int | float | str | bool | None | [those]},
     "arrays": {<name>: {"dtype": <numpy dtype name>, "shape": [<int>, ...], "data": <bin>}}}
`data` is the array's C-order bytes, little-endian. Decoding never executes code and checks
every field, so a truncated or forged message raises `WireError` naming what is wrong.
"""
from __future__ import annotations

import math

import msgpack
import numpy as np

FORMAT = "dqn-wire"
TRANSITIONS = "transitions"  # actor -> replay: new frames, n-step transitions naming them
BATCH = "batch"  # replay -> learner: distinct frames once, index arrays, weights, keys
PRIORITIES = "priorities"  # learner -> replay: new priorities by transition key
VERSION = 2
ALLOWED_DTYPES = frozenset(
    {"uint8", "int8", "int32", "int64", "uint32", "float16", "float32", "float64", "bool"})
MAX_MESSAGE_BYTES = 1 << 31


class WireError(ValueError):
    """A message is not a valid dqn-wire message."""


def encode(kind: str, arrays: dict[str, np.ndarray], meta: dict | None = None) -> bytes:
    packed = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.name not in ALLOWED_DTYPES:
            raise WireError(f"array {name!r} has dtype {array.dtype.name}, "
                            f"not one of {sorted(ALLOWED_DTYPES)}")
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        packed[name] = {"dtype": array.dtype.name, "shape": list(array.shape),
                        "data": np.ascontiguousarray(little).data}
    return msgpack.packb({"format": FORMAT, "version": VERSION, "kind": kind,
                          "meta": meta or {}, "arrays": packed}, use_bin_type=True)


def decode(message: bytes, expect_kind: str | None = None) -> tuple[dict[str, np.ndarray], dict]:
    """Return (arrays, meta). Arrays are read-only views into `message`: copy to keep them."""
    if not isinstance(message, (bytes, bytearray, memoryview)):
        raise WireError(f"message must be bytes, got {type(message).__name__}")
    if len(message) > MAX_MESSAGE_BYTES:
        raise WireError(f"message of {len(message)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        body = msgpack.unpackb(message, raw=False, strict_map_key=True)
    except Exception as error:  # msgpack raises several unrelated types on garbage
        raise WireError(f"not a msgpack message: {type(error).__name__}: {error}") from None
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


def _decode_array(name: str, spec) -> np.ndarray:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data"}:
        raise WireError(f"array {name!r} must be a map with exactly dtype, shape, data")
    dtype, shape, data = spec["dtype"], spec["shape"], spec["data"]
    if dtype not in ALLOWED_DTYPES:
        raise WireError(f"array {name!r} has dtype {dtype!r}, not one of {sorted(ALLOWED_DTYPES)}")
    if (not isinstance(shape, list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
        raise WireError(f"array {name!r} has invalid shape {shape!r}")
    if not isinstance(data, bytes):
        raise WireError(f"array {name!r} data must be binary")
    expected = math.prod(shape) * np.dtype(dtype).itemsize
    if len(data) != expected:
        raise WireError(f"array {name!r} of {dtype}{shape} needs {expected} bytes, "
                        f"got {len(data)}")
    return np.frombuffer(data, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def encode_transitions(frames: np.ndarray, obs_frames: np.ndarray, next_obs_frames: np.ndarray,
                       action: np.ndarray, reward: np.ndarray, discount: np.ndarray, *,
                       stream: int, first_frame: int,
                       priority: np.ndarray | None = None) -> bytes:
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
    return encode(TRANSITIONS, arrays, {"stream": stream, "first_frame": first_frame})


def decode_batch(message: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """A replay batch with its stacks rebuilt: `obs` and `next_obs` [k, B, *obs_shape] from the
    distinct frames and the per-item frame indices; the other fields as sent."""
    arrays, meta = decode(message, expect_kind=BATCH)
    frames = arrays.pop("frames")
    obs_shape = meta.get("obs_shape")
    if not isinstance(obs_shape, list):
        raise WireError("batch meta needs 'obs_shape'")
    for name in ("obs_frames", "next_obs_frames"):
        index = arrays.pop(name)
        if index.size and (index.min() < 0 or index.max() >= len(frames)):
            raise WireError(f"{name!r} indexes outside the batch's {len(frames)} frames")
        stacked = np.take(frames, index, axis=0)
        arrays[name.replace("_frames", "")] = stacked.reshape(*index.shape[:2], *obs_shape)
    return arrays, meta


def encode_priorities(key: np.ndarray, priority: np.ndarray) -> bytes:
    return encode(PRIORITIES, {"key": key.astype(np.int64, copy=False).reshape(-1),
                               "priority": priority.astype(np.float32, copy=False).reshape(-1)})
