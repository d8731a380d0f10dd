"""How the learner keeps batches coming from the replay shards, without Ray.

`BatchPrefetcher` keeps `depth` sample calls in flight over the shards (each waits in its shard,
up to SAMPLE_WAIT_S, until the rate limiter lets it through: no polling) and decodes the
batches that come (stacks rebuilt from the distinct frames) into a small queue the trainer
takes from. A shard that died is asked again after a pause (Ray restarts it).

It talks to the shards through a `ShardSet` it is given: on Ray, thin wrappers around
`shard.sample.remote`, `ray.wait` and `ray.get`; in tests, an in-memory fake.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from typing import Callable, Hashable, Protocol

import numpy as np

from common import wire

PREFETCH_BATCHES = 2  # sample calls in flight
SAMPLE_WAIT_S = 1.0  # longest a sample call waits in the shard for the rate limiter
SHARD_RETRY_S = 1.0  # pause before asking a shard that died again (calls queue while it restarts)
READY_WAIT_S = 0.1  # how often the prefetch thread looks at its stop event


class ShardLost(Exception):
    """The replay shard died (Ray restarts it)."""


class ShardSet(Protocol):
    """What the prefetcher needs of the replay shards. `result` raises `ShardLost` when the
    call's shard died."""

    num_shards: int

    def sample(self, shard: int, batch_size: int, num_batches: int, beta: float,
               wait_s: float) -> Hashable:
        """Start a sample call on `shard`; returns a handle to its answer."""

    def ready(self, handles: list, num: int, timeout: float | None) -> list:
        """The handles whose answer came, waiting up to `timeout` s until `num` of them did."""

    def result(self, handle) -> bytes | None:
        """The batch message of a ready call, or None: the rate limiter still said wait."""


class BatchPrefetcher:
    """Keeps `depth` sample calls in flight over the shards and decoded batches in a queue.

    Each call goes to one shard, chosen in proportion to the shards' priority mass (their
    size under uniform replay) as last reported, so items are drawn in proportion to their
    priority over all shards. A batch from one shard carries weights normalised within it,
    which is what per-shard sampling needs: the shard's share cancels in the normalisation.
    """

    def __init__(self, shards: ShardSet, batch_size: int, batches_per_call: int,
                 beta: Callable[[], float], stop: threading.Event,
                 depth: int = PREFETCH_BATCHES, seed: int = 0,
                 retry_s: float = SHARD_RETRY_S):
        self.shards, self.beta, self.stop, self.depth = shards, beta, stop, depth
        self.sample_shape = (batch_size, batches_per_call)
        self.retry_s = retry_s
        self.mass = np.ones(shards.num_shards)
        self.rng = np.random.default_rng(seed)
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        # Batches live in the queue (depth), in training (1) and in decoding (1).
        self.decode = wire.BatchDecoder(ring=depth + 2)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def get(self, timeout: float) -> tuple[int, dict]:
        """(shard, batch) of the next decoded batch."""
        return self.ready.get(timeout=timeout)

    def _call(self, pending: dict) -> None:
        total = self.mass.sum()
        shard = int(self.rng.choice(len(self.mass), p=self.mass / total if total > 0 else None))
        pending[self.shards.sample(shard, *self.sample_shape, self.beta(), SAMPLE_WAIT_S)] = shard

    def _run(self) -> None:
        try:
            pending: dict = {}
            for _ in range(self.depth):
                self._call(pending)
            while not self.stop.is_set():
                for handle in self.shards.ready(list(pending), 1, READY_WAIT_S):
                    shard = pending.pop(handle)
                    try:
                        message = self.shards.result(handle)
                    except ShardLost:
                        message = None
                        time.sleep(self.retry_s)
                    if message is not None:  # None: still refused after SAMPLE_WAIT_S
                        batch, meta = self.decode(message)
                        self.mass[shard] = meta["priority_mass"]
                        self._put((shard, batch))
                    self._call(pending)
        except Exception:
            self.error = traceback.format_exc()

    def _put(self, item: tuple[int, dict]) -> None:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
