"""The actors' CPU priority.

Actors are the elastic part of the system: at the seed's replay ratio the learner bounds the
pace, and on a machine where both run (a laptop, the head node) every CPU-second an actor
takes from the learner's compute threads stalls a train step, while a stalled actor only
waits for insert budget anyway. Linux's SCHED_IDLE policy gives a thread CPU only when no
normal thread wants it; threads inherit their creator's policy, so lowering the thread that
builds and runs the actor lowers its emulator and TensorFlow threads too, and leaves Ray's
own threads (which answer the launcher) at normal priority.
"""
from __future__ import annotations

import os


def lower_to_idle() -> bool:
    """Put the calling thread, and every thread it starts from now on, on SCHED_IDLE. False
    where the OS has no such policy (macOS, Windows): the thread keeps its priority."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread, on Linux
    return True
