"""The learner as a Ray actor: a thin shell that feeds `DQNLearner` from the replay shards.

Two threads run inside it: a `BatchPrefetcher` keeps sample calls in flight (each waits in
the shard until the rate limiter lets it through: no polling; `RayShards` makes them Ray
calls) and decodes batches into a small queue, and the trainer takes them, steps, sends the
new |TD| priorities back to the shard each batch came from without waiting, and every
`weight_publish_updates` updates puts the weights into the object store once (`ray.put`)
under a new version number. Actors' `WeightClient`s ask `latest_weights(their_version,
wait_s, learner_life)`, a long poll that answers when a newer version is out or the learner is
a new process (restored from a checkpoint, with an older version), or after `wait_s`, and
fetch that one object: one query and one fetch per version, however often an actor checks its
query. The actor is threaded (max_concurrency > 1) so stats answer while it trains, and the
long polls wait in a concurrency group of their own so they never hold up the rest. A
checkpoint (`checkpoint`) saves the whole training state between two updates; a new process
of this actor starts from the latest one.
"""
from __future__ import annotations

import math
import os
import queue
import secrets
import threading
import time
import traceback

import numpy as np
import ray

from common import checkpoints, metrics, wire
from common.checkpoints import CheckpointStore
from common.config import Config, importance_exponent_at
from common.env_info import EnvInfo
from learner.learner import DQNLearner, tf
from learner.prefetcher import BatchPrefetcher, ShardLost
from learner.records import LearnerStats

# The long polls' concurrency group: one thread per waiting query. Past this many actors the
# extra queries queue, and answer as soon as the next publish frees the threads.
WEIGHTS_GROUP, WEIGHTS_QUERY_THREADS = "weights", 64


class DivergedError(RuntimeError):
    """The loss is no longer finite: training stops, keeping the last good state."""


class RayShards:
    """A `ShardSet` over `ReplayService` handles."""

    def __init__(self, shards: list):
        self.shards, self.num_shards = shards, len(shards)

    def sample(self, shard: int, batch_size: int, num_batches: int, beta: float,
               wait_s: float):
        return self.shards[shard].sample.remote(batch_size, num_batches, beta, wait_s)

    def ready(self, handles: list, num: int, timeout: float | None) -> list:
        return ray.wait(handles, num_returns=num, timeout=timeout)[0]

    def result(self, handle):
        try:
            return ray.get(handle)
        except ray.exceptions.RayActorError as error:
            raise ShardLost(str(error)) from error


# (The ignore: Ray's typed overloads of `ray.remote` leave out `concurrency_groups`.)
@ray.remote(  # type: ignore[call-overload]
    concurrency_groups={WEIGHTS_GROUP: WEIGHTS_QUERY_THREADS, "checkpoint": 1})
