"""Sharded replay on real Ray: the learner samples every shard in proportion to its priority
mass and sends each batch's new priorities back to the shard it came from; actors' weight
queries are long polls the learner answers when it publishes."""
import threading
import time
import uuid

import numpy as np
import ray

from common.config import PRESETS
from common.envs import describe_env
from learner.prefetcher import BatchPrefetcher
from learner.service import LearnerService, RayShards
from replay_server.service import ReplayService
from tests.synthetic import cartpole_chunk


def start_shards(config, sizes):
    """Named shards (a learner finds its shards by name) holding `sizes` transitions."""
    info = describe_env("CartPole-v1")
    names = [f"test-replay-{uuid.uuid4().hex[:8]}-{i}" for i in range(len(sizes))]
    shards = [ReplayService.options(name=name).remote(config, info, i)
              for i, name in enumerate(names)]
    rng = np.random.default_rng(0)
    ray.get([shard.insert.remote(cartpole_chunk(i + 1, size, rng))
             for i, (shard, size) in enumerate(zip(shards, sizes))])
    return shards, names, info


def open_config(**changes):
    # Each shard is filled by one chunk (start_shards): they may be as large as 300 transitions.
    return PRESETS["cartpole"].replace(**{"min_replay_size": 0, "samples_per_insert": 1.0,
                                          "samples_per_insert_tolerance": 1e12,
                                          "chunk_transitions": 300, **changes})


def test_batches_come_from_shards_in_proportion_to_their_mass(ray_address):
    shards, _, _ = start_shards(open_config(), [300, 100])
    stop = threading.Event()
    prefetcher = BatchPrefetcher(RayShards(shards), 16, 1, lambda: 0.4, stop, depth=4)
    counts = np.zeros(2)
    try:
        deadline = time.monotonic() + 60
        while counts.sum() < 400 and time.monotonic() < deadline:
            shard, batch = prefetcher.get(timeout=10)
            counts[shard] += 1
            assert batch["obs"].shape == (1, 16, 4)
    finally:
        stop.set()
        prefetcher.thread.join()
    assert prefetcher.error is None
    share = counts[0] / counts.sum()
    assert 0.68 < share < 0.82, counts  # 300 / (300 + 100) = 0.75
    for shard in shards:
        ray.kill(shard)


def test_priority_updates_go_back_to_the_shard_each_batch_came_from(ray_address):
    config = open_config(priority_exponent=1.0, batch_size=16, learner_batches_per_call=1,
                         target_sync_updates=1000, weight_publish_updates=1000)
    shards, names, info = start_shards(config, [200, 200])
    before = [ray.get(s.stats.remote()) for s in shards]
    # Every item entered at the largest priority so far, 1.0.
    assert all(abs(stats.priority_mass - stats.size) < 1e-3 for stats in before)
    learner = LearnerService.options(max_concurrency=4).remote(config, info, names)
    try:
        deadline = time.monotonic() + 90
        while ray.get(learner.stats.remote()).updates < 60 and time.monotonic() < deadline:
            time.sleep(0.5)
        stats = ray.get(learner.stop.remote())
        assert stats.error is None and stats.updates >= 60
        after = [ray.get(s.stats.remote()) for s in shards]
        # Both shards' items took |TD| priorities in place of the initial 1.0.
        assert all(abs(a.priority_mass - a.size) > 1.0 for a in after), after
    finally:
        for actor in (learner, *shards):
            ray.kill(actor)


def test_weight_queries_wait_for_a_newer_version_and_stop_releases_them(ray_address):
    config = open_config(batch_size=16, learner_batches_per_call=1, target_sync_updates=1000,
                         weight_publish_updates=20)
    shards, names, info = start_shards(config, [200])
    learner = LearnerService.options(max_concurrency=4).remote(config, info, names)
    try:
        version, ref, life = ray.get(learner.latest_weights.remote(-1, 0.0), timeout=30)
        assert version >= 0 and len(ray.get(ref)) == 6  # 3 dense layers' kernels and biases
        # A query for the version it has waits, and comes back with the next one published.
        newer, _, same_life = ray.get(learner.latest_weights.remote(version, 60.0, life),
                                      timeout=60)
        assert newer > version and same_life == life
        # Nothing newer within the wait: None once the wait is over, not before.
        started = time.monotonic()
        assert ray.get(learner.latest_weights.remote(10**9, 1.0, life), timeout=30) is None
        assert time.monotonic() - started >= 0.9
        # Weights from another learner process (one since restarted) are news at once.
        assert ray.get(learner.latest_weights.remote(10**9, 60.0, "gone"), timeout=5)[2] == life
        # Two queries wait in their own group while stats still answer; stop releases them.
        waiting = [learner.latest_weights.remote(10**9, 600.0, life) for _ in range(2)]
        time.sleep(0.5)
        assert ray.get(learner.stats.remote(), timeout=10).error is None
        ray.get(learner.stop.remote(), timeout=30)
        assert ray.get(waiting, timeout=10) == [None, None]
    finally:
        for actor in (learner, *shards):
            ray.kill(actor)
