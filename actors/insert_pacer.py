"""How an actor sends its chunks to its replay shard, without Ray.

`InsertPacer` keeps at most `max_inflight` sends unacknowledged and sends nothing beyond the
shard's insert budget (its rate limiter), so a slow replay or learner slows the actor instead of
filling its memory. Each acknowledgement brings the shard's total inserts and its budget; from
the totals it estimates the agent steps of all actors, which drive the epsilon schedule. When
the shard dies, what was in flight is dropped and the actor is asked to go on as a new stream.

It talks to the shard through a `ReplayLink` it is given: on Ray, thin wrappers around
`replay.insert.remote`, `ray.wait`, `ray.get` and `replay.insert_budget.remote`; in tests, an
in-memory fake.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Callable, Hashable, Protocol

from common.records import InsertAck
from common.wire import Message

BUDGET_WAIT_S = 1.0  # longest an ask for insert budget waits in the shard (stop is checked)
FLUSH_WAIT_S = 10.0  # how long the last acknowledgements are waited for at stop


class ReplayLost(Exception):
    """The replay shard died (Ray restarts it from its latest snapshot)."""


class ReplayLink(Protocol):
    """What the pacer needs of a replay shard. `result` and `ask_budget` raise `ReplayLost`
    when the shard died."""

    def send(self, message: Message) -> Hashable:
        """Start an insert; returns a handle to its acknowledgement."""

    def ready(self, handles: list, num: int, timeout: float | None) -> list:
        """The handles whose acknowledgement came, waiting up to `timeout` s (None: for
        ever) until `num` of them did."""

    def result(self, handle) -> InsertAck:
        """The acknowledgement of a ready insert."""

    def ask_budget(self, transitions: int, wait_s: float) -> int:
        """The shard's insert budget, once it reaches `transitions` or after `wait_s` s."""


class InsertPacer:
    def __init__(self, replay: ReplayLink, max_inflight: int, num_shards: int,
                 stop: threading.Event, agent_steps: Callable[[], int],
                 new_stream: Callable[[], None], budget_wait_s: float = BUDGET_WAIT_S):
        """`agent_steps` reads the actor's own step count; `new_stream` makes it send as a
        new stream of frames (after the shard lost this stream's latest ones)."""
        self.replay, self.max_inflight, self.num_shards = replay, max_inflight, num_shards
        self.stop, self.agent_steps, self.new_stream = stop, agent_steps, new_stream
        self.budget_wait_s = budget_wait_s
        self.inflight: list = []  # (handle, transitions) of unacknowledged inserts
        self.budget = 0
        self.global_steps_base = 0  # the shard's total inserts at the last acknowledgement ...
        self.local_steps_at_base = 0  # ... and the actor's own step count then

    def global_steps(self) -> int:
        """All actors' agent steps, estimated from this shard's inserts (one transition per
        agent step) times the shards (actors spread evenly over them)."""
        return (self.global_steps_base * self.num_shards
                + self.agent_steps() - self.local_steps_at_base)

    def send(self, message: Message, transitions: int) -> bool:
        """Send one chunk once the in-flight bound and the budget allow. False when it was not
        sent: the actor is stopping, or the shard died (then the actor goes on as a new
        stream, and the next ask for budget waits for the shard to be back)."""
        try:
            while len(self.inflight) >= self.max_inflight:
                self._collect(num=1, timeout=None)
            if not self._wait_for_budget(transitions):
                return False
            self.inflight.append((self.replay.send(message), transitions))
            self.budget -= transitions
            return True
        except ReplayLost:
            self._replay_lost()
            return False

    def flush(self) -> None:
        """Wait a while for the last acknowledgements (at stop); a dead shard ends the wait."""
        with contextlib.suppress(ReplayLost):
            self._collect(num=len(self.inflight), timeout=FLUSH_WAIT_S)

    def _wait_for_budget(self, transitions: int) -> bool:
        while True:
            self._collect()  # chunks that landed during a wait are no longer pending
            if self.stop.is_set():
                return False
            if self.budget >= transitions:
                return True
            pending = self._pending()  # the shard's budget still counts them
            self.budget = self.replay.ask_budget(transitions + pending,
                                                 self.budget_wait_s) - pending

    def _pending(self) -> int:
        return sum(n for _, n in self.inflight)

    def _collect(self, num: int | None = None, timeout: float | None = 0.0) -> None:
        """Take the acknowledgements that came (waiting as `ready` does for `num`)."""
        handles = [handle for handle, _ in self.inflight]
        if not handles:
            return
        done = set(self.replay.ready(handles, num or len(handles), timeout))
        if not done:
            return
        for handle in [handle for handle in handles if handle in done]:
            ack = self.replay.result(handle)
            if ack.total_inserted > self.global_steps_base:
                self.global_steps_base = ack.total_inserted
                self.local_steps_at_base = self.agent_steps()
        self.inflight = [item for item in self.inflight if item[0] not in done]
        self.budget = ack.insert_budget - self._pending()

    def _replay_lost(self) -> None:
        """What was in flight is lost, and the restored shard has not seen this stream's
        recent frames."""
        self.inflight = []
        self.budget = 0
        self.new_stream()
