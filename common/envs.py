"""Environment factory and a batch of envs stepped together by one actor.

Atari ids get the seed's preprocessing: gymnasium's `AtariPreprocessing` with its defaults
(no-op reset up to 30, frame skip 4, 84x84 gray, no life-loss terminal) on an unskipped base env,
then a frame stack. Rewards are left unclipped. The time limit counts agent steps, so it wraps
the preprocessed env, not the frame-level one.
"""
from __future__ import annotations

from dataclasses import dataclass

import ale_py
import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TimeLimit

gym.register_envs(ale_py)
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner on every env

ATARI_FRAME_SKIP = 4


@dataclass(frozen=True)
class EnvInfo:
    """What every role needs to know about an env, without holding one."""
    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    num_actions: int
    frame_skip: int  # emulator frames per agent step

    @property
    def stack(self) -> int:
        """Frames per observation: the leading axis of stacked images, 1 for vectors."""
        return self.obs_shape[0] if len(self.obs_shape) == 3 else 1

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One frame, the unit replay stores once: an image, or the whole vector."""
        return tuple(self.obs_shape[1:]) if len(self.obs_shape) == 3 else tuple(self.obs_shape)

    def to_dict(self) -> dict:
        return {"env_id": self.env_id, "obs_shape": list(self.obs_shape),
                "obs_dtype": self.obs_dtype, "num_actions": self.num_actions,
                "frame_skip": self.frame_skip}


class EnvError(ValueError):
    """The env id is unknown or not one this project can train on."""


def is_atari(env_id: str) -> bool:
    try:
        entry = gym.spec(env_id).entry_point
    except gym.error.Error as error:
        raise EnvError(f"unknown env id {env_id!r}: {error}") from None
    return isinstance(entry, str) and entry.startswith("ale_py")


def make_env(env_id: str, max_episode_agent_steps: int, frame_stack: int = 4) -> gym.Env:
    if is_atari(env_id):
        # Atari ids register no frame-level limit; ours counts agent steps, so it goes outside.
        env = gym.make(env_id, frameskip=1)
        env = AtariPreprocessing(env, frame_skip=ATARI_FRAME_SKIP)
        env = FrameStackObservation(env, frame_stack)
        env = TimeLimit(env, max_episode_steps=max_episode_agent_steps)
    else:
        env = gym.make(env_id, max_episode_steps=max_episode_agent_steps)
    if not isinstance(env.action_space, gym.spaces.Discrete):
        raise EnvError(f"env {env_id!r} has action space {env.action_space}; DQN needs Discrete")
    if not isinstance(env.observation_space, gym.spaces.Box):
        raise EnvError(f"env {env_id!r} has observation space {env.observation_space}; "
                       "DQN needs a Box")
    return env


def describe_env(env_id: str, max_episode_agent_steps: int = 1000,
                 frame_stack: int = 4) -> EnvInfo:
    env = make_env(env_id, max_episode_agent_steps, frame_stack)
    try:
        space = env.observation_space
        return EnvInfo(env_id=env_id, obs_shape=tuple(space.shape),
                       obs_dtype=np.dtype(space.dtype).name,
                       num_actions=int(env.action_space.n),
                       frame_skip=ATARI_FRAME_SKIP if is_atari(env_id) else 1)
    finally:
        env.close()


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
    """K independent envs stepped in lockstep; resets are handled here so callers see the
    true last observation of each episode and the first of the next."""

    def __init__(self, env_id: str, num_envs: int, seed: int, max_episode_agent_steps: int,
                 frame_stack: int = 4):
        self.envs = [make_env(env_id, max_episode_agent_steps, frame_stack)
                     for _ in range(num_envs)]
        self.seed = seed
        self.returns = np.zeros(num_envs, dtype=np.float64)
        self.lengths = np.zeros(num_envs, dtype=np.int64)
        self.obs: np.ndarray | None = None

    @property
    def num_envs(self) -> int:
        return len(self.envs)

    def reset(self) -> np.ndarray:
        self.obs = np.stack([np.asarray(env.reset(seed=self.seed + i)[0])
                             for i, env in enumerate(self.envs)])
        self.returns[:] = 0
        self.lengths[:] = 0
        return self.obs

    def step(self, actions: np.ndarray) -> BatchStep:
        if self.obs is None:
            raise RuntimeError("EnvBatch.step before reset")
        results = [env.step(int(a)) for env, a in zip(self.envs, actions)]
        next_obs = np.stack([np.asarray(r[0]) for r in results])
        reward = np.array([r[1] for r in results], dtype=np.float32)
        terminated = np.array([r[2] for r in results], dtype=bool)
        truncated = np.array([r[3] for r in results], dtype=bool)
        self.returns += reward
        self.lengths += 1
        obs = next_obs.copy()
        finished_returns, finished_lengths = [], []
        for i in np.flatnonzero(terminated | truncated):
            finished_returns.append(float(self.returns[i]))
            finished_lengths.append(int(self.lengths[i]))
            self.returns[i] = 0
            self.lengths[i] = 0
            obs[i] = np.asarray(self.envs[i].reset()[0])
        self.obs = obs
        return BatchStep(next_obs, reward, terminated, truncated, obs,
                         finished_returns, finished_lengths)

    def close(self):
        for env in self.envs:
            env.close()
