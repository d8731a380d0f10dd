"""Replay storage (frames once), prioritized sampling, the rate limiter and the bytes-in/
bytes-out server, without Ray."""
import hashlib
import threading
import time

import numpy as np
import pytest

from actors.adder import FrameAdder
from common import wire
from common.config import PRESETS
from common.env_info import EnvInfo
from replay_server.buffer import ChunkLimits, InvalidTransitions, ReplayBuffer, ReplaySpec
from replay_server.rate_limiter import RateLimiter
from replay_server.server import ReplayServer, SharedExclusiveLock
from tests.synthetic import FRAME_SHAPE, STACK, SyntheticEnvs, make_adder, play

SPEC = dict(obs_shape=(STACK, *FRAME_SHAPE), frame_shape=FRAME_SHAPE, stack=STACK,
            frame_dtype="uint8", num_actions=4)


def make_buffer(capacity=10_000, alpha=0.0, seed=0):
    return ReplayBuffer(ReplaySpec(capacity, **SPEC, priority_exponent=alpha), seed=seed)


def interleaved_chunks(rng, senders=3, envs=3, steps=150, **adder_args):
    """Chunks of several senders, each sender's in order, senders interleaved at random."""
    record, queues = {}, []
    for sender in range(senders):
        adder = make_adder(envs, **adder_args)
        synthetic = SyntheticEnvs(envs, rng, id_base=1_000_000 * sender)
        queues.append(play(synthetic, adder, steps, record))
    order = [s for s, chunks in enumerate(queues) for _ in chunks]
    rng.shuffle(order)
    return [queues[s].pop(0) for s in order], record


def insert_all(buffer, chunks):
    for chunk in chunks:
        arrays, meta = wire.decode(chunk, expect_kind=wire.TRANSITIONS)
        buffer.add(arrays, meta)


def sampled_items(buffer, count, beta=0.0):
    message = wire.encode(wire.BATCH, buffer.sample(count, 1, beta),
                          {"obs_shape": list(buffer.spec.obs_shape)})
    batch, _ = wire.decode_batch(message)
    return {name: array[0] for name, array in batch.items()}


@pytest.mark.parametrize("capacity", [10_000, 300])
def test_rebuilt_stacks_equal_what_the_actors_saw(capacity):
    """Three senders of three envs each, episodes of random lengths ending in terminations
    and truncations, chunks interleaved at random; with a small capacity both rings wrap."""
    rng = np.random.default_rng(0)
    chunks, record = interleaved_chunks(rng)
    buffer = make_buffer(capacity)
    insert_all(buffer, chunks)
    assert 0 < buffer.size <= capacity
    items = sampled_items(buffer, 4_000)
    for i, step_id in enumerate(items["reward"]):
        step = record[float(step_id)]
        np.testing.assert_array_equal(items["obs"][i], step.obs)
        np.testing.assert_array_equal(items["next_obs"][i], step.next_obs)
        assert items["action"][i] == step.action
        assert items["discount"][i] == pytest.approx(0.0 if step.terminated else 0.9)
    if capacity == 10_000:  # nothing evicted: every transition sent is there, once
        assert buffer.size == buffer.total_added > len(record) - 3 * 8  # 3 senders' leftovers
        assert len(set(items["reward"])) > 0.85 * buffer.size
    else:  # the newest transitions survive
        newest = sorted(record)[-50:]
        assert set(newest) & set(map(float, items["reward"]))


def test_each_frame_is_stored_once():
    rng = np.random.default_rng(1)
    chunks, record = interleaved_chunks(rng, senders=2, envs=4, steps=100)
    buffer = make_buffer()
    insert_all(buffer, chunks)
    episodes = sum(step.terminated or step.truncated for step in record.values())
    # One frame per step plus one per episode start (2 senders x 4 envs started once more).
    assert buffer.frames_written == len(record) + episodes + 2 * 4


def test_sampling_is_uniform_without_priorities():
    rng = np.random.default_rng(2)
    chunks, record = interleaved_chunks(rng, senders=1, envs=2, steps=5, chunk=10)
    buffer = make_buffer()
    insert_all(buffer, chunks)
    ids = sorted(record)
    counts = np.array([np.sum(sampled_items(buffer, 50_000)["reward"] == i) for i in ids])
    expected = 50_000 / len(ids)
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 27.9  # chi-square, 9 degrees of freedom, p = 0.001
    assert (sampled_items(buffer, 64, beta=1.0)["weight"] == 1.0).all()


