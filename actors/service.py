"""An actor as a Ray actor: a thin shell that runs `Actor` in a loop and ships its chunks.

Sends are bounded: at most `max_inflight_chunks` unacknowledged inserts, and none beyond the
replay shard's insert budget (its rate limiter), so a slow replay service or learner slows
the actor instead of filling memory. Every `weight_refresh_env_frames` emulator frames per env
(or after each chunk) it checks, without waiting, its open weight query (a long poll the
learner answers when it publishes a newer version) and fetches that one object when one came.
The loop starts in `__init__`, so a restarted actor process resumes playing on its own (with
new env seeds and a new frame stream, so replay never mixes its old and new frames). When the
replay shard dies under it, it drops what was in flight and goes on as a new stream once the
shard is back; when the learner dies, its weight query is asked again. Its thread builds the actor,
so the emulator and TensorFlow threads share that thread's CPU priority and CPUs
(`actors.scheduling`): idle by default, and pinned to the actor's own CPUs on a local
machine, while the thread that answers the launcher stays at normal priority on any CPU.
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
from actors.scheduling import lower_to_idle, pin_to_cpus
from common import metrics, wire
from common.config import Config
from common.env_info import EnvInfo
from common.networks import configure_cpu_threads

BUDGET_WAIT_S = 1.0  # longest an ask for insert budget waits in the shard (stop is checked)
WEIGHTS_WAIT_S = 10.0  # how long the learner holds a weight query open for a new version
EPISODE_BACKLOG = 10_000


@ray.remote
class ActorService:
    def __init__(self, config: Config, env_info: EnvInfo, actor_index: int, num_actors: int,
                 replay_name: str, learner_name: str):
        """The replay shard and the learner are named actors, looked up by name: handles as
        constructor arguments would live in the object store, which a restart depends on."""
        configure_cpu_threads(config.actor_threads or 1)  # actors share the node's cores
        if ray.get_runtime_context().was_current_actor_reconstructed:
            # A restarted process plays new games, not a replay of its first life's.
            config = config.replace(seed=secrets.randbelow(1 << 31))
        self.config, self.env_info, self.index = config, env_info, actor_index
        self.replay, self.learner = ray.get_actor(replay_name), ray.get_actor(learner_name)
        self.actor: Actor | None = None
        self.steps_per_refresh = -(-config.weight_refresh_env_frames // env_info.frame_skip)
        self.steps_since_refresh = 0
        self.metrics = metrics.for_role(metrics.ACTOR, actor_index)
        self.episodes: collections.deque = collections.deque(maxlen=EPISODE_BACKLOG)
        self.inflight: list = []  # (ref, transitions) of unacknowledged inserts
        self.insert_budget = 0
        self.global_steps_base = 0  # replay's total inserts at the last acknowledgement ...
        self.local_steps_at_base = 0  # ... and our own step count then
        self.weights_query = None
        self.learner_life = None  # the learner process the weights came from
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
        this thread's priority, take the first weights, then play until stopped."""
        try:
            if self.config.actor_cpu_priority == "idle":
                lower_to_idle()
            if self.config.pin_actor_cpus:
                pin_to_cpus(actor_index, self.config.actor_threads or 1)
            self.actor = Actor(self.config, self.env_info, actor_index, num_actors)
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
                result = self.actor.step(self._global_steps())
                steps = self.config.envs_per_actor
                self.metrics[metrics.AGENT_STEPS].inc(steps)
                self.metrics[metrics.ENV_FRAMES].inc(steps * self.env_info.frame_skip)
                for ret, length in zip(result.finished_returns, result.finished_lengths):
                    self.episodes.append((ret, length))
                    self.metrics[metrics.EPISODES].inc()
                    self.metrics[metrics.EPISODE_RETURN].observe(ret)
                sent = False
                try:
                    while (chunk := self.actor.take_chunk()) is not None:  # K may exceed one
                        self._send(*chunk)
                        sent = True
                except ray.exceptions.RayActorError:
                    self._replay_restarted()
                if self._refresh_due(chunk_sent=sent):
                    self._refresh_weights()
                    self.metrics[metrics.EPSILON].set(
                        float(self.actor.epsilons(self._global_steps()).mean()))
            with contextlib.suppress(ray.exceptions.RayActorError):
                self._collect_acks(wait_all=True)
        except Exception:
            if not self.stop_event.is_set():
                self.error = traceback.format_exc()

    def _replay_restarted(self):
        """The shard died (Ray restarts it from its latest snapshot): what was in flight is
        lost, and the restored shard has not seen this stream's recent frames, so go on as a
        new stream. The next ask for insert budget waits for the shard to be back."""
        self.inflight = []
        self.insert_budget = 0
        self.actor.new_stream()

    def _refresh_due(self, chunk_sent: bool) -> bool:
        """Every `steps_per_refresh` loop steps, or after each chunk when that is 0."""
        if not self.steps_per_refresh:
            return chunk_sent
        self.steps_since_refresh += 1
        if self.steps_since_refresh < self.steps_per_refresh:
            return False
        self.steps_since_refresh = 0
        return True

    def _global_steps(self) -> int:
        """All actors' agent steps, estimated from this shard's inserts (one transition per
        agent step) times the shards (actors spread evenly over them)."""
        return (self.global_steps_base * self.config.replay_shards
                + self.actor.agent_steps - self.local_steps_at_base)

    def _send(self, message: bytes, transitions: int):
        while len(self.inflight) >= self.config.max_inflight_chunks:
            self._collect_acks(wait_one=True)
        while True:
            self._collect_acks()  # chunks that landed during a wait are no longer pending
            if self.stop_event.is_set():
                return
            if self.insert_budget >= transitions:
                break
            pending = sum(n for _, n in self.inflight)  # the replay's rate limiter says wait
            self.insert_budget = ray.get(self.replay.insert_budget.remote(
                transitions + pending, BUDGET_WAIT_S)) - pending
        self.inflight.append((self.replay.insert.remote(wire.for_ray(message)), transitions))
        self.insert_budget -= transitions

    def _collect_acks(self, wait_one: bool = False, wait_all: bool = False):
        refs = [ref for ref, _ in self.inflight]
        if not refs:
            return
        num = len(refs) if wait_all else 1 if wait_one else len(refs)
        timeout = 10.0 if wait_all else None if wait_one else 0
        done, _ = ray.wait(refs, num_returns=num, timeout=timeout)
        done = set(done)
        for ref, _ in [item for item in self.inflight if item[0] in done]:
            ack = ray.get(ref)
            if ack["total_inserted"] > self.global_steps_base:
                self.global_steps_base = ack["total_inserted"]
                self.local_steps_at_base = self.actor.agent_steps
        self.inflight = [item for item in self.inflight if item[0] not in done]
        if done:
            pending = sum(n for _, n in self.inflight)
            self.insert_budget = ack["insert_budget"] - pending

    def _refresh_weights(self, wait: bool = False):
        """Check the open weight query (a long poll the learner answers when a newer version
        is out), open the next one, and load the weights it brought, if any."""
        if self.weights_query is None:
            self.weights_query = self.learner.latest_weights.remote(
                self.actor.policy.weight_version, 0.0 if wait else WEIGHTS_WAIT_S,
                self.learner_life)
        ready, _ = ray.wait([self.weights_query], timeout=None if wait else 0)
        if ready:
            self.weights_query = None
            try:
                answer = ray.get(ready[0])
                if answer is not None:
                    version, ref, self.learner_life = answer
                    self.actor.policy.set_weights(ray.get(ref), version)
                    self.metrics[metrics.ACTOR_WEIGHT_VERSION].set(version)
            except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError):
                pass  # the learner died: Ray restarts it, and the next query waits for it

    def __repr__(self) -> str:  # the dashboard's Repr column and the log lines' prefix
        return f"dqn-actor-{self.index}"

    # What the launcher calls.
    def report(self) -> dict:
        """Episodes finished since the last report, and running totals."""
        episodes = [self.episodes.popleft() for _ in range(len(self.episodes))]
        return {"episodes": episodes, "agent_steps": self.actor.agent_steps,
                "weight_version": self.actor.policy.weight_version, "error": self.error,
                "life": self.life, "pid": os.getpid()}

    def stop(self) -> dict:
        self.stop_event.set()
        self.thread.join()
        self.actor.close()
        return self.report()
