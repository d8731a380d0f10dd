"""Replay storage, the rate limiter and the bytes-in/bytes-out server, without Ray."""
import numpy as np
import pytest

from common import wire
from common.config import PRESETS
from common.envs import EnvInfo
from replay_server.buffer import InvalidTransitions, ReplayBuffer
from replay_server.rate_limiter import RateLimiter
from replay_server.server import ReplayServer

OBS_SHAPE = (4, 6, 6)


def transitions(ids, obs_shape=OBS_SHAPE):
    """Transitions whose every field encodes its id, so a sample can be checked field by field."""
    ids = np.asarray(ids)
    obs = (ids % 251).astype(np.uint8)[:, None, None, None] * np.ones(obs_shape, np.uint8)
    return {"obs": obs, "action": (ids % 4).astype(np.int32),
            "reward": ids.astype(np.float32), "discount": np.full(len(ids), 0.99, np.float32),
            "next_obs": ((ids + 1) % 251).astype(np.uint8)[:, None, None, None]
            * np.ones(obs_shape, np.uint8)}


def test_sampled_transitions_are_stored_ones_with_fields_kept_together():
    buffer = ReplayBuffer(100, OBS_SHAPE, "uint8", seed=1)
    buffer.add(transitions(range(60)))
    batch = buffer.sample(500)
    ids = batch["reward"].astype(int)
    assert set(ids) <= set(range(60))
    np.testing.assert_array_equal(batch["obs"][:, 0, 0, 0], ids % 251)
    np.testing.assert_array_equal(batch["next_obs"][:, 3, 5, 5], (ids + 1) % 251)
    np.testing.assert_array_equal(batch["action"], ids % 4)
    np.testing.assert_array_equal(batch["reward"], buffer.storage["reward"][batch["index"]])


def test_ring_overwrites_the_oldest_first_and_counts_everything():
    buffer = ReplayBuffer(50, OBS_SHAPE, "uint8")
    for start in range(0, 130, 13):
        buffer.add(transitions(range(start, start + 13)))
    assert buffer.size == 50 and buffer.total_added == 130
    assert sorted(buffer.storage["reward"].astype(int)) == list(range(80, 130))
    big = ReplayBuffer(10, OBS_SHAPE, "uint8")
    big.add(transitions(range(25)))  # one insert larger than the ring keeps its newest part
    assert sorted(big.storage["reward"].astype(int)) == list(range(15, 25))
    assert big.total_added == 25


def test_sampling_is_uniform_over_stored_transitions():
    buffer = ReplayBuffer(1000, (2,), "float32", seed=3)
    buffer.add({k: v for k, v in transitions(range(10), obs_shape=(2,)).items()}
               | {"obs": np.zeros((10, 2), np.float32), "next_obs": np.zeros((10, 2), np.float32)})
    counts = np.bincount(buffer.sample(100_000)["reward"].astype(int), minlength=10)
    expected = 10_000
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001


def snapshot(buffer):
    return {k: v.copy() for k, v in buffer.storage.items()}, buffer.cursor, buffer.size, \
        buffer.total_added


def broken(**changes):
    good = transitions(range(8))
    good.update(changes)
    return {k: v for k, v in good.items() if v is not None}


@pytest.mark.parametrize("bad, needle", [
    (broken(action=None), "exactly fields"),
    (broken(extra=np.zeros(8)), "exactly fields"),
    (broken(obs=np.zeros((8, 4, 6, 5), np.uint8)), "'obs' has shape"),
    (broken(next_obs=np.zeros((7, 4, 6, 6), np.uint8)), "'next_obs' has shape"),
    (broken(obs=np.zeros((8, 4, 6, 6), np.float32)), "'obs' has dtype float32"),
    (broken(reward=np.array([0, 1, np.nan, 0, 0, 0, 0, 0], np.float32)), "'reward' holds a non"),
    (broken(reward=np.full(8, np.inf, np.float32)), "'reward' holds a non-finite"),
    (broken(discount=np.full(8, 1.5, np.float32)), "'discount' must lie in [0, 1]"),
    (broken(action=np.zeros((8, 1), np.int32)), "non-empty 1-d"),
    (broken(action=np.zeros(0, np.int32)), "non-empty 1-d"),
])
def test_malformed_inserts_are_refused_and_leave_the_buffer_unchanged(bad, needle):
    buffer = ReplayBuffer(20, OBS_SHAPE, "uint8")
    buffer.add(transitions(range(15)))
    before = snapshot(buffer)
    with pytest.raises(InvalidTransitions) as error:
        buffer.add(bad)
    assert needle in str(error.value)
    after = snapshot(buffer)
    assert before[1:] == after[1:]
    for name in before[0]:
        np.testing.assert_array_equal(before[0][name], after[0][name])


