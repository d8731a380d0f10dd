"""BatchPrefetcher without Ray: fake shards that answer each sample call from a real
`ReplayServer` (its rate limiter, sampling and wire format) in the prefetcher's own thread."""
import itertools
import threading
import time

import numpy as np
import pytest

from common.config import PRESETS
from common.env_info import EnvInfo
from learner.prefetcher import BatchPrefetcher, ShardLost
from replay_server.server import ReplayServer
from tests.synthetic import cartpole_chunk

CARTPOLE = EnvInfo("CartPole-v1", (4,), "float32", 2, 1)


class FakeShards:
    """Shards in memory. A call is answered when made (a refused one after a shortened wait
    in the server); a call to a shard in `dead` fails as a dead Ray actor's would."""

    def __init__(self, servers: list):
        self.servers, self.num_shards = servers, len(servers)
        self.dead: set = set()
        self.answers: dict = {}  # handle -> message, None, or ShardLost
        self.handles = itertools.count()
        self.calls: list = []  # the shard of each call
        self.most_in_flight = 0
        self.refused = 0

    def sample(self, shard, batch_size, num_batches, beta, wait_s):
        self.calls.append(shard)
        handle = next(self.handles)
        answer = ShardLost
        if shard not in self.dead:
            answer = self.servers[shard].sample(batch_size, num_batches, beta, min(wait_s, 0.05))
            self.refused += answer is None
        self.answers[handle] = answer
        self.most_in_flight = max(self.most_in_flight, len(self.answers))
        return handle

    def ready(self, handles, num, timeout):
        return handles

    def result(self, handle):
        answer = self.answers.pop(handle)
        if answer is ShardLost:
            raise ShardLost("shard died")
        return answer


def shards_holding(sizes, **changes):
    # Each shard is filled by one chunk: they may be as large as 300 transitions.
    config = PRESETS["cartpole"].replace(**{"min_replay_size": 0, "samples_per_insert": 1.0,
                                            "samples_per_insert_tolerance": 1e12,
                                            "chunk_transitions": 300, **changes})
    servers = [ReplayServer.from_config(config, CARTPOLE, i) for i in range(len(sizes))]
    rng = np.random.default_rng(0)
    for i, (server, size) in enumerate(zip(servers, sizes)):
        if size:
            server.insert(cartpole_chunk(i + 1, size, rng))
    return FakeShards(servers)


@pytest.fixture
def stop():
    stop = threading.Event()
    yield stop
    stop.set()


def prefetcher_for(shards, stop, depth=4, batches_per_call=1):
    return BatchPrefetcher(shards, 16, batches_per_call, lambda: 0.4, stop, depth=depth,
                           retry_s=0.01)


def shards_of(prefetcher, count: int) -> np.ndarray:
    """The shard of each of the next `count` batches."""
    return np.array([prefetcher.get(timeout=10)[0] for _ in range(count)])


def test_batches_come_from_shards_in_proportion_to_their_priority_mass(stop):
    prefetcher = prefetcher_for(shards_holding([300, 100]), stop)
    came = shards_of(prefetcher, 400)
    assert 0.68 < np.mean(came == 0) < 0.82  # 300 / (300 + 100) = 0.75
    assert prefetcher.error is None


def test_decoded_batches_wait_in_a_queue_of_depth_with_depth_calls_in_flight(stop):
    shards = shards_holding([200])
    prefetcher = prefetcher_for(shards, stop, depth=3, batches_per_call=2)
    shard, batch = prefetcher.get(timeout=10)
    assert shard == 0 and batch["obs"].shape == (2, 16, 4) and batch["weight"].shape == (2, 16)
    deadline = time.monotonic() + 10
    while prefetcher.ready.qsize() < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert prefetcher.ready.qsize() == 3  # full: the next decoded batch waits to go in
    assert shards.most_in_flight <= 3
    assert len(shards.calls) <= 1 + 3 + 3  # taken, queued, in flight: no more asked


def test_a_refused_call_is_asked_again_until_the_shard_has_enough(stop):
    shards = shards_holding([0], min_replay_size=50)
    prefetcher = prefetcher_for(shards, stop, depth=2)
    time.sleep(0.3)
    assert prefetcher.ready.empty() and prefetcher.error is None and shards.refused > 2
    shards.servers[0].insert(cartpole_chunk(1, 60, np.random.default_rng(1)))
    assert shards_of(prefetcher, 4).tolist() == [0] * 4


def test_a_dead_shard_is_asked_again_while_the_others_serve(stop):
    shards = shards_holding([100, 100])
    shards.dead.add(1)
    prefetcher = prefetcher_for(shards, stop)
    assert set(shards_of(prefetcher, 30)) == {0}
    assert 1 in shards.calls  # asked, failed, and asked again after a pause
    shards.dead.clear()  # restarted
    deadline = time.monotonic() + 10
    while 1 not in shards_of(prefetcher, 10):
        assert time.monotonic() < deadline, "no batch from the restarted shard"
    assert prefetcher.error is None
