"""InsertPacer without Ray: a fake replay shard with a real rate limiter, whose inserts land
only when the actor waits for them (a slow shard)."""
import threading

import pytest

from actors.insert_pacer import InsertPacer, ReplayLost
from common.records import InsertAck
from replay_server.rate_limiter import RateLimiter


class FakeReplay:
    """A shard in memory. A message is `n` bytes for `n` transitions. Inserts land (are
    stored and counted by the limiter) in the order sent, only when a wait asks for them; an
    ask for budget that falls short lets the learner sample `sample_per_wait` meanwhile."""

    def __init__(self, limiter: RateLimiter, sample_per_wait: int = 0):
        self.limiter, self.sample_per_wait = limiter, sample_per_wait
        self.others = 0  # inserts of other actors into this shard
        self.sent: list = []  # transitions of each send, by handle
        self.acks: dict = {}  # handle -> acknowledgement, once landed
        self.unacknowledged: set = set()
        self.most_unacknowledged = 0
        self.asks: list = []  # (at_least, wait_s) of each ask for budget
        self.dead = False

    def send(self, message: bytes):
        assert self.limiter.insert_budget() >= len(message) + self._unlanded()  # within budget
        handle = len(self.sent)
        self.sent.append(len(message))
        self.unacknowledged.add(handle)
        self.most_unacknowledged = max(self.most_unacknowledged, len(self.unacknowledged))
        return handle

    def _unlanded(self) -> int:
        return sum(n for h, n in enumerate(self.sent) if h not in self.acks)

    def land(self, count: int = 1) -> None:
        for handle in [h for h in range(len(self.sent)) if h not in self.acks][:count]:
            self.limiter.record_insert(self.sent[handle])
            self.acks[handle] = InsertAck(self.sent[handle],
                                          self.limiter.inserts + self.others,
                                          self.limiter.insert_budget())

    def ready(self, handles: list, num: int, timeout: float | None) -> list:
        if timeout != 0:
            self.land(num - len([h for h in handles if h in self.acks]))
        return [h for h in handles if h in self.acks]

    def result(self, handle) -> InsertAck:
        if self.dead:
            raise ReplayLost("shard died")
        self.unacknowledged.discard(handle)
        return self.acks[handle]

    def ask_budget(self, transitions: int, wait_s: float) -> int:
        if self.dead:
            raise ReplayLost("shard died")
        self.asks.append((transitions, wait_s))
        if self.limiter.insert_budget() < transitions:
            self.limiter.record_sample(self.sample_per_wait)
        return self.limiter.insert_budget()


class Steps:
    """The actor's own step count, and how often it was asked for a new stream."""

    def __init__(self):
        self.agent_steps, self.new_streams = 0, 0

    def new_stream(self):
        self.new_streams += 1


def pacer_for(replay, steps, max_inflight=2, num_shards=1, stop=None):
    return InsertPacer(replay, max_inflight, num_shards, stop or threading.Event(),
                       agent_steps=lambda: steps.agent_steps, new_stream=steps.new_stream)


def open_limiter():
    return RateLimiter(samples_per_insert=1.0, min_size_to_sample=0, tolerance=1e9)


def test_never_more_than_max_inflight_unacknowledged_sends():
    replay, steps = FakeReplay(open_limiter()), Steps()
    pacer = pacer_for(replay, steps, max_inflight=3)
    for _ in range(20):
        assert pacer.send(b"x" * 8, 8)
        assert len(pacer.inflight) <= 3
    assert replay.most_unacknowledged == 3  # the shard only answers when waited on
    pacer.flush()
    assert pacer.inflight == [] and replay.limiter.inserts == 20 * 8


def test_a_send_waits_for_the_budget_the_learners_samples_free():
    """Tolerance 32 at one sample per insert: 32 transitions go at once, then each ask waits
    until the learner has sampled enough; what is in flight counts against the budget."""
    limiter = RateLimiter(samples_per_insert=1.0, min_size_to_sample=0, tolerance=32)
    replay, steps = FakeReplay(limiter, sample_per_wait=4), Steps()
    pacer = pacer_for(replay, steps, max_inflight=8)
    for _ in range(4):
        assert pacer.send(b"x" * 8, 8)
    assert replay.asks == [(8, pytest.approx(1.0))]  # the first ask: budget 32, no wait
    assert pacer.send(b"x" * 8, 8)  # the fake's asserts: never beyond the budget
    # Budget is 0 with 32 pending, so two asks (each freeing 4) before the fifth could go.
    assert [at_least for at_least, _ in replay.asks[1:]] == [40, 40]
    assert limiter.samples == 8


def test_a_stop_while_waiting_for_budget_sends_nothing():
    limiter = RateLimiter(samples_per_insert=1.0, min_size_to_sample=0, tolerance=8)
    replay, steps, stop = FakeReplay(limiter), Steps(), threading.Event()
    pacer = pacer_for(replay, steps, stop=stop)
    assert pacer.send(b"x" * 8, 8)
    replay.ask_budget = lambda transitions, wait_s: stop.set() or 0  # stopped during the wait
    assert not pacer.send(b"x" * 8, 8)
    assert replay.sent == [8]


def test_the_global_step_estimate_is_the_shards_inserts_times_shards_plus_own_steps_since():
    replay, steps = FakeReplay(open_limiter()), Steps()
    pacer = pacer_for(replay, steps, max_inflight=1, num_shards=4)
    steps.agent_steps = 8
    assert pacer.global_steps() == 8  # no acknowledgement yet: only its own steps
    pacer.send(b"x" * 8, 8)
    replay.others = 100  # other actors' inserts reached the shard first
    steps.agent_steps = 16
    pacer.send(b"x" * 8, 8)  # waits for the first acknowledgement: 108 inserted
    assert pacer.global_steps() == 108 * 4
    steps.agent_steps = 30
    assert pacer.global_steps() == 108 * 4 + 14
    replay.others = 0  # an older total (a shard restored from a snapshot) never lowers it
    pacer.flush()
    assert pacer.global_steps() == 108 * 4 + 14


def test_a_replay_restart_clears_what_was_in_flight_and_asks_for_a_new_stream():
    replay, steps = FakeReplay(open_limiter()), Steps()
    pacer = pacer_for(replay, steps, max_inflight=2)
    for _ in range(2):
        assert pacer.send(b"x" * 8, 8)
    replay.dead = True
    assert not pacer.send(b"x" * 8, 8)
    assert pacer.inflight == [] and pacer.budget == 0 and steps.new_streams == 1
    asks = len(replay.asks)
    replay.dead = False  # restarted
    assert pacer.send(b"x" * 8, 8)
    assert len(replay.asks) == asks + 1  # the budget is asked for again, of the new shard
    assert steps.new_streams == 1


def test_flush_waits_for_the_last_acknowledgements_and_survives_a_dead_shard():
    replay, steps = FakeReplay(open_limiter()), Steps()
    pacer = pacer_for(replay, steps)
    pacer.send(b"x" * 8, 8)
    pacer.flush()
    assert pacer.inflight == [] and replay.unacknowledged == set()
    pacer.send(b"x" * 8, 8)
    replay.dead = True
    pacer.flush()  # no error, and no new stream at stop
    assert steps.new_streams == 0
