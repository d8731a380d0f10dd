"""Replay at Ape-X scale, measured: memory, insert and sample rates, the sum-tree, snapshots.

    python benchmarks/replay.py [--seconds 10] [--memory-capacity 1000000] [--quick]

Figures (each printed with the load it was measured under), then one JSON line:
- bytes_per_transition: resident memory a full Atari buffer adds to its process, divided by
  the transitions it holds (frames stored once; Breakout frames, 180-step episodes).
- insert_transitions_per_s: Atari transitions sent as msgpack chunks by 2 actor-like Ray
  clients (one frame stream each, at most 4 chunks in flight) into one Ray replay shard that
  validates and stores them; rate limiter open.
- sample_batches_per_s: prioritized batches of 512 (alpha 0.6, beta 0.4) of 3-step
  transitions, as the apex preset stores them, delivered to a learner-like Ray client as
  numpy arrays ready for the train step (stacks rebuilt from the distinct frames, weights
  computed), priority updates sent back for every batch, while a third client inserts 2,000
  transitions/s. sample_batches_per_s_n1: the same with 1-step transitions (the seed
  preset's), whose next stacks share 3 frames with their stacks: fewer bytes a batch.
- sampler_ops_per_s: the sum-tree alone, in process, 2M leaves: sample 512 indices and update
  their 512 priorities.
- snapshot_s_per_100k, restore_s_per_100k: write a 100K-transition Atari shard to a snapshot
  file and read it back into a new buffer.
Each timed Ray measurement follows an untimed warm-up of a few seconds. Linux only
(resident memory is read from /proc). `--quick` runs every part at a small size:
a check that the script works, not a measurement.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import wire
from replay_server.buffer import ReplayBuffer, ReplaySpec
from replay_server.sumtree import SumTree

STACK, FRAME = 4, (84, 84)
EPISODE_STEPS = 180  # a random agent's Breakout episode; longer episodes need fewer frames
CHUNK = 1024
WARM_UP_S = 3.0  # untimed, before each timed Ray measurement
GAMMA = 0.99


def atari_spec(capacity: int, alpha: float = 0.0) -> ReplaySpec:
    return ReplaySpec(capacity, (STACK, *FRAME), FRAME, STACK, "uint8", 4, alpha)


def breakout_frames(count: int) -> np.ndarray:
    """Real preprocessed Breakout frames from random play, so sizes and compression are
    realistic."""
    import ale_py
    import gymnasium as gym
    from gymnasium.wrappers import AtariPreprocessing
    gym.register_envs(ale_py)
    env = AtariPreprocessing(gym.make("BreakoutNoFrameskip-v4", frameskip=1))
    frames = [env.reset(seed=0)[0]]
    while len(frames) < count:
        frame, _, terminated, truncated, _ = env.step(env.action_space.sample())
        frames.append(env.reset()[0] if terminated or truncated else frame)
    env.close()
    return np.stack(frames)


class SyntheticStream:
    """What one actor's adder sends (stack 4, episodes of EPISODE_STEPS, n-step transitions),
    built with numpy instead of an emulator, frames taken from a pool of real ones."""

    def __init__(self, stream: int, pool: np.ndarray, n_step: int = 1):
        self.stream, self.pool, self.n_step = stream, pool, n_step
        self.next_number = 0  # next new frame's number
        self.first_unsent = 0
        self.step_in_episode: int | None = None  # None: the next chunk starts an episode
        self.base = 0  # number of the current episode's first frame

    def chunk(self, n: int, priority: bool = False) -> tuple[dict, dict]:
        obs: list[np.ndarray] = []
        nxt: list[np.ndarray] = []
        discount: list[np.ndarray] = []
        offsets = np.arange(STACK)
        while sum(map(len, discount)) < n:
            if self.step_in_episode is None:
                self.base, self.step_in_episode = self.next_number, 0
            t0 = self.step_in_episode
            steps = min(n - sum(map(len, discount)), EPISODE_STEPS - t0)
            t = np.arange(t0, t0 + steps)[:, None]
            # Transition t bootstraps from the stack n steps on (its episode's last one at
            # most): the frames it names may be sent in a later chunk.
            later = np.minimum(t + self.n_step, EPISODE_STEPS)
            obs.append(self.base + np.maximum(0, t - (STACK - 1) + offsets))
            nxt.append(self.base + np.maximum(0, later - (STACK - 1) + offsets))
            ends = t0 + steps == EPISODE_STEPS
            segment_discount = np.where(later[:, 0] == EPISODE_STEPS, 0.0, GAMMA ** self.n_step)
            discount.append(segment_discount)
            self.next_number = max(self.next_number, self.base + int(later.max()) + 1)
            self.step_in_episode = None if ends else t0 + steps
        numbers = np.arange(self.first_unsent, self.next_number)
        arrays = {"frames": self.pool[numbers % len(self.pool)],
                  "obs_frames": np.concatenate(obs), "next_obs_frames": np.concatenate(nxt),
                  "action": (np.arange(n) % 4).astype(np.int32),
                  "reward": np.zeros(n, np.float32),
                  "discount": np.concatenate(discount).astype(np.float32)}
        if priority:
            arrays["priority"] = np.random.default_rng(self.next_number).random(n).astype(
                np.float32)
        meta = {"stream": self.stream, "first_frame": self.first_unsent}
        self.first_unsent = self.next_number
        return arrays, meta

    def message(self, n: int, priority: bool = False) -> memoryview:
        """The chunk as an actor sends it (frames compressed)."""
        arrays, meta = self.chunk(n, priority)
        return wire.encode_transitions(**arrays, stream=meta["stream"],
                                       first_frame=meta["first_frame"])


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_bytes_per_transition(capacity: int, pool: np.ndarray) -> dict:
    gc.collect()
    before = resident_bytes()
    buffer = ReplayBuffer(atari_spec(capacity, alpha=0.6))
    stream = SyntheticStream(1, pool)
    while buffer.total_added < capacity + capacity // 8:  # past full: both rings wrapped
        buffer.add(*stream.chunk(CHUNK, priority=True))
    size = buffer.size
    per_transition = (resident_bytes() - before) / size
    del buffer
    gc.collect()
    return {"bytes_per_transition": round(per_transition, 1), "memory_capacity": capacity,
            "memory_size": size}


def measure_sampler(leaves: int, seconds: float) -> float:
    tree = SumTree(leaves)
    rng = np.random.default_rng(0)
    tree.set_all(rng.random(leaves))
    ops, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        slots = tree.sample(512, rng)
        tree.set(slots, rng.random(512))
        ops += 1
    return ops / (time.perf_counter() - started)


def measure_snapshot(transitions: int, pool: np.ndarray) -> dict:
    from replay_server.snapshot import read_snapshot, write_snapshot
    buffer = ReplayBuffer(atari_spec(transitions, alpha=0.6))
    stream = SyntheticStream(1, pool)
    while buffer.total_added < transitions:
        buffer.add(*stream.chunk(min(CHUNK, transitions - buffer.total_added), priority=True))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "shard.msgpack"
        started = time.perf_counter()
        written = write_snapshot(buffer, path, threading.Lock())
        write_s = time.perf_counter() - started
        started = time.perf_counter()
        restored, _ = read_snapshot(path, buffer.spec)
        read_s = time.perf_counter() - started
    assert restored.size == buffer.size
    scale = 100_000 / transitions
    return {"snapshot_s_per_100k": round(write_s * scale, 3),
            "restore_s_per_100k": round(read_s * scale, 3),
            "snapshot_mb_per_100k": round(written["bytes"] * scale / 1e6, 2)}


# --- Through Ray ------------------------------------------------------------------------------

def replay_config(capacity: int, alpha: float):
    from common.config import PRESETS
    # Rate limiter open: a tolerance no run reaches, so only the shard's own speed counts;
    # the senders' chunks are CHUNK transitions (a shard refuses more than its run's chunk).
    return PRESETS["apex"].replace(replay_capacity=capacity, min_replay_size=0,
                                   priority_exponent=alpha, samples_per_insert=1.0,
                                   samples_per_insert_tolerance=1e15, chunk_transitions=CHUNK)


def start_shard(capacity: int, alpha: float):
    from common.env_info import EnvInfo
    from replay_server.service import ReplayService
    info = EnvInfo("BreakoutNoFrameskip-v4", (STACK, *FRAME), "uint8", 4, 4)
    # (The ignore: mypy types a class under @ray.remote as the class itself.)
    return ReplayService.options(  # type: ignore[attr-defined]
        num_cpus=1).remote(replay_config(capacity, alpha), info)


def insert_client_class():
    import ray

    @ray.remote(num_cpus=0)
    class InsertClient:
        """An actor-like sender: one frame stream, bounded in-flight chunks."""

        def __init__(self, replay, stream: int, pool, chunk: int, priority: bool,
                     n_step: int = 1):
            self.replay, self.chunk, self.priority = replay, chunk, priority
            self.stream = SyntheticStream(stream, pool, n_step)

        def run(self, seconds: float, per_second: float | None = None,
                inflight: int = 4) -> float:
            """Transitions/s acknowledged; `per_second` paces the sends."""
            pending: list = []
            acked, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                if per_second is not None:
                    due = started + (self.stream.next_number / per_second)
                    time.sleep(max(0.0, due - time.perf_counter()))
                if len(pending) >= inflight:
                    done, pending = ray.wait(pending, num_returns=1)
                    acked += sum(ack.inserted for ack in ray.get(done))
                pending.append(self.replay.insert.remote(wire.for_ray(
                    self.stream.message(self.chunk, self.priority))))
            acked += sum(ack.inserted for ack in ray.get(pending))
            return acked / (time.perf_counter() - started)

    return InsertClient


def learner_client_class():
    import ray

    @ray.remote(num_cpus=0)
    class LearnerClient:
        """A learner-like consumer: sample calls in flight, batches decoded with stacks
        rebuilt, priority updates sent back without waiting."""

        def __init__(self, replay, inflight: int = 3):
            self.replay, self.inflight = replay, inflight
            self.rng = np.random.default_rng(0)
            self.decode = wire.BatchDecoder(ring=inflight + 2)  # as the learner does

        def run(self, seconds: float, batch_size: int = 512) -> float:
            pending = [self.replay.sample.remote(batch_size, 1, 0.4)
                       for _ in range(self.inflight)]
            batches, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                done, pending = ray.wait(pending, num_returns=1)
                pending.append(self.replay.sample.remote(batch_size, 1, 0.4))
                batch, _ = self.decode(ray.get(done[0]))
                assert batch["obs"].shape == (1, batch_size, STACK, *FRAME)
                self.replay.update_priorities.remote(wire.encode_priorities(
                    batch["key"], self.rng.random(batch["key"].shape)))
                batches += 1
            return batches / (time.perf_counter() - started)

    return LearnerClient


def measure_inserts(pool_ref, seconds: float, capacity: int) -> float:
    import ray
    shard = start_shard(capacity, alpha=0.6)
    client = insert_client_class()
    clients = [client.remote(shard, stream, pool_ref, CHUNK, True) for stream in (1, 2)]
    ray.get([c.run.remote(WARM_UP_S) for c in clients])
    rate = sum(ray.get([c.run.remote(seconds) for c in clients]))
    for actor in (*clients, shard):
        ray.kill(actor)
    return rate


def measure_samples(pool_ref, seconds: float, capacity: int, n_step: int) -> dict:
    import ray
    shard = start_shard(capacity, alpha=0.6)
    client = insert_client_class()
    fillers = [client.remote(shard, stream, pool_ref, CHUNK, True, n_step) for stream in (1, 2)]
    while ray.get(shard.stats.remote()).total_inserted < capacity:  # both rings full
        ray.get([f.run.remote(2.0) for f in fillers])
    inserter = client.remote(shard, 3, pool_ref, 256, True, n_step)
    learner = learner_client_class().remote(shard)
    insert_ref = inserter.run.remote(seconds + WARM_UP_S, per_second=2000.0)
    ray.get(learner.run.remote(WARM_UP_S))  # first batches fault in fresh memory everywhere
    batches = ray.get(learner.run.remote(seconds))
    insert_rate = ray.get(insert_ref)
    size = ray.get(shard.stats.remote()).size
    for actor in (*fillers, inserter, learner, shard):
        ray.kill(actor)
    return {"batches_per_s": round(batches, 1), "inserts_per_s_meanwhile": round(insert_rate),
            "replay_size": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="duration of each timed measurement")
    parser.add_argument("--memory-capacity", type=int, default=1_000_000,
                        help="transitions in the buffer whose memory is measured")
    parser.add_argument("--ray-capacity", type=int, default=200_000,
                        help="capacity of the Ray shard for the insert and sample figures")
    parser.add_argument("--address", default=None,
                        help="Ray cluster to join (default: start a local one)")
    parser.add_argument("--quick", action="store_true",
                        help="every part at a small size (checks the script, measures nothing)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.memory_capacity, args.ray_capacity = 1.0, 20_000, 8_000
    snapshot_size = 10_000 if args.quick else 100_000

    pool = breakout_frames(1024)
    results: dict = {"quick": args.quick}
    results.update(measure_bytes_per_transition(args.memory_capacity, pool))
    print(f"bytes per transition: {results['bytes_per_transition']:,.0f} "
          f"(resident memory of a full {args.memory_capacity:,}-transition Atari buffer, "
          f"{results['memory_size']:,} live; in process, nothing else running)", flush=True)
    results["sampler_ops_per_s"] = round(measure_sampler(2_000_000, args.seconds))
    print(f"sum-tree, 2M leaves, sample 512 + update 512: {results['sampler_ops_per_s']:,} "
          f"ops/s (in process, nothing else running)", flush=True)
    results.update(measure_snapshot(snapshot_size, pool))
    print(f"snapshot: {results['snapshot_s_per_100k']} s per 100K transitions "
          f"({results['snapshot_mb_per_100k']} MB), restore: "
          f"{results['restore_s_per_100k']} s per 100K (in process)", flush=True)

    import ray
    runtime_env = {"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}}
    if args.address:
        ray.init(address=args.address, logging_level=logging.ERROR, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR,
                 runtime_env=runtime_env)
    try:
        pool_ref = ray.put(pool)
        results["insert_transitions_per_s"] = round(
            measure_inserts(pool_ref, args.seconds, args.ray_capacity))
        print(f"inserts: {results['insert_transitions_per_s']:,} transitions/s into one Ray "
              f"shard (2 clients, chunks of {CHUNK}, 4 in flight each, priorities attached; "
              f"nothing else running)", flush=True)
        for n_step, suffix in ((3, ""), (1, "_n1")):
            measured = measure_samples(pool_ref, args.seconds, args.ray_capacity, n_step)
            results.update({f"sample_{name}{suffix}": value
                            for name, value in measured.items()})
            print(f"samples, {n_step}-step transitions: {measured['batches_per_s']} "
                  f"prioritized batches of 512/s decoded by a learner-like client with "
                  f"priority updates sent back, from a shard of {measured['replay_size']:,} "
                  f"while {measured['inserts_per_s_meanwhile']:,} transitions/s were "
                  f"inserted", flush=True)
    finally:
        ray.shutdown()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
