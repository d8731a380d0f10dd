"""What a replay shard reports of itself: plain records, no heavy imports, so the launcher,
the benchmarks and the tests read them without loading the server."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplayStats:
    """A shard's counters (`ReplayServer.stats`)."""
    shard: int
    size: int  # live transitions: the ones sampling can return
    capacity: int
    total_inserted: int  # over the shard's life, a restored snapshot's included
    total_sampled: int
    samples_per_insert: float  # past the minimum size: the limiter holds it near its target
    priority_mass: float  # the sum-tree's total: the learner spreads its samples by it
    rejected_messages: int
    stale_dropped: int  # transitions refused for naming frames already evicted
    parked_chunks: int  # chunks that came before their predecessor and wait for it
    parked_bytes: int


@dataclass(frozen=True)
class ReplayServiceStats(ReplayStats):
    """`ReplayService.stats`: the counters, which process answers, and what it started from."""
    life: str  # a token per process: a new one means Ray restarted the shard
    pid: int
    restored_from: str | None  # the checkpoint it restored; None: it started empty
    passed_over: str | None  # why newer checkpoints' snapshots (all: it started empty) were not
    restored_total_inserted: int  # the counters it restored (0 when it started empty)
    restored_total_sampled: int
