"""The actor core without Ray: real envs, a real network, chunks that replay accepts."""
import numpy as np
import pytest

from actors.actor import Actor, ChunkAdder
from common import wire
from common.config import PRESETS
from common.envs import EnvBatch, describe_env
from replay_server.buffer import ReplayBuffer


def test_chunk_adder_cuts_exact_chunks_in_order():
    adder = ChunkAdder(chunk_size=5)
    for step in range(4):  # 3 envs per step: 12 transitions -> 2 chunks, 2 left over
        ids = np.arange(3 * step, 3 * step + 3)
        adder.add(obs=ids[:, None], action=ids, reward=ids.astype(np.float32),
                  discount=np.ones(3, np.float32), next_obs=ids[:, None] + 1)
    first, second = adder.take(), adder.take()
    assert adder.take() is None and adder.pending == 2
    np.testing.assert_array_equal(first["action"], [0, 1, 2, 3, 4])
    np.testing.assert_array_equal(second["action"], [5, 6, 7, 8, 9])
    np.testing.assert_array_equal(second["next_obs"][:, 0], [6, 7, 8, 9, 10])


def test_env_batch_reports_final_observations_and_resets():
    envs = EnvBatch("CartPole-v1", num_envs=3, seed=0, max_episode_agent_steps=15)
    obs = envs.reset()
    finished = 0
    for _ in range(40):
        step = envs.step(np.zeros(3, np.int64))  # always push left: falls within ~10 steps
        ended = step.terminated | step.truncated
        # Where an episode ended, the next observation differs from the reset one we act on.
        assert not np.allclose(step.next_obs[ended], step.obs[ended]) or not ended.any()
        assert np.array_equal(step.next_obs[~ended], step.obs[~ended])
        finished += len(step.finished_returns)
        obs = step.obs
    assert finished >= 3 and obs.shape == (3, 4)


def test_truncation_keeps_the_discount_and_termination_zeroes_it():
    config = PRESETS["cartpole"].replace(envs_per_actor=2, max_episode_agent_steps=5,
                                         chunk_transitions=10, random_agent_steps=0,
                                         epsilon_start=0.0, epsilon_end=0.0)
    actor = Actor(config, describe_env("CartPole-v1"), actor_index=0)
    results = [actor.step(global_agent_steps=10**6) for _ in range(5)]
    arrays, _ = wire.decode(actor.take_chunk()[0], expect_kind=wire.TRANSITIONS)
    truncated = np.concatenate([r.truncated for r in results])
    terminated = np.concatenate([r.terminated for r in results])
    assert truncated.any()  # a 5-step limit on CartPole always truncates first
    np.testing.assert_allclose(arrays["discount"][terminated], 0.0)
    np.testing.assert_allclose(arrays["discount"][~terminated], config.gamma)


def test_greedy_actions_follow_the_network_and_random_ones_cover_all_actions():
    config = PRESETS["cartpole"].replace(envs_per_actor=8)
    actor = Actor(config, describe_env("CartPole-v1"), actor_index=0)
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    expected = actor.model(obs).numpy().argmax(axis=1)
    np.testing.assert_array_equal(actor.select_actions(obs, epsilon=0.0), expected)
    random_actions = np.concatenate([actor.select_actions(obs, 1.0) for _ in range(50)])
    assert set(random_actions) == {0, 1}


def test_breakout_chunks_are_accepted_by_the_replay_buffer():
    info = describe_env("BreakoutNoFrameskip-v4")
    config = PRESETS["seed"].replace(envs_per_actor=2, chunk_transitions=8)
    actor = Actor(config, info, actor_index=1)
    first_obs = actor.obs.copy()
    for _ in range(4):
        actor.step(global_agent_steps=0)
    message, count = actor.take_chunk()
    buffer = ReplayBuffer(100, info.obs_shape, info.obs_dtype)
    arrays, _ = wire.decode(message, expect_kind=wire.TRANSITIONS)
    assert buffer.add(arrays) == count == 8
    np.testing.assert_array_equal(arrays["obs"][:2], first_obs)
    # The stack slides: the next observation's first 3 frames are the obs's last 3.
    np.testing.assert_array_equal(arrays["next_obs"][:, :3], arrays["obs"][:, 1:])
    assert arrays["obs"].dtype == np.uint8 and arrays["obs"].shape[1:] == (4, 84, 84)


def test_weights_set_on_the_actor_change_its_greedy_policy():
    config = PRESETS["cartpole"]
    actor = Actor(config, describe_env("CartPole-v1"), actor_index=0)
    weights = [np.zeros_like(w) for w in actor.model.get_weights()]
    weights[-1][1] = 1.0  # output bias: action 1 always has the larger value
    actor.set_weights(weights, version=7)
    obs = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    assert actor.weight_version == 7
    np.testing.assert_array_equal(actor.select_actions(obs, 0.0), [1, 1, 1, 1])


@pytest.mark.parametrize("env_id", ["ALE/Pong-v5", "CartPole-v1"])
def test_action_count_comes_from_the_env(env_id):
    assert describe_env(env_id).num_actions == {"ALE/Pong-v5": 6, "CartPole-v1": 2}[env_id]
