"""The learner core without Ray: real Keras networks, real updates."""
import numpy as np
import pytest

from common.config import PRESETS
from common.env_info import EnvInfo
from common.networks import build_q_network
from learner.learner import DQNLearner

CARTPOLE = EnvInfo("CartPole-v1", (4,), "float32", 2, 1)
BREAKOUT = EnvInfo("BreakoutNoFrameskip-v4", (4, 84, 84), "uint8", 4, 4)


def fixed_batch(env_info, batch_size, rng, k=1):
    obs_shape = (k, batch_size, *env_info.obs_shape)
    if env_info.obs_dtype == "uint8":
        obs = rng.integers(0, 256, obs_shape, dtype=np.uint8)
        next_obs = rng.integers(0, 256, obs_shape, dtype=np.uint8)
    else:
        obs = rng.normal(size=obs_shape).astype(np.float32)
        next_obs = rng.normal(size=obs_shape).astype(np.float32)
    return {"obs": obs, "next_obs": next_obs,
            "action": rng.integers(0, env_info.num_actions, (k, batch_size)).astype(np.int32),
            "reward": rng.normal(size=(k, batch_size)).astype(np.float32),
            "discount": np.where(rng.random((k, batch_size)) < 0.1, 0.0, 0.99).astype(np.float32),
            "weight": np.ones((k, batch_size), np.float32)}


def unstack(batch):
    return {name: array[0] for name, array in batch.items()}


@pytest.mark.parametrize("preset, env_info", [("cartpole", CARTPOLE), ("seed", BREAKOUT),
                                              ("apex", BREAKOUT)])
def test_one_update_lowers_the_td_error_on_a_fixed_batch(preset, env_info):
    learner = DQNLearner(PRESETS[preset], env_info)
    batch = fixed_batch(env_info, 32, np.random.default_rng(0))
    before = np.mean(learner.td_error(unstack(batch)) ** 2)
    result = learner.step(batch)
    after = np.mean(learner.td_error(unstack(batch)) ** 2)
    assert after < before
    assert np.isfinite(result.loss) and result.td_error.shape == (1, 32)
    assert learner.updates == 1


def test_update_target_is_reward_plus_discounted_max_of_the_target_network():
    learner = DQNLearner(PRESETS["cartpole"], CARTPOLE)
    batch = unstack(fixed_batch(CARTPOLE, 16, np.random.default_rng(1)))
    next_q = learner.target(batch["next_obs"]).numpy()
    q = learner.online(batch["obs"]).numpy()
    expected = (batch["reward"] + batch["discount"] * next_q.max(axis=1)
                - q[np.arange(16), batch["action"]])
    np.testing.assert_allclose(learner.td_error(batch), expected, rtol=1e-5, atol=1e-5)
    terminal = batch["discount"] == 0  # terminal steps bootstrap with zero, not the seed's -1
    np.testing.assert_allclose(expected[terminal] + q[np.arange(16), batch["action"]][terminal],
                               batch["reward"][terminal], rtol=1e-5)


def test_k_batches_per_call_make_k_updates_and_sync_on_schedule():
    config = PRESETS["cartpole"].replace(learner_batches_per_call=4, target_sync_updates=8,
                                         weight_publish_updates=4)
    learner = DQNLearner(config, CARTPOLE)
    rng = np.random.default_rng(2)
    batch = fixed_batch(CARTPOLE, 32, rng, k=4)
    learner.step(batch)
    assert learner.updates == 4 and learner.target_syncs == 0
    probe = batch["obs"][0]
    assert not np.allclose(learner.online(probe), learner.target(probe))
    learner.step(batch)
    assert learner.updates == 8 and learner.target_syncs == 1
    np.testing.assert_allclose(learner.online(probe), learner.target(probe))


def test_saved_weights_load_into_a_fresh_network(tmp_path):
    learner = DQNLearner(PRESETS["cartpole"], CARTPOLE)
    learner.step(fixed_batch(CARTPOLE, 32, np.random.default_rng(3)))
    path = tmp_path / "q.weights.h5"
    path.write_bytes(learner.weights_h5_bytes())
    fresh = build_q_network(CARTPOLE.obs_shape, CARTPOLE.num_actions,
                            PRESETS["cartpole"].mlp_hidden_units)
    fresh.load_weights(str(path))
    probe = np.random.default_rng(4).normal(size=(5, 4)).astype(np.float32)
    np.testing.assert_allclose(fresh(probe), learner.online(probe), rtol=1e-6)


