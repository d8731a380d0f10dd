"""WeightClient without Ray: a fake learner that answers long polls as `latest_weights` does."""
import pytest

from actors.weight_client import WEIGHTS_WAIT_S, SourceLost, WeightClient


class FakeLearner:
    """Publishes versions; a query is answered once there is news for it (a newer version,
    or another learner process), or with None when its wait is over (`expire`, or at once
    for a wait of 0). A dead learner's queries fail when fetched."""

    def __init__(self):
        self.version, self.life, self.dead = 0, "first", False
        self.queries: list = []  # (known_version, wait_s, known_life) of each query
        self.fetches = 0
        self.expired: set = set()

    def publish(self):
        self.version += 1

    def restart(self, version: int):
        """A new process, restored from a checkpoint at `version`."""
        self.version, self.life, self.dead = version, f"life-{len(self.queries)}", False

    def query(self, known_version, wait_s, known_life):
        self.queries.append((known_version, wait_s, known_life))
        return len(self.queries) - 1

    def _news(self, handle) -> bool:
        known_version, _, known_life = self.queries[handle]
        return self.version > known_version or known_life != self.life

    def ready(self, handle, timeout) -> bool:
        waits = self.queries[handle][1] > 0 and handle not in self.expired
        return self.dead or self._news(handle) or not waits or timeout is None

    def fetch(self, handle):
        if self.dead:
            raise SourceLost("learner died")
        if not self._news(handle):
            return None
        self.fetches += 1
        return self.version, f"weights-{self.version}", self.life


def client_for(learner):
    received = []
    client = WeightClient(learner, lambda weights, version: received.append((weights, version)))
    return client, received


def test_one_query_and_one_fetch_per_version_however_often_update_is_called():
    learner = FakeLearner()
    client, received = client_for(learner)
    assert client.update(wait=True)  # at start: whatever the learner has, at once
    assert received == [("weights-0", 0)] and learner.queries == [(-1, 0.0, None)]
    for _ in range(100):
        assert not client.update()
    assert learner.queries[1:] == [(0, WEIGHTS_WAIT_S, "first")]  # one query stays open
    for version in (1, 2):
        learner.publish()
        assert client.update()
        for _ in range(10):
            client.update()
        assert received[-1] == (f"weights-{version}", version)
    assert len(learner.queries) == 4 and learner.fetches == 3
    assert client.version == 2


def test_a_query_whose_wait_ends_without_news_is_asked_again():
    learner = FakeLearner()
    client, received = client_for(learner)
    client.update(wait=True)
    assert not client.update()
    learner.expired.add(1)  # the learner's wait is over: None
    assert not client.update()
    assert not client.update()
    assert learner.queries[1:] == [(0, WEIGHTS_WAIT_S, "first")] * 2
    assert received == [("weights-0", 0)] and learner.fetches == 1


def test_a_new_learner_life_is_picked_up_even_with_an_older_version():
    learner = FakeLearner()
    client, received = client_for(learner)
    for _ in range(5):
        learner.publish()
    client.update(wait=True)
    assert client.version == 5
    learner.restart(version=3)  # restored from an older checkpoint
    assert client.update()
    assert received[-1] == ("weights-3", 3) and client.version == 3
    assert client.life == learner.life


def test_a_dead_source_is_asked_again_and_the_restarted_one_answers():
    learner = FakeLearner()
    client, received = client_for(learner)
    client.update(wait=True)
    assert not client.update()  # a query is open when the learner dies
    learner.dead = True
    with pytest.raises(SourceLost):
        client.update()
    learner.restart(version=0)
    assert client.update()  # a new query, to the new process
    assert learner.queries[-1] == (0, WEIGHTS_WAIT_S, "first")
    assert received[-1] == ("weights-0", 0) and client.life == learner.life
