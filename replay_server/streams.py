"""Where each sender's frames went: the table that lets a chunk refer to frames it sent before.

A sender (one actor process) numbers its frames 0, 1, 2, ... in one `stream`; each chunk
carries frames `first_frame .. first_frame + m - 1` and transitions that name frames by those
numbers, including frames of the sender's earlier chunks (a stack or an n-step transition
reaches a few steps back). The replay writes each chunk's frames contiguously into its frame
ring, so a stream's history is a short list of ranges (first number, count, first global
frame serial). Ranges are dropped once their frames have left the ring, streams once all of
theirs have; both checks cost O(1) per insert, however many streams there are.
"""
from __future__ import annotations

import collections

import numpy as np

MAX_RANGES_PER_STREAM = 64  # a reference may reach back this many chunks of its own stream
STREAM_ID_LIMIT = 1 << 63


class UnresolvedFrames(ValueError):
    """A transition names a frame the replay does not hold."""


class StreamTable:
    def __init__(self):
        # stream id -> [first_numbers, counts, first_globals] as lists, oldest range first;
        # the dict is ordered by last insert so the least recently active stream comes first.
        self.streams: collections.OrderedDict[int, list[list[int]]] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self.streams)

    def next_number(self, stream: int) -> int:
        """The lowest frame number the stream may send next."""
        ranges = self.streams.get(stream)
        return 0 if ranges is None else ranges[0][-1] + ranges[1][-1]

    def resolve(self, stream: int, numbers: np.ndarray, chunk_first: int, chunk_count: int,
                chunk_global: int) -> np.ndarray:
        """Global frame serials of `numbers`, which may name this chunk's own frames (to be
        written at `chunk_global`) or the stream's earlier ones. Raises UnresolvedFrames."""
        firsts, counts, globals_ = ([], [], []) if stream not in self.streams \
            else self.streams[stream]
        firsts = np.array(firsts + [chunk_first], np.int64)
        counts = np.array(counts + [chunk_count], np.int64)
        globals_ = np.array(globals_ + [chunk_global], np.int64)
        flat = numbers.reshape(-1)
        which = np.searchsorted(firsts, flat, side="right") - 1
        found = (which >= 0) & (flat < firsts[which] + counts[which])
        if not found.all():
            missing = int(flat[~found][0])
            raise UnresolvedFrames(
                f"frame {missing} of stream {stream} is neither in this chunk (frames "
                f"{chunk_first}..{chunk_first + chunk_count - 1}) nor among the stream's "
                f"frames this replay still holds")
        return (globals_[which] + flat - firsts[which]).reshape(numbers.shape)

    def add(self, stream: int, first: int, count: int, first_global: int,
            oldest_global: int) -> None:
        """Record a chunk's frames; forget ranges and streams whose frames all have serials
        below `oldest_global` (they have left the frame ring)."""
        if count:
            ranges = self.streams.setdefault(stream, [[], [], []])
            self.streams.move_to_end(stream)
            for column, value in zip(ranges, (first, count, first_global)):
                column.append(value)
                del column[:-MAX_RANGES_PER_STREAM]
            self._trim(ranges, oldest_global)
        # Least recently active first: stop at the first stream that still has frames.
        while self.streams:
            stream, ranges = next(iter(self.streams.items()))
            if ranges[2][-1] + ranges[1][-1] > oldest_global:
                break
            del self.streams[stream]

    @staticmethod
    def _trim(ranges: list, oldest_global: int) -> None:
        firsts, counts, globals_ = ranges
        gone = 0
        while gone < len(counts) - 1 and globals_[gone] + counts[gone] <= oldest_global:
            gone += 1
        for column in ranges:
            del column[:gone]

    def state(self) -> list:
        return [[stream, *ranges] for stream, ranges in self.streams.items()]

    @classmethod
    def from_state(cls, state: list) -> "StreamTable":
        table = cls()
        for stream, firsts, counts, globals_ in state:
            table.streams[int(stream)] = [list(map(int, firsts)), list(map(int, counts)),
                                          list(map(int, globals_))]
        return table
