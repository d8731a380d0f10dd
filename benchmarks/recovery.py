"""How fast a run recovers from losing each role, and what a checkpoint costs, in one run.

    python benchmarks/recovery.py [--quick] [--address ADDR]

The seed preset on this machine's actor layout, with a replay of 100,000 transitions (its
capacity, the seed's) filled before the learner starts (`--quick`: 2,000), then, while
training runs:
- checkpoint_s, checkpoint_mb: one checkpoint of every role (learner state, the shard's
  snapshot, the launcher's progress) while the actors and the learner go on;
  checkpoint_updates_during: the learner's updates meanwhile (training did not stop);
- actor_back_s: SIGKILL to an actor process until its restarted process reports steps;
- shard_back_s: SIGKILL to the replay shard until its restarted process (restored from the
  latest checkpoint) has taken new inserts and the learner has trained on it again;
  shard_transitions_lost: transitions the shard had taken since that checkpoint (lost with
  it), beside shard_transitions_at_last_checkpoint;
- learner_back_s: SIGKILL to the learner until its restarted process (restored from the
  latest checkpoint) has made new updates;
- resume_s: every role stopped and placed again from the final checkpoint, until the
  learner trains again (what `launch.py --resume` waits for before its first progress line).
Ends with one JSON line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import TypeVar

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import launch  # noqa: E402
from actors.records import ActorReport  # noqa: E402
from common.checkpoints import CheckpointStore  # noqa: E402
from common.config import PRESETS, Config  # noqa: E402
from common.envs import describe_env  # noqa: E402
from learner.records import LearnerStats  # noqa: E402
from replay_server.records import ReplayServiceStats  # noqa: E402

TARGETS_S = {"actor_back_s": 30, "shard_back_s": 60, "learner_back_s": 60, "checkpoint_s": 10}
WAIT_S = 240.0  # longest wait for any one step, well past its target


def wait_until(condition, what: str, roles, timeout_s: float = WAIT_S,
               every_s: float = 0.2) -> float:
    """Seconds until `condition()` held; past `timeout_s`, ends the script with what every
    role last said."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            print(f"the roles now:\n{roles_now(roles)}", file=sys.stderr, flush=True)
            raise SystemExit(f"recovery.py: no {what} within {timeout_s:.0f} s")
        time.sleep(every_s)
    return time.monotonic() - started


def roles_now(roles) -> str:
    """Each role's latest report or stats (None: it did not answer within 5 s), an actor's
    finished episodes counted rather than listed."""
    answers = launch.wait_all([*(actor.report.remote() for actor in roles.actors),
                               roles.learner.stats.remote(),
                               *(shard.stats.remote() for shard in roles.shards)], 5.0)
    names = [*(f"actor {i}" for i in range(len(roles.actors))), "learner",
             *(f"shard {i}" for i in range(len(roles.shards)))]
    return "\n".join(f"  {name}: {brief(answer)}" for name, answer in zip(names, answers))


def brief(answer) -> str:
    if isinstance(answer, ActorReport):
        return f"{dataclasses.replace(answer, episodes=())} ({len(answer.episodes)} episodes)"
    return str(answer)


def kill(pid: int) -> float:
    """SIGKILL a role's process; returns when it was sent."""
    os.kill(pid, signal.SIGKILL)
    return time.monotonic()


def actor_report(actor, wait_s: float) -> ActorReport | None:
    return launch.wait_all([actor.report.remote()], wait_s)[0]


def learner_stats(learner) -> LearnerStats | None:
    return launch.wait_all([learner.stats.remote()], 1.0)[0]


def shard_stats(shard) -> ReplayServiceStats | None:
    return launch.wait_all([shard.stats.remote()], 1.0)[0]


Report = TypeVar("Report", ActorReport, LearnerStats, ReplayServiceStats)


def serving(report: Report | None, wait_s: float = 1.0) -> Report:
    """The report of a role the benchmark needs an answer from now."""
    if report is None:
        raise SystemExit(f"recovery.py: a role did not answer within {wait_s:g} s")
    return report