def test_priorities_and_importance_weights():
    rng = np.random.default_rng(3)
    chunks, record = interleaved_chunks(rng, senders=1, envs=2, steps=4, chunk=8)
    buffer = make_buffer(alpha=0.5)
    insert_all(buffer, chunks)
    assert buffer.size == 8
    keys = np.arange(8)
    priorities = np.array([0, 1, 4, 9, 16, 25, 36, 49], np.float64)
    assert buffer.update_priorities(keys, priorities) == 8
    # leaf = (p + eps)^0.5, so P(i) ~ sqrt(p_i) = 0, 1, ..., 7.
    batch = sampled_items(buffer, 70_000, beta=0.5)
    counts = np.bincount(batch["key"], minlength=8)
    expected = 70_000 * np.arange(8) / 28
    assert counts[0] < 10
    assert (np.abs(counts[1:] - expected[1:]) < 5 * np.sqrt(expected[1:])).all()
    # w_i = (N P(i))^-beta / max_j w_j: the rarest sampled item weighs 1.
    p = np.sqrt(priorities + 1e-6) / np.sqrt(priorities + 1e-6).sum()
    weights = (8 * p[batch["key"]]) ** -0.5
    np.testing.assert_allclose(batch["weight"], weights / weights.max(), rtol=1e-5)


def test_priority_updates_for_overwritten_transitions_are_skipped():
    rng = np.random.default_rng(4)
    chunks, _ = interleaved_chunks(rng, senders=1, envs=2, steps=40, chunk=8)
    buffer = make_buffer(capacity=32, alpha=1.0)
    insert_all(buffer, chunks[:4])  # keys 0..31
    insert_all(buffer, chunks[4:5])  # keys 32..39 overwrite rows of keys 0..7
    applied = buffer.update_priorities(np.arange(16), np.full(16, 5.0))
    assert applied == 8  # keys 8..15 only
    leaves = buffer.tree.get(np.arange(32) % 32)
    assert np.allclose(leaves[8:16], 5.0 + 1e-6)
    assert buffer.max_priority == 5.0
    # New transitions enter at the largest priority seen so far.
    insert_all(buffer, chunks[5:6])
    assert np.allclose(buffer.tree.get(np.arange(40, 48) % 32), 5.0 + 1e-6)


def test_actor_priorities_are_used_as_initial_priorities():
    adder = make_adder(1, chunk=3, priorities=True)
    stack = np.zeros((STACK, *FRAME_SHAPE), np.uint8)
    adder.observe_first(0, stack)
    for t, error in enumerate([0.5, 2.0, 8.0]):
        next_stack = np.concatenate([stack[1:], np.full((1, *FRAME_SHAPE), t + 1, np.uint8)])
        adder.observe(0, 0, 0.0, next_stack, terminated=True, truncated=False, q_taken=-error)
        adder.observe_first(0, next_stack)
        stack = next_stack
    buffer = make_buffer(alpha=1.0)
    insert_all(buffer, [adder.take_chunk()[0]])
    np.testing.assert_allclose(buffer.tree.get(np.arange(3)), [0.5, 2.0, 8.0], rtol=1e-5)


def state_fingerprint(buffer):
    digest = hashlib.sha256()
    for array in (buffer.frames, buffer.obs_slots, buffer.next_slots, buffer.oldest_frame,
                  buffer.action, buffer.reward, buffer.discount, buffer.tree.nodes):
        digest.update(array.tobytes())
    digest.update(repr((buffer.counters(), buffer.streams.state())).encode())
    return digest.hexdigest()


def good_chunk():
    adder = make_adder(2, chunk=6)
    synthetic = SyntheticEnvs(2, np.random.default_rng(5), id_base=0)
    chunks = play(synthetic, adder, 6, {})
    return wire.decode(chunks[0], expect_kind=wire.TRANSITIONS), adder


def altered(changes: dict, meta_changes: dict | None = None):
    (arrays, meta), _ = good_chunk()
    arrays = {name: array.copy() for name, array in arrays.items()}
    for name, value in changes.items():
        if value is None:
            del arrays[name]
        elif callable(value):
            arrays[name] = value(arrays[name])
        else:
            arrays[name] = value
    return arrays, {**meta, **(meta_changes or {})}


def set_item(index, value):
    def change(array):
        array[index] = value
        return array
    return change


