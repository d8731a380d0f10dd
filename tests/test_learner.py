"""The learner core without Ray: real Keras networks, real updates."""
import numpy as np
import pytest

from common.config import PRESETS
from common.env_info import EnvInfo
from common.networks import auto_precision, build_q_network
from learner.learner import BATCH_FIELDS, DQNLearner, synthetic_batch

# The exact-arithmetic checks here run in float32, whatever `auto` picks on this machine; the
# low-precision tests ask for theirs.
PRESETS = {name: config.replace(learner_precision="float32") for name, config in PRESETS.items()}
CARTPOLE = EnvInfo("CartPole-v1", (4,), "float32", 2, 1)
BREAKOUT = EnvInfo("BreakoutNoFrameskip-v4", (4, 84, 84), "uint8", 4, 4)


def fixed_batch(env_info, batch_size, rng, k=1):
    return synthetic_batch(env_info, batch_size, k, rng)


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


# /proc/cpuinfo as Linux shows it: an x86 CPU's flags, an aarch64 CPU's features.
EPYC_GENOA = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9R14\n"
              "flags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16 clzero\n\n"
              "processor\t: 1\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni avx512_bf16\n")
SAPPHIRE_RAPIDS = "model name\t: Intel Xeon Platinum 8488C\nflags\t\t: avx512f amx_bf16 amx_tile\n"
SKYLAKE = "model name\t: Intel Xeon 8175M (bf16 not in flags)\nflags\t\t: avx512f avx2\n"
GRAVITON3 = "processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd sve bf16 i8mm\n"
GRAVITON2 = "processor\t: 0\nFeatures\t: fp asimd aes pmull sha1 sha2 crc32 atomics\n"


@pytest.mark.parametrize("capability, cpu_info, expected", [
    (None, EPYC_GENOA, "bfloat16"), (None, SAPPHIRE_RAPIDS, "bfloat16"),
    (None, GRAVITON3, "bfloat16"), (None, SKYLAKE, "float32"), (None, GRAVITON2, "float32"),
    (None, "", "float32"),  # no /proc/cpuinfo: no claim of bfloat16
    ((9, 0), "", "bfloat16"), ((8, 0), "", "bfloat16"), ((8, 6), SKYLAKE, "bfloat16"),
    ((7, 5), EPYC_GENOA, "float16"), ((7, 0), "", "float16"), ((6, 1), EPYC_GENOA, "float32")])
def test_auto_precision_takes_bfloat16_where_the_device_has_it(capability, cpu_info, expected):
    """On a GPU its compute capability decides, whatever the host CPU has; an MLP stays
    float32 everywhere (too small to gain)."""
    assert auto_precision(capability, cpu_info) == expected
    assert auto_precision(capability, cpu_info, convolutional=False) == "float32"


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
@pytest.mark.parametrize("preset, env_info", [("cartpole", CARTPOLE), ("seed", BREAKOUT)])
def test_a_low_precision_learner_trains_on_float32_weights(preset, env_info, precision,
                                                           tmp_path):
    """Hidden layers compute in the low precision on float32 variables; the Q-values, the TD
    target and the loss are float32, and so are the weights actors get, which load into the
    actors' float32 network. Only float16 needs a loss scale."""
    config = PRESETS[preset].replace(learner_precision=precision, xla="off")
    learner = DQNLearner(config, env_info)
    assert learner.precision == precision
    hidden = [layer for layer in learner.online.layers if layer.weights][:-1]
    assert hidden and all(layer.compute_dtype == precision for layer in hidden)
    assert all(v.dtype == "float32" for v in learner.online.weights + learner.target.weights)
    assert learner.online.layers[-1].compute_dtype == "float32"
    assert (learner.optimizer is not learner.adam) == (precision == "float16")
    k = config.learner_batches_per_call
    batch = fixed_batch(env_info, config.batch_size, np.random.default_rng(0), k=k)
    losses, td, q_means = learner._train_steps(*(batch[name] for name in BATCH_FIELDS))
    assert losses.dtype == td.dtype == q_means.dtype == "float32"
    assert td.shape == (k, config.batch_size) and np.isfinite(losses.numpy()).all()
    assert learner.td_error(unstack(batch)).dtype == np.float32
    result = learner.step(batch)
    assert np.isfinite(result.loss) and np.isfinite(result.td_error).all()
    obs = batch["obs"][0]
    assert learner.online(obs).dtype == "float32"
    weights = learner.get_weights()
    assert all(w.dtype == np.float32 for w in weights)
    actor_net = build_q_network(env_info.obs_shape, env_info.num_actions,
                                config.mlp_hidden_units)
    actor_net.set_weights(weights)
    np.testing.assert_allclose(actor_net(obs).numpy(), learner.online(obs).numpy(),
                               rtol=0.05, atol=0.05)
    (tmp_path / "q.weights.h5").write_bytes(learner.weights_h5_bytes())  # the final weights
    actor_net.load_weights(str(tmp_path / "q.weights.h5"))
    for a, b in zip(actor_net.get_weights(), weights):
        np.testing.assert_array_equal(a, b)


