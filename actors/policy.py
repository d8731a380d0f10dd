"""The epsilon-greedy policy the actors and the evaluator play with: a Q-network copy and a
random stream, with weights set from the learner's or from a file."""
from __future__ import annotations

import functools

import numpy as np

from common.config import Config
from common.env_info import EnvInfo
from common.networks import build_q_network, resolve_precision, tf
from common.timing import calls_per_second_in_turns

# Seconds of forward passes `fastest_policy` times each precision, after its trace.
PRECISION_PROBE_S = 0.5


class EpsilonGreedyPolicy:
    """`precision`: what the forward pass computes in ("float32", or "bfloat16"/"float16"
    as Keras mixed precision: its weights are float32 all the same, so the learner's load
    into every precision)."""

    def __init__(self, config: Config, env_info: EnvInfo, seed: int,
                 precision: str = "float32"):
        self.rng = np.random.default_rng(seed)
        self.num_actions = env_info.num_actions
        self.precision = precision
        self.model = build_q_network(env_info.obs_shape, env_info.num_actions,
                                     config.mlp_hidden_units, config.dueling, precision)
        # Called on the envs that act greedily: any batch size, so one trace and no XLA
        # (which compiles per shape, and with oneDNN on runs this forward pass no faster).
        self.q_values = tf.function(
            lambda obs: self.model(obs, training=False), jit_compile=False,
            input_signature=[tf.TensorSpec((None, *env_info.obs_shape),
                                           tf.as_dtype(env_info.obs_dtype))])
        self.weight_version = -1

    def set_weights(self, weights: list[np.ndarray], version: int) -> None:
        self.model.set_weights(weights)
        self.weight_version = version

    def load_weights(self, path: str) -> None:
        """A `.weights.h5` file the learner wrote (HDF5 tensors: nothing is unpickled)."""
        self.model.load_weights(path)
        self.weight_version = 0

    def greedy_actions(self, obs: np.ndarray) -> np.ndarray:
        return self.q_values(obs).numpy().argmax(axis=1)

    def select_actions(self, obs: np.ndarray, epsilon: np.ndarray | float,
                       q: np.ndarray | None = None) -> np.ndarray:
        """Epsilon-greedy per observation; `q` (the obs' Q-values) when already computed.
        Only the observations acted on greedily go through the network (none at epsilon 1)."""
        explore = self.rng.random(len(obs)) < epsilon
        actions = self.rng.integers(0, self.num_actions, size=len(obs), dtype=np.int32)
        greedy = np.flatnonzero(~explore)
        if len(greedy):
            actions[greedy] = (self.greedy_actions(obs[greedy]) if q is None
                               else q[greedy].argmax(axis=1))
        return actions


def fastest_policy(config: Config, env_info: EnvInfo, seed: int, obs: np.ndarray,
                   seconds_each: float = PRECISION_PROBE_S
                   ) -> tuple[EpsilonGreedyPolicy, dict[str, float] | None]:
    """The policy in `config.actor_precision`, traced on `obs`. For "auto": float32 and the
    precision `resolve_precision` picks for this device, when that is another, each timed on
    `obs` (the actor's envs, all acting greedily: the most a step asks), taking turns; the
    faster is kept, and the observations per second each computed are returned beside it."""
    candidate = resolve_precision(config.actor_precision, env_info.obs_shape)
    if config.actor_precision != "auto" or candidate == "float32":
        policy = EpsilonGreedyPolicy(config, env_info, seed, candidate)
        policy.q_values(obs)
        return policy, None
    policies = {precision: EpsilonGreedyPolicy(config, env_info, seed, precision)
                for precision in ("float32", candidate)}
    forward_passes = {precision: functools.partial(policy.greedy_actions, obs)
                      for precision, policy in policies.items()}
    for forward_pass in forward_passes.values():
        for _ in range(2):  # trace, warm up
            forward_pass()
    calls = calls_per_second_in_turns(forward_passes, seconds_each)
    rates = {precision: round(rate * len(obs), 1) for precision, rate in calls.items()}
    return policies[max(rates, key=rates.__getitem__)], rates
