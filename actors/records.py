"""What an actor reports to the launcher: plain records, no heavy imports, so the launcher,
the benchmarks and the tests read them without loading an actor."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class FinishedEpisode(NamedTuple):
    episode_return: float  # the raw game score, unclipped
    length: int  # agent steps


@dataclass(frozen=True)
class ActorReport:
    """`ActorService.report` (and `stop`): the episodes finished since the last report, and
    running totals of the process's life."""
    episodes: tuple[FinishedEpisode, ...]
    agent_steps: int  # since this process started: a restarted actor counts from zero
    weight_version: int  # of the weights it plays with
    error: str | None  # the playing loop's traceback when it died (the process lives on)
    life: str  # a token per process: a new one means Ray restarted the actor
    pid: int
    precision: str  # what its forward pass computes in
    # Observations/s of each precision it timed at start (--actor-precision auto), or None.
    precision_rates: dict[str, float] | None
