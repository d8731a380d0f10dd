"""The msgpack wire format every role speaks: named numpy arrays as raw bytes.

A message is a msgpack map:
    {"format": "dqn-wire", "version": 1, "kind": <str>,
     "meta": {<str>: int | float | str | bool | None},
     "arrays": {<name>: {"dtype": <numpy dtype name>, "shape": [<int>, ...], "data": <bin>}}}
`data` is the array's C-order bytes, little-endian. Decoding never executes code and checks
every field, so a truncated or forged message raises `WireError` naming what is wrong.
"""
from __future__ import annotations

import math

import msgpack
import numpy as np

FORMAT = "dqn-wire"
TRANSITIONS = "transitions"  # actor -> replay: obs, action, reward, discount, next_obs
BATCH = "batch"  # replay -> learner: the same fields plus index
VERSION = 1
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


def encode_transitions(obs: np.ndarray, action: np.ndarray, reward: np.ndarray,
                       discount: np.ndarray, next_obs: np.ndarray) -> bytes:
    """The insert message an actor sends to the replay service."""
    return encode(TRANSITIONS, {
        "obs": obs, "action": action.astype(np.int32, copy=False),
        "reward": reward.astype(np.float32, copy=False),
        "discount": discount.astype(np.float32, copy=False), "next_obs": next_obs})
