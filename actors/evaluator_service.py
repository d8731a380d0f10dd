"""The evaluator as a Ray actor: a thin shell over `Evaluator` that brings its weights up to
the learner's latest for each evaluation the launcher asks for (a `WeightClient`: weights are
fetched only when the learner published a new version or is a new process).

Its playing threads (emulators, forward pass) run at the actors' CPU priority, so an
evaluation takes CPU the learner leaves over, never the learner's.
"""
from __future__ import annotations

import os
import secrets
import time

import ray

from actors.evaluator import Evaluator
from actors.remotes import RayWeightSource
from actors.scheduling import lower_to_idle
from actors.weight_client import WeightClient
from common import metrics
from common.config import SEED_LIMIT, Config
from common.env_info import EnvInfo
from common.networks import configure_cpu_threads, weights_h5_bytes

EVALUATOR_SEED_OFFSET = 7_777_777


@ray.remote
class EvaluatorService:
    def __init__(self, config: Config, env_info: EnvInfo, learner_name: str):
        configure_cpu_threads(1)
        if config.actor_cpu_priority == "idle":
            lower_to_idle()  # this thread runs every call, and starts the playing threads
        self.config = config
        seed = config.seed + EVALUATOR_SEED_OFFSET  # other games than any actor's
        if ray.get_runtime_context().was_current_actor_reconstructed:
            seed = secrets.randbelow(SEED_LIMIT)  # as a restarted actor does
        self.evaluator = Evaluator(config, env_info, config.eval_episodes, seed)
        self.weights = WeightClient(RayWeightSource(ray.get_actor(learner_name)),
                                    self.evaluator.policy.set_weights)
        self.metrics = metrics.for_role(metrics.EVALUATOR)
        self.life = secrets.token_hex(4)

    def evaluate(self) -> dict:
        """Plays one evaluation with the learner's newest weights: their version, the
        episodes' raw scores, and the weights as `.weights.h5` bytes (kept when they are the
        best so far)."""
        started = time.monotonic()
        self.weights.update(wait=True)  # a learner that died fails this evaluation
        returns = self.evaluator.play(self.config.eval_epsilon)
        mean = sum(returns) / len(returns)
        self.metrics[metrics.EVAL_RETURN_MEAN].set(mean)
        return {"weight_version": self.weights.version, "returns": returns, "life": self.life,
                "seconds": round(time.monotonic() - started, 2), "pid": os.getpid(),
                "weights_h5": weights_h5_bytes(self.evaluator.policy.model)}

    def __repr__(self) -> str:  # the dashboard's Repr column and the log lines' prefix
        return "dqn-evaluator"
