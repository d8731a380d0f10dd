"""The learner as a Ray actor: a thin shell that feeds `DQNLearner` from the replay service.

Two threads run inside it: a prefetcher keeps sample calls in flight and decodes batches into
a small queue, and the trainer takes them, steps, and every `weight_publish_updates` updates
puts the weights into the object store once (`ray.put`) under a new version number. Actors ask
`latest_weights(their_version)` and fetch that one object when it is newer. The actor is
threaded (max_concurrency > 1) so stats and weight queries answer while it trains.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback

import ray

from common import metrics, wire
from common.config import Config
from common.envs import EnvInfo
from learner.learner import DQNLearner, tf

PREFETCH_BATCHES = 2  # sample calls in flight
RATE_LIMITED_BACKOFF_S = 0.002


class BatchPrefetcher:
    """Keeps `depth` sample calls in flight and decoded batches ready in a queue."""

    def __init__(self, replay, batch_size: int, batches_per_call: int, stop: threading.Event,
                 depth: int = PREFETCH_BATCHES):
        self.replay, self.stop, self.depth = replay, stop, depth
        self.sample_args = (batch_size, batches_per_call)
        self.ready: queue.Queue = queue.Queue(maxsize=depth)
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self.thread.start()

    def get(self, timeout: float):
        return self.ready.get(timeout=timeout)

    def _run(self):
        try:
            pending = [self.replay.sample.remote(*self.sample_args) for _ in range(self.depth)]
            while not self.stop.is_set():
                done, pending = ray.wait(pending, num_returns=1, timeout=0.1)
                for ref in done:
                    message = ray.get(ref)
                    if message is None:  # rate limiter: the learner is ahead of the actors
                        time.sleep(RATE_LIMITED_BACKOFF_S)
                    else:
                        arrays, _ = wire.decode(message, expect_kind=wire.BATCH)
                        self._put(arrays)
                    pending.append(self.replay.sample.remote(*self.sample_args))
        except Exception:
            self.error = traceback.format_exc()

    def _put(self, batch):
        while not self.stop.is_set():
            try:
                self.ready.put(batch, timeout=0.1)
                return
            except queue.Full:
                continue


@ray.remote
class LearnerService:
    def __init__(self, config: Config, env_info: EnvInfo, replay):
        self.config = config
        self.device = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
        self.learner = DQNLearner(config, env_info)
        self.metrics = metrics.make(metrics.UPDATES, metrics.TARGET_SYNCS,
                                    metrics.WEIGHT_VERSION)
        self.version = 0
        self.weights_ref = ray.put(self.learner.get_weights())
        self.last_loss = float("nan")
        self.error: str | None = None
        self.stop_event = threading.Event()
        self.prefetcher = BatchPrefetcher(replay, config.batch_size,
                                          config.learner_batches_per_call, self.stop_event)
        self.trainer = threading.Thread(target=self._train, name="train", daemon=True)
        self.trainer.start()

    def _train(self):
        try:
            while not self.stop_event.is_set():
                if self.prefetcher.error:
                    raise RuntimeError(f"batch prefetch failed:\n{self.prefetcher.error}")
                try:
                    batch = self.prefetcher.get(timeout=0.1)
                except queue.Empty:
                    continue
                syncs_before = self.learner.target_syncs
                self.last_loss = self.learner.step(batch)["loss"]
                self.metrics[metrics.UPDATES].inc(self.config.learner_batches_per_call)
                if self.learner.target_syncs != syncs_before:
                    self.metrics[metrics.TARGET_SYNCS].inc()
                if self.learner.updates % self.config.weight_publish_updates == 0:
                    self._publish()
        except Exception:
            self.error = traceback.format_exc()

    def _publish(self):
        # One object per version, however many actors read it.
        self.weights_ref = ray.put(self.learner.get_weights())
        self.version += 1
        self.metrics[metrics.WEIGHT_VERSION].set(self.version)

    def latest_weights(self, known_version: int):
        """[version, ref] when a newer version than `known_version` exists, else None. The
        ref sits in a list so Ray hands it over as a reference, not as the weights."""
        if self.version <= known_version:
            return None
        return [self.version, self.weights_ref]

    def stats(self) -> dict:
        return {"updates": self.learner.updates, "target_syncs": self.learner.target_syncs,
                "weight_version": self.version, "loss": self.last_loss, "device": self.device,
                "error": self.error}

    def stop(self) -> dict:
        self.stop_event.set()
        self.trainer.join()
        self.prefetcher.thread.join()
        return self.stats()

    def weights_h5(self) -> bytes:
        """Final online-network weights as `.weights.h5` bytes, written by the caller."""
        return self.learner.weights_h5_bytes()
