"""Replay snapshots: a shard's whole state in one versioned msgpack file, never pickle.

The file is a sequence of msgpack maps:
    header  {"format": "dqn-replay-snapshot", "version": 1, "spec": {...}, "state": {...},
             "arrays": {name: {"dtype": str, "shape": [per-row dims], "first": int,
                               "rows": int}}}
    piece   {"array": name, "start": int, "rows": int, "codec": "zstd" | "raw",
             "crc32": int (of the raw bytes), "data": bin}          (repeated)
    footer  {"end": true, "pieces": int}
Pieces of each array tile its rows [first, first + rows) in order. Atari frames (mostly
background) compress very well at zstd's fastest level, index arrays less so; each piece is
stored compressed only where that pays. The file is written to `<path>.tmp`, fsynced and renamed,
so a crash leaves the previous snapshot intact.

`write_snapshot` holds the replay's lock only to copy the row arrays (tens of bytes per
transition) and then one piece of frames at a time, so inserts go on while it writes. An
insert about to overwrite frames the snapshot has not saved yet copies them aside first
(`FrameSaver.rescue`), so the file is the state at the moment the snapshot began.
`read_snapshot` checks everything (format, version, codec, checksums, tiling, the footer)
and builds a new buffer; the running one is only replaced once that has succeeded. Sizes are
checked before anything is allocated or decompressed (each array's declared dtype, shape and
rows against this shard's spec; each piece's size, and a compressed piece's declared size,
against the rows it claims); the content as strictly as an insert's, and the state it makes
against every invariant the running shard relies on (`ReplayBuffer.check_invariants`: bounded
priorities and a finite sum, consistent counters, each row's frames, the stream table, the
random state), so a restored shard can sample, update and insert.
"""
from __future__ import annotations

import collections
import contextlib
import os
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ContextManager, TypeGuard

import msgpack
import numpy as np
import zstandard

from common.wire import clip
from replay_server.buffer import COUNT_LIMIT, ReplayBuffer, ReplaySpec
from replay_server.streams import StreamTable

FORMAT = "dqn-replay-snapshot"
VERSION = 1
PIECE_BYTES = 8 << 20
COMPRESSION_PAYS = 0.9  # keep the compressed piece when it is at most this fraction
ROW_ARRAYS = ("obs_slots", "next_slots", "oldest_frame", "action", "reward", "discount")


class SnapshotError(ValueError):
    """A snapshot file is missing, truncated, altered, or from another kind of shard."""


