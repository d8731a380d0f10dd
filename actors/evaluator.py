"""The evaluator without Ray: how well the greedy policy plays, apart from training.

Training returns come from epsilon-greedy play at the schedule's epsilon (0.1 or more for most
of a run), which says little about the policy being learned. The evaluator plays whole episodes
with given weights at a small fixed epsilon (0.05, Nature DQN's, so a policy that never
presses FIRE cannot stall an episode forever) on the training env's preprocessing, and feeds
nothing to replay. N episodes run as N envs of one batch, each counted once, from its first
episode: taking the first N episodes to end would favour short ones.
"""
from __future__ import annotations

import numpy as np

from actors.env_batch import EnvBatch
from actors.policy import EpsilonGreedyPolicy
from common.config import Config
from common.env_info import EnvInfo


class Evaluator:
    def __init__(self, config: Config, env_info: EnvInfo, episodes: int, seed: int,
                 repeat_action_probability: float | None = None, num_threads: int = 1):
        self.policy = EpsilonGreedyPolicy(config, env_info, seed)
        self.envs = EnvBatch(config.env, episodes, seed, config.max_episode_agent_steps,
                             config.frame_stack, num_threads=num_threads,
                             repeat_action_probability=repeat_action_probability)
        self.seed = seed
        self.evaluations = 0

    @property
    def last_seed(self) -> int:
        """The envs' seed at the latest call: every evaluation starts new games (for 65,536
        evaluations, then again: the offset stays within ALE's seeds, common.config.SEED_LIMIT)."""
        return self.seed + 7_919 * (self.evaluations % 2**16)

    def play(self, epsilon: float) -> list[float]:
        """One episode in each env, with new starts at every call; their raw game scores
        (unclipped), in env order."""
        self.evaluations += 1
        obs = self.envs.reset(seed=self.last_seed)
        scores: dict[int, float] = {}  # env -> the score of its first episode
        while len(scores) < self.envs.num_envs:
            result = self.envs.step(self.policy.select_actions(obs, epsilon))
            ended = np.flatnonzero(result.terminated | result.truncated)
            for env, score in zip(ended, result.finished_returns):
                scores.setdefault(int(env), score)
            obs = result.obs
        return [scores[env] for env in range(self.envs.num_envs)]

    def close(self) -> None:
        self.envs.close()