def test_nature_cnn_has_the_seed_architecture():
    model = build_q_network((4, 84, 84), 4)
    assert model.count_params() == 1_686_180
    with pytest.raises(ValueError, match="no Q-network"):
        build_q_network((3, 3), 2)


def test_double_dqn_target_lets_the_online_network_pick_the_action():
    config = PRESETS["cartpole"].replace(double_dqn=True)
    learner = DQNLearner(config, CARTPOLE)
    learner.online.layers[-1].bias.assign([0.0, 5.0])  # online prefers action 1 ...
    learner.target.layers[-1].bias.assign([5.0, 0.0])  # ... target values action 0 highest
    batch = unstack(fixed_batch(CARTPOLE, 16, np.random.default_rng(5)))
    next_q = learner.target(batch["next_obs"]).numpy()
    online_pick = learner.online(batch["next_obs"]).numpy().argmax(axis=1)
    assert (online_pick == 1).all()
    q = learner.online(batch["obs"]).numpy()[np.arange(16), batch["action"]]
    expected = batch["reward"] + batch["discount"] * next_q[:, 1] - q
    np.testing.assert_allclose(learner.td_error(batch), expected, rtol=1e-5, atol=1e-5)


def test_importance_weights_scale_each_item_in_the_loss():
    """The loss is mean_i w_i Huber_i: zeroing half the weights equals dropping those items
    and doubling the rest's; all-zero weights leave the network as it was."""
    batch = fixed_batch(CARTPOLE, 8, np.random.default_rng(6))
    weighted = {k: v.copy() for k, v in batch.items()}
    weighted["weight"][0, 4:] = 0.0
    halved = {k: v[:, :4] for k, v in batch.items()}
    halved["weight"] = np.full((1, 4), 0.5, np.float32)
    a, b = (DQNLearner(PRESETS["cartpole"], CARTPOLE) for _ in range(2))
    for model_a, model_b in ((a.online, b.online), (a.target, b.target)):
        model_b.set_weights(model_a.get_weights())
    assert a.step(weighted).loss == pytest.approx(b.step(halved).loss, rel=1e-6)
    frozen = DQNLearner(PRESETS["cartpole"], CARTPOLE)
    before = frozen.online.get_weights()
    zero = {**batch, "weight": np.zeros((1, 8), np.float32)}
    assert frozen.step(zero).loss == 0.0
    for w0, w1 in zip(before, frozen.online.get_weights()):
        np.testing.assert_array_equal(w0, w1)


def test_dueling_head_splits_value_and_advantage():
    model = build_q_network((4,), 3, (16,), dueling=True)
    obs = np.random.default_rng(7).normal(size=(5, 4)).astype(np.float32)
    q = model(obs).numpy()
    assert q.shape == (5, 3)
    # Q = V + A - mean(A): the mean over actions of Q is V alone.
    value_head = [layer for layer in model.layers if getattr(layer, "units", None) == 1][0]
    value_model = __import__("keras").Model(model.input, value_head.output)
    np.testing.assert_allclose(q.mean(axis=1), value_model(obs).numpy()[:, 0], rtol=1e-5,
                               atol=1e-6)