class SnapshotWriter:
    """Writes one snapshot file atomically: pieces go to `<path>.tmp`, `close()` renames."""

    def __init__(self, path: str | os.PathLike, header: dict):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.file = open(self.tmp, "wb")
        self.packer = msgpack.Packer(use_bin_type=True)
        self.compressor = zstandard.ZstdCompressor(level=1)
        self.pieces = 0
        self.bytes = 0
        try:
            self._write(header)
        except BaseException:
            self.abort()
            raise

    def _write(self, obj) -> None:
        data = self.packer.pack(obj)
        self.file.write(data)
        self.bytes += len(data)

    def write_array(self, name: str, start: int, array: np.ndarray) -> None:
        """Rows `start ..` of array `name`, split into pieces of about PIECE_BYTES."""
        array = np.ascontiguousarray(array)
        row_bytes = max(1, array[:1].nbytes)
        step = max(1, PIECE_BYTES // row_bytes)
        for offset in range(0, len(array), step):
            raw = array[offset:offset + step].tobytes()
            packed = self.compressor.compress(raw)
            codec, data = ("zstd", packed) if len(packed) <= COMPRESSION_PAYS * len(raw) \
                else ("raw", raw)
            self._write({"array": name, "start": start + offset,
                         "rows": len(array[offset:offset + step]), "codec": codec,
                         "crc32": zlib.crc32(raw), "data": data})
            self.pieces += 1

    def close(self) -> int:
        self._write({"end": True, "pieces": self.pieces})
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
        return self.bytes

    def abort(self) -> None:
        """Remove the temporary file. Never raises: the error that made the writer give up is
        the one to report (on a full disk, closing fails again as it flushes the buffer)."""
        with contextlib.suppress(OSError):
            self.file.close()  # closes the descriptor even when the flush fails
        with contextlib.suppress(OSError):
            self.tmp.unlink(missing_ok=True)


class FrameSaver:
    """Hands out the frames of a snapshot oldest first, one piece at a time, and rescues the
    ones an insert is about to overwrite before the snapshot reached them."""

    def __init__(self, buffer: ReplayBuffer, first: int, end: int):
        self.buffer, self.end = buffer, end
        self.next = first  # next global frame serial not yet handed out or rescued
        self.rescued: collections.deque = collections.deque()

    def _copy(self, first: int, last: int) -> tuple[int, np.ndarray]:
        slots = np.arange(first, last) % self.buffer.spec.frame_capacity
        return first, self.buffer.frames[slots]

    def rescue(self, lost_from: int, lost_to: int) -> None:
        """Called (under the replay's lock) before frames [lost_from, lost_to) are lost."""
        first, last = max(lost_from, self.next), min(lost_to, self.end)
        if first < last:
            self.rescued.append(self._copy(first, last))
            self.next = last

    def take(self, max_frames: int) -> tuple[int, np.ndarray] | None:
        """The next piece (first serial, frames), or None when all are handed out. Call
        under the replay's lock."""
        if self.rescued:
            return self.rescued.popleft()
        if self.next >= self.end:
            return None
        piece = self._copy(self.next, min(self.next + max_frames, self.end))
        self.next += len(piece[1])
        return piece


def write_snapshot(buffer: ReplayBuffer, path: str | os.PathLike, lock: ContextManager[Any],
                   extra_state: Callable[[], dict] | None = None) -> dict:
    """Write `buffer` (and what `extra_state()` returns, e.g. the rate limiter's counters,
    read under `lock` with the buffer's, so both are of one moment) to `path`.
    Returns {"bytes", "frames", "transitions"}."""
    with lock:
        rows = min(buffer.transitions_written, buffer.capacity)
        copies = {name: getattr(buffer, name)[:rows].copy() for name in ROW_ARRAYS}
        copies["leaves"] = buffer.tree.leaves[:rows].copy()
        first_frame = max(0, buffer.frames_written - buffer.spec.frame_capacity)
        saver = FrameSaver(buffer, first_frame, buffer.frames_written)
        header: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "spec": buffer.spec.to_dict(),
            "state": {**buffer.counters(), "streams": buffer.streams.state(),
                      "extra": extra_state() if extra_state else {}},
            "arrays": {name: {"dtype": array.dtype.name, "shape": list(array.shape[1:]),
                              "first": 0, "rows": rows} for name, array in copies.items()}}
        header["arrays"]["frames"] = {"dtype": buffer.frames.dtype.name,
                                      "shape": list(buffer.frames.shape[1:]),
                                      "first": first_frame,
                                      "rows": buffer.frames_written - first_frame}
        buffer.snapshot_hook = saver.rescue
    try:  # (the hook goes whatever fails, the writer's opening too)
        writer = SnapshotWriter(path, header)
        try:
            for name, array in copies.items():
                writer.write_array(name, 0, array)
            del copies
            frame_bytes = max(1, buffer.frames[:1].nbytes)
            while True:
                with lock:
                    piece = saver.take(max(1, PIECE_BYTES // frame_bytes))
                if piece is None:
                    break
                writer.write_array("frames", *piece)
            written = writer.close()
        except BaseException:
            writer.abort()
            raise
    finally:
        with lock:
            buffer.snapshot_hook = None
    return {"bytes": written, "frames": header["arrays"]["frames"]["rows"],
            "transitions": rows}


def _read_objects(path: Path):
    try:
        file = open(path, "rb")
    except OSError as error:
        raise SnapshotError(f"cannot open replay snapshot {path}: {error.strerror}") from None
    with file:
        unpacker = msgpack.Unpacker(file, raw=False, strict_map_key=True,
                                    max_buffer_size=PIECE_BYTES * 4)
        try:
            yield from unpacker
        except Exception as error:  # msgpack raises several unrelated types on garbage
            raise SnapshotError(f"replay snapshot {path} is corrupt: "
                                f"{type(error).__name__}: {error}") from None


def read_snapshot(path: str | os.PathLike, spec: ReplaySpec, seed: int = 0
                  ) -> tuple[ReplayBuffer, dict]:
    """A new buffer holding the snapshot at `path`, which must be of a shard with `spec`;
    and the snapshot's extra state. Raises SnapshotError naming the problem."""
    path = Path(path)
    objects = _read_objects(path)
    header = next(objects, None)
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise SnapshotError(f"{path} is not a replay snapshot (no {FORMAT!r} header)")
    if header.get("version") != VERSION:
        raise SnapshotError(f"{path}: snapshot version {header.get('version')!r} is not the "
                            f"version {VERSION} this build reads")
    if header.get("spec") != spec.to_dict():
        raise SnapshotError(f"{path} holds a shard with spec {header.get('spec')}, not this "
                            f"shard's {spec.to_dict()}")
    buffer = ReplayBuffer(spec, seed)  # its arrays are paged in only as they are filled
    arrays = _allocate(path, header.get("arrays"), _layout(buffer))
    decompressor = zstandard.ZstdDecompressor()
    pieces = 0
    for obj in objects:
        if not isinstance(obj, dict):
            raise SnapshotError(f"{path}: unexpected object after piece {pieces}")
        if obj.get("end") is True:
            if obj.get("pieces") != pieces:
                raise SnapshotError(f"{path}: footer counts {obj.get('pieces')} pieces, "
                                    f"found {pieces}")
            break
        _place_piece(path, obj, arrays, decompressor)
        pieces += 1
    else:
        raise SnapshotError(f"{path} is truncated: no footer after {pieces} pieces")
    for name, array in arrays.items():
        if array["filled"] != len(array["data"]):
            raise SnapshotError(f"{path}: array {name!r} has {array['filled']} of "
                                f"{len(array['data'])} rows")
    return _build_buffer(path, buffer, header.get("state"), arrays)


def _layout(buffer: ReplayBuffer) -> dict[str, np.ndarray]:
    """The arrays a snapshot holds, as the buffer keeps them: their dtypes, row shapes and
    row counts are the most a snapshot of it may declare."""
    return {**{name: getattr(buffer, name) for name in ROW_ARRAYS},
            "leaves": buffer.tree.leaves, "frames": buffer.frames}


def _allocate(path: Path, declared, layout: dict[str, np.ndarray]) -> dict:
    """Room for each declared array, once its declaration fits the layout."""
    if not isinstance(declared, dict) or set(declared) != set(layout):
        raise SnapshotError(f"{path}: header must declare arrays {sorted(layout)}")
    arrays = {}
    for name, info in declared.items():
        like = layout[name]
        first, rows = (info.get("first"), info.get("rows")) if isinstance(info, dict) else (0, 0)
        if (not isinstance(info, dict) or info.get("dtype") != like.dtype.name
                or info.get("shape") != list(like.shape[1:])
                or not _is_count(first) or (first and name != "frames")
                or not _is_count(rows) or rows > len(like)):
            raise SnapshotError(
                f"{path}: array {name!r} is declared as {clip(info)}; this shard stores "
                f"{like.dtype.name}{list(like.shape[1:])} rows, at most {len(like)}")
        arrays[name] = {"first": first, "filled": 0,
                        "data": np.empty((rows, *like.shape[1:]), like.dtype)}
    return arrays


def _is_count(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _place_piece(path: Path, piece: dict, arrays: dict, decompressor) -> None:
    name = piece.get("array")
    if not isinstance(name, str) or name not in arrays:
        raise SnapshotError(f"{path}: piece of unknown array {clip(name)}")
    target = arrays[name]
    data, rows, filled = piece.get("data"), piece.get("rows"), target["filled"]
    if piece.get("start") != target["first"] + filled or not isinstance(data, bytes):
        raise SnapshotError(f"{path}: piece of {name!r} out of order or malformed")
    if not _is_count(rows) or not 0 < rows <= len(target["data"]) - filled:
        raise SnapshotError(f"{path}: piece of {name!r} has {clip(rows)} rows; "
                            f"{len(target['data']) - filled} are left to fill")
    destination = target["data"][filled:filled + rows]
    if piece.get("codec") == "zstd":
        data = _decompress(path, name, data, destination.nbytes, decompressor)
    elif piece.get("codec") != "raw":
        raise SnapshotError(f"{path}: unknown codec {clip(piece.get('codec'))}")
    if len(data) != destination.nbytes:
        raise SnapshotError(f"{path}: piece of {name!r} has {len(data)} bytes; its {rows} rows "
                            f"need {destination.nbytes}")
    if zlib.crc32(data) != piece.get("crc32"):
        raise SnapshotError(f"{path}: checksum mismatch in a piece of {name!r}")
    destination.reshape(-1).view(np.uint8)[:] = np.frombuffer(data, np.uint8)
    target["filled"] += rows


def _decompress(path: Path, name: str, data: bytes, size: int, decompressor) -> bytes:
    """A compressed piece's bytes, refused unless its frame declares exactly `size` (read
    from the frame header, before anything is allocated)."""
    try:
        declared = zstandard.frame_content_size(data)
        if declared != size:
            raise SnapshotError(f"{path}: piece of {name!r} declares {declared} bytes "
                                f"uncompressed; its rows need {size}")
        return decompressor.decompress(data, max_output_size=size, allow_extra_data=False)
    except zstandard.ZstdError as error:
        raise SnapshotError(f"{path}: piece of {name!r} does not decompress: "
                            f"{error}") from None


def _build_buffer(path: Path, buffer: ReplayBuffer, state, arrays: dict
                  ) -> tuple[ReplayBuffer, dict]:
    """`buffer` filled from the snapshot's arrays and counters, once they agree with each
    other and the buffer holds every invariant a running shard relies on
    (`ReplayBuffer.check_invariants`: values an insert could have stored, priorities, counters,
    frames, the stream table, the random state)."""
    spec = buffer.spec
    try:
        if not isinstance(state, dict) or not isinstance(state.get("extra", {}), dict):
            raise ValueError("the state must be a map with a map 'extra'")
        frames_written, transitions_written, scan_key, stale_dropped = (
            _count(state, key) for key in ("frames_written", "transitions_written",
                                           "scan_key", "stale_dropped"))
        rows = min(transitions_written, spec.capacity)
        frames = arrays["frames"]
        if (frames["first"] != max(0, frames_written - spec.frame_capacity)
                or frames["first"] + len(frames["data"]) != frames_written
                or any(len(arrays[name]["data"]) != rows for name in (*ROW_ARRAYS, "leaves"))
                or scan_key > transitions_written):
            raise ValueError("array sizes disagree with the counters")
        data = {name: array["data"] for name, array in arrays.items()}
        streams = StreamTable.from_state(state["streams"], frames_written)
        slots = np.arange(frames["first"], frames_written) % spec.frame_capacity
        buffer.frames[slots] = frames["data"]
        for name in ROW_ARRAYS:
            getattr(buffer, name)[:rows] = data[name]
        all_leaves = np.zeros(spec.capacity)
        all_leaves[:rows] = data["leaves"]
        with np.errstate(over="ignore", invalid="ignore"):  # forged leaves: refused below
            buffer.tree.set_all(all_leaves)
        buffer.live = int(np.count_nonzero(data["leaves"]))
        buffer.frames_written, buffer.transitions_written = frames_written, transitions_written
        buffer.scan_key, buffer.max_priority = scan_key, state["max_priority"]
        buffer.stale_dropped, buffer.streams = stale_dropped, streams
        buffer.set_rng_state(state["rng"])
        buffer.check_invariants()
        return buffer, dict(state.get("extra", {}))
    except KeyError as error:
        raise SnapshotError(f"{path}: invalid snapshot content: no field {error}") from None
    except (TypeError, ValueError, AttributeError, OverflowError) as error:
        # InvalidTransitions (a bad value) is a ValueError; the others: a value of the wrong
        # kind or size that slipped past a check (none should).
        raise SnapshotError(f"{path}: invalid snapshot content: {error}") from None


def _count(state: dict, key: str) -> int:
    if not _is_count(state[key]) or state[key] >= COUNT_LIMIT:
        raise ValueError(f"{key} {clip(state[key])} is not a count below 2**62")
    return state[key]