@pytest.mark.parametrize("changes, meta_changes, needle", [
    ({"action": None}, None, "must have fields"),
    ({"extra": np.zeros(3)}, None, "must have fields"),
    ({"frames": lambda f: f[:, :, :5].copy()}, None, "'frames' has shape"),
    ({"frames": lambda f: f.astype(np.float32)}, None, "'frames' has dtype float32"),
    ({"obs_frames": lambda f: f[:, :3].copy()}, None, "'obs_frames' has shape"),
    ({"obs_frames": lambda f: f.astype(np.int32)}, None, "'obs_frames' has dtype int32"),
    ({"reward": set_item(2, np.nan)}, None, "'reward' holds a non-finite"),
    ({"discount": set_item(0, 1.5)}, None, "'discount' must lie in [0, 1]"),
    ({"action": set_item(1, 7)}, None, "'action' outside [0, 4)"),
    ({"priority": np.full(6, -1.0, np.float32)}, None, "'priority' must be >= 0"),
    ({"next_obs_frames": set_item((0, 3), 10_000)}, None, "frame 10000 of stream"),
    ({}, {"stream": -1}, "meta 'stream' must be an integer"),
    ({}, {"first_frame": "zero"}, "meta 'first_frame' must be an integer"),
    ({"action": lambda a: a[:0].copy()}, None, "'action' has shape (0,): 0 transitions"),
    ({name: (lambda a: a[:0].copy()) for name in ("obs_frames", "next_obs_frames", "action",
                                                   "reward", "discount")},
     None, "non-empty 1-d"),
    ({"frames": lambda f: np.zeros((2_000, *f.shape[1:]), f.dtype)}, None,
     "2000 frames, more than the"),
])
def test_malformed_inserts_are_refused_and_leave_the_buffer_unchanged(changes, meta_changes,
                                                                     needle):
    buffer = make_buffer(capacity=50)
    insert_all(buffer, interleaved_chunks(np.random.default_rng(6), senders=2, steps=30)[0])
    before = state_fingerprint(buffer)
    arrays, meta = altered(changes, meta_changes)
    with pytest.raises(InvalidTransitions) as error:
        buffer.add(arrays, meta)
    assert needle in str(error.value)
    assert state_fingerprint(buffer) == before


def test_a_chunk_resent_or_out_of_order_is_refused():
    (arrays, meta), adder = good_chunk()
    buffer = make_buffer()
    buffer.add(arrays, meta)
    before = state_fingerprint(buffer)
    with pytest.raises(InvalidTransitions, match="frame numbers must increase"):
        buffer.add(arrays, meta)
    assert state_fingerprint(buffer) == before


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


def test_a_learner_held_by_the_limiter_observes_the_target_ratio():
    """Ape-X's shape: 0.8 samples per insert, 50,000 inserts before the first sample, a
    learner faster than its actors. The inserts that filled replay were never sampled
    against, so the figure counts the ones past them: 0.8, where all inserts give 0.7."""
    spi, chunk, batch, min_size = 0.8, 128, 1024, 50_000
    limiter = RateLimiter(spi, min_size_to_sample=min_size, tolerance=2 * chunk * spi + batch)
    while limiter.inserts < 400_000:
        limiter.record_insert(chunk)
        while limiter.can_sample(batch):
            limiter.record_sample(batch)
    assert limiter.samples / limiter.inserts == pytest.approx(0.7, abs=0.01)
    assert limiter.observed_samples_per_insert() == pytest.approx(spi, abs=0.01)


def make_server(capacity=2_000, **changes):
    config = PRESETS["seed"].replace(**{"replay_capacity": capacity, "chunk_transitions": 8,
                                        "min_replay_size": 10, **changes})
    info = EnvInfo("test", (STACK, *FRAME_SHAPE), "uint8", 4, 4)
    return ReplayServer.from_config(config, info)


@pytest.mark.parametrize("actor_sleep_s, learner_sleep_s", [(0.0, 0.004), (0.004, 0.0)])
def test_server_holds_the_ratio_with_real_threads(actor_sleep_s, learner_sleep_s):
    """An inserting thread and a sampling thread at different speeds: the slower one sets
    the pace and the observed ratio stays within the tolerance; stopping never deadlocks."""
    server = make_server(samples_per_insert=4.0)
    chunks, _ = interleaved_chunks(np.random.default_rng(7), senders=1, envs=4, steps=400,
                                   chunk=8)
    stop = threading.Event()

    def act():
        for chunk in chunks:
            while server.insert_budget() < 8 and not stop.is_set():
                time.sleep(0.001)
            if stop.is_set():
                return
            server.insert(chunk)
            time.sleep(actor_sleep_s)

    def learn():
        while not stop.is_set():
            if server.sample(16) is None:
                time.sleep(0.001)
            time.sleep(learner_sleep_s)

    threads = [threading.Thread(target=act), threading.Thread(target=learn)]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
        assert not thread.is_alive()
    limiter = server.limiter
    assert limiter.inserts > 100 and limiter.samples > 400
    assert limiter.min_diff - 16 <= limiter.diff <= limiter.max_diff


