"""The actor without Ray: K envs, an epsilon-greedy copy of the Q-network, transition chunks.

`step()` takes one action in every env (one batched forward pass for all K) and hands the K
transitions to a `ChunkAdder`; `take_chunk()` returns a ready wire message for the replay
service. Weights arrive through `set_weights(weights, version)`.
"""
from __future__ import annotations

import numpy as np

from common.config import Config, epsilon_at
from common.envs import BatchStep, EnvBatch, EnvInfo
from common.networks import build_q_network
from common.wire import encode_transitions

import tensorflow as tf  # noqa: E402  (after networks.py set the Keras backend)


class ChunkAdder:
    """Collects one-step transitions and cuts them into chunks of exactly `chunk_size`."""

    FIELDS = ("obs", "action", "reward", "discount", "next_obs")

    def __init__(self, chunk_size: int):
        self.chunk_size = chunk_size
        self.parts: list[dict[str, np.ndarray]] = []
        self.pending = 0

    def add(self, **transitions: np.ndarray) -> None:
        self.parts.append(transitions)
        self.pending += len(transitions["action"])

    def take(self) -> dict[str, np.ndarray] | None:
        if self.pending < self.chunk_size:
            return None
        joined = {name: np.concatenate([p[name] for p in self.parts]) for name in self.FIELDS}
        chunk = {name: array[:self.chunk_size] for name, array in joined.items()}
        rest = {name: array[self.chunk_size:] for name, array in joined.items()}
        self.pending -= self.chunk_size
        self.parts = [rest] if self.pending else []
        return chunk


class Actor:
    def __init__(self, config: Config, env_info: EnvInfo, actor_index: int):
        self.config = config
        seed = config.seed + 10_000 * (actor_index + 1)
        self.rng = np.random.default_rng(seed)
        self.num_actions = env_info.num_actions
        self.envs = EnvBatch(config.env, config.envs_per_actor, seed,
                             config.max_episode_agent_steps, config.frame_stack)
        self.model = build_q_network(env_info.obs_shape, env_info.num_actions,
                                     config.mlp_hidden_units)
        self.greedy = tf.function(
            lambda obs: tf.argmax(self.model(obs, training=False), axis=1, output_type=tf.int32),
            reduce_retracing=True)
        self.adder = ChunkAdder(config.chunk_transitions)
        self.weight_version = -1
        self.agent_steps = 0
        self.obs = self.envs.reset()

    def set_weights(self, weights: list[np.ndarray], version: int) -> None:
        self.model.set_weights(weights)
        self.weight_version = version

    def select_actions(self, obs: np.ndarray, epsilon: float) -> np.ndarray:
        explore = self.rng.random(len(obs)) < epsilon
        actions = self.rng.integers(0, self.num_actions, size=len(obs), dtype=np.int32)
        if not explore.all():  # skip the forward pass while every env acts at random
            greedy = self.greedy(obs).numpy()
            actions = np.where(explore, actions, greedy)
        return actions

    def step(self, global_agent_steps: int) -> BatchStep:
        """One action in each env, with epsilon from the global step count."""
        actions = self.select_actions(self.obs, epsilon_at(self.config, global_agent_steps))
        result = self.envs.step(actions)
        discount = self.config.gamma * (1.0 - result.terminated.astype(np.float32))
        self.adder.add(obs=self.obs, action=actions, reward=result.reward,
                       discount=discount, next_obs=result.next_obs)
        self.obs = result.obs
        self.agent_steps += len(actions)
        return result

    def take_chunk(self) -> tuple[bytes, int] | None:
        """(wire message, transition count) of the next full chunk, if one is ready."""
        chunk = self.adder.take()
        if chunk is None:
            return None
        return encode_transitions(**chunk), len(chunk["action"])

    def close(self) -> None:
        self.envs.close()