def test_mixed_precision_is_off_without_tensor_cores_and_trains_when_asked():
    assert not DQNLearner(PRESETS["seed"], BREAKOUT).mixed_precision  # this machine: CPU
    config = PRESETS["seed"].replace(mixed_precision=True, xla=False)
    learner = DQNLearner(config, BREAKOUT)
    conv = next(layer for layer in learner.online.layers if "conv" in layer.name)
    assert conv.compute_dtype == "float16" and conv.kernel.dtype == "float32"
    batch = fixed_batch(BREAKOUT, 32, np.random.default_rng(0))
    before = np.mean(learner.td_error(unstack(batch)) ** 2)
    for _ in range(3):
        result = learner.step(batch)
    assert np.isfinite(result.loss)
    assert np.mean(learner.td_error(unstack(batch)) ** 2) < before
    # The weights actors get are float32 and load into the actors' float32 network.
    weights = learner.get_weights()
    assert all(w.dtype == np.float32 for w in weights)
    actor_net = build_q_network(BREAKOUT.obs_shape, BREAKOUT.num_actions)
    actor_net.set_weights(weights)
    obs = batch["obs"][0]
    np.testing.assert_allclose(actor_net(obs).numpy(), learner.online(obs).numpy(),
                               rtol=0.05, atol=0.05)


def test_a_restored_learner_continues_exactly_where_the_saved_one_was(tmp_path):
    """Both networks, Adam's slots and step, and the counters survive save -> restore: the
    restored learner's next update equals the one the saved learner makes."""
    config = PRESETS["cartpole"].replace(target_sync_updates=3 * 8)
    rng = np.random.default_rng(3)
    saved = DQNLearner(config, CARTPOLE)
    for _ in range(2):
        saved.step(fixed_batch(CARTPOLE, 16, rng, k=8))  # 16 updates, no sync yet
    saved.save(str(tmp_path / "state"), {"weight_version": 7})
    restored = DQNLearner(config.replace(seed=config.seed + 1), CARTPOLE)  # other weights
    assert restored.restore(str(tmp_path / "state"), ("weight_version",)) == {
        "weight_version": 7}
    assert (restored.updates, restored.target_syncs) == (16, saved.target_syncs)
    for a, b in zip(saved.target.get_weights(), restored.target.get_weights()):
        np.testing.assert_array_equal(a, b)
    batch = fixed_batch(CARTPOLE, 16, rng, k=8)
    expected, got = saved.step(batch), restored.step(batch)  # 24 updates: the sync is due
    np.testing.assert_allclose(got.td_error, expected.td_error, rtol=1e-5, atol=1e-6)
    for a, b in zip(saved.get_weights(), restored.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert restored.target_syncs == saved.target_syncs == 1


def test_a_corrupt_or_foreign_learner_checkpoint_is_refused_naming_it(tmp_path):
    from common.checkpoints import CheckpointError
    cartpole = DQNLearner(PRESETS["cartpole"], CARTPOLE)
    cartpole.save(str(tmp_path / "cartpole"), {"weight_version": 1})
    other = DQNLearner(PRESETS["cartpole"].replace(mlp_hidden_units=(64,)), CARTPOLE)
    with pytest.raises(CheckpointError, match="cartpole: not a learner checkpoint"):
        other.restore(str(tmp_path / "cartpole"), ("weight_version",))
    data = next(tmp_path.glob("cartpole.data-*"))
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])  # truncated
    with pytest.raises(CheckpointError, match="cartpole"):
        DQNLearner(PRESETS["cartpole"], CARTPOLE).restore(str(tmp_path / "cartpole"),
                                                          ("weight_version",))
    with pytest.raises(CheckpointError, match="missing"):
        DQNLearner(PRESETS["cartpole"], CARTPOLE).restore(str(tmp_path / "missing"))


def test_non_finite_weights_are_noticed_and_never_restored(tmp_path):
    """An overflowing update leaves inf in the weights while the loss it reports (computed
    before it) is still finite: the learner's own check sees it, and a saved state holding
    it is refused on restore."""
    from common.checkpoints import CheckpointError
    learner = DQNLearner(PRESETS["cartpole"], CARTPOLE)
    assert learner.state_finite() and learner.state_finite(online_only=True)
    weights = learner.online.get_weights()
    weights[0][0, 0] = np.inf
    learner.online.set_weights(weights)
    assert not learner.state_finite() and not learner.state_finite(online_only=True)
    learner.save(str(tmp_path / "bad"), {"weight_version": 1})
    with pytest.raises(CheckpointError, match="bad: holds non-finite weights"):
        DQNLearner(PRESETS["cartpole"], CARTPOLE).restore(str(tmp_path / "bad"),
                                                          ("weight_version",))
