"""What the learner reports of itself: a plain record, no TensorFlow, so the launcher, the
benchmarks and the tests read it without loading the learner."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LearnerStats:
    """`LearnerService.stats` (and `stop`): training's counters and which process answers."""
    updates: int
    target_syncs: int
    weight_version: int  # the latest weights published to the actors
    loss: float  # of the latest update (NaN before the first)
    q_mean: float  # mean Q(s, a) of the latest batch's taken actions (NaN before the first)
    device: str  # "GPU" or "CPU"
    starved_s: float  # seconds it sat without a batch once training had begun
    error: str | None  # why training stopped (a traceback, or one line when it diverged)
    life: str  # a token per process: a new one means Ray restarted the learner
    restored_from: str | None  # the checkpoint it restored; None: it started from scratch
    passed_over: str | None  # why newer checkpoints' copies were not restored (damaged)
    restored_updates: int  # the updates that checkpoint held
    node_ip: str
    pid: int