def test_server_round_trip_through_the_wire():
    server = make_server()
    chunks, record = interleaved_chunks(np.random.default_rng(8), senders=1, envs=2, steps=20)
    acks = [server.insert(chunk) for chunk in chunks]
    inserted = sum(a.inserted for a in acks)
    assert acks[-1].total_inserted == inserted == 40
    batch, meta = wire.decode_batch(server.sample(8, num_batches=3))
    assert batch["obs"].shape == (3, 8, STACK, *FRAME_SHAPE)
    assert batch["key"].shape == batch["weight"].shape == (3, 8)
    assert meta["total_inserted"] == inserted and meta["size"] == inserted
    assert server.stats().total_sampled == 24


def test_small_batches_come_compressed_and_large_ones_raw(monkeypatch):
    import msgpack

    from replay_server import server as server_module
    server = make_server(chunk_transitions=20)
    frames = np.zeros((21, *FRAME_SHAPE), np.uint8)  # compressible, as Atari frames are
    frames[np.arange(21), 0, 0] = np.arange(21)
    refs = np.repeat(np.arange(20)[:, None], STACK, axis=1)
    server.insert(wire.encode_transitions(frames, refs, refs + 1, np.zeros(20), np.zeros(20),
                                          np.full(20, 0.9), stream=1, first_frame=0))
    small = server.sample(8, num_batches=2)
    monkeypatch.setattr(server_module, "COMPRESS_BATCH_BYTES", frames[0].nbytes)
    large = server.sample(8, num_batches=2)
    assert msgpack.unpackb(small)["arrays"]["frames"]["codec"] == "zstd"
    assert "codec" not in msgpack.unpackb(large)["arrays"]["frames"]
    for message in (small, large):
        batch, _ = wire.decode_batch(message)
        # Transition i: stack [i] * 4 -> [i + 1] * 4, and frame i holds i at (0, 0).
        first = np.repeat(batch["obs"][:, :, :1, 0, 0], STACK, axis=2)
        np.testing.assert_array_equal(batch["obs"][..., 0, 0], first)
        np.testing.assert_array_equal(batch["next_obs"][..., 0, 0], first + 1)


def test_server_refuses_malformed_messages_and_keeps_serving():
    server = make_server()
    chunks, _ = interleaved_chunks(np.random.default_rng(9), senders=1, envs=2, steps=20)
    server.insert(chunks[0])
    before = state_fingerprint(server.buffer), server.limiter.inserts
    arrays, meta = wire.decode(chunks[1], expect_kind=wire.TRANSITIONS)
    bad = {**arrays, "reward": np.full(len(arrays["reward"]), np.nan, np.float32)}
    for message in [b"junk", wire.encode(wire.TRANSITIONS, bad, meta),
                    wire.encode(wire.BATCH, arrays, meta)]:
        with pytest.raises(ValueError):
            server.insert(message)
    with pytest.raises(ValueError, match="key and priority"):
        server.update_priorities(wire.encode(wire.PRIORITIES, {"key": np.zeros(2, np.int64)}))
    assert server.stats().rejected_messages == 4
    assert (state_fingerprint(server.buffer), server.limiter.inserts) == before
    server.insert(chunks[1])
    assert server.buffer.total_added == 16


def test_server_sample_waits_while_the_learner_is_ahead():
    server = make_server(samples_per_insert=1.0, samples_per_insert_tolerance=16.0)
    assert server.sample(4) is None  # empty: below min size
    chunks, _ = interleaved_chunks(np.random.default_rng(10), senders=1, envs=2, steps=8)
    server.insert(chunks[0])
    server.insert(chunks[1])
    taken = 0
    while server.sample(4) is not None:
        taken += 4
    # Ratio 1 allows 16 samples for 16 inserts, plus what the tolerance (16) leaves beyond
    # the min-size offset (10): 6 more, in whole batches of 4.
    assert taken == 20


