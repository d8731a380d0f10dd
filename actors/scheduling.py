"""The actors' CPU priority and CPUs.

Actors are the elastic part of the system: at the seed's replay ratio the learner bounds the
pace, and on a machine where both run (a laptop, the head node) every CPU-second an actor
takes from the learner's compute threads stalls a train step, while a stalled actor only
waits for insert budget anyway. Linux's SCHED_IDLE policy gives a thread CPU only when no
normal thread wants it; threads inherit their creator's policy, so lowering the thread that
builds and runs the actor lowers its emulator and TensorFlow threads too, and leaves Ray's
own threads (which answer the launcher) at normal priority. A restarted actor builds while
the learner trains, and at idle priority starting its emulators was most of its restart time:
it builds at normal priority, then lowers its thread and the threads the build started.

Threads inherit their creator's CPU affinity too. An actor's emulator thread and its acting
thread (which runs the forward pass) take turns on the same data, so pinning both to one CPU
keeps that data in one core's caches; left free, the scheduler moves them between cores and
each step costs the actors a little more CPU (the A/B run is in benchmarks/RESULTS.md).
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable


def thread_ids() -> set[int]:
    """The kernel ids of this process's threads (empty where there is no /proc)."""
    try:
        return {int(tid) for tid in os.listdir("/proc/self/task")}
    except OSError:
        return set()


def lower_to_idle(threads: Iterable[int] = (0,)) -> bool:
    """Put these threads (kernel ids; 0 is the calling thread), and every thread they start
    from now on, on SCHED_IDLE. False where the OS has no such policy (macOS, Windows): the
    threads keep their priority."""
    if not hasattr(os, "SCHED_IDLE"):
        return False
    for thread in threads:
        with contextlib.suppress(ProcessLookupError):  # a thread that has ended since
            os.sched_setscheduler(thread, os.SCHED_IDLE, os.sched_param(0))
    return True


def pin_to_cpus(actor_index: int, threads: int) -> set[int] | None:
    """Pin the calling thread, and every thread it starts from now on, to `threads` of the
    CPUs this thread may use, the ones after those of actors 0 .. actor_index - 1 (wrapping
    around), so actors on one machine take different CPUs. Returns the CPUs, or None where the
    OS cannot pin threads (macOS, Windows)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0))  # 0: this thread, on Linux
    chosen = {allowed[(actor_index * threads + j) % len(allowed)] for j in range(threads)}
    os.sched_setaffinity(0, chosen)
    return chosen