class LearnerService:
    def __init__(self, config: Config, env_info: EnvInfo, shard_names: list[str],
                 checkpoint_root: str | None = None):
        """Starts from the latest checkpoint under `checkpoint_root` when there is one (a
        resumed run, or this process restarted after a crash), else from scratch. The replay
        shards are named actors, looked up by name: handles as constructor arguments would
        live in the object store, which a restart depends on."""
        self.config = config
        self.device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        self.life = secrets.token_hex(4)  # a restarted process reports a new one
        self.learner = DQNLearner(config, env_info)
        self.version = 0
        self.restored_from: str | None = None  # the checkpoint it started from
        self.passed_over: str | None = None  # why newer ones were not
        self.restored_updates = 0
        if checkpoint_root is not None:
            self._restore_latest(CheckpointStore(checkpoint_root))
        if config.xla == "auto":  # after the restore, which may fail: a few seconds of steps
            self.learner.choose_compile_mode()
        # Training and saving take turns, so a checkpoint is one consistent state.
        self.step_lock = threading.Lock()
        self.metrics = metrics.for_role(metrics.LEARNER)
        self.metrics[metrics.WEIGHT_VERSION].set(self.version)  # the policy lag's reference
        # Seconds the trainer sat without a batch once training had begun: the rate limiter
        # holding it back, or replay and Ray not keeping the prefetch queue full.
        self.starved_s = 0.0
        self.weights_ref = ray.put(self.learner.get_weights())
        self.published = threading.Condition()  # notified at each new version, and at stop
        self.last_loss = self.last_q_mean = float("nan")
        self.error: str | None = None
        self.diverged = False  # a non-finite loss: nothing is published or saved after it
        self.stop_event = threading.Event()
        self.shards = [ray.get_actor(name) for name in shard_names]
        self.prefetcher = BatchPrefetcher(
            RayShards(self.shards), config.batch_size, config.learner_batches_per_call,
            lambda: importance_exponent_at(config, self.learner.updates), self.stop_event,
            seed=config.seed)
        self.trainer = threading.Thread(target=self._train, name="train", daemon=True)
        self.trainer.start()

    def _train(self):
        try:
            while not self.stop_event.is_set():
                if self.prefetcher.error:
                    raise RuntimeError(f"batch prefetch failed:\n{self.prefetcher.error}")
                waiting_since = time.perf_counter()
                try:
                    shard, batch = self.prefetcher.get(timeout=0.1)
                except queue.Empty:
                    continue
                finally:
                    self._count_wait(time.perf_counter() - waiting_since)
                with self.step_lock:
                    syncs_before = self.learner.target_syncs
                    result = self.learner.step(batch)
                    if not math.isfinite(result.loss):
                        self._diverge(f"the loss became {result.loss}")
                    if self.learner.updates % self.config.weight_publish_updates == 0:
                        if not self.learner.state_finite(online_only=True):
                            self._diverge("the weights became non-finite")
                        self._publish()
                self.last_loss, self.last_q_mean = result.loss, result.q_mean
                if self.config.priority_exponent > 0:  # fire and forget: never wait on replay
                    self.shards[shard].update_priorities.remote(
                        wire.encode_priorities(batch["key"], np.abs(result.td_error)))
                self.metrics[metrics.UPDATES].inc(self.config.learner_batches_per_call)
                self.metrics[metrics.LOSS].set(result.loss)
                self.metrics[metrics.Q_MEAN].set(result.q_mean)
                if self.learner.target_syncs != syncs_before:
                    self.metrics[metrics.TARGET_SYNCS].inc()
        except DivergedError as diverged:  # one line says it all
            self.error = f"diverged: {diverged}"
        except Exception:
            self.error = traceback.format_exc()

    def _diverge(self, what: str):
        self.diverged = True
        raise DivergedError(f"{what} at update {self.learner.updates}; these weights are "
                            f"neither published nor saved (the latest checkpoint is the last "
                            f"good state)")

    def _count_wait(self, seconds: float):
        if self.learner.updates > 0:  # before the first update the wait is replay filling up
            self.starved_s += seconds
            self.metrics[metrics.LEARNER_STARVED].inc(seconds)

    def _publish(self):
        # One object per version, however many actors read it.
        weights_ref = ray.put(self.learner.get_weights())
        with self.published:
            self.weights_ref = weights_ref
            self.version += 1
            self.published.notify_all()
        self.metrics[metrics.WEIGHT_VERSION].set(self.version)

    @ray.method(concurrency_group=WEIGHTS_GROUP)
    def latest_weights(self, known_version: int, wait_s: float = 0.0,
                       known_life: str | None = None):
        """[version, ref, life] once there is news for a caller holding `known_version` of
        the learner process `known_life`: a newer version, or this process is another one
        (a learner restored from a checkpoint goes back to that checkpoint's version). Waits
        up to `wait_s` for news; else None. The ref sits in a list so Ray hands it over as a
        reference, not as the weights."""
        def news() -> bool:
            return self.version > known_version or known_life != self.life

        with self.published:
            self.published.wait_for(lambda: news() or self.stop_event.is_set(), wait_s)
            if not news():
                return None
            return [self.version, self.weights_ref, self.life]

    def stats(self) -> LearnerStats:
        return LearnerStats(
            updates=self.learner.updates, target_syncs=self.learner.target_syncs,
            weight_version=self.version, loss=self.last_loss, q_mean=self.last_q_mean,
            device=self.device, precision=self.learner.precision, xla=self.learner.xla,
            compile_rates=self.learner.compile_rates,
            starved_s=self.starved_s, error=self.error, life=self.life,
            restored_from=self.restored_from, passed_over=self.passed_over,
            restored_updates=self.restored_updates,
            node_ip=ray.util.get_node_ip_address(), pid=os.getpid())

    def __repr__(self) -> str:  # the dashboard's Repr column and the log lines' prefix
        return "dqn-learner"

    # Checkpoints.
    def _restore_latest(self, store: CheckpointStore) -> None:
        with store.latest_part(checkpoints.LEARNER) as latest:
            if latest is None:
                return
            counters = self.learner.restore(os.path.join(latest.path, "state"),
                                            ("weight_version",))
        self.version = counters["weight_version"]
        self.restored_from, self.restored_updates = latest.name, self.learner.updates
        self.passed_over = latest.passed_over

    @ray.method(concurrency_group="checkpoint")
    def checkpoint(self, checkpoint_root: str, staging: str) -> dict:
        """Write the whole training state into the staged checkpoint `staging`, between two
        updates (training pauses only while the tensors are written)."""
        started = time.monotonic()
        store = CheckpointStore(checkpoint_root)
        with store.writing(f"{staging}/{checkpoints.LEARNER}") as folder:
            with self.step_lock:
                if self.diverged or not self.learner.state_finite():
                    self.diverged = True
                    raise DivergedError("no checkpoint of a diverged learner")
                self.learner.save(os.path.join(folder, "state"),
                                  {"weight_version": self.version})
                updates = self.learner.updates
        return {"updates": updates, "weight_version": self.version,
                "seconds": round(time.monotonic() - started, 3)}

    def stop(self) -> LearnerStats:
        self.stop_event.set()
        with self.published:
            self.published.notify_all()  # release the waiting weight queries
        self.trainer.join()
        self.prefetcher.thread.join()
        return self.stats()

    def weights_h5(self) -> bytes | None:
        """Final online-network weights as `.weights.h5` bytes, written by the caller; None
        once the learner diverged."""
        return None if self.diverged else self.learner.weights_h5_bytes()
