"""A replay shard's logic, bytes in and bytes out, without Ray: storage + rate limiter.

`insert`, `sample` and `update_priorities` speak the wire format (`common.wire`); a malformed
message raises an error naming the problem and leaves the buffer and the limiter exactly as
they were.

Methods may run on several threads (the Ray shell samples on two, and writes snapshots on a
third). Two locks keep that safe:
- `lock`, shared or exclusive: frames and rows change only under it exclusively (inserts,
  restores, a snapshot's copies); samples hold it shared while they gather frames, so two
  samples overlap their copying but never see an insert half done;
- `mutex`: the sum-tree, the random state, the rate limiter and the counters, which shared
  holders also change (a sample draws rows, a priority update sets leaves).
Always `lock` before `mutex`. A message is decoded (and decompressed) before either is taken:
an insert holds them only to be checked against what is stored, and stored. A sample the rate
limiter refuses may wait (Reverb's blocking sample) on `sampleable`, a condition on `mutex`
that inserts and restores notify, and an actor's ask for insert budget on `insertable`, which
samples and restores notify; neither holds a lock while it waits.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import threading
import time

from common import checkpoints, wire
from common.checkpoints import CheckpointError, CheckpointStore
from common.config import MAX_SAMPLE_ITEMS, Config
from common.env_info import EnvInfo
from common.records import InsertAck
from replay_server.buffer import (
    COUNT_LIMIT,
    InvalidTransitions,
    ReplayBuffer,
    ReplaySpec,
)
from replay_server.rate_limiter import RateLimiter
from replay_server.records import ReplayStats
from replay_server.snapshot import SnapshotError, read_snapshot, write_snapshot

MAX_PARKED_PER_STREAM = 16
MAX_PARKED_BYTES = 64 << 20  # all streams' parked chunks together, as sent (compressed)
PARKED_TIMEOUT_S = 30.0
# Batches with up to this many bytes of frames go compressed. The seed's 2 x 32 (1.2 MB of
# Breakout frames, ~9 KB compressed) then travels inline with the reply instead of through
# Ray's object store, which frees ~0.05 CPUs for the learner on 2 CPUs; Ape-X's batches of
# 512 (~25 MB) cost more to compress and decompress than the object store (-10 to -18% in
# benchmarks/replay.py), and their shards sit on the learner's node anyway.
COMPRESS_BATCH_BYTES = 4 << 20


class SharedExclusiveLock:
    """Held by many at once (`with lock.shared():`) or by one alone (`with lock:`). A waiting
    exclusive holder goes first, so a stream of samples cannot starve inserts."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    def __enter__(self) -> "SharedExclusiveLock":
        with self._condition:
            self._waiting += 1
            self._condition.wait_for(lambda: not self._exclusive and not self._shared)
            self._waiting -= 1
            self._exclusive = True
        return self

    def __exit__(self, *exc: object) -> None:
        with self._condition:
            self._exclusive = False
            self._condition.notify_all()

    @contextlib.contextmanager
    def shared(self):
        with self._condition:
            self._condition.wait_for(lambda: not self._exclusive and not self._waiting)
            self._shared += 1
        try:
            yield self
        finally:
            with self._condition:
                self._shared -= 1
                self._condition.notify_all()


