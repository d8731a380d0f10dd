"""Timing alternatives against each other in one process, as the roles do at start to pick
the faster way to compute (the learner's compile mode, the actors' precision)."""
from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

Key = TypeVar("Key", bound=Hashable)


def calls_per_second_in_turns(calls: Mapping[Key, Callable[[], object]], seconds_each: float,
                              turns: int = 4) -> dict[Key, float]:
    """Calls per second of each of `calls` (compiled and warmed up already: a call must wait
    until its result is computed), each called for about `seconds_each` in all, in `turns`
    turns taken in order with the others, so a load that comes and goes weighs on all alike.
    Each is called at least once a turn."""
    seconds, counts = dict.fromkeys(calls, 0.0), dict.fromkeys(calls, 0)
    for _ in range(turns):
        for key, call in calls.items():
            started = time.perf_counter()
            while True:
                call()
                counts[key] += 1
                if time.perf_counter() - started >= seconds_each / turns:
                    break
            seconds[key] += time.perf_counter() - started
    return {key: counts[key] / seconds[key] for key in calls}
