"""The batch of envs one actor (or the evaluator) steps together, as one vector env."""
from __future__ import annotations

from dataclasses import dataclass

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode

from common.envs import ATARI_FRAME_SKIP, is_atari, make_env


@dataclass
class BatchStep:
    """One step of K envs. `next_obs` is what each action led to (the final observation where
    an episode ended); `obs` is what to act on next (the first of the new episode there)."""
    next_obs: np.ndarray
    reward: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    obs: np.ndarray
    finished_returns: list[float]
    finished_lengths: list[int]


class EnvBatch:
    """K envs stepped together as one gymnasium vector env, so callers see the true last
    observation of each episode (`next_obs`) and the first of the next (`obs`).

    Atari ids run on `ale_py`'s AtariVectorEnv: its C++ threads step the K games and do the
    seed's preprocessing (frame skip 4 with max-pooling, 84x84 gray, 4-frame stack, up to 30
    no-op starts), pixel for pixel what gymnasium's AtariPreprocessing + FrameStackObservation
    give. Its defaults differ from the seed's and are set here: no reward clipping (the
    returns reported are the game score; clipping for training is the adder's job), no fire
    on reset, no life-loss terminal, the env id's own sticky-action probability, and the time
    limit counted here in agent steps (ALE's frame limit would cut the last step short). One
    more difference is mended: it pads a new episode's stack with black frames where
    gymnasium repeats the first frame.
    Other ids run on gymnasium's SyncVectorEnv with the time limit in agent steps.
    `num_threads` caps AtariVectorEnv's threads (0: one per CPU); `repeat_action_probability`
    overrides the Atari id's sticky actions.
    """

    def __init__(self, env_id: str, num_envs: int, seed: int, max_episode_agent_steps: int,
                 frame_stack: int = 4, noop_max: int = 30, num_threads: int = 0,
                 repeat_action_probability: float | None = None):
        self.seed = seed
        self.atari = is_atari(env_id)
        self.envs: gym.vector.VectorEnv
        if self.atari:
            from ale_py.vector_env import AtariVectorEnv
            kwargs = gym.spec(env_id).kwargs
            self.envs = AtariVectorEnv(
                game=kwargs["game"], num_envs=num_envs, frameskip=ATARI_FRAME_SKIP,
                stack_num=frame_stack, noop_max=noop_max, reward_clipping=False,
                use_fire_reset=False, episodic_life=False,
                repeat_action_probability=(
                    kwargs.get("repeat_action_probability", 0.0)
                    if repeat_action_probability is None else repeat_action_probability),
                full_action_space=kwargs.get("full_action_space", False),
                # The time limit is ours, in agent steps (below): ALE's own frame limit ends
                # the last step short of its 4 frames. This one is only a backstop.
                max_num_frames_per_episode=(max_episode_agent_steps + noop_max + 1)
                * ATARI_FRAME_SKIP,
                autoreset_mode=AutoresetMode.SAME_STEP, num_threads=num_threads)
        else:
            self.envs = gym.vector.SyncVectorEnv(
                [lambda: make_env(env_id, max_episode_agent_steps, frame_stack)] * num_envs,
                autoreset_mode=AutoresetMode.SAME_STEP)
        self.stack = frame_stack
        self.max_episode_agent_steps = max_episode_agent_steps
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.obs: np.ndarray | None = None

    @property
    def num_envs(self) -> int:
        return len(self.returns)

    def reset(self, seed: int | None = None) -> np.ndarray:
        """All envs at a new episode, seeded from `seed` (default: the batch's own)."""
        self.returns[:] = 0
        self.lengths[:] = 0
        first = self.envs.reset(seed=self.seed if seed is None else seed)[0]
        self.obs = self._pad(np.asarray(first), self.lengths)
        return self.obs

    def step(self, actions: np.ndarray) -> BatchStep:
        if self.obs is None:
            raise RuntimeError("EnvBatch.step before reset")
        obs, reward, terminated, truncated, info = self.envs.step(np.asarray(actions))
        obs, reward = np.array(obs), np.asarray(reward, np.float32)
        terminated, truncated = np.array(terminated), np.array(truncated)
        self.returns += reward
        self.lengths += 1
        next_obs = obs.copy()
        for i in np.flatnonzero(terminated | truncated):
            next_obs[i] = np.asarray(info["final_obs"][i])
        if self.atari:  # the time limit, and a reset of just the envs it cut
            cut = (self.lengths >= self.max_episode_agent_steps) & ~(terminated | truncated)
            if cut.any():
                truncated |= cut
                obs[cut] = np.asarray(self.envs.reset(options={"reset_mask": cut})[0])[cut]
        ended = terminated | truncated
        next_obs = self._pad(next_obs, self.lengths)
        finished_returns = [float(r) for r in self.returns[ended]]
        finished_lengths = [int(n) for n in self.lengths[ended]]
        self.returns[ended] = 0
        self.lengths[ended] = 0
        self.obs = self._pad(obs, self.lengths)
        return BatchStep(next_obs, reward, terminated, truncated, self.obs, finished_returns,
                         finished_lengths)

    def _pad(self, stacks: np.ndarray, steps: np.ndarray) -> np.ndarray:
        """Episode-start stacks as gymnasium pads them: the first frame repeated in place
        of the black frames AtariVectorEnv puts before it (`steps` taken in each episode)."""
        if self.atari:
            for i in np.flatnonzero(steps < self.stack - 1):
                first = self.stack - 1 - steps[i]
                stacks[i, :first] = stacks[i, first]
        return stacks

    def close(self):
        self.envs.close()
