"""The actor core without Ray: real envs, a real network, chunks that replay accepts."""
from pathlib import Path

import numpy as np
import pytest

from actors.actor import Actor
from actors.env_batch import EnvBatch
from actors.policy import EpsilonGreedyPolicy, fastest_policy
from common import wire
from common.config import PRESETS
from common.envs import describe_env
from common.networks import resolve_precision
from replay_server.buffer import ReplayBuffer, ReplaySpec

PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained" / "breakout-seed"


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


def replay_for(config, info, capacity=10_000):
    return ReplayBuffer(ReplaySpec.for_env(capacity, info, config.priority_exponent))


def drain(actor, buffer):
    count = 0
    while (chunk := actor.take_chunk()) is not None:
        arrays, meta = wire.decode(chunk[0], expect_kind=wire.TRANSITIONS)
        count += buffer.add(arrays, meta)
    return count


def test_truncation_keeps_the_discount_and_termination_zeroes_it():
    config = PRESETS["cartpole"].replace(envs_per_actor=2, max_episode_agent_steps=5,
                                         chunk_transitions=10, random_agent_steps=0,
                                         epsilon_start=0.0, epsilon_end=0.0)
    info = describe_env("CartPole-v1")
    actor = Actor(config, info, actor_index=0)
    buffer = replay_for(config, info)
    results = [actor.step(global_agent_steps=10**6) for _ in range(5)]
    assert drain(actor, buffer) == 10
    truncated = np.concatenate([r.truncated for r in results])
    terminated = np.concatenate([r.terminated for r in results])
    assert truncated.any()  # a 5-step limit on CartPole always truncates first
    np.testing.assert_allclose(buffer.discount[:10][terminated], 0.0)
    np.testing.assert_allclose(buffer.discount[:10][~terminated], config.gamma)


def test_greedy_actions_follow_the_network_and_random_ones_cover_all_actions():
    config = PRESETS["cartpole"].replace(envs_per_actor=8)
    actor = Actor(config, describe_env("CartPole-v1"), actor_index=0)
    obs = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
    expected = actor.policy.model(obs).numpy().argmax(axis=1)
    np.testing.assert_array_equal(actor.policy.select_actions(obs, epsilon=0.0), expected)
    random_actions = np.concatenate([actor.policy.select_actions(obs, 1.0) for _ in range(50)])
    assert set(random_actions) == {0, 1}


def test_breakout_transitions_rebuild_to_the_stacks_the_actor_saw():
    """Real ALE Breakout through the adder and the replay: every stored transition's
    observation and next observation equal the env's stacks, frames stored once."""
    info = describe_env("BreakoutNoFrameskip-v4")
    config = PRESETS["seed"].replace(envs_per_actor=2, chunk_transitions=8,
                                     max_episode_agent_steps=30)
    actor = Actor(config, info, actor_index=1)
    buffer = replay_for(config, info)
    seen = []  # (obs, action-independent next obs) per transition, in the adder's order
    for _ in range(40):
        before = actor.obs.copy()
        result = actor.step(global_agent_steps=0)
        seen.extend((before[i], result.next_obs[i]) for i in range(2))
    stored = drain(actor, buffer)
    assert stored == 80 and buffer.frames_written < 80 + 10  # about one frame per step
    rows = np.arange(stored)
    obs = buffer.frames[buffer.obs_slots[rows]]
    next_obs = buffer.frames[buffer.next_slots[rows]]
    # The adder emits one transition per env per step, in env order (n_step 1).
    for row, (expected_obs, expected_next) in enumerate(seen):
        np.testing.assert_array_equal(obs[row], expected_obs)
        np.testing.assert_array_equal(next_obs[row], expected_next)


def test_only_greedy_envs_go_through_the_network():
    """Epsilon 0.5 over 64 envs: the forward pass sees the greedy ones only, and their
    actions are the network's argmax for exactly those observations."""
    config = PRESETS["cartpole"].replace(envs_per_actor=64)
    actor = Actor(config, describe_env("CartPole-v1"), actor_index=0)
    obs = np.random.default_rng(1).normal(size=(64, 4)).astype(np.float32)
    seen = []
    forward = actor.policy.q_values
    actor.policy.q_values = lambda batch: seen.append(batch.copy()) or forward(batch)
    state = actor.policy.rng.bit_generator.state
    actions = actor.policy.select_actions(obs, epsilon=0.5)
    actor.policy.rng.bit_generator.state = state
    greedy = actor.policy.rng.random(64) >= 0.5  # the draw select_actions made
    assert len(seen) == 1 and 0 < greedy.sum() < 64
    np.testing.assert_array_equal(seen[0], obs[greedy])
    np.testing.assert_array_equal(actions[greedy],
                                  actor.policy.model(obs[greedy]).numpy().argmax(axis=1))
    assert forward.experimental_get_tracing_count() == 1  # any batch size, one trace


def test_the_forward_pass_compiles_at_start_up_once():
    """Not at the first greedy step, which comes late while epsilon is near 1."""
    actor = Actor(PRESETS["cartpole"].replace(envs_per_actor=4), describe_env("CartPole-v1"),
                  actor_index=0)
    assert actor.policy.q_values.experimental_get_tracing_count() == 1
    actor.policy.select_actions(actor.obs, epsilon=1.0)
    actor.policy.select_actions(actor.obs, epsilon=0.0)
    assert actor.policy.q_values.experimental_get_tracing_count() == 1


def test_weights_set_on_the_actor_change_its_greedy_policy():
    config = PRESETS["cartpole"]
    actor = Actor(config, describe_env("CartPole-v1"), actor_index=0)
    weights = [np.zeros_like(w) for w in actor.policy.model.get_weights()]
    weights[-1][1] = 1.0  # output bias: action 1 always has the larger value
    actor.policy.set_weights(weights, version=7)
    obs = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    assert actor.policy.weight_version == 7
    np.testing.assert_array_equal(actor.policy.select_actions(obs, 0.0), [1, 1, 1, 1])


