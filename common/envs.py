"""Environment factory.

Atari ids get the seed's preprocessing: gymnasium's `AtariPreprocessing` defaults (no-op reset
up to 30, frame skip 4 with max-pooling, 84x84 gray, no life-loss terminal) and a 4-frame
stack, rewards unclipped, the time limit in agent steps. `make_env` builds one such env with
gymnasium's wrappers (for describing an env, for the evaluation video, and as the reference
in tests); `actors.env_batch.EnvBatch` runs K of them as one vector env.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ale_py
import gymnasium as gym
import numpy as np
from gymnasium.wrappers import AtariPreprocessing, FrameStackObservation, TimeLimit

from common.env_info import EnvInfo

gym.register_envs(ale_py)
ale_py.ALEInterface.setLoggerMode(ale_py.LoggerMode.Error)  # no banner on every env

ATARI_FRAME_SKIP = 4


class EnvError(ValueError):
    """The env id is unknown or not one this project can train on."""


def is_atari(env_id: str) -> bool:
    try:
        entry = gym.spec(env_id).entry_point
    except gym.error.Error as error:
        raise EnvError(f"unknown env id {env_id!r}: {error}") from None
    return isinstance(entry, str) and entry.startswith("ale_py")


class FrameRecorder(gym.Wrapper):
    """Hands every frame the game shows, in full colour, to `on_frame` (for a video): sits
    under the frame skip, so not one emulator frame is missed."""

    def __init__(self, env: gym.Env, on_frame: Callable[[np.ndarray], None]):
        super().__init__(env)
        self.on_frame = on_frame

    def reset(self, **kwargs):
        result = self.env.reset(**kwargs)
        self.on_frame(self.env.render())
        return result

    def step(self, action):
        result = self.env.step(action)
        self.on_frame(self.env.render())
        return result


def make_env(env_id: str, max_episode_agent_steps: int, frame_stack: int = 4,
             noop_max: int = 30, repeat_action_probability: float | None = None,
             on_frame: Callable[[np.ndarray], None] | None = None) -> gym.Env:
    """One env with the seed's wrappers (the reference `EnvBatch`'s vector envs match).
    `repeat_action_probability` overrides an Atari id's sticky actions; `on_frame` receives
    each full-colour frame the game shows."""
    render: dict[str, Any] = {"render_mode": "rgb_array"} if on_frame else {}
    if is_atari(env_id):
        sticky: dict[str, Any] = ({} if repeat_action_probability is None
                                  else {"repeat_action_probability": repeat_action_probability})
        # The time limit counts agent steps, so it goes outside the frame-level env.
        env = gym.make(env_id, frameskip=1, **sticky, **render)
        if on_frame:
            env = FrameRecorder(env, on_frame)
        env = AtariPreprocessing(env, frame_skip=ATARI_FRAME_SKIP, noop_max=noop_max)
        env = FrameStackObservation(env, frame_stack)
        env = TimeLimit(env, max_episode_steps=max_episode_agent_steps)
    else:
        env = gym.make(env_id, max_episode_steps=max_episode_agent_steps, **render)
        if on_frame:
            env = FrameRecorder(env, on_frame)
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
        space, actions = env.observation_space, env.action_space
        assert isinstance(space, gym.spaces.Box)  # make_env refuses the others
        assert isinstance(actions, gym.spaces.Discrete)
        return EnvInfo(env_id=env_id, obs_shape=tuple(space.shape),
                       obs_dtype=np.dtype(space.dtype).name, num_actions=int(actions.n),
                       frame_skip=ATARI_FRAME_SKIP if is_atari(env_id) else 1)
    finally:
        env.close()
