"""The actor without Ray: K envs, an epsilon-greedy copy of the Q-network, an adder.

`step()` takes one action in every env (one batched forward pass over the envs that act
greedily this step) and hands the K steps to a `FrameAdder`; `take_chunk()` returns a ready
insert message for the replay service.
Weights arrive through `set_weights(weights, version)`.
"""
from __future__ import annotations

import numpy as np

from actors.adder import FrameAdder
from common.config import Config, epsilon_at, epsilon_ladder
from common.envs import BatchStep, EnvBatch, EnvInfo
from common.networks import build_q_network

import tensorflow as tf  # noqa: E402  (after networks.py set the Keras backend)


class Actor:
    def __init__(self, config: Config, env_info: EnvInfo, actor_index: int, num_actors: int = 1):
        self.config = config
        seed = config.seed + 10_000 * (actor_index + 1)
        self.rng = np.random.default_rng(seed)
        self.num_actions = env_info.num_actions
        k = config.envs_per_actor
        self.envs = EnvBatch(config.env, k, seed, config.max_episode_agent_steps,
                             config.frame_stack, num_threads=config.actor_threads or 0)
        self.model = build_q_network(env_info.obs_shape, env_info.num_actions,
                                     config.mlp_hidden_units, config.dueling)
        # Called on the envs that act greedily: any batch size up to K, so one trace and no
        # XLA (which compiles per shape; with oneDNN on, XLA and plain graphs run this forward
        # pass equally fast here: 0.40-0.44 against 0.39-0.41 CPU-ms a state at batch 64).
        self.q_values = tf.function(
            lambda obs: self.model(obs, training=False), jit_compile=False,
            input_signature=[tf.TensorSpec((None, *env_info.obs_shape),
                                           tf.as_dtype(env_info.obs_dtype))])
        self.compute_priorities = (config.priority_exponent > 0
                                   and config.initial_priority == "actor")
        self.env_info = env_info
        self.ladder = None
        if config.epsilon_ladder_base is not None:
            total_envs = num_actors * k
            self.ladder = np.array([epsilon_ladder(config, actor_index * k + i, total_envs)
                                    for i in range(k)])
        self.weight_version = -1
        self.agent_steps = 0
        self.obs = self.envs.reset()
        self.new_stream()
        # Compile now: the first greedy step can come minutes in (epsilon starts near 1), and
        # there the compile takes ~1 CPU-s from a running system (perf, in the system run).
        self.q_values(self.obs)

    def new_stream(self) -> None:
        """Send from here on as a new stream of frames, starting at the current observations
        (as after a restart; and when a replay shard restarted from a snapshot that has not
        seen this stream's latest frames). Steps still in the old n-step windows are lost."""
        info, config = self.env_info, self.config
        self.adder = FrameAdder(config.envs_per_actor, info.stack, info.frame_shape,
                                info.obs_dtype, config.n_step, config.gamma,
                                config.chunk_transitions, clip_rewards=config.clip_rewards,
                                compute_priorities=self.compute_priorities)
        for env, obs in enumerate(self.obs):
            self.adder.observe_first(env, obs)

    def set_weights(self, weights: list[np.ndarray], version: int) -> None:
        self.model.set_weights(weights)
        self.weight_version = version

    def epsilons(self, global_agent_steps: int) -> np.ndarray:
        if self.ladder is not None:
            return self.ladder
        return np.full(len(self.obs), epsilon_at(self.config, global_agent_steps))

    def select_actions(self, obs: np.ndarray, epsilon: np.ndarray | float,
                       q: np.ndarray | None = None) -> np.ndarray:
        """Epsilon-greedy per env; `q` (the obs' Q-values) when already computed. Only the
        envs that act greedily go through the network (none while epsilon is 1)."""
        explore = self.rng.random(len(obs)) < epsilon
        actions = self.rng.integers(0, self.num_actions, size=len(obs), dtype=np.int32)
        greedy = np.flatnonzero(~explore)
        if len(greedy):
            greedy_q = self.q_values(obs[greedy]).numpy() if q is None else q[greedy]
            actions[greedy] = greedy_q.argmax(axis=1)
        return actions

    def step(self, global_agent_steps: int) -> BatchStep:
        """One action in each env, with epsilon from the schedule or the ladder."""
        q = self.q_values(self.obs).numpy() if self.compute_priorities else None
        if q is not None:
            self.adder.observe_values(q.max(axis=1))
        actions = self.select_actions(self.obs, self.epsilons(global_agent_steps), q)
        result = self.envs.step(actions)
        final_values = np.zeros(len(actions))
        if self.compute_priorities and result.truncated.any():
            cut = np.flatnonzero(result.truncated)
            final_values[cut] = self.q_values(result.next_obs[cut]).numpy().max(axis=1)
        for env, action in enumerate(actions):
            self.adder.observe(
                env, action, result.reward[env], result.next_obs[env],
                bool(result.terminated[env]), bool(result.truncated[env]),
                q_taken=None if q is None else float(q[env, action]),
                final_value=float(final_values[env]))
            if result.terminated[env] or result.truncated[env]:
                self.adder.observe_first(env, result.obs[env])
        self.obs = result.obs
        self.agent_steps += len(actions)
        return result

    def take_chunk(self) -> tuple[bytes, int] | None:
        """(insert message, transition count) of the next full chunk, if one is ready."""
        return self.adder.take_chunk()

    def close(self) -> None:
        self.envs.close()