def test_a_low_precision_dueling_head_combines_in_float32():
    model = build_q_network((4,), 3, (16,), dueling=True, precision="bfloat16")
    dense = [layer for layer in model.layers if layer.weights]
    assert sorted(layer.compute_dtype for layer in dense) == ["bfloat16"] * 2 + ["float32"] * 2
    assert model.layers[-1].compute_dtype == "float32"  # V + A - mean(A)
    assert model(np.ones((2, 4), np.float32)).dtype == "float32"


def test_a_low_precision_learner_lowers_the_td_error_on_a_fixed_batch():
    config = PRESETS["seed"].replace(learner_precision="bfloat16", xla="off")
    learner = DQNLearner(config, BREAKOUT)
    batch = fixed_batch(BREAKOUT, 32, np.random.default_rng(0))
    before = np.mean(learner.td_error(unstack(batch)) ** 2)
    for _ in range(3):
        learner.step(batch)
    assert np.mean(learner.td_error(unstack(batch)) ** 2) < before


def test_a_checkpoint_restores_across_precisions(tmp_path):
    """float32 -> bfloat16 -> float16 -> float32: each learner takes the one before's networks,
    Adam's slots and counters whole, and trains on from them (float16's loss scale is not
    part of a checkpoint: it starts afresh, as at a run's start)."""
    rng = np.random.default_rng(8)
    config = PRESETS["cartpole"].replace(xla="off", learner_batches_per_call=2)
    saved = DQNLearner(config, CARTPOLE)
    saved.step(fixed_batch(CARTPOLE, 16, rng, k=2))
    for number, precision in enumerate(["bfloat16", "float16", "float32"]):
        prefix = str(tmp_path / f"state-{number}")
        saved.save(prefix, {"weight_version": number})
        restored = DQNLearner(config.replace(learner_precision=precision, seed=number + 1),
                              CARTPOLE)
        assert restored.restore(prefix, ("weight_version",)) == {"weight_version": number}
        assert restored.updates == saved.updates == 2 * (number + 1)
        for a, b in zip(saved.get_weights() + saved.target.get_weights()
                        + [v.numpy() for v in saved.adam.variables],
                        restored.get_weights() + restored.target.get_weights()
                        + [v.numpy() for v in restored.adam.variables]):
            np.testing.assert_array_equal(a, b)
        assert np.isfinite(restored.step(fixed_batch(CARTPOLE, 16, rng, k=2)).loss)
        saved = restored


def test_xla_on_and_off_compile_as_told():
    on = DQNLearner(PRESETS["cartpole"].replace(xla="on"), CARTPOLE)
    off = DQNLearner(PRESETS["cartpole"].replace(xla="off"), CARTPOLE)
    assert (on.xla, off.xla, on.compile_rates, off.compile_rates) == (True, False, None, None)
    assert on._train_steps._jit_compile and not off._train_steps._jit_compile


def test_auto_compile_mode_keeps_the_faster_and_leaves_the_learner_as_it_was():
    config = PRESETS["cartpole"].replace(learner_batches_per_call=2,
                                         learner_precision="bfloat16")
    learner = DQNLearner(config, CARTPOLE)
    before = [v.numpy() for v in learner.online.weights + learner.adam.variables]
    learner.choose_compile_mode(seconds_each=0.2)
    rates = learner.compile_rates
    assert set(rates) == {"xla", "plain"} and min(rates.values()) > 0
    assert learner.xla == (rates["xla"] >= rates["plain"])
    assert learner._train_steps._jit_compile == learner.xla
    after = [v.numpy() for v in learner.online.weights + learner.adam.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    assert learner.updates == 0 and int(learner.adam.iterations) == 0
    assert np.isfinite(learner.step(fixed_batch(CARTPOLE, 64, np.random.default_rng(9),
                                                k=2)).loss)


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
