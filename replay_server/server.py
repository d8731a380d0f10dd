"""The replay service's logic, bytes in and bytes out, without Ray: storage + rate limiter.

`insert` and `sample` speak the wire format (`common.wire`); a malformed message raises an
error naming the problem and leaves the buffer and the limiter exactly as they were.
"""
from __future__ import annotations

from common import wire
from common.config import Config
from common.envs import EnvInfo
from replay_server.buffer import ReplayBuffer
from replay_server.rate_limiter import RateLimiter


class ReplayServer:
    def __init__(self, buffer: ReplayBuffer, limiter: RateLimiter):
        self.buffer = buffer
        self.limiter = limiter
        self.rejected = 0

    @classmethod
    def from_config(cls, config: Config, env_info: EnvInfo, seed: int = 0) -> "ReplayServer":
        buffer = ReplayBuffer(config.replay_capacity, env_info.obs_shape, env_info.obs_dtype,
                              seed=config.seed + seed)
        limiter = RateLimiter(config.samples_per_insert, config.min_replay_size,
                              config.rate_tolerance)
        return cls(buffer, limiter)

    def insert(self, message: bytes) -> dict:
        """Store a chunk of transitions. Returns the totals an actor paces itself by."""
        try:
            arrays, _ = wire.decode(message, expect_kind=wire.TRANSITIONS)
            n = self.buffer.add(arrays)
        except ValueError:
            self.rejected += 1
            raise
        self.limiter.record_insert(n)
        return {"inserted": n, "total_inserted": self.buffer.total_added,
                "insert_budget": self.limiter.insert_budget()}

    def insert_budget(self) -> int:
        return self.limiter.insert_budget()

    def sample(self, batch_size: int, num_batches: int = 1) -> bytes | None:
        """`num_batches` batches stacked as [num_batches, batch_size, ...] in one wire
        message, or None while the rate limiter says wait."""
        total = batch_size * num_batches
        if not self.limiter.can_sample(total):
            return None
        batch = self.buffer.sample(total)
        self.limiter.record_sample(total)
        stacked = {name: array.reshape(num_batches, batch_size, *array.shape[1:])
                   for name, array in batch.items()}
        return wire.encode(wire.BATCH, stacked, meta={"total_inserted": self.buffer.total_added})

    def stats(self) -> dict:
        return {"size": self.buffer.size, "capacity": self.buffer.capacity,
                "total_inserted": self.buffer.total_added,
                "total_sampled": self.limiter.samples,
                "samples_per_insert": self.limiter.observed_samples_per_insert(),
                "rejected_messages": self.rejected}

