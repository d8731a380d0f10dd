"""The replay service as a Ray actor: a thin shell over `ReplayServer` that exports metrics.

Calls run one at a time (a plain, single-threaded Ray actor), so storage needs no locks. A
malformed insert raises in the caller and leaves this actor serving.
"""
from __future__ import annotations

import ray

from common import metrics
from common.config import Config
from common.envs import EnvInfo
from replay_server.server import ReplayServer

SERVICE_NAME = "dqn_replay"


@ray.remote
class ReplayService:
    def __init__(self, config: Config, env_info: EnvInfo):
        self.server = ReplayServer.from_config(config, env_info)
        self.metrics = metrics.make(metrics.REPLAY_SIZE, metrics.REPLAY_INSERTS,
                                    metrics.REPLAY_SAMPLES, metrics.REPLAY_REJECTED)

    def insert(self, message: bytes) -> dict:
        try:
            result = self.server.insert(message)
        except ValueError:
            self.metrics[metrics.REPLAY_REJECTED].inc()
            raise
        self.metrics[metrics.REPLAY_INSERTS].inc(result["inserted"])
        self.metrics[metrics.REPLAY_SIZE].set(self.server.buffer.size)
        return result

    def insert_budget(self) -> int:
        return self.server.insert_budget()

    def sample(self, batch_size: int, num_batches: int = 1) -> bytes | None:
        message = self.server.sample(batch_size, num_batches)
        if message is not None:
            self.metrics[metrics.REPLAY_SAMPLES].inc(batch_size * num_batches)
        return message

    def stats(self) -> dict:
        return self.server.stats()