def test_rate_limiter_follows_reverb_semantics():
    limiter = RateLimiter(samples_per_insert=8, min_size_to_sample=32, tolerance=600)
    assert not limiter.can_sample(32)  # below min size
    assert limiter.insert_budget() == (8 * 32 + 600) // 8
    limiter.record_insert(32)
    assert limiter.can_sample(32)
    limiter.record_insert(limiter.insert_budget())
    assert limiter.insert_budget() == 0  # actors must wait for the learner now
    while limiter.can_sample(32):
        limiter.record_sample(32)
    # The learner stopped where the ratio would leave the tolerance on the low side.
    assert limiter.diff - 32 < limiter.min_diff <= limiter.diff
    assert limiter.insert_budget() > 0


@pytest.mark.parametrize("actor_period, learner_period", [(1, 7), (7, 1)])
def test_rate_limiter_keeps_the_observed_ratio_within_tolerance(actor_period, learner_period):
    """Fast actors with a slow learner, and the reverse: whoever is faster waits."""
    spi, chunk, batch = 8.0, 64, 32
    tolerance = 2 * chunk * spi + batch
    limiter = RateLimiter(spi, min_size_to_sample=100, tolerance=tolerance)
    for tick in range(50_000):
        if tick % actor_period == 0 and limiter.insert_budget() >= chunk:
            limiter.record_insert(chunk)
        if tick % learner_period == 0 and limiter.can_sample(batch):
            limiter.record_sample(batch)
        if limiter.inserts >= limiter.min_size_to_sample:
            assert limiter.min_diff <= limiter.diff <= limiter.max_diff
    assert limiter.inserts > 10_000 and limiter.samples > 80_000  # both sides made progress
    # Samples per insert stays within tolerance of the target, whoever was faster.
    assert abs(limiter.samples - spi * limiter.inserts) <= tolerance + spi * 100


def make_server(capacity=200, **changes):
    config = PRESETS["seed"].replace(replay_capacity=capacity, chunk_transitions=16,
                                     min_replay_size=10, **changes)
    return ReplayServer.from_config(config, EnvInfo("test", OBS_SHAPE, "uint8", 4, 4))


def test_server_round_trip_through_the_wire():
    server = make_server()
    t = transitions(range(40))
    ack = server.insert(wire.encode_transitions(**t))
    assert ack["inserted"] == 40 and ack["total_inserted"] == 40 and ack["insert_budget"] >= 0
    arrays, meta = wire.decode(server.sample(8, num_batches=3), expect_kind=wire.BATCH)
    assert arrays["obs"].shape == (3, 8, *OBS_SHAPE) and arrays["index"].shape == (3, 8)
    assert meta["total_inserted"] == 40
    assert server.stats()["total_sampled"] == 24


def test_server_refuses_malformed_messages_and_keeps_serving():
    server = make_server()
    server.insert(wire.encode_transitions(**transitions(range(20))))
    before = snapshot(server.buffer), server.limiter.inserts
    bad = dict(transitions(range(5)))
    bad["reward"] = np.array([1, 2, np.nan, 4, 5], np.float32)
    for message in [b"junk", wire.encode_transitions(**bad),
                    wire.encode("batch", transitions(range(3)))]:
        with pytest.raises(ValueError):
            server.insert(message)
    assert server.stats()["rejected_messages"] == 3
    assert server.limiter.inserts == before[1] and server.buffer.total_added == 20
    server.insert(wire.encode_transitions(**transitions(range(20, 25))))
    assert server.buffer.total_added == 25


def test_server_sample_waits_while_the_learner_is_ahead():
    server = make_server(samples_per_insert=1.0, samples_per_insert_tolerance=16.0)
    assert server.sample(4) is None  # empty: below min size
    server.insert(wire.encode_transitions(**transitions(range(16))))
    taken = 0
    while server.sample(4) is not None:
        taken += 4
    # Ratio 1 allows 16 samples for 16 inserts, plus what the tolerance (16) leaves beyond
    # the min-size offset (10): 6 more, in whole batches of 4.
    assert taken == 20
