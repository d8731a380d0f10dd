"""A replay shard as a Ray actor: a thin shell over `ReplayServer` that exports metrics.

Inserts and priority updates run one at a time in the default group, in the order each
caller sent them (an actor's chunks name frames of its earlier chunks, so order matters).
Samples run on two threads of their own ("sample" group), so one batch's frames are gathered
and handed to Ray while the next is drawn, and a sample the rate limiter refuses waits there
for inserts (up to the caller's `wait_s`) without holding up anything else; its snapshots
for checkpoints run on a third ("snapshot"), so a long write does not stop inserts; an actor's ask
for insert budget waits ("budget" group) until samples free enough of it. `ReplayServer`
keeps the threads apart. A malformed message raises in the caller and leaves this actor
serving.
"""
from __future__ import annotations

import dataclasses
import os
import secrets

import numpy as np
import ray

from common import checkpoints, metrics, wire
from common.checkpoints import CheckpointStore
from common.config import Config
from common.env_info import EnvInfo
from common.records import InsertAck
from replay_server.records import ReplayServiceStats
from replay_server.server import ReplayServer

# Actors' asks for insert budget wait in a group of their own, one thread per waiting ask;
# past this many throttled actors on one shard the extra asks queue for a thread.
BUDGET_GROUP, BUDGET_ASK_THREADS = "budget", 64


# (The ignore: Ray's typed overloads of `ray.remote` leave out `concurrency_groups`.)
@ray.remote(  # type: ignore[call-overload]
    concurrency_groups={"sample": 2, "snapshot": 1, BUDGET_GROUP: BUDGET_ASK_THREADS})
class ReplayService:
    def __init__(self, config: Config, env_info: EnvInfo, shard: int = 0,
                 checkpoint_root: str | None = None):
        """Starts from this shard's snapshot in the latest checkpoint under `checkpoint_root`
        when there is one (a resumed run, or this process restarted after a crash)."""
        self.server = ReplayServer.from_config(config, env_info, shard)
        self.life = secrets.token_hex(4)  # a restarted process reports a new one
        self.restored_from: str | None = None
        self.passed_over: str | None = None
        if checkpoint_root is not None:
            self.restored_from, self.passed_over = self.server.restore_latest(
                CheckpointStore(checkpoint_root))
        restored = self.server.stats()
        self.restored_inserted, self.restored_sampled = (restored.total_inserted,
                                                         restored.total_sampled)
        self.metrics = metrics.for_role(metrics.REPLAY, shard)

    def insert(self, message: wire.Message) -> InsertAck:
        try:
            result = self.server.insert(message)
        except ValueError:
            self.metrics[metrics.REPLAY_REJECTED].inc()
            raise
        self.metrics[metrics.REPLAY_INSERTS].inc(result.inserted)
        self.metrics[metrics.REPLAY_SIZE].set(self.server.buffer.size)
        return result

    @ray.method(concurrency_group=BUDGET_GROUP)
    def insert_budget(self, at_least: int = 0, wait_s: float = 0.0) -> int:
        return self.server.insert_budget(at_least, wait_s)

    @ray.method(concurrency_group="sample")
    def sample(self, batch_size: int, num_batches: int = 1, beta: float = 0.0,
               wait_s: float = 0.0) -> np.ndarray | None:
        """A batch message (as `wire.for_ray` bytes), or None if the rate limiter still says
        wait after `wait_s` seconds."""
        message = self.server.sample(batch_size, num_batches, beta, wait_s)
        if message is None:
            return None
        self.metrics[metrics.REPLAY_SAMPLES].inc(batch_size * num_batches)
        self.metrics[metrics.REPLAY_SAMPLES_PER_INSERT].set(
            self.server.limiter.observed_samples_per_insert())
        return wire.for_ray(message)

    def update_priorities(self, message: wire.Message) -> int:
        try:
            return self.server.update_priorities(message)
        except ValueError:
            self.metrics[metrics.REPLAY_REJECTED].inc()
            raise

    def stats(self) -> ReplayServiceStats:
        return ReplayServiceStats(
            **dataclasses.asdict(self.server.stats()), life=self.life, pid=os.getpid(),
            restored_from=self.restored_from, passed_over=self.passed_over,
            restored_total_inserted=self.restored_inserted,
            restored_total_sampled=self.restored_sampled)

    def __repr__(self) -> str:  # the dashboard's Repr column and the log lines' prefix
        return f"dqn-replay-{self.server.shard}"

    @ray.method(concurrency_group="snapshot")
    def checkpoint(self, checkpoint_root: str, staging: str) -> dict:
        """This shard's snapshot into the staged checkpoint `staging`, while inserts go on."""
        store = CheckpointStore(checkpoint_root)
        with store.writing(f"{staging}/{checkpoints.shard_part(self.server.shard)}") as path:
            return self.server.snapshot(path)
