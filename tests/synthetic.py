"""Synthetic env streams for replay tests: stacks built like gymnasium's FrameStackObservation
(an episode starts with its first frame repeated), random episode lengths, every frame
distinct, and a record of exactly what the actor saw at each step; and random CartPole-shaped
insert messages to fill a shard."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from actors.adder import FrameAdder
from common import wire

FRAME_SHAPE = (6, 6)
STACK = 4


@dataclass
class Step:
    obs: np.ndarray
    action: int
    reward: float
    next_obs: np.ndarray
    terminated: bool
    truncated: bool


class SyntheticEnvs:
    """K envs of one sender. Rewards are unique step ids, so a transition sampled from replay
    (with n_step 1, no clipping) names the step it came from."""

    def __init__(self, num_envs: int, rng: np.random.Generator, id_base: int,
                 mean_episode: int = 12, truncate_share: float = 0.3):
        self.rng, self.mean_episode, self.truncate_share = rng, mean_episode, truncate_share
        self.next_id = id_base
        self.stacks = [self._first_stack() for _ in range(num_envs)]
        self.remaining = [self._episode_length() for _ in range(num_envs)]

    def _frame(self) -> np.ndarray:
        return self.rng.integers(0, 256, FRAME_SHAPE, dtype=np.uint8)

    def _first_stack(self) -> np.ndarray:
        return np.repeat(self._frame()[None], STACK, axis=0)

    def _episode_length(self) -> int:
        return int(self.rng.integers(1, 2 * self.mean_episode))

    def step(self, env: int) -> tuple[Step, np.ndarray | None]:
        """One step of `env`: the Step, and the next episode's first stack if it ended."""
        obs = self.stacks[env]
        next_obs = np.concatenate([obs[1:], self._frame()[None]])
        self.remaining[env] -= 1
        ended = self.remaining[env] == 0
        truncated = ended and self.rng.random() < self.truncate_share
        step = Step(obs, int(self.rng.integers(0, 4)), float(self.next_id), next_obs,
                    ended and not truncated, truncated)
        self.next_id += 1
        first = None
        if ended:
            first = self._first_stack()
            self.stacks[env] = first
            self.remaining[env] = self._episode_length()
        else:
            self.stacks[env] = next_obs
        return step, first


def make_adder(num_envs: int, n_step: int = 1, gamma: float = 0.9, chunk: int = 8,
               priorities: bool = False) -> FrameAdder:
    return FrameAdder(num_envs, STACK, FRAME_SHAPE, "uint8", n_step, gamma, chunk,
                      compute_priorities=priorities)


def play(envs: SyntheticEnvs, adder: FrameAdder, steps: int, record: dict) -> list[bytes]:
    """Step every env `steps` times through `adder`; returns the chunks it cut and adds each
    step to `record` by its reward id."""
    for env, stack in enumerate(envs.stacks):
        if adder.last_refs[env] is None:
            adder.observe_first(env, stack)
    chunks = []
    for _ in range(steps):
        for env in range(len(envs.stacks)):
            step, first = envs.step(env)
            record[step.reward] = step
            adder.observe(env, step.action, step.reward, step.next_obs, step.terminated,
                          step.truncated)
            if first is not None:
                adder.observe_first(env, first)
        while (chunk := adder.take_chunk()) is not None:
            chunks.append(chunk[0])
    return chunks


def cartpole_chunk(stream: int, count: int, rng) -> np.ndarray:
    """An insert message of `count` random CartPole transitions (as `wire.for_ray` sends it)."""
    frames = rng.normal(size=(count + 1, 4)).astype(np.float32)
    refs = np.arange(count)[:, None]
    return wire.for_ray(wire.encode_transitions(
        frames, refs, refs + 1, rng.integers(0, 2, count), rng.normal(size=count),
        np.full(count, 0.99), stream=stream, first_frame=0))
