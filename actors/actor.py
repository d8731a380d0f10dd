"""The actor without Ray: K envs, an epsilon-greedy policy, an adder.

`step()` takes one action in every env (one batched forward pass over the envs that act
greedily this step) and hands the K steps to a `FrameAdder`; `take_chunk()` returns a ready
insert message for the replay service.
Weights arrive through `policy.set_weights(weights, version)`.
"""
from __future__ import annotations

import numpy as np

from actors.adder import FrameAdder
from actors.env_batch import BatchStep, EnvBatch
from actors.policy import fastest_policy
from common.config import Config, epsilon_at
from common.env_info import EnvInfo


def epsilon_ladder(config: Config, env_index: int, num_envs: int) -> float:
    """Ape-X: env `env_index` of `num_envs` (all envs of all actors) explores with a fixed
    epsilon base^(1 + exponent * i / (N - 1)), from base down to base^(1 + exponent)."""
    base = config.epsilon_ladder_base
    if base is None:
        raise ValueError("the config has no epsilon ladder (epsilon_ladder_base is None)")
    spread = env_index / (num_envs - 1) if num_envs > 1 else 0.0
    return base ** (1.0 + config.epsilon_ladder_exponent * spread)


class Actor:
    def __init__(self, config: Config, env_info: EnvInfo, actor_index: int, num_actors: int = 1):
        self.config = config
        seed = config.seed + 10_000 * (actor_index + 1)
        k = config.envs_per_actor
        self.envs = EnvBatch(config.env, k, seed, config.max_episode_agent_steps,
                             config.frame_stack, num_threads=config.actor_threads or 0)
        self.compute_priorities = (config.priority_exponent > 0
                                   and config.initial_priority == "actor")
        self.env_info = env_info
        self.ladder = None
        if config.epsilon_ladder_base is not None:
            total_envs = num_actors * k
            self.ladder = np.array([epsilon_ladder(config, actor_index * k + i, total_envs)
                                    for i in range(k)])
        self.agent_steps = 0
        self.obs = self.envs.reset()
        self.new_stream()
        # Traced now: the first greedy step can come minutes in (epsilon starts near 1), and
        # there the trace takes ~1 CPU-s from a running system (perf, in the system run).
        # `precision_rates`: observations/s of each precision timed for --actor-precision auto.
        self.policy, self.precision_rates = fastest_policy(config, env_info, seed, self.obs)

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

    def epsilons(self, global_agent_steps: int) -> np.ndarray:
        if self.ladder is not None:
            return self.ladder
        return np.full(len(self.obs), epsilon_at(self.config, global_agent_steps))

    def step(self, global_agent_steps: int) -> BatchStep:
        """One action in each env, with epsilon from the schedule or the ladder."""
        q = self.policy.q_values(self.obs).numpy() if self.compute_priorities else None
        if q is not None:
            self.adder.observe_values(q.max(axis=1))
        actions = self.policy.select_actions(self.obs, self.epsilons(global_agent_steps), q)
        result = self.envs.step(actions)
        final_values = np.zeros(len(actions))
        if self.compute_priorities and result.truncated.any():
            cut = np.flatnonzero(result.truncated)
            final_values[cut] = self.policy.q_values(result.next_obs[cut]).numpy().max(axis=1)
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

    def take_chunk(self) -> tuple[memoryview, int] | None:
        """(insert message, transition count) of the next full chunk, if one is ready."""
        return self.adder.take_chunk()

    def close(self) -> None:
        self.envs.close()
