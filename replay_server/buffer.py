"""Replay storage that keeps each frame once, with prioritized (or uniform) sampling.

Two rings (the Dopamine idea, made safe for many interleaved senders):
- a frame ring of `frame_capacity` frames (84x84 uint8 for Atari, the whole vector for
  vector observations), written in arrival order;
- a transition ring of `capacity` rows, each naming the frame-ring slots of its observation
  stack and of its next observation's stack, plus action, n-step reward and discount.
A stacked observation is rebuilt by index at sample time, so it is exactly the stack the actor
saw: the actor named its frames (see `actors/adder.py`), including the repeated first frame at
an episode start, so nothing is ever stacked across episodes or senders.

A transition is live while its row has not been overwritten and all its frames are still in
the frame ring. Sampling goes through a sum-tree of priority^alpha (alpha 0: every live row
weighs 1, which is uniform sampling); a row leaves the tree when it dies. Each row has a key
(its insert serial) so that priority updates for rows overwritten meanwhile are dropped.

`discount` is gamma^k where the episode went on for the k steps summed in `reward` (k = n, or
fewer at a time-limit truncation, which is not a real end) and 0 where it terminated, so the
learner's target is `reward + discount * max_a Q_target(next_obs, a)` without special cases.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from common.wire import Field, Gather, Schema, WireError
from replay_server.streams import STREAM_ID_LIMIT, StreamTable, UnresolvedFrames
from replay_server.sumtree import SumTree

PRIORITY_EPSILON = 1e-6  # keeps a zero-error transition sampleable


class InvalidTransitions(WireError):
    """A message does not fit the buffer's spec (an insert, a priority update); nothing
    changed."""


@dataclass(frozen=True)
class ReplaySpec:
    """What one replay shard stores: observations of `obs_shape` made of `stack` frames of
    `frame_shape` (stack 1: the observation is one frame, e.g. a vector)."""
    capacity: int
    obs_shape: tuple[int, ...]
    frame_shape: tuple[int, ...]
    stack: int
    frame_dtype: str
    num_actions: int
    priority_exponent: float = 0.0

    @classmethod
    def for_env(cls, capacity: int, env_info, priority_exponent: float = 0.0) -> "ReplaySpec":
        return cls(capacity, tuple(env_info.obs_shape), env_info.frame_shape, env_info.stack,
                   env_info.obs_dtype, env_info.num_actions, priority_exponent)

    @property
    def frame_capacity(self) -> int:
        # One frame per transition plus a little for episode starts (an episode of L steps
        # brings L + 1 frames), and room for a chunk in flight.
        return self.capacity + self.capacity // 256 + 64 * self.stack

    @property
    def nbytes(self) -> int:
        """Memory of a shard of this spec once its pages are touched: the frame ring, the
        transition rings (`ReplayBuffer.__init__` allocates them) and the sum-tree."""
        frame = math.prod(self.frame_shape) * np.dtype(self.frame_dtype).itemsize
        slots = 2 * self.stack * np.dtype(np.int32).itemsize  # obs_slots, next_slots
        fields = np.dtype(np.int64).itemsize + 3 * 4  # oldest_frame; action, reward, discount
        tree = 2 * (1 << max(0, (self.capacity - 1).bit_length())) * 8  # SumTree.nodes
        return self.frame_capacity * frame + self.capacity * (slots + fields) + tree

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "obs_shape": list(self.obs_shape),
                "frame_shape": list(self.frame_shape)}

    def insert_schema(self) -> Schema:
        """What an insert message carries: a chunk of m frames and n transitions naming them,
        at most half the frame ring and the whole transition ring."""
        rows = {name: Field(dtype, ("transitions",)) for name, dtype in (
            ("action", "int32"), ("reward", "float32"), ("discount", "float32"),
            ("priority", "float32"))}
        stacks = Field("int64", ("transitions", self.stack))
        return Schema("transitions",
                      {"frames": Field(self.frame_dtype, ("frames", *self.frame_shape)),
                       "obs_frames": stacks, "next_obs_frames": stacks, **rows},
                      limits={"frames": self.frame_capacity // 2,
                              "transitions": self.capacity},
                      optional=frozenset({"priority"}))


def check_values(arrays: dict[str, np.ndarray], num_actions: int) -> None:
    """What stored data holds, whether it comes from an insert or a snapshot: actions of the
    env, finite rewards, priorities and (float) frames, discounts in [0, 1], priorities >= 0.
    Checks the fields `arrays` has."""
    if "action" in arrays and ((arrays["action"] < 0) | (arrays["action"] >= num_actions)).any():
        raise InvalidTransitions(f"'action' outside [0, {num_actions})")
    for name in ("reward", "discount", "priority", "frames"):
        if (name in arrays and np.issubdtype(arrays[name].dtype, np.floating)
                and not np.isfinite(arrays[name]).all()):
            raise InvalidTransitions(f"{name!r} holds a non-finite value")
    if "discount" in arrays and ((arrays["discount"] < 0) | (arrays["discount"] > 1)).any():
        raise InvalidTransitions("'discount' must lie in [0, 1]")
    if "priority" in arrays and (arrays["priority"] < 0).any():
        raise InvalidTransitions("'priority' must be >= 0")


@dataclass(frozen=True)
class InsertPlan:
    """What `ReplayBuffer.validate` found an insert to hold, and `_commit` stores: checked
    whole before anything changes, so a bad chunk leaves the buffer as it was."""
    stream: int
    first_frame: int  # the chunk's first frame, numbered in its stream
    frames: int  # frames the chunk brings (stored even when none of its transitions is)
    keep: np.ndarray  # per transition of the chunk: its frames are all still in the ring
    frame_serials: np.ndarray  # per kept transition: global serials of its obs + next stacks
    oldest_frame: np.ndarray  # per kept transition: the smallest of those serials

    @property
    def stored(self) -> int:
        return len(self.oldest_frame)

    @property
    def stale(self) -> int:
        """Transitions dropped for naming frames already evicted."""
        return len(self.keep) - self.stored


def _meta_count(meta: dict, name: str, limit: int) -> int:
    value = meta.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < limit:
        raise InvalidTransitions(f"meta {name!r} must be an integer in [0, {limit}), "
                                 f"got {value!r}")
    return value


class ReplayBuffer:
    def __init__(self, spec: ReplaySpec, seed: int = 0):
        self.spec = spec
        self.insert_schema = spec.insert_schema()
        capacity, frames, stack = spec.capacity, spec.frame_capacity, spec.stack
        # np.zeros pages memory in lazily: an empty 1M-transition buffer costs little.
        self.frames = np.zeros((frames, *spec.frame_shape), spec.frame_dtype)
        self.obs_slots = np.zeros((capacity, stack), np.int32)
        self.next_slots = np.zeros((capacity, stack), np.int32)
        self.oldest_frame = np.zeros(capacity, np.int64)
        self.action = np.zeros(capacity, np.int32)
        self.reward = np.zeros(capacity, np.float32)
        self.discount = np.zeros(capacity, np.float32)
        self.tree = SumTree(capacity)
        self.streams = StreamTable()
        self.frames_written = 0
        self.transitions_written = 0
        self.scan_key = 0  # rows below this key were checked for evicted frames
        self.live = 0
        self.stale_dropped = 0  # transitions refused for naming frames already evicted
        self.max_priority = 1.0
        self.rng = np.random.default_rng(seed)
        # Called with (first, last) global frames about to be lost.
        self.snapshot_hook: Callable[[int, int], None] | None = None

    # --- Inserting ------------------------------------------------------------------------

    @property
    def size(self) -> int:
        """Live transitions: the ones sampling can return."""
        return self.live

    @property
    def capacity(self) -> int:
        return self.spec.capacity

    @property
    def total_added(self) -> int:
        return self.transitions_written

    def _first_kept_frame(self, frames_written: int) -> int:
        """Serial of the oldest frame the ring holds once `frames_written` were written."""
        return frames_written - self.spec.frame_capacity

    def check_content(self, arrays: dict[str, np.ndarray], meta: dict) -> tuple[int, int]:
        """The checks of an insert that need nothing stored before it (a chunk may wait for
        its predecessor only once it passed them); returns its (stream, first_frame).
        Raises InvalidTransitions naming the first problem."""
        try:
            self.insert_schema.check(arrays)
        except WireError as error:
            raise InvalidTransitions(str(error)) from None
        stream = _meta_count(meta, "stream", STREAM_ID_LIMIT)
        first = _meta_count(meta, "first_frame", 1 << 62)
        if not len(arrays["action"]):
            raise InvalidTransitions("'action' must be a non-empty 1-d array")
        check_values(arrays, self.spec.num_actions)
        return stream, first

    def validate(self, arrays: dict[str, np.ndarray], meta: dict) -> InsertPlan:
        """Check an insert completely, before anything is stored; returns what `_commit`
        needs. Raises InvalidTransitions naming the first problem."""
        stream, first = self.check_content(arrays, meta)
        m = len(arrays["frames"])
        if first < self.streams.next_number(stream):
            raise InvalidTransitions(
                f"stream {stream} already sent frames up to {self.streams.next_number(stream)}"
                f" - 1; this chunk starts at {first} (frame numbers must increase)")
        references = np.concatenate([arrays["obs_frames"], arrays["next_obs_frames"]], axis=1)
        try:
            globals_ = self.streams.resolve(stream, references, first, m, self.frames_written)
        except UnresolvedFrames as error:
            raise InvalidTransitions(str(error)) from None
        # A sender that was slow (or stalled) can name frames that have left the ring since
        # it sent them (EVICTED is -1): those transitions are too old to keep, not malformed.
        oldest = globals_.min(axis=1)
        keep = oldest >= self._first_kept_frame(self.frames_written + m)
        return InsertPlan(stream, first, m, keep, globals_[keep], oldest[keep])

    def add(self, arrays: dict[str, np.ndarray], meta: dict) -> int:
        """Validate, then store. Returns the number of transitions stored: all of the chunk's
        except those naming frames that have left the ring (counted in `stale_dropped`)."""
        plan = self.validate(arrays, meta)
        self._commit(arrays, plan)
        self.stale_dropped += plan.stale
        return plan.stored

    def _commit(self, arrays: dict[str, np.ndarray], plan: InsertPlan) -> None:
        spec, n, m, keep = self.spec, plan.stored, plan.frames, plan.keep
        if m:
            if self.snapshot_hook is not None:
                lost_from = self._first_kept_frame(self.frames_written)
                self.snapshot_hook(lost_from, lost_from + m)
            frame_slots = (self.frames_written + np.arange(m)) % spec.frame_capacity
            self.frames[frame_slots] = arrays["frames"]
            self.frames_written += m
            self.streams.add(plan.stream, plan.first_frame, m, self.frames_written - m,
                             self._first_kept_frame(self.frames_written))
        keys = self.transitions_written + np.arange(n)
        rows = keys % spec.capacity
        slots = (plan.frame_serials % spec.frame_capacity).astype(np.int32)
        self.obs_slots[rows] = slots[:, :spec.stack]
        self.next_slots[rows] = slots[:, spec.stack:]
        self.oldest_frame[rows] = plan.oldest_frame
        self.action[rows] = arrays["action"][keep]
        self.reward[rows] = arrays["reward"][keep]
        self.discount[rows] = arrays["discount"][keep]
        if spec.priority_exponent == 0.0:
            leaves = np.ones(n)
        else:
            raw = arrays["priority"][keep] if "priority" in arrays \
                else np.full(n, self.max_priority)
            self.max_priority = max(self.max_priority, float(raw.max(initial=0.0)))
            leaves = (raw.astype(np.float64) + PRIORITY_EPSILON) ** spec.priority_exponent
        self._set_leaves(rows, leaves)
        self.transitions_written += n
        self._drop_rows_with_evicted_frames()

    def _set_leaves(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Set distinct rows' leaves, keeping the live count."""
        before = self.tree.get(rows) > 0
        self.tree.set(rows, values)
        self.live += int(np.count_nonzero(values > 0)) - int(np.count_nonzero(before))

    def _drop_rows_with_evicted_frames(self) -> None:
        """Rows die when their oldest frame leaves the frame ring. Rows are roughly in frame
        order, so scan from the oldest row and stop at the first live one; the rare row out
        of order is caught when sampled."""
        first_kept = self._first_kept_frame(self.frames_written)
        self.scan_key = max(self.scan_key, self.transitions_written - self.spec.capacity)
        while self.scan_key < self.transitions_written:
            keys = np.arange(self.scan_key, min(self.scan_key + 1024, self.transitions_written))
            rows = keys % self.spec.capacity
            dead = self.oldest_frame[rows] < first_kept
            alive_at = np.argmin(dead) if not dead.all() else len(dead)
            if alive_at:
                self._set_leaves(rows[:alive_at], np.zeros(alive_at))
            self.scan_key += int(alive_at)
            if alive_at < len(dead):
                return

    # --- Sampling -------------------------------------------------------------------------

    def key_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """Insert serial of the transition now in each row."""
        last = self.transitions_written - 1
        return last - (last - rows) % self.spec.capacity

    def sample_rows(self, count: int) -> np.ndarray:
        """Rows drawn in proportion to their leaves, dead ones removed and redrawn."""
        if self.live == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        rows = self.tree.sample(count, self.rng)
        first_kept = self._first_kept_frame(self.frames_written)
        for _ in range(64):
            dead = self.oldest_frame[rows] < first_kept
            if not dead.any():
                return rows
            dead_rows = np.unique(rows[dead])
            self._set_leaves(dead_rows, np.zeros(len(dead_rows)))
            if self.live == 0:
                raise ValueError("cannot sample from an empty replay buffer")
            rows[dead] = self.tree.sample(int(dead.sum()), self.rng)
        raise RuntimeError("replay sampling kept drawing rows whose frames were evicted")

    def sample(self, batch_size: int, num_batches: int = 1, beta: float = 0.0) -> dict:
        """`num_batches` batches, each item drawn with probability P(i) = leaf_i / total.
        Returns each distinct frame once (`frames`, a `wire.Gather` of frame-ring rows, so
        encoding copies them straight into the message) and, per item, the indices of its stack
        frames into it (`obs_frames`, `next_obs_frames` [k, B, stack]), plus action, reward,
        discount, the importance weight (N * P(i))^-beta normalised by its batch's largest,
        and the key for priority updates."""
        rows = self.sample_rows(batch_size * num_batches)
        probabilities = self.tree.get(rows) / self.tree.total
        weights = (self.live * probabilities).reshape(num_batches, batch_size) ** -beta
        weights /= weights.max(axis=1, keepdims=True)
        slots = np.concatenate([self.obs_slots[rows], self.next_slots[rows]], axis=1)
        unique, inverse = np.unique(slots, return_inverse=True)
        inverse = inverse.reshape(num_batches, batch_size, 2 * self.spec.stack).astype(np.int32)
        shape = (num_batches, batch_size)
        return {"frames": Gather(self.frames, unique),
                "obs_frames": inverse[..., :self.spec.stack],
                "next_obs_frames": inverse[..., self.spec.stack:],
                "action": self.action[rows].reshape(shape),
                "reward": self.reward[rows].reshape(shape),
                "discount": self.discount[rows].reshape(shape),
                "weight": weights.astype(np.float32),
                "key": self.key_of_rows(rows).reshape(shape)}

    def update_priorities(self, keys: np.ndarray, priorities: np.ndarray) -> int:
        """New priorities for sampled transitions; keys of rows overwritten or dead since are
        skipped. Returns how many were applied. A no-op under uniform sampling."""
        if self.spec.priority_exponent == 0.0:
            return 0
        keys = np.asarray(keys, np.int64).reshape(-1)
        priorities = np.asarray(priorities, np.float64).reshape(-1)
        if keys.shape != priorities.shape:
            raise InvalidTransitions(f"{len(keys)} keys but {len(priorities)} priorities")
        if not np.isfinite(priorities).all() or (priorities < 0).any():
            raise InvalidTransitions("priorities must be finite and >= 0")
        current = (keys >= self.transitions_written - self.spec.capacity) & \
                  (keys < self.transitions_written)
        keys, priorities = keys[current], priorities[current]
        rows, last = np.unique((keys % self.spec.capacity)[::-1], return_index=True)
        priorities = priorities[::-1][last]  # the latest update of a repeated row wins
        alive = self.tree.get(rows) > 0
        rows, priorities = rows[alive], priorities[alive]
        if len(rows):
            self.max_priority = max(self.max_priority, float(priorities.max()))
            self.tree.set(rows, (priorities + PRIORITY_EPSILON) ** self.spec.priority_exponent)
        return len(rows)

    def priority_mass(self) -> float:
        return self.tree.total

    # --- State for snapshots (see snapshot.py) ---------------------------------------------

    def counters(self) -> dict:
        return {"frames_written": self.frames_written,
                "transitions_written": self.transitions_written, "scan_key": self.scan_key,
                "live": self.live, "max_priority": self.max_priority,
                "stale_dropped": self.stale_dropped,
                "rng": {**self.rng.bit_generator.state,  # PCG64's 128-bit ints as text
                        "state": {k: str(v) for k, v in
                                  self.rng.bit_generator.state["state"].items()}}}

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = {**state, "state": {
            k: int(v) for k, v in state["state"].items()}}