class ReplayServer:
    def __init__(self, buffer: ReplayBuffer, limiter: RateLimiter, shard: int = 0):
        self.buffer = buffer
        self.limiter = limiter
        self.shard = shard
        self.rejected = 0
        self.lock = SharedExclusiveLock()
        self.mutex = threading.Lock()
        self.sampleable = threading.Condition(self.mutex)  # notified when inserts land
        self.insertable = threading.Condition(self.mutex)  # notified when samples land
        # (stream, first frame) -> (message, arrival time), oldest first; and per stream
        self.parked: collections.OrderedDict[tuple[int, int], tuple[bytes, float]] = \
            collections.OrderedDict()
        self.parked_per_stream: collections.Counter[int] = collections.Counter()
        self.parked_bytes = 0
        self.priorities_schema = wire.Schema(
            wire.PRIORITIES, {"key": wire.Field("int64", ("items",)),
                              "priority": wire.Field("float32", ("items",))},
            limits={"items": MAX_SAMPLE_ITEMS})

    @classmethod
    def from_config(cls, config: Config, env_info: EnvInfo, shard: int = 0) -> "ReplayServer":
        buffer = ReplayBuffer(ReplaySpec.of_run(config, env_info), seed=config.seed + 1_000 * shard)
        limiter = RateLimiter(config.samples_per_insert, config.min_replay_size,
                              config.rate_tolerance)
        return cls(buffer, limiter, shard)

    def insert(self, message: wire.Message) -> InsertAck:
        """Store a chunk of transitions. Returns the totals an actor paces itself by.

        A sender's chunks must be stored in the order it numbered their frames, and Ray does
        not promise to run one caller's calls in order on an actor with several threads. A
        valid chunk that arrives before its predecessor is parked (a copy of the message)
        until the predecessor is stored, then stored itself; one whose predecessor never
        comes is dropped after PARKED_TIMEOUT_S, or sooner when younger chunks need its place
        in MAX_PARKED_BYTES, and counted as rejected.

        The message is decoded (and decompressed) before the locks are taken: they are held
        only to check it against what is stored and to store it."""
        arrays, meta = self._decode(message, wire.TRANSITIONS, self.buffer.insert_schema)
        with self.lock, self.mutex:
            self._expire_parked()
            try:
                stream, first = meta.get("stream"), meta.get("first_frame")
                if (isinstance(stream, int) and isinstance(first, int)
                        and first > self.buffer.streams.next_number(stream)):
                    self.buffer.check_content(arrays, meta)
                    return self._park(stream, first, message)
                n = self.buffer.add(arrays, meta)
            except ValueError:
                self.rejected += 1
                raise
            assert isinstance(stream, int)  # add() checked it
            n += self._store_parked_successors(stream)
            self.limiter.record_insert(n)
            self.sampleable.notify_all()
            return self._ack(n)

    def _decode_insert(self, message: wire.Message) -> tuple[dict, dict]:
        return wire.decode(message, expect_kind=wire.TRANSITIONS,
                           schema=self.buffer.insert_schema)

    def _decode(self, message: wire.Message, kind: str, schema: wire.Schema
                ) -> tuple[dict, dict]:
        """A message decoded (and decompressed) outside the locks; a refusal is counted. Any
        buffer's schema will do, also one a restore is swapping in: all have this shard's spec."""
        try:
            return wire.decode(message, expect_kind=kind, schema=schema)
        except ValueError:
            with self.mutex:
                self.rejected += 1
            raise

    def _ack(self, inserted: int, parked: bool = False) -> InsertAck:
        return InsertAck(inserted, self.buffer.total_added, self.limiter.insert_budget(), parked)

    def _park(self, stream: int, first: int, message: wire.Message) -> InsertAck:
        waiting = self.parked_per_stream[stream]
        if waiting >= MAX_PARKED_PER_STREAM:
            raise InvalidTransitions(
                f"stream {stream}: {waiting} chunks already wait for its frames from "
                f"{self.buffer.streams.next_number(stream)}; this one starts at {first}")
        if len(message) > MAX_PARKED_BYTES:
            raise InvalidTransitions(f"a chunk of {len(message)} bytes, before its predecessor, "
                                     f"exceeds the {MAX_PARKED_BYTES} bytes a shard parks")
        while self.parked_bytes + len(message) > MAX_PARKED_BYTES:
            self._unpark(*next(iter(self.parked)))
            self.rejected += 1
        self.parked[stream, first] = (bytes(message), time.monotonic())
        self.parked_per_stream[stream] += 1
        self.parked_bytes += len(message)
        return self._ack(0, parked=True)

    def _unpark(self, stream: int, first: int) -> bytes | None:
        entry = self.parked.pop((stream, first), None)
        if entry is None:
            return None
        self.parked_bytes -= len(entry[0])
        self.parked_per_stream[stream] -= 1
        if not self.parked_per_stream[stream]:
            del self.parked_per_stream[stream]
        return entry[0]

    def _store_parked_successors(self, stream: int) -> int:
        stored = 0
        while (message := self._unpark(stream, self.buffer.streams.next_number(stream))):
            try:
                stored += self.buffer.add(*self._decode_insert(message))
            except ValueError:
                self.rejected += 1
        return stored

    def _expire_parked(self) -> None:
        deadline = time.monotonic() - PARKED_TIMEOUT_S
        while self.parked:
            key, (_, arrived) = next(iter(self.parked.items()))
            if arrived >= deadline:
                return
            self._unpark(*key)
            self.rejected += 1

    def insert_budget(self, at_least: int = 0, wait_s: float = 0.0) -> int:
        """Transitions that may be inserted now; if fewer than `at_least`, first waits up to
        `wait_s` seconds for the samples that free them (an actor's blocking ask)."""
        with self.insertable:
            self.insertable.wait_for(lambda: self.limiter.insert_budget() >= at_least, wait_s)
            return self.limiter.insert_budget()

    def sample(self, batch_size: int, num_batches: int = 1, beta: float = 0.0,
               wait_s: float = 0.0) -> memoryview | None:
        """`num_batches` batches [num_batches, batch_size, ...] in one wire message (each
        distinct frame once; `wire.decode_batch` rebuilds the stacks), or None if the rate
        limiter still says wait after `wait_s` seconds."""
        total = batch_size * num_batches
        if not 0 < total <= MAX_SAMPLE_ITEMS:
            raise ValueError(f"a sample of {num_batches} x {batch_size} items is not in "
                             f"[1, {MAX_SAMPLE_ITEMS}]")
        if wait_s > 0:
            with self.sampleable:
                self.sampleable.wait_for(lambda: self.limiter.can_sample(total), wait_s)
        with self.lock.shared():
            with self.mutex:
                if not self.limiter.can_sample(total):
                    return None
                batch = self.buffer.sample(batch_size, num_batches, beta)
                self.limiter.record_sample(total)
                self.insertable.notify_all()
                meta = {"shard": self.shard, "obs_shape": list(self.buffer.spec.obs_shape),
                        "total_inserted": self.buffer.total_added, "size": self.buffer.size,
                        "priority_mass": self.buffer.priority_mass()}
            # The frames are gathered (and compressed) here, by encode, while other samples
            # may do the same.
            small = batch["frames"].nbytes <= COMPRESS_BATCH_BYTES
            return wire.encode(wire.BATCH, batch, meta, compress=("frames",) if small else ())

    def update_priorities(self, message: wire.Message) -> int:
        """New priorities from the learner; returns how many still-stored items took them."""
        arrays, _ = self._decode(message, wire.PRIORITIES, self.priorities_schema)
        with self.lock.shared(), self.mutex:
            try:
                return self.buffer.update_priorities(arrays["key"], arrays["priority"])
            except ValueError:
                self.rejected += 1
                raise

    def snapshot(self, path: str) -> dict:
        """Write this shard's state to `path` while inserts go on; returns what was written."""
        started = time.monotonic()
        written = write_snapshot(self.buffer, path, self.lock, extra_state=lambda: {
            "limiter_inserts": self.limiter.inserts, "limiter_samples": self.limiter.samples,
            "rejected": self.rejected})
        return {**written, "seconds": round(time.monotonic() - started, 3), "path": str(path)}

    def restore(self, path: str) -> dict:
        """Replace this shard's state with the snapshot at `path`. A bad file raises
        SnapshotError and leaves the current state untouched."""
        started = time.monotonic()
        buffer, extra = read_snapshot(path, self.buffer.spec)
        counts = self._restored_counts(path, buffer, extra)
        with self.lock, self.mutex:
            self.buffer = buffer
            self.limiter.inserts = counts["limiter_inserts"]
            self.limiter.samples = counts["limiter_samples"]
            self.rejected = counts["rejected"]
            self.sampleable.notify_all()
            self.insertable.notify_all()
        return {"transitions": buffer.size, "seconds": round(time.monotonic() - started, 3)}

    def _restored_counts(self, path: str, buffer: ReplayBuffer, extra: dict) -> dict:
        """The limiter's and the refusal counters a snapshot holds (older ones may lack
        them), once they are ones this shard could have reached with `buffer`: the limiter
        records every transition the buffer stores, and samples only as far as it allows."""
        counts = {"limiter_inserts": buffer.total_added, "limiter_samples": 0, "rejected": 0}
        counts.update((key, extra[key]) for key in counts if key in extra)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < COUNT_LIMIT
                   for v in counts.values()):
            raise SnapshotError(f"{path}: invalid snapshot content: the shard's counters "
                                f"{wire.clip(counts)} are not counts below 2**62")
        if counts["limiter_inserts"] != buffer.total_added:
            raise SnapshotError(
                f"{path}: invalid snapshot content: the rate limiter counts "
                f"{counts['limiter_inserts']} inserts, the buffer {buffer.total_added}")
        limiter = copy.copy(self.limiter)
        limiter.inserts, limiter.samples = counts["limiter_inserts"], counts["limiter_samples"]
        try:
            limiter.check()
        except ValueError as error:
            raise SnapshotError(f"{path}: invalid snapshot content: rate limiter: "
                                f"{error}") from None
        return counts

    def restore_latest(self, store: CheckpointStore) -> tuple[str | None, str | None]:
        """Restore this shard's snapshot from the newest checkpoint in `store` that holds an
        intact one: (that checkpoint's name, why newer ones were passed over or None).
        (None, None): no checkpoint yet. No snapshot that can be read leaves the shard empty,
        (None, why): a lost replay refills, a run that stopped for it would not go on."""
        try:
            with store.latest_part(checkpoints.shard_part(self.shard)) as latest:
                if latest is None:
                    return None, None
                self.restore(latest.path)
        except (CheckpointError, SnapshotError, OSError) as error:
            return None, str(error)
        return latest.name, latest.passed_over

    def stats(self) -> ReplayStats:
        with self.lock.shared(), self.mutex:
            return ReplayStats(
                shard=self.shard, size=self.buffer.size, capacity=self.buffer.capacity,
                total_inserted=self.buffer.total_added, total_sampled=self.limiter.samples,
                samples_per_insert=self.limiter.observed_samples_per_insert(),
                priority_mass=self.buffer.priority_mass(), rejected_messages=self.rejected,
                stale_dropped=self.buffer.stale_dropped, parked_chunks=len(self.parked),
                parked_bytes=self.parked_bytes)
