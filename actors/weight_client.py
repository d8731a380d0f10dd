"""How an actor or the evaluator keeps its weights fresh, without Ray (after Acme's
`VariableClient`).

`WeightClient` keeps one query open at the learner: a long poll that the learner answers when
it publishes a version newer than the one the client holds, or at once when it is another
process than the one the client's weights came from (a learner restored from a checkpoint may
be back at an older version), or with nothing after the poll's wait. `update()` checks that
query without blocking and, when weights came, hands them to a setter: one query and one fetch
per version, however often it is called. A learner that died is asked again by the next
query, which waits for the restarted one.

It talks to the learner through a `WeightSource` it is given: on Ray, thin wrappers around
`learner.latest_weights.remote`, `ray.wait` and `ray.get`; in tests, an in-memory fake.
"""
from __future__ import annotations

from typing import Any, Callable, Hashable, Protocol

WEIGHTS_WAIT_S = 10.0  # how long the learner holds a query open for a newer version


class SourceLost(Exception):
    """The learner died before answering (Ray restarts it)."""


class WeightSource(Protocol):
    """What the client needs of the learner. `fetch` raises `SourceLost` when it died."""

    def query(self, known_version: int, wait_s: float, known_life: str | None) -> Hashable:
        """Start a long poll for news to a holder of `known_version` from the learner process
        `known_life`; returns a handle to its answer."""

    def ready(self, handle, timeout: float | None) -> bool:
        """Whether the answer came, waiting up to `timeout` s (None: until it does)."""

    def fetch(self, handle) -> tuple[int, Any, str] | None:
        """(version, weights, learner life) of a ready answer, or None: no news."""


class WeightClient:
    def __init__(self, source: WeightSource, set_weights: Callable[[Any, int], None],
                 wait_s: float = WEIGHTS_WAIT_S):
        self.source, self.set_weights, self.wait_s = source, set_weights, wait_s
        self.version = -1  # of the weights set last; -1: none yet
        self.life: str | None = None  # the learner process they came from
        self.query: Hashable | None = None  # the open query's handle

    def update(self, wait: bool = False) -> bool:
        """Check the open query (opening one if none is), and set the weights it brought.
        With `wait`, the query asks for whatever the learner has now and is waited for.
        True when new weights were set. Raises `SourceLost` when the learner died; the next
        update asks again."""
        if self.query is None:
            self.query = self.source.query(self.version, 0.0 if wait else self.wait_s,
                                           self.life)
        if not self.source.ready(self.query, None if wait else 0.0):
            return False
        query, self.query = self.query, None
        answer = self.source.fetch(query)
        if answer is None:
            return False
        version, weights, self.life = answer
        self.set_weights(weights, version)
        self.version = version
        return True
