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
    precision: str  # what it computes in: "float32", "bfloat16" or "float16"
    xla: bool  # whether its train step is XLA-compiled (else a plain tf.function)
    # Updates/s of each compile mode ("xla", "plain") as timed at start (--xla auto), or None.
    compile_rates: dict[str, float] | None
    starved_s: float  # seconds it sat without a batch once training had begun
    error: str | None  # why training stopped (a traceback, or one line when it diverged)
    life: str  # a token per process: a new one means Ray restarted the learner
    restored_from: str | None  # the checkpoint it restored; None: it started from scratch
    passed_over: str | None  # why newer checkpoints' copies were not restored (damaged)
    restored_updates: int  # the updates that checkpoint held
    node_ip: str
    pid: int

    def compute(self) -> dict:
        """How it trains, as config.json and summary.json say it."""
        return {"learner_device": self.device, "learner_precision": self.precision,
                "learner_xla": self.xla, "learner_compile_updates_per_s": self.compile_rates}

    def describe_compute(self) -> str:
        """The run header's words for it, e.g. "CPU, bfloat16, XLA off (timed: XLA 45.3,
        plain 71.1 upd/s)"."""
        timed = ("" if self.compile_rates is None else
                 f" (timed: XLA {self.compile_rates['xla']:.1f}, plain "
                 f"{self.compile_rates['plain']:.1f} upd/s)")
        return f"{self.device}, {self.precision}, XLA {'on' if self.xla else 'off'}{timed}"
