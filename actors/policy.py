"""The epsilon-greedy policy the actors and the evaluator play with: a Q-network copy and a
random stream, with weights set from the learner's or from a file."""
from __future__ import annotations

import numpy as np

from common.config import Config
from common.env_info import EnvInfo
from common.networks import build_q_network, tf


class EpsilonGreedyPolicy:
    def __init__(self, config: Config, env_info: EnvInfo, seed: int):
        self.rng = np.random.default_rng(seed)
        self.num_actions = env_info.num_actions
        self.model = build_q_network(env_info.obs_shape, env_info.num_actions,
                                     config.mlp_hidden_units, config.dueling)
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

    def select_actions(self, obs: np.ndarray, epsilon: np.ndarray | float,
                       q: np.ndarray | None = None) -> np.ndarray:
        """Epsilon-greedy per observation; `q` (the obs' Q-values) when already computed.
        Only the observations acted on greedily go through the network (none at epsilon 1)."""
        explore = self.rng.random(len(obs)) < epsilon
        actions = self.rng.integers(0, self.num_actions, size=len(obs), dtype=np.int32)
        greedy = np.flatnonzero(~explore)
        if len(greedy):
            greedy_q = self.q_values(obs[greedy]).numpy() if q is None else q[greedy]
            actions[greedy] = greedy_q.argmax(axis=1)
        return actions
