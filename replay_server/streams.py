"""Where each sender's frames went: the table that lets a chunk refer to frames it sent before.

A sender (one actor process) numbers its frames 0, 1, 2, ... in one `stream`; each chunk
carries frames `first_frame .. first_frame + m - 1` and transitions that name frames by those
numbers, including frames of the sender's earlier chunks (a stack or an n-step transition
reaches a few steps back). The replay writes each chunk's frames contiguously into its frame
ring, so a stream's history is a short list of ranges (first number, count, first global
frame serial). Ranges are dropped once their frames have left the ring, streams once all of
theirs have; both checks cost O(1) per insert, however many streams there are. The next
number each stream may send is remembered longer (for the last MAX_REMEMBERED_STREAMS
streams), so a sender that was silent while its frames left the ring can go on.
"""
from __future__ import annotations

import collections
from typing import NamedTuple

import numpy as np

from common.wire import clip

MAX_RANGES_PER_STREAM = 64  # a reference may reach back this many chunks of its own stream
MAX_REMEMBERED_STREAMS = 100_000
EVICTED = -1  # what `resolve` returns for a frame the stream sent that has left the ring
STREAM_ID_LIMIT = 1 << 63


class UnresolvedFrames(ValueError):
    """A transition names a frame its stream never sent, or sent in a chunk not stored."""


class StreamRanges(NamedTuple):
    """A stream's chunks whose frames the ring may still hold, oldest first, as columns."""
    first_numbers: list[int]  # each chunk's first frame, numbered in the stream
    counts: list[int]  # its frames
    first_globals: list[int]  # the global serial its first frame was written at


