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
from typing import Any, Callable, Mapping

import numpy as np

from common.config import Config
from common.env_info import EnvInfo
from common.wire import Field, Gather, Schema, WireError, clip
from replay_server.streams import STREAM_ID_LIMIT, StreamTable, UnresolvedFrames
from replay_server.sumtree import SumTree

PRIORITY_EPSILON = 1e-6  # keeps a zero-error transition sampleable
# Priorities (|TD errors|) are clipped to this before the exponent. With rewards clipped to
# [-1, 1] and gamma 0.99 a sane Q-network's |TD| stays below 2 / (1 - gamma) = 200; unclipped
# Atari rewards seldom take Q values, and so errors, past 1e5. Anything larger comes from a
# network far off, and clipped it is still the top priority. For any exponent in [0, 1] a leaf
# is then at most 1e6: the tree's total stays below capacity x 1e6 (2e12 for 2M transitions),
# far from float64's 1.8e308, and the largest leaf is at most 1e12 times the smallest
# (PRIORITY_EPSILON ** exponent), so importance weights stay normal float32 numbers.
MAX_PRIORITY = 1e6
COUNT_LIMIT = 1 << 62  # counters and frame serials stay far from int64's overflow
RNG_STATE_WORD_LIMIT = 1 << 128  # PCG64's state and increment are 128-bit integers
# Relative slack when checking stored leaves against the priorities they were computed from.
LEAF_ROUNDING = 1e-12
CHECK_ROWS = 1 << 16  # rows whose frame slots `check_invariants` checks at once


class InvalidSpec(ValueError):
    """A replay spec no shard can store by (e.g. a priority exponent outside [0, 1])."""


class InvalidTransitions(WireError):
    """A message does not fit the buffer's spec (an insert, a priority update); nothing
    changed."""


@dataclass(frozen=True)
class ChunkLimits:
    """The largest insert the actors of a run send: `transitions` transitions and at most
    `frames` new frames, so a shard refuses a larger one from its header."""
    transitions: int
    frames: int
    why: str  # the knobs they come from, for a refusal to name

    @classmethod
    def of_actors(cls, chunk_transitions: int, envs_per_actor: int, n_step: int,
                  stack: int) -> "ChunkLimits":
        """Exactly what `actors/adder.py` can send, as `actors/actor.py` drives it (one step
        of its K envs, then every full chunk is taken). `take_chunk` sends C transitions and
        every frame registered since the previous chunk; `observe` and `observe_first`
        each register at most `stack` frames (a stack that does not slide shares none),
        once per env step and once more per episode end, plus K first observations when a
        stream starts. A step completes a transition within n steps, one more with actor
        priorities (valued at the next action selection); so after the next-to-last step
        since the previous chunk, which left fewer than C complete, K x (steps - 1 - n) < C,
        that is at most n + 1 + (C - 1) // K steps of 2 x K x stack frames, plus K x stack."""
        steps = n_step + 1 + (chunk_transitions - 1) // envs_per_actor
        return cls(chunk_transitions, stack * envs_per_actor * (2 * steps + 1),
                   f"an actor's chunk: {chunk_transitions} transitions of {envs_per_actor} "
                   f"envs, {n_step}-step, {stack}-frame stacks")