def test_streams_whose_frames_have_left_the_ring_are_forgotten():
    rng = np.random.default_rng(11)
    chunks, _ = interleaved_chunks(rng, senders=3, envs=2, steps=20)
    buffer = make_buffer(capacity=100)
    insert_all(buffer, chunks)
    assert len(buffer.streams) == 3
    adder = make_adder(2)
    later = play(SyntheticEnvs(2, rng, id_base=9_000_000), adder, 400, {})
    insert_all(buffer, later)  # one sender alone pushes the others' frames out
    assert list(buffer.streams.streams) == [adder.stream]
    assert len(buffer.streams.streams[adder.stream].first_numbers) <= 64


def test_chunks_arriving_out_of_order_are_stored_in_order():
    """Ray may run one caller's calls out of order on a threaded actor: a chunk that comes
    before its predecessor waits for it, and the stored stacks are still the actors'."""
    rng = np.random.default_rng(12)
    server = make_server(capacity=5_000)
    record, chunks = {}, []
    for sender in range(2):
        adder = make_adder(3)
        chunks.append(play(SyntheticEnvs(3, rng, id_base=1_000_000 * sender), adder, 60,
                           record))
    arrivals = []
    for own in chunks:  # swap neighbours: 1 0 3 2 5 4 ...
        for i in range(0, len(own) - 1, 2):
            own[i], own[i + 1] = own[i + 1], own[i]
        arrivals += own
    acks = [server.insert(chunk) for chunk in arrivals]
    assert any(ack.parked for ack in acks)
    assert server.stats().parked_chunks == (len(chunks[0]) % 2) + (len(chunks[1]) % 2)
    assert server.stats().rejected_messages == 0
    stored = server.buffer.total_added
    assert stored == sum(ack.inserted for ack in acks) > 0
    items = sampled_items(server.buffer, 2_000)
    for i, step_id in enumerate(items["reward"]):
        step = record[float(step_id)]
        np.testing.assert_array_equal(items["obs"][i], step.obs)
        np.testing.assert_array_equal(items["next_obs"][i], step.next_obs)


def test_a_chunk_whose_predecessor_never_comes_expires(monkeypatch):
    import replay_server.server as server_module
    server = make_server()
    chunks, _ = interleaved_chunks(np.random.default_rng(13), senders=1, envs=2, steps=40)
    assert server.insert(chunks[1]).parked
    monkeypatch.setattr(server_module, "PARKED_TIMEOUT_S", 0.0)
    server.insert(interleaved_chunks(np.random.default_rng(14), senders=1, envs=2,
                                     steps=8)[0][0])  # another stream's insert expires it
    assert server.stats().parked_chunks == 0 and server.stats().rejected_messages == 1
    monkeypatch.setattr(server_module, "PARKED_TIMEOUT_S", 30.0)
    monkeypatch.setattr(server_module, "MAX_PARKED_PER_STREAM", 2)
    server.insert(chunks[2])
    server.insert(chunks[3])
    with pytest.raises(InvalidTransitions, match="2 chunks already wait"):
        server.insert(chunks[4])


def test_a_sender_silent_while_its_frames_left_the_ring_goes_on():
    """Transitions naming frames evicted since they were sent are dropped, not refused."""
    rng = np.random.default_rng(15)
    buffer = make_buffer(capacity=200)
    slow = make_adder(2, n_step=3)
    slow_envs = SyntheticEnvs(2, rng, id_base=0, mean_episode=40)
    slow_chunks = play(slow_envs, slow, 30, {})
    insert_all(buffer, slow_chunks[:-1])  # the last chunk is held back ...
    busy = interleaved_chunks(rng, senders=2, envs=2, steps=200)[0]
    insert_all(buffer, busy)  # ... while others turn the frame ring over
    insert_all(buffer, slow_chunks[-1:])
    assert buffer.stale_dropped > 0
    more = play(slow_envs, slow, 20, {})
    insert_all(buffer, more)  # and the sender carries on normally
    assert buffer.streams.next_number(slow.stream) == slow.next_number - len(
        slow.unsent_frames)


