"""Backpressure on real Ray: an actor whose replay shard stalls stops playing after a bounded
number of unacknowledged sends, so its memory stays flat, and resumes when the shard does."""
import os
import signal
import time

import psutil
import ray

from common.config import PRESETS
from common.envs import describe_env
from launch import place_roles, stop_roles
from tests.conftest import wait_until


def actor_steps(actor) -> int:
    return ray.get(actor.report.remote(), timeout=30).agent_steps


def test_a_stalled_replay_shard_bounds_what_an_actor_holds(ray_address):
    envs, chunk = 4, 16
    config = PRESETS["seed"].replace(
        envs_per_actor=envs, actor_threads=1, chunk_transitions=chunk, max_inflight_chunks=2,
        # The learner never samples: only the stall can hold the actor back.
        replay_capacity=1_000_000, min_replay_size=1_000_000)
    info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    roles = place_roles(config, info, num_actors=1)
    actor, shard = roles.actors[0], roles.shards[0]
    shard_process = psutil.Process(ray.get(shard.__ray_call__.remote(lambda self: os.getpid())))
    actor_process = psutil.Process(ray.get(actor.__ray_call__.remote(lambda self: os.getpid())))
    try:
        wait_until(lambda: actor_steps(actor) > 20 * chunk, "the actor to play", 120,
                   every=0.2)
        shard_process.send_signal(signal.SIGSTOP)  # the shard stops answering inserts
        try:
            time.sleep(3.0)  # acknowledgements in flight drain; the actor hits its bound
            stalled_steps, stalled_rss = actor_steps(actor), actor_process.memory_info().rss
            time.sleep(5.0)
            assert actor_steps(actor) == stalled_steps  # it waits instead of playing on
            assert actor_process.memory_info().rss - stalled_rss < 20e6
        finally:
            shard_process.send_signal(signal.SIGCONT)
        wait_until(lambda: actor_steps(actor) > stalled_steps + 10 * chunk,
                   "the actor to resume after the stall", 60, every=0.2)
    finally:
        stop_roles(roles)