@dataclass(frozen=True)
class ReplaySpec:
    """What one replay shard stores: observations of `obs_shape` made of `stack` frames of
    `frame_shape` (stack 1: the observation is one frame, e.g. a vector); and what one
    insert may bring (`chunk`; None: as much as the rings can take)."""
    capacity: int
    obs_shape: tuple[int, ...]
    frame_shape: tuple[int, ...]
    stack: int
    frame_dtype: str
    num_actions: int
    priority_exponent: float = 0.0
    chunk: ChunkLimits | None = None

    def __post_init__(self):
        # Beyond 1 a finite priority can make the tree's total overflow (1e31 ** 10): the
        # PER paper's range, which MAX_PRIORITY's bound on the total relies on.
        alpha = self.priority_exponent
        if (not isinstance(alpha, (int, float)) or isinstance(alpha, bool)
                or not 0.0 <= alpha <= 1.0):
            raise InvalidSpec(f"priority exponent must be a number in [0, 1], got {alpha!r}")

    @classmethod
    def for_env(cls, capacity: int, env_info, priority_exponent: float = 0.0,
                chunk: ChunkLimits | None = None) -> "ReplaySpec":
        return cls(capacity, tuple(env_info.obs_shape), env_info.frame_shape, env_info.stack,
                   env_info.obs_dtype, env_info.num_actions, priority_exponent, chunk)

    @classmethod
    def of_run(cls, config: Config, env_info: EnvInfo) -> "ReplaySpec":
        """A run's shards' spec, inserts bounded by its actors' chunks."""
        chunk = ChunkLimits.of_actors(config.chunk_transitions, config.envs_per_actor,
                                      config.n_step, env_info.stack)
        return cls.for_env(config.replay_capacity, env_info, config.priority_exponent, chunk)

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
        """What a snapshot must match: what is stored, not how inserts are cut."""
        stored = {key: value for key, value in dataclasses.asdict(self).items()
                  if key != "chunk"}
        return {**stored, "obs_shape": list(self.obs_shape),
                "frame_shape": list(self.frame_shape)}

    def insert_schema(self) -> Schema:
        """What an insert message carries: a chunk of m frames and n transitions naming them,
        at most what an actor's chunk holds, and never more than half the frame ring and the
        whole transition ring."""
        rows = {name: Field(dtype, ("transitions",)) for name, dtype in (
            ("action", "int32"), ("reward", "float32"), ("discount", "float32"),
            ("priority", "float32"))}
        stacks = Field("int64", ("transitions", self.stack))
        limits = {"frames": self.frame_capacity // 2, "transitions": self.capacity}
        why: dict[str, str] = {}
        if self.chunk is not None:
            for name, most in (("frames", self.chunk.frames),
                               ("transitions", self.chunk.transitions)):
                if most < limits[name]:
                    limits[name], why[name] = most, self.chunk.why
        return Schema("transitions",
                      {"frames": Field(self.frame_dtype, ("frames", *self.frame_shape)),
                       "obs_frames": stacks, "next_obs_frames": stacks, **rows},
                      limits=limits, optional=frozenset({"priority"}), why=why)


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
                                 f"got {clip(value)}")
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
        # (While the ring has not wrapped the first kept serial is negative: EVICTED then
        # means a frame the table forgot, as old as any evicted one.)
        keep = oldest >= max(0, self._first_kept_frame(self.frames_written + m))
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
            leaves = self._prioritize(arrays["priority"][keep] if "priority" in arrays
                                      else np.full(n, self.max_priority))
        self._set_leaves(rows, leaves)
        self.transitions_written += n
        self._drop_rows_with_evicted_frames()

    def _prioritize(self, priorities: np.ndarray) -> np.ndarray:
        """The leaves of `priorities` (finite, >= 0), each clipped to MAX_PRIORITY; the
        largest clipped one raises `max_priority`."""
        clipped = np.minimum(np.asarray(priorities, np.float64), MAX_PRIORITY)
        self.max_priority = max(self.max_priority, float(clipped.max(initial=0.0)))
        return (clipped + PRIORITY_EPSILON) ** self.spec.priority_exponent

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
            self.tree.set(rows, self._prioritize(priorities))
        return len(rows)

    def priority_mass(self) -> float:
        return self.tree.total

    # --- Invariants (a restored snapshot must hold them) ------------------------------------

    def check_invariants(self) -> None:
        """Raises ValueError naming the first broken one unless the buffer is in a state its
        own inserts, samples and priority updates could have left it in: one it can go on
        from (sample with finite weights, update priorities, insert). O(capacity)."""
        self._check_counters()
        rows = min(self.transitions_written, self.capacity)
        check_values({"action": self.action[:rows], "reward": self.reward[:rows],
                      "discount": self.discount[:rows], "frames": self.frames},
                     self.spec.num_actions)
        self._check_leaves(rows)
        self._check_frames_of_rows(rows)
        self.streams.check(self.frames_written)

    def _check_counters(self) -> None:
        counts = {"frames_written": self.frames_written,
                  "transitions_written": self.transitions_written, "scan_key": self.scan_key,
                  "stale_dropped": self.stale_dropped, "live": self.live}
        for name, value in counts.items():
            if not isinstance(value, int) or isinstance(value, bool) \
                    or not 0 <= value < COUNT_LIMIT:
                raise ValueError(f"{name} {clip(value)} is not a count below 2**62")
        # Each insert moves the scan up to the oldest row not yet overwritten.
        lowest = max(0, self.transitions_written - self.capacity)
        if not lowest <= self.scan_key <= self.transitions_written:
            raise ValueError(f"scan_key {self.scan_key} is outside [{lowest}, "
                             f"{self.transitions_written}] (the rows not yet overwritten)")

    def _check_leaves(self, rows: int) -> None:
        """Leaves are what inserts and updates set: 1 or 0 under uniform sampling, else the
        leaf of a priority in [0, max_priority]; 0 for rows never written, and for rows the
        scan found dead; `live` counts the others."""
        self.tree.check()
        leaves = self.tree.leaves
        if leaves[rows:].any():
            raise ValueError(f"rows from {rows} were never written but have priorities")
        if self.live != np.count_nonzero(leaves):
            raise ValueError(f"live {self.live} but {np.count_nonzero(leaves)} rows have "
                             "priorities")
        scanned = np.arange(max(0, self.transitions_written - self.capacity),
                            self.scan_key) % self.capacity
        if leaves[scanned].any():
            raise ValueError("a row below scan_key (found dead) has a priority")
        alpha, most = self.spec.priority_exponent, self.max_priority
        if not isinstance(most, float) or not (
                most == 1.0 if alpha == 0.0 else 1.0 <= most <= MAX_PRIORITY):
            raise ValueError(f"max_priority {clip(most)} is not in [1, {MAX_PRIORITY:g}] "
                             "(exactly 1 under uniform sampling)")
        positive = leaves[leaves > 0]
        if not positive.size:
            return
        if alpha == 0.0:
            low = high = 1.0
        else:
            low, high = (np.array([0.0, most]) + PRIORITY_EPSILON) ** alpha
        if (positive.min() < low * (1 - LEAF_ROUNDING)
                or positive.max() > high * (1 + LEAF_ROUNDING)):
            raise ValueError(f"leaf priorities must lie in [{low:.6g}, {high:.6g}], the "
                             "leaves of priorities in [0, max_priority]; they span "
                             f"[{positive.min():.6g}, {positive.max():.6g}]")

    def _check_frames_of_rows(self, rows: int) -> None:
        """Each written row names frames `_commit` gave it: its stacks' slots are those of
        serials in [oldest_frame, frames_written), oldest_frame among them."""
        ring, written = self.spec.frame_capacity, self.frames_written
        oldest = self.oldest_frame[:rows]
        for name in ("obs_slots", "next_slots"):
            slots = getattr(self, name)[:rows]
            if slots.size and (slots.min() < 0 or slots.max() >= ring):
                raise ValueError(f"{name} outside the frame ring")
        if oldest.size and oldest.max() >= written:
            raise ValueError("oldest_frame names a frame not yet written")
        if oldest.size and oldest.min() < 0:
            raise ValueError(f"oldest_frame {oldest.min()} is not a frame serial")
        for start in range(0, rows, CHECK_ROWS):
            block = slice(start, min(start + CHECK_ROWS, rows))
            first = oldest[block, None]
            # How far past the row's oldest frame each of its frames was written.
            after = (np.concatenate([self.obs_slots[block], self.next_slots[block]], axis=1)
                     - first) % ring
            wrong = (after.min(axis=1) != 0) | (after.max(axis=1) >= written - first[:, 0])
            if wrong.any():
                row = start + int(np.argmax(wrong))
                raise ValueError(
                    f"row {row}'s frame slots {self.obs_slots[row].tolist()} + "
                    f"{self.next_slots[row].tolist()} are not frames of its transition (its "
                    f"oldest frame is {self.oldest_frame[row]} of {written} written)")

    # --- State for snapshots (see snapshot.py) ---------------------------------------------

    def counters(self) -> dict:
        return {"frames_written": self.frames_written,
                "transitions_written": self.transitions_written, "scan_key": self.scan_key,
                "live": self.live, "max_priority": self.max_priority,
                "stale_dropped": self.stale_dropped,
                "rng": {**self.rng.bit_generator.state,  # PCG64's 128-bit ints as text
                        "state": {k: str(v) for k, v in
                                  self.rng.bit_generator.state["state"].items()}}}

    def set_rng_state(self, state) -> None:
        """The random state `counters()` wrote. Raises ValueError naming the first field that
        is not one of PCG64's (numpy would raise OverflowError, TypeError, ...)."""
        self.rng.bit_generator.state = _rng_state(state, self.rng.bit_generator.state)