def test_an_ask_for_insert_budget_waits_for_the_samples_that_free_it():
    """An actor's blocking ask: it answers at once when the budget is there, waits (holding no
    lock) for the samples that free enough of it, and answers what there is after its wait."""
    server = make_server(samples_per_insert=1.0, samples_per_insert_tolerance=16.0)
    chunks, _ = interleaved_chunks(np.random.default_rng(12), senders=1, envs=2, steps=16)
    for chunk in chunks:
        if server.insert_budget() < 8:
            break
        server.insert(chunk)
    budget = server.insert_budget(at_least=0, wait_s=30.0)  # enough already: no wait
    assert budget < 8
    started = time.monotonic()
    assert server.insert_budget(at_least=budget + 1, wait_s=0.3) == budget  # nothing sampled
    assert time.monotonic() - started >= 0.3
    answers = []
    waiter = threading.Thread(
        target=lambda: answers.append(server.insert_budget(at_least=budget + 4, wait_s=30.0)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not answers
    sampled_at = time.monotonic()
    assert server.sample(4) is not None  # the sample goes through while the ask waits
    waiter.join(timeout=10)
    assert not waiter.is_alive() and time.monotonic() - sampled_at < 5
    assert answers == [budget + 4]


def test_a_refused_sample_waits_for_the_insert_that_allows_it():
    """Reverb's blocking sample: a sample call waits (holding no lock) until an insert lets
    the rate limiter pass it, and gives up with None after its wait."""
    server = make_server(samples_per_insert=1.0, samples_per_insert_tolerance=16.0)
    chunks, _ = interleaved_chunks(np.random.default_rng(11), senders=1, envs=2, steps=8)
    started = time.monotonic()
    assert server.sample(4, wait_s=0.3) is None  # nothing comes: None once the wait is over
    assert time.monotonic() - started >= 0.3
    answers = []
    waiter = threading.Thread(target=lambda: answers.append(server.sample(4, wait_s=30.0)))
    waiter.start()
    time.sleep(0.3)
    assert waiter.is_alive() and not answers  # still waiting: below the minimum size
    inserted_at = time.monotonic()
    server.insert(chunks[0])  # the insert goes through while the sample waits
    server.insert(chunks[1])
    waiter.join(timeout=10)
    assert not waiter.is_alive() and time.monotonic() - inserted_at < 5
    batch, _ = wire.decode_batch(answers[0])
    assert batch["obs"].shape[:2] == (1, 4)


def test_an_invalid_chunk_is_refused_before_it_could_be_parked():
    """A chunk ahead of its stream is checked for everything that needs no predecessor
    first: an invalid one is refused (and counted), not parked."""
    server = make_server()
    chunks, _ = interleaved_chunks(np.random.default_rng(16), senders=1, envs=2, steps=30)
    arrays, meta = wire.decode(chunks[2], expect_kind=wire.TRANSITIONS)
    bad = {**arrays, "action": np.full(len(arrays["action"]), 99, np.int32)}
    for stream in range(20):
        with pytest.raises(wire.WireError, match=r"'action' outside \[0, 4\)"):
            server.insert(wire.encode(wire.TRANSITIONS, bad, {**meta, "stream": stream}))
    assert server.stats().parked_chunks == 0 and server.stats().rejected_messages == 20


def test_parked_chunks_are_capped_in_bytes_oldest_expiring_first(monkeypatch):
    import replay_server.server as server_module
    server = make_server()
    streams = [interleaved_chunks(np.random.default_rng(17 + s), senders=1, envs=2, steps=30)[0]
               for s in range(4)]
    size = max(len(chunks[1]) for chunks in streams)
    monkeypatch.setattr(server_module, "MAX_PARKED_BYTES", 2 * size)
    for chunks in streams:  # each stream's second chunk, ahead of its first
        assert server.insert(chunks[1]).parked
        assert server.stats().parked_bytes <= 2 * size
    stats = server.stats()
    assert stats.parked_chunks == 2 and stats.rejected_messages == 2
    for chunks in streams[:2]:  # the oldest were dropped: only the predecessor is stored
        assert server.insert(chunks[0]).inserted == 8
    for chunks in streams[2:]:  # the youngest are stored once their predecessor comes
        assert server.insert(chunks[0]).inserted == 16
    assert server.stats().parked_chunks == 0 and server.stats().parked_bytes == 0
    monkeypatch.setattr(server_module, "MAX_PARKED_BYTES", size // 2)
    with pytest.raises(InvalidTransitions, match="exceeds the .* bytes a shard parks"):
        server.insert(streams[0][2])


def test_an_insert_bomb_shaped_like_a_chunk_is_refused_before_anything_is_allocated():
    from tests.test_wire import message_of, refusal_and_peak, zeros_frame
    server = make_server()
    rows = (128 << 20) // 36  # 6x6 frames: ~128 MiB in a 5 KB message
    arrays = {"frames": ("uint8", [rows, *FRAME_SHAPE], zeros_frame(rows * 36), True),
              **{name: (dtype, [8, *shape], bytes(8 * 8 * STACK), False) for name, dtype, shape in (
                  ("obs_frames", "int64", [STACK]), ("next_obs_frames", "int64", [STACK]))},
              **{name: (dtype, [8], bytes(32), False) for name, dtype in (
                  ("action", "int32"), ("reward", "float32"), ("discount", "float32"))}}
    message = message_of(arrays, {"stream": 1, "first_frame": 0}, kind=wire.TRANSITIONS)
    assert len(message) < 10_000
    refusal, peak = refusal_and_peak(lambda: server.insert(message))
    assert f"{rows} frames, more than the" in refusal and peak < 1 << 20
    assert server.stats().rejected_messages == 1


def test_the_replay_service_loads_no_tensorflow_emulator_or_gymnasium():
    """A replay process holds frames, not models or games: its modules import none of them
    (checked in a fresh interpreter, as a Ray worker starts)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    probe = ("import sys, replay_server.service, replay_server.server, replay_server.snapshot;"
             "print(sorted({'tensorflow', 'keras', 'ale_py', 'gymnasium'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_specs_nbytes_is_what_its_buffer_allocates():
    """The launcher checks replay against the machine's memory with `ReplaySpec.nbytes`: it
    must count every array the buffer holds."""
    for capacity, priority in [(1_000, 0.0), (4_097, 0.6)]:
        spec = ReplaySpec(capacity=capacity, priority_exponent=priority, **SPEC)
        buffer = ReplayBuffer(spec)
        arrays = [value for value in vars(buffer).values() if isinstance(value, np.ndarray)]
        assert spec.nbytes == sum(a.nbytes for a in arrays) + buffer.tree.nodes.nbytes


@pytest.mark.parametrize("chunk, envs, n_step, priorities", [
    (8, 3, 3, True), (128, 64, 3, True), (5, 16, 1, False), (1, 1, 1, False), (7, 2, 5, True)])
def test_an_actors_chunks_fit_the_limits_its_knobs_set(chunk, envs, n_step, priorities):
    """The adder driven as an actor drives it (the values of the current observations, one
    step of every env, a first observation after each end, then every full chunk), with the
    most frames a step can bring: no frame of a stack shared with its predecessor, and
    stretches of long episodes (steps wait for their n-step return) between bursts of
    episodes of one step. Every chunk fits a shard built from the same knobs."""
    rng = np.random.default_rng(chunk)
    limits = ChunkLimits.of_actors(chunk, envs, n_step, STACK)
    schema = ReplaySpec(10**6, **SPEC, chunk=limits).insert_schema()
    adder = FrameAdder(envs, STACK, FRAME_SHAPE, "uint8", n_step, 0.9, chunk,
                       compute_priorities=priorities)

    def unshared_stack():
        return rng.integers(0, 256, (STACK, *FRAME_SHAPE), dtype=np.uint8)

    for env in range(envs):
        adder.observe_first(env, unshared_stack())
    most = sent = 0
    for step in range(40):
        if priorities:
            adder.observe_values(rng.random(envs))
        ending = 0.9 if step % 10 > 6 else 0.02
        for env in range(envs):
            ended, terminated = rng.random() < ending, rng.random() < 0.5
            adder.observe(env, 0, 1.0, unshared_stack(), ended and terminated,
                          ended and not terminated, q_taken=0.5 if priorities else None,
                          final_value=0.0)
            if ended:
                adder.observe_first(env, unshared_stack())
        while (taken := adder.take_chunk()) is not None:
            arrays, _ = wire.decode(taken[0], expect_kind=wire.TRANSITIONS, schema=schema)
            most, sent = max(most, len(arrays["frames"])), sent + 1
    assert sent > 1 and 0 < most <= limits.frames


def apex_shard() -> ReplayServer:
    """A shard of Ape-X's knobs on Atari frames, its rings small enough that half of its
    frame ring is more than a chunk may hold."""
    config = PRESETS["apex"].replace(replay_capacity=6_000, min_replay_size=100)
    return ReplayServer.from_config(config, EnvInfo("test", (4, 84, 84), "uint8", 4, 4))


def zero_frames_chunk(frames: int, transitions: int = 128) -> memoryview:
    """An insert of `transitions` transitions over `frames` frames of zeros: a few KB."""
    refs = np.minimum(np.arange(transitions)[:, None] + np.arange(4), frames - 2)
    return wire.encode_transitions(
        np.zeros((frames, 84, 84), np.uint8), refs, refs + 1, np.zeros(transitions),
        np.zeros(transitions), np.full(transitions, 0.9), stream=1, first_frame=0)


def shard_counts(server: ReplayServer) -> tuple:
    return (server.buffer.counters(), server.buffer.streams.state(), server.limiter.inserts,
            server.limiter.samples)


def test_an_insert_larger_than_an_actors_chunk_is_refused_from_its_header():
    """Ape-X's knobs (chunks of 128 transitions, 64 envs an actor, 3-step, 4-frame stacks)
    bound what one insert may bring to 2,816 frames (19.9 MB of Atari frames), not to half
    the frame ring nor the 2 GiB wire budget: a message of a few KB declaring more is refused
    from its header, nothing decompressed, the shard unchanged; a chunk of the bound is
    stored."""
    from tests.test_wire import refusal_and_peak
    server = apex_shard()
    assert server.buffer.insert_schema.limits == {"frames": 2_816, "transitions": 128}
    assert server.buffer.spec.frame_capacity // 2 > 2_816
    before = shard_counts(server)
    for message, needle in [
            (zero_frames_chunk(2_817), "'frames' has shape (2817, 84, 84): 2817 frames, more "
             "than the 2816 a message may hold (an actor's chunk: 128 transitions of 64 envs, "
             "3-step, 4-frame stacks)"),
            (zero_frames_chunk(200, transitions=129), "'obs_frames' has shape (129, 4): 129 "
             "transitions, more than the 128 a message may hold (an actor's chunk")]:
        assert len(message) < 20_000
        refusal, peak = refusal_and_peak(lambda: server.insert(message))
        assert refusal == needle if needle.endswith(")") else needle in refusal
        assert peak < 1 << 20
    assert shard_counts(server) == before and server.stats().rejected_messages == 2
    assert server.insert(zero_frames_chunk(2_816)).inserted == 128


class RecordingLock(SharedExclusiveLock):
    """The shard's lock, noting when it is taken exclusively."""

    def __init__(self, events: list):
        super().__init__()
        self.events = events

    def __enter__(self):
        self.events.append("lock")
        return super().__enter__()


class DecodeRecordingServer(ReplayServer):
    """The shard, noting when it decodes a message it was sent."""
    events: list

    def _decode(self, *args):
        self.events.append("decode")
        return super()._decode(*args)


def test_an_insert_is_decoded_before_the_shards_lock_is_taken():
    config = PRESETS["seed"].replace(replay_capacity=2_000, chunk_transitions=8)
    server = DecodeRecordingServer.from_config(config, EnvInfo("t", (STACK, *FRAME_SHAPE),
                                                               "uint8", 4, 4))
    server.events = []
    server.lock = RecordingLock(server.events)
    chunks, _ = interleaved_chunks(np.random.default_rng(30), senders=1, envs=2, steps=8)
    assert server.insert(chunks[0]).inserted == 8
    assert server.events == ["decode", "lock"]


@pytest.mark.parametrize("call", ["insert", "update_priorities"])
def test_a_malformed_message_is_refused_while_another_thread_holds_the_lock(call):
    """Decoding needs none of the shard's locks: a message refused while a long insert (or a
    snapshot's copy) holds the lock is refused at once, and counted."""
    server = make_server()
    valid = (interleaved_chunks(np.random.default_rng(31), senders=1, envs=2, steps=4)[0][0]
             if call == "insert" else wire.encode_priorities(np.arange(4), np.ones(4)))
    forged = msgpack_body_with(valid, dtype=["int64"])
    outcome: list = []

    def send():
        try:
            getattr(server, call)(forged)
        except wire.WireError as error:
            outcome.append(str(error))

    with server.lock:
        sender = threading.Thread(target=send)
        sender.start()
        sender.join(timeout=10)
        refused_while_locked = not sender.is_alive()
    sender.join()
    assert refused_while_locked
    name = "frames" if call == "insert" else "key"
    assert outcome == [f"array {name!r} has dtype ['int64'], not one of ['bool', 'float16', "
                       f"'float32', 'float64', 'int32', 'int64', 'int8', 'uint32', 'uint8']"]
    assert server.stats().rejected_messages == 1


def msgpack_body_with(message, **array_fields) -> bytes:
    """`message` with its first array's fields replaced."""
    import msgpack
    body = msgpack.unpackb(message)
    next(iter(body["arrays"].values())).update(array_fields)
    return msgpack.packb(body, use_bin_type=True)