class StreamTable:
    def __init__(self) -> None:
        # Ordered by last insert, so the least recently active stream comes first.
        self.streams: collections.OrderedDict[int, StreamRanges] = collections.OrderedDict()
        self.next_numbers: collections.OrderedDict[int, int] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.streams)

    def next_number(self, stream: int) -> int:
        """The frame number the stream's next chunk starts at."""
        return self.next_numbers.get(stream, 0)

    def resolve(self, stream: int, numbers: np.ndarray, chunk_first: int, chunk_count: int,
                chunk_global: int) -> np.ndarray:
        """Global frame serials of `numbers`, which may name this chunk's own frames (to be
        written at `chunk_global`) or the stream's earlier ones; EVICTED for earlier frames
        this table no longer holds. Raises UnresolvedFrames for numbers never stored."""
        held = self.streams.get(stream, StreamRanges([], [], []))
        oldest_held = held.first_numbers[0] if held.first_numbers else chunk_first
        firsts = np.array(held.first_numbers + [chunk_first], np.int64)
        counts = np.array(held.counts + [chunk_count], np.int64)
        globals_ = np.array(held.first_globals + [chunk_global], np.int64)
        flat = numbers.reshape(-1)
        which = np.maximum(np.searchsorted(firsts, flat, side="right") - 1, 0)
        found = (flat >= firsts[which]) & (flat < firsts[which] + counts[which])
        evicted = (flat >= 0) & (flat < oldest_held)
        if not (found | evicted).all():
            missing = int(flat[~(found | evicted)][0])
            raise UnresolvedFrames(
                f"frame {missing} of stream {stream} is neither in this chunk (frames "
                f"{chunk_first}..{chunk_first + chunk_count - 1}) nor one the stream sent "
                f"before")
        resolved = np.where(found, globals_[which] + flat - firsts[which], EVICTED)
        return resolved.reshape(numbers.shape)

    def add(self, stream: int, first: int, count: int, first_global: int,
            oldest_global: int) -> None:
        """Record a chunk's frames; forget ranges and streams whose frames all have serials
        below `oldest_global` (they have left the frame ring)."""
        self.next_numbers[stream] = first + count
        self.next_numbers.move_to_end(stream)
        if len(self.next_numbers) > MAX_REMEMBERED_STREAMS:
            self.next_numbers.popitem(last=False)
        if count:
            ranges = self.streams.setdefault(stream, StreamRanges([], [], []))
            self.streams.move_to_end(stream)
            for column, value in zip(ranges, (first, count, first_global)):
                column.append(value)
                del column[:-MAX_RANGES_PER_STREAM]
            self._trim(ranges, oldest_global)
        # Least recently active first: stop at the first stream that still has frames.
        while self.streams:
            stream, ranges = next(iter(self.streams.items()))
            if ranges.first_globals[-1] + ranges.counts[-1] > oldest_global:
                break
            del self.streams[stream]

    @staticmethod
    def _trim(ranges: StreamRanges, oldest_global: int) -> None:
        counts, globals_ = ranges.counts, ranges.first_globals
        gone = 0
        while gone < len(counts) - 1 and globals_[gone] + counts[gone] <= oldest_global:
            gone += 1
        for column in ranges:
            del column[:gone]

    def state(self) -> dict:
        """A copy: inserts go on mutating the live ranges while a snapshot writes this."""
        return {"ranges": [[stream, *map(list, ranges)]
                           for stream, ranges in self.streams.items()],
                "next_numbers": [[stream, n] for stream, n in self.next_numbers.items()]}

    @classmethod
    def from_state(cls, state: dict, frames_written: int) -> "StreamTable":
        """The table `state()` described, of a buffer that has written `frames_written`
        frames. Raises ValueError unless it is one `add` could have built."""
        table = cls()
        if not isinstance(state, dict):
            raise ValueError(f"stream table: expected a map, got {clip(state)}")
        ranges, next_numbers = state["ranges"], state["next_numbers"]
        if not (isinstance(ranges, list) and isinstance(next_numbers, list)
                and len(ranges) <= len(next_numbers) <= MAX_REMEMBERED_STREAMS):
            raise ValueError("stream table: ranges and next_numbers must be lists, at most "
                             f"{MAX_REMEMBERED_STREAMS} streams")
        for entry in next_numbers:
            stream, n = _integers(entry, 2)
            table.next_numbers[stream] = n
        for entry in ranges:
            if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[1], list):
                raise ValueError(f"stream table: a range entry is {clip(entry)}")
            (stream,) = _integers(entry[:1], 1)
            if stream in table.streams:
                raise ValueError(f"stream table: stream {stream} is listed twice")
            firsts, counts, globals_ = (_integers(column, len(entry[1])) for column in entry[1:])
            table.streams[stream] = StreamRanges(firsts, counts, globals_)
        if len(table.next_numbers) != len(next_numbers):
            raise ValueError("stream table: a stream's next number is listed twice")
        table.check(frames_written)
        return table

    def check(self, frames_written: int) -> None:
        """Raises ValueError unless `add` could have built this table in a buffer that has
        written `frames_written` frames: each stream's ranges in its numbering order, within
        what it has sent, in the order their frames were written, none past the frames written;
        no frame claimed by two ranges; streams in the order they last brought frames."""
        last_starts = []
        for stream, (firsts, counts, globals_) in self.streams.items():
            ends = [first + count for first, count in zip(firsts, counts)]
            if (not 0 < len(firsts) <= MAX_RANGES_PER_STREAM or min(counts) <= 0
                    or ends[-1] > self.next_numbers.get(stream, ends[-1])
                    or any(end > first for end, first in zip(ends, firsts[1:]))
                    or any(start + count > next_start for start, count, next_start
                           in zip(globals_, counts, globals_[1:]))
                    or globals_[-1] + counts[-1] > frames_written):
                raise ValueError(f"stream table: stream {stream}'s ranges are inconsistent")
            last_starts.append(globals_[-1])
        if any(later <= earlier for earlier, later in zip(last_starts, last_starts[1:])):
            raise ValueError("stream table: streams are not in the order they last sent frames")
        self._check_frames_claimed_once()

    def _check_frames_claimed_once(self) -> None:
        starts = np.array([g for ranges in self.streams.values() for g in ranges.first_globals],
                          np.int64)
        counts = np.array([c for ranges in self.streams.values() for c in ranges.counts],
                          np.int64)
        order = np.argsort(starts)
        if (starts[order][:-1] + counts[order][:-1] > starts[order][1:]).any():
            raise ValueError("stream table: two ranges claim the same frames")


def _integers(values, length: int) -> list[int]:
    """`values` if it is a list of `length` integers in [0, STREAM_ID_LIMIT)."""
    if not (isinstance(values, list) and len(values) == length
            and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < STREAM_ID_LIMIT
                    for v in values)):
        raise ValueError(f"stream table: expected {length} integers, got {clip(values)}")
    return values