def _rng_state(state, current: Mapping[str, Any]) -> dict:
    """PCG64's state from what `ReplayBuffer.counters` wrote (its 128-bit words as decimal
    text), once every field is one numpy's PCG64 has: `current` (the generator's own state)
    gives the name and keys."""
    if not isinstance(state, dict) or set(state) != set(current):
        raise ValueError(f"rng state must be a map with keys {sorted(current)}, got "
                         f"{clip(state)}")
    if state["bit_generator"] != current["bit_generator"]:
        raise ValueError(f"rng state 'bit_generator' is {clip(state['bit_generator'])}, not "
                         f"{current['bit_generator']!r}")
    words = state["state"]
    if not isinstance(words, dict) or set(words) != set(current["state"]):
        raise ValueError(f"rng state 'state' must be a map with keys "
                         f"{sorted(current['state'])}, got {clip(words)}")
    values = {}
    for key, text in words.items():
        if not (isinstance(text, str) and 0 < len(text) <= 39 and text.isascii()
                and text.isdigit() and int(text) < RNG_STATE_WORD_LIMIT):
            raise ValueError(f"rng state {key!r} must be an integer in [0, 2**128) written in "
                             f"decimal, got {clip(text)}")
        values[key] = int(text)
    if not values["inc"] % 2:
        raise ValueError(f"rng state 'inc' {values['inc']} is even; PCG64's increment is odd")
    if type(state["has_uint32"]) is not int or state["has_uint32"] not in (0, 1):
        raise ValueError(f"rng state 'has_uint32' must be 0 or 1, got "
                         f"{clip(state['has_uint32'])}")
    uinteger = state["uinteger"]
    if type(uinteger) is not int or not 0 <= uinteger < 1 << 32:
        raise ValueError(f"rng state 'uinteger' must be an integer in [0, 2**32), got "
                         f"{clip(uinteger)}")
    return {**state, "state": values}