def test_apex_actor_explores_on_the_ladder_and_sends_priorities():
    config = PRESETS["apex"].replace(envs_per_actor=2, chunk_transitions=8, dueling=True)
    info = describe_env("BreakoutNoFrameskip-v4")
    first, last = (Actor(config, info, actor_index=i, num_actors=3) for i in (0, 2))
    np.testing.assert_allclose(first.epsilons(0), [0.4, 0.4 ** (1 + 7 / 5)])
    np.testing.assert_allclose(last.epsilons(10**9), [0.4 ** (1 + 7 * 4 / 5), 0.4 ** 8])
    buffer = replay_for(config, info)
    for _ in range(12):
        first.step(global_agent_steps=0)
    assert drain(first, buffer) == 16  # n = 3: the last steps wait for their third step
    leaves = buffer.tree.get(np.arange(16))
    assert (leaves > 0).all() and len(np.unique(leaves)) > 1  # TD errors, not max priority


@pytest.mark.parametrize("env_id", ["ALE/Pong-v5", "CartPole-v1"])
def test_action_count_comes_from_the_env(env_id):
    assert describe_env(env_id).num_actions == {"ALE/Pong-v5": 6, "CartPole-v1": 2}[env_id]


def test_vector_atari_batch_equals_the_single_env_reference():
    """AtariVectorEnv (C++ threads) against gymnasium's AtariPreprocessing and
    FrameStackObservation on single envs, with no random no-op starts so both are
    deterministic: the same observations (episode-start padding included), rewards,
    terminations and truncations, step for step across episode ends."""
    from common.envs import make_env
    steps, limit = 500, 200
    batch = EnvBatch("BreakoutNoFrameskip-v4", 2, seed=0, max_episode_agent_steps=limit,
                     noop_max=0)
    reference = [make_env("BreakoutNoFrameskip-v4", limit, noop_max=0) for _ in range(2)]
    obs = batch.reset()
    ref_obs = [np.asarray(env.reset(seed=i)[0]) for i, env in enumerate(reference)]
    np.testing.assert_array_equal(obs, ref_obs)
    actions = np.random.default_rng(0).integers(0, 4, (steps, 2))
    ends = {"terminated": 0, "truncated": 0}
    for t in range(steps):
        step = batch.step(actions[t])
        for i, env in enumerate(reference):
            next_obs, reward, terminated, truncated, _ = env.step(int(actions[t, i]))
            np.testing.assert_array_equal(step.next_obs[i], next_obs, err_msg=f"step {t}")
            assert (step.reward[i], step.terminated[i], step.truncated[i]) == \
                (reward, terminated, truncated), t
            if terminated or truncated:
                ends["terminated" if terminated else "truncated"] += 1
                next_obs = env.reset()[0]
            np.testing.assert_array_equal(step.obs[i], next_obs, err_msg=f"step {t}")
    assert min(ends.values()) >= 1, ends  # both game overs and time limits were crossed


def test_auto_actor_precision_times_the_device_s_fast_precision_and_keeps_the_faster():
    """On a CPU with bfloat16 math both precisions are timed on the actor's own envs; on one
    without, and for the MLP, float32 without timing. A precision given is taken as it is."""
    config = PRESETS["seed"].replace(envs_per_actor=8)
    info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    actor = Actor(config, info, actor_index=0)
    fast = resolve_precision("auto", info.obs_shape)
    if fast == "float32":
        assert (actor.policy.precision, actor.precision_rates) == ("float32", None)
    else:
        rates = actor.precision_rates
        assert set(rates) == {"float32", fast} and min(rates.values()) > 0
        assert actor.policy.precision == max(rates, key=rates.__getitem__)
    assert actor.policy.q_values.experimental_get_tracing_count() == 1
    actor.close()
    for precision in ("float32", "bfloat16"):
        policy, rates = fastest_policy(config.replace(actor_precision=precision), info, 0,
                                       actor.obs)
        assert (policy.precision, rates) == (precision, None)
    cartpole = PRESETS["cartpole"].replace(actor_precision="auto")
    cartpole_actor = Actor(cartpole, describe_env("CartPole-v1"), actor_index=0)
    assert (cartpole_actor.policy.precision, cartpole_actor.precision_rates) == ("float32", None)


def test_a_bfloat16_policy_acts_as_the_float32_one_on_the_states_a_trained_agent_meets():
    """The float32 weights a learner publishes load into a bfloat16 forward pass, whose
    greedy actions are the float32 pass's on at least 98% of the states the trained agent
    meets (99.5% over 2,400 when measured: its Q-values differ by under 0.005)."""
    config = PRESETS["seed"]
    info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    policies = {precision: EpsilonGreedyPolicy(config, info, seed=0, precision=precision)
                for precision in ("float32", "bfloat16")}
    for policy in policies.values():
        policy.load_weights(str(PRETRAINED / "q_network.weights.h5"))
    envs = EnvBatch(config.env, 16, 1, config.max_episode_agent_steps, config.frame_stack)
    obs, same, seen = envs.reset(), 0, 0
    for _ in range(60):
        q = {name: policy.q_values(obs).numpy() for name, policy in policies.items()}
        assert q["bfloat16"].dtype == np.float32  # the output layer computes in float32
        same += int((q["float32"].argmax(axis=1) == q["bfloat16"].argmax(axis=1)).sum())
        seen += len(obs)
        obs = envs.step(policies["float32"].select_actions(obs, 0.05, q["float32"])).obs
    envs.close()
    assert same / seen >= 0.98, f"{same} of {seen}"
