"""The evaluator's plain core on real envs and a real network, without Ray."""
import numpy as np

from actors.evaluator import Evaluator
from common.config import PRESETS
from common.envs import describe_env, make_env


def always(action: int, evaluator: Evaluator) -> None:
    """Weights under which the greedy action is `action` in every state."""
    weights = [np.zeros_like(w) for w in evaluator.policy.model.get_weights()]
    weights[-1][action] = 1.0  # the output bias
    evaluator.policy.set_weights(weights, version=3)


def test_each_env_counts_its_first_episode_once_at_the_given_epsilon():
    config = PRESETS["cartpole"]
    evaluator = Evaluator(config, describe_env(config.env), episodes=6, seed=0)
    always(1, evaluator)  # pushing right topples the pole in about ten steps
    pushed = evaluator.play(epsilon=0.0)
    assert len(pushed) == 6 and all(8 <= score <= 12 for score in pushed), pushed
    # Each is the first episode of its env (vector env i is seeded with seed + i), replayed
    # here on gymnasium's own env: not whichever six episodes ended first.
    env = make_env(config.env, config.max_episode_agent_steps)
    for i, score in enumerate(pushed):
        env.reset(seed=evaluator.last_seed + i)
        steps, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(1)
            steps, done = steps + 1, terminated or truncated
        assert score == steps
    random_play = evaluator.play(epsilon=1.0)
    assert len(random_play) == 6 and np.mean(random_play) > np.mean(pushed)
    evaluator.close()


def test_breakout_scores_are_raw_game_scores_of_whole_episodes():
    config = PRESETS["seed"]
    evaluator = Evaluator(config, describe_env(config.env), episodes=3, seed=1)
    first, second = evaluator.play(epsilon=1.0), evaluator.play(epsilon=1.0)
    for scores in (first, second):
        assert len(scores) == 3 and all(score >= 0 and score == int(score) for score in scores)
    assert first != second or sum(first) == 0  # each call starts new games
    evaluator.close()
