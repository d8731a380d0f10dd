"""An actor as a Ray actor: a thin shell that runs `Actor` in a loop and ships its chunks.

Each chunk goes to the replay shard through an `InsertPacer` (a bounded number of
unacknowledged sends, none beyond the shard's insert budget; it also estimates the global agent
step the epsilon schedule runs on). Every `weight_refresh_env_frames` emulator frames per env
(or after each chunk) a `WeightClient` checks, without waiting, its open weight query (a long
poll the learner answers when it publishes a newer version) and loads the weights when some
came. Both reach Ray through the thin wrappers in `actors.remotes`.
The loop starts in `__init__`, so a restarted actor process resumes playing on its own (with
new env seeds and a new frame stream, so replay never mixes its old and new frames). When the
replay shard dies under it, the pacer drops what was in flight and the actor goes on as a new
stream once the shard is back; when the learner dies, its weight query is asked again. Its
thread builds the actor, so the emulator and TensorFlow threads share that thread's CPU
priority and CPUs (`actors.scheduling`): idle by default (a restarted process builds at normal
priority first), and pinned to the actor's own CPUs on a local machine, while the thread that
answers the launcher stays at normal priority on any CPU.
"""
from __future__ import annotations

import collections
import contextlib
import os
import secrets
import threading
import traceback

import ray

from actors.actor import Actor
from actors.insert_pacer import InsertPacer
from actors.records import ActorReport, FinishedEpisode
from actors.remotes import RayReplay, RayWeightSource
from actors.scheduling import lower_to_idle, pin_to_cpus, thread_ids
from actors.weight_client import SourceLost, WeightClient
from common import metrics
from common.config import SEED_LIMIT, Config
from common.env_info import EnvInfo
from common.networks import configure_cpu_threads

EPISODE_BACKLOG = 10_000


@ray.remote
class ActorService:
    def __init__(self, config: Config, env_info: EnvInfo, actor_index: int, num_actors: int,
                 replay_name: str, learner_name: str):
        """The replay shard and the learner are named actors, looked up by name: handles as
        constructor arguments would live in the object store, which a restart depends on."""
        configure_cpu_threads(config.actor_threads or 1)  # actors share the node's cores
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        if self.restarted:
            # A restarted process plays new games, not a replay of its first life's.
            config = config.replace(seed=secrets.randbelow(SEED_LIMIT))
        self.config, self.env_info, self.index = config, env_info, actor_index
        self.replay, self.learner = ray.get_actor(replay_name), ray.get_actor(learner_name)
        # Built by `_play` on its thread before this constructor returns (or raises).
        self.actor: Actor
        self.pacer: InsertPacer
        self.weights: WeightClient
        self.steps_per_refresh = -(-config.weight_refresh_env_frames // env_info.frame_skip)
        self.steps_since_refresh = 0
        self.metrics = metrics.for_role(metrics.ACTOR, actor_index)
        self.episodes: collections.deque[FinishedEpisode] = collections.deque(
            maxlen=EPISODE_BACKLOG)
        self.life = secrets.token_hex(4)  # a restarted process reports a new one
        self.error: str | None = None
        self.start_error: Exception | None = None
        self.stop_event = threading.Event()
        started = threading.Event()
        self.thread = threading.Thread(target=self._play, name="act", daemon=True,
                                       args=(actor_index, num_actors, started))
        self.thread.start()
        started.wait()
        if self.start_error is not None:
            raise self.start_error

    # The loop.
    def _play(self, actor_index: int, num_actors: int, started: threading.Event):
        """Build the actor on this thread, so its emulator and TensorFlow threads inherit
        this thread's priority and CPUs, take the first weights, then play until stopped.
        A first start builds at the actors' priority, leaving the CPU to the learner and the
        replay shard starting beside it; a restarted process builds at normal priority (the
        learner is training, and would starve its emulators' start), then lowers this thread
        and the ones the build started."""
        try:
            idle = self.config.actor_cpu_priority == "idle"
            if idle and not self.restarted:
                lower_to_idle()
            if self.config.pin_actor_cpus:
                pin_to_cpus(actor_index, self.config.actor_threads or 1)
            before_build = thread_ids()
            self.actor = actor = Actor(self.config, self.env_info, actor_index, num_actors)
            if idle and self.restarted:
                lower_to_idle({0, *(thread_ids() - before_build)})
            self.pacer = InsertPacer(RayReplay(self.replay), self.config.max_inflight_chunks,
                                     self.config.replay_shards, self.stop_event,
                                     agent_steps=lambda: actor.agent_steps,
                                     new_stream=actor.new_stream)
            self.weights = WeightClient(RayWeightSource(self.learner), self._set_weights)
            self._refresh_weights(wait=True)
        except Exception as error:  # raised by __init__: the actor fails to start
            self.start_error = error
            return
        finally:
            started.set()
        self._run()

    def _run(self):
        try:
            while not self.stop_event.is_set():
                result = self.actor.step(self.pacer.global_steps())
                steps = self.config.envs_per_actor
                self.metrics[metrics.AGENT_STEPS].inc(steps)
                self.metrics[metrics.ENV_FRAMES].inc(steps * self.env_info.frame_skip)
                for ret, length in zip(result.finished_returns, result.finished_lengths):
                    self.episodes.append(FinishedEpisode(ret, length))
                    self.metrics[metrics.EPISODES].inc()
                    self.metrics[metrics.EPISODE_RETURN].observe(ret)
                sent = False
                while (chunk := self.actor.take_chunk()) is not None:  # K may exceed one
                    sent = self.pacer.send(*chunk) or sent
                if self._refresh_due(chunk_sent=sent):
                    self._refresh_weights()
                    self.metrics[metrics.EPSILON].set(
                        float(self.actor.epsilons(self.pacer.global_steps()).mean()))
            self.pacer.flush()
        except Exception:
            if not self.stop_event.is_set():
                self.error = traceback.format_exc()

    def _refresh_due(self, chunk_sent: bool) -> bool:
        """Every `steps_per_refresh` loop steps, or after each chunk when that is 0."""
        if not self.steps_per_refresh:
            return chunk_sent
        self.steps_since_refresh += 1
        if self.steps_since_refresh < self.steps_per_refresh:
            return False
        self.steps_since_refresh = 0
        return True

    def _refresh_weights(self, wait: bool = False):
        with contextlib.suppress(SourceLost):  # Ray restarts the learner; the next query waits
            self.weights.update(wait)

    def _set_weights(self, weights: list, version: int):
        self.actor.policy.set_weights(weights, version)
        self.metrics[metrics.ACTOR_WEIGHT_VERSION].set(version)

    def __repr__(self) -> str:  # the dashboard's Repr column and the log lines' prefix
        return f"dqn-actor-{self.index}"

    # What the launcher calls.
    def report(self) -> ActorReport:
        episodes = tuple(self.episodes.popleft() for _ in range(len(self.episodes)))
        actor = self.actor
        return ActorReport(episodes, actor.agent_steps, actor.policy.weight_version,
                           self.error, self.life, os.getpid(), actor.policy.precision,
                           actor.precision_rates)

    def stop(self) -> ActorReport:
        self.stop_event.set()
        self.thread.join()
        self.actor.close()
        return self.report()