def measure(config: Config, store: CheckpointStore) -> dict:
    import ray
    env_info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    roles = launch.place_roles(config, env_info, launch.actor_count(config), store.root)
    progress = launch.Progress(env_info.frame_skip)
    learner, shard = roles.learner, roles.shards[0]
    results: dict = {}

    def updates(handle) -> int:
        return -1 if (now := learner_stats(handle)) is None else now.updates

    def inserted() -> int:  # not `size`: rows whose frames left the frame ring are not live
        return 0 if (now := shard_stats(shard)) is None else now.total_inserted

    wait_until(lambda: inserted() >= config.replay_capacity and updates(learner) > 0,
               "full replay and training", roles)
    print(f"replay holds {serving(shard_stats(shard)).size:,} transitions; training", flush=True)

    # A checkpoint while everything runs.
    before = updates(learner)
    started = time.monotonic()
    name = launch.write_checkpoint(roles, progress, store, config.keep_checkpoints, 0.0)
    results["checkpoint_s"] = round(time.monotonic() - started, 2)
    results["checkpoint_updates_during"] = updates(learner) - before
    if name is None:
        raise SystemExit("recovery.py: the checkpoint was not written")
    folder = Path(store.path(name))
    results["checkpoint_mb"] = round(sum(f.stat().st_size for f in folder.rglob("*")
                                         if f.is_file()) / 1e6, 1)
    at_checkpoint = serving(shard_stats(shard))

    # An actor.
    old_actor = serving(actor_report(roles.actors[0], 60.0), 60.0)
    killed = kill(old_actor.pid)

    def actor_back() -> bool:
        report = actor_report(roles.actors[0], 1.0)
        return report is not None and report.life != old_actor.life and report.agent_steps > 0

    wait_until(actor_back, "actor back", roles)
    results["actor_back_s"] = round(time.monotonic() - killed, 1)
    print(f"actor back in {results['actor_back_s']} s", flush=True)

    # The replay shard.
    before_kill = serving(shard_stats(shard))
    killed = kill(before_kill.pid)

    def shard_back() -> bool:
        now = shard_stats(shard)
        return (now is not None and now.life != before_kill.life
                and now.total_inserted > now.restored_total_inserted
                and now.total_sampled > now.restored_total_sampled)

    wait_until(shard_back, "shard back", roles)
    results["shard_back_s"] = round(time.monotonic() - killed, 1)
    results["shard_transitions_at_last_checkpoint"] = at_checkpoint.size
    results["shard_transitions_lost"] = (before_kill.total_inserted
                                         - serving(shard_stats(shard)).restored_total_inserted)
    print(f"shard back in {results['shard_back_s']} s", flush=True)

    # The learner.
    old_learner = serving(learner_stats(learner))
    killed = kill(old_learner.pid)

    def learner_back() -> bool:
        now = learner_stats(learner)
        return now is not None and now.life != old_learner.life \
            and now.updates > now.restored_updates

    wait_until(learner_back, "learner back", roles)
    results["learner_back_s"] = round(time.monotonic() - killed, 1)
    print(f"learner back in {results['learner_back_s']} s", flush=True)

    # Stop, then resume every role from the final checkpoint.
    launch.stop_and_collect(roles, progress)
    launch.write_checkpoint(roles, progress, store, config.keep_checkpoints, 0.0)
    for handle in roles.all:
        ray.kill(handle, no_restart=True)
    time.sleep(1.0)
    started = time.monotonic()
    roles = launch.place_roles(config, env_info, launch.actor_count(config), store.root)
    launch.wait_until_serving(roles, WAIT_S)
    restored = serving(learner_stats(roles.learner)).restored_updates
    wait_until(lambda: updates(roles.learner) > restored, "training after resume", roles)
    results["resume_s"] = round(time.monotonic() - started, 1)
    launch.stop_roles(roles)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="A 2,000-transition replay: checks the script, measures little.")
    parser.add_argument("--address", default=None,
                        help="Join this Ray cluster instead of starting a local one.")
    args = parser.parse_args()
    transitions = 2_000 if args.quick else 100_000
    base = PRESETS["seed"].replace(address=args.address, replay_capacity=transitions,
                                   min_replay_size=transitions)
    config = launch.machine_layout(base, os.cpu_count() or 1, local=True)
    with tempfile.TemporaryDirectory(prefix="dqn-recovery-") as tmp:
        store = CheckpointStore(os.path.join(tmp, "checkpoints"))
        launch.connect_ray(config, launch.actor_count(config))
        try:
            results = measure(config, store)
        finally:
            import ray
            ray.shutdown()
    results = {"quick": args.quick, "replay_transitions": transitions,
               "num_actors": config.num_actors, "envs_per_actor": config.envs_per_actor,
               **results}
    results["targets_met"] = {name: results[name] <= limit for name, limit in TARGETS_S.items()}
    print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
