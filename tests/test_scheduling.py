"""The actors' CPU priority and CPUs: their playing threads run at SCHED_IDLE (by default) and,
when pinned, on the actor's own CPUs; the thread that answers the launcher does neither."""
import os
import signal
import threading
import time

import pytest
import ray

from actors.scheduling import lower_to_idle, pin_to_cpus, thread_ids
from common.config import PRESETS
from common.envs import describe_env
from launch import machine_layout, place_roles, stop_roles

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")


def test_a_lowered_thread_and_the_threads_it_starts_run_at_idle_priority():
    seen = {}

    def child():
        seen["child"] = os.sched_getscheduler(0)

    def parent():
        seen["lowered"] = lower_to_idle()
        seen["parent"] = os.sched_getscheduler(0)
        started = threading.Thread(target=child)
        started.start()
        started.join()

    thread = threading.Thread(target=parent)
    thread.start()
    thread.join()
    assert seen == {"lowered": True, "parent": os.SCHED_IDLE, "child": os.SCHED_IDLE}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the caller's own thread is untouched


def test_the_threads_a_build_started_are_lowered_with_the_builder_and_no_others():
    """What an actor does: build at normal priority, then lower itself and the threads the build
    started; a thread that was running before the build keeps its priority."""
    stop = threading.Event()
    bystander = threading.Thread(target=stop.wait)
    bystander.start()
    seen = {}

    def builder():
        before = thread_ids()
        built = threading.Thread(target=stop.wait)
        built.start()
        seen["lowered"] = lower_to_idle({0, *(thread_ids() - before)})
        seen["builder"] = os.sched_getscheduler(0)
        seen["built"] = os.sched_getscheduler(built.native_id)
        seen["bystander"] = os.sched_getscheduler(bystander.native_id)
        stop.set()
        built.join()

    thread = threading.Thread(target=builder)
    thread.start()
    thread.join()
    bystander.join()
    assert seen == {"lowered": True, "builder": os.SCHED_IDLE, "built": os.SCHED_IDLE,
                    "bystander": os.SCHED_OTHER}
    assert lower_to_idle({thread.native_id})  # a thread that has ended is passed over


def test_a_pinned_thread_and_the_threads_it_starts_keep_to_the_actors_cpus():
    allowed = sorted(os.sched_getaffinity(0))
    seen = {}

    def child():
        seen["child"] = os.sched_getaffinity(0)

    def parent(actor_index, threads):
        seen["chosen"] = pin_to_cpus(actor_index, threads)
        seen["parent"] = os.sched_getaffinity(0)
        started = threading.Thread(target=child)
        started.start()
        started.join()

    for actor_index, threads in [(0, 1), (1, 1), (len(allowed), 1), (1, 2)]:
        thread = threading.Thread(target=parent, args=(actor_index, threads))
        thread.start()
        thread.join()
        expected = {allowed[(actor_index * threads + j) % len(allowed)] for j in range(threads)}
        assert seen == {"chosen": expected, "parent": expected, "child": expected}
    assert sorted(os.sched_getaffinity(0)) == allowed  # the caller's own thread is untouched


def test_actors_are_pinned_on_a_local_machine_unless_told_otherwise():
    seed = PRESETS["seed"]
    assert seed.pin_actor_cpus is None
    assert machine_layout(seed, 8, local=True).pin_actor_cpus is True
    assert machine_layout(seed, 8, local=False).pin_actor_cpus is False
    off = seed.replace(pin_actor_cpus=False)
    assert machine_layout(off, 8, local=True).pin_actor_cpus is False
    local = machine_layout(seed, 8, local=True)
    assert (local.num_actors, local.actor_threads) == (6, 1)  # one CPU each


def thread_cpu(pid: int) -> dict[int, tuple[int, float]]:
    """Each thread of `pid`: (scheduling policy, CPU seconds so far), from /proc."""
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended
            continue
        # Fields 14, 15 (utime, stime) and 41 (policy) of proc(5); the list starts at 3.
        threads[int(tid)] = (int(fields[38]),
                             (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"))
    return threads


def cpu_while_playing(actor, pid: int) -> dict[int, tuple[int, float]]:
    """Each thread of the actor process `pid`: (policy, CPU seconds) over 3 s of play."""
    first_steps = ray.get(actor.report.remote(), timeout=30).agent_steps
    before = thread_cpu(pid)
    time.sleep(3.0)
    after = thread_cpu(pid)
    assert ray.get(actor.report.remote(), timeout=30).agent_steps > first_steps
    return {tid: (policy, cpu - before.get(tid, (policy, 0.0))[1])
            for tid, (policy, cpu) in after.items()}


def assert_plays_at_idle_on_its_cpu(used: dict[int, tuple[int, float]], pid: int):
    idle = sum(cpu for policy, cpu in used.values() if policy == os.SCHED_IDLE)
    total = sum(cpu for _, cpu in used.values())
    assert total > 0.5  # it played for most of the 3 s
    assert idle / total > 0.9, sorted(used.items(), key=lambda kv: -kv[1][1])[:6]
    assert os.sched_getscheduler(pid) == os.SCHED_OTHER  # the main thread answers calls
    # Actor 0 with one thread: the first CPU the worker may use, for every playing thread.
    worker_cpus = os.sched_getaffinity(pid)  # the main thread's: all the worker may use
    playing = {}
    for tid, (policy, cpu) in used.items():
        if policy == os.SCHED_IDLE and cpu > 0:
            try:
                playing[tid] = os.sched_getaffinity(tid)
            except ProcessLookupError:  # the thread ended since
                pass
    assert playing and all(cpus == {min(worker_cpus)} for cpus in playing.values()), (
        playing, worker_cpus)
    assert worker_cpus == os.sched_getaffinity(0)  # the main thread is not pinned


def test_an_actor_plays_at_idle_priority_on_its_cpu_and_answers_at_normal(ray_address):
    """So does its restarted process, which builds at normal priority and then lowers the
    threads its build started."""
    config = PRESETS["seed"].replace(envs_per_actor=4, actor_threads=1, chunk_transitions=16,
                                     replay_capacity=1_000_000, min_replay_size=1_000_000,
                                     pin_actor_cpus=True)
    assert config.actor_cpu_priority == "idle"  # the default
    info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    roles = place_roles(config, info, num_actors=1)
    actor = roles.actors[0]
    try:
        first = ray.get(actor.report.remote(), timeout=120)
        assert_plays_at_idle_on_its_cpu(cpu_while_playing(actor, first.pid), first.pid)
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            try:
                restarted = ray.get(actor.report.remote(), timeout=10)
                if restarted.life != first.life and restarted.agent_steps > 0:
                    break
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                pass  # not back yet
            assert time.monotonic() < deadline, "the killed actor did not come back"
            time.sleep(0.5)
        assert_plays_at_idle_on_its_cpu(cpu_while_playing(actor, restarted.pid), restarted.pid)
    finally:
        stop_roles(roles)
