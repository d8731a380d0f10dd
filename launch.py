"""Train a distributed DQN: `python launch.py [--preset seed|cartpole] [--flags]`.

Reads top to bottom: parse the config -> start or join Ray -> place the replay service, the
learner and the actors -> report progress until Ctrl-C or a limit -> stop the roles in order
-> write the final weights and summary.json. `--help` lists every knob.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common.config import Config, epsilon_at, parse_args  # noqa: E402
from common.envs import EnvError, EnvInfo, describe_env  # noqa: E402

LEARNER_HOST = "dqn_learner_host"  # custom resource of the node that hosts learner and replay
WORKER_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_BACKEND": "tensorflow"}


def fail(message: str) -> None:
    print(f"launch.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- Ray -------------------------------------------------------------------------------------

def check_address_answers(address: str) -> None:
    """Ray waits minutes on an address nobody answers; a TCP probe fails in seconds."""
    if address == "auto":
        return
    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        fail(f"--address {address!r} is not 'auto' or host:port")
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as error:
        fail(f"no Ray cluster answers at --address {address}: {error}")


def connect_ray(config: Config, num_actors_hint: int) -> str | None:
    """Start or join Ray. Returns the dashboard URL when this process started Ray (and so
    stops it), else None."""
    import ray
    if ray.is_initialized():
        return None
    kwargs = dict(logging_level=logging.WARNING, runtime_env={"env_vars": WORKER_ENV})
    if config.address is None:
        cpus = os.cpu_count() or 1
        # Logical CPUs: every role gets a slot even where actors outnumber cores.
        kwargs.update(num_cpus=max(cpus, num_actors_hint + 1 + config.replay_shards),
                      resources={LEARNER_HOST: 1}, dashboard_host=config.dashboard_host)
    else:
        check_address_answers(config.address)
        kwargs.update(address=config.address)
    try:
        context = ray.init(**kwargs)
    except Exception as error:
        where = f"join the Ray cluster at --address {config.address}" if config.address \
            else "start a local Ray"
        fail(f"could not {where}: {str(error).splitlines()[0]}")
    return (context.dashboard_url or "disabled") if config.address is None else None


def default_num_actors(cpus: int, replay_shards: int) -> int:
    """One actor per CPU the learner and the replay shards leave, and at least 2: on a few
    cores two actors overlap one's emulator time with the other's forward pass."""
    return max(2, cpus - 1 - replay_shards)


def machine_layout(config: Config, cpus: int, local: bool) -> Config:
    """`config` with the actor count and threads it leaves open chosen for `cpus` CPUs: one
    actor per CPU the learner and the shards leave (at least 2), and on a local machine its
    CPUs shared among the actors' TF and emulator threads, each actor pinned to its share (on
    a cluster, where actors fill the workers' CPUs, one thread each, not pinned)."""
    num_actors = config.num_actors or default_num_actors(cpus, config.replay_shards)
    threads = config.actor_threads or (max(1, cpus // num_actors) if local else 1)
    pin = local if config.pin_actor_cpus is None else config.pin_actor_cpus
    return config.replace(num_actors=num_actors, actor_threads=threads, pin_actor_cpus=pin)


@dataclass
class Roles:
    shards: list
    learner: object
    actors: list
    learner_gpus: float


def snapshot_path(config: Config, shard: int) -> Path | None:
    if config.replay_snapshot_dir is None:
        return None
    return Path(config.replay_snapshot_dir).resolve() / f"replay-shard-{shard}.msgpack"


def place_roles(config: Config, env_info: EnvInfo, num_actors: int) -> Roles:
    import ray
    from actors.service import ActorService
    from learner.service import LearnerService
    from replay_server.service import ReplayService, shard_name

    resources = ray.cluster_resources()
    gpus = config.learner_gpus
    if gpus is None:
        gpus = 1.0 if resources.get("GPU", 0) >= 1 else 0.0
    # Learner and replay shards share the node marked as the learner host when there is one.
    on_host = resources.get(LEARNER_HOST, 0) >= 1
    shard_host = {LEARNER_HOST: 0.5 / config.replay_shards} if on_host else {}
    shards = [ReplayService.options(name=shard_name(i), num_cpus=1, resources=shard_host)
              .remote(config, env_info, i) for i in range(config.replay_shards)]
    restore_snapshots(config, shards)
    learner = LearnerService.options(
        num_cpus=1, num_gpus=gpus, resources={LEARNER_HOST: 0.5} if on_host else {},
        max_concurrency=4).remote(config, env_info, shards)
    actors = [ActorService.options(num_cpus=1, max_concurrency=3, max_restarts=3).remote(
        config, env_info, i, num_actors, shards[i % len(shards)], learner)
        for i in range(num_actors)]
    return Roles(shards, learner, actors, gpus)


def stop_roles(roles: Roles) -> None:
    """Stop in data-flow order and end the roles' processes (freeing the shards' names), for
    callers that place roles more than once in one Ray session."""
    import ray
    ray.get([actor.stop.remote() for actor in roles.actors])
    ray.get(roles.learner.stop.remote())
    for handle in [*roles.actors, roles.learner, *roles.shards]:
        ray.kill(handle)
    time.sleep(1.0)  # let the processes exit before the next placement


def restore_snapshots(config: Config, shards: list) -> None:
    """Each shard whose snapshot file exists starts from it; a bad file stops the launch."""
    import ray
    for shard, replay in enumerate(shards):
        path = snapshot_path(config, shard)
        if path is not None and path.exists():
            try:
                restored = ray.get(replay.restore.remote(str(path)))
            except ray.exceptions.RayTaskError as error:
                fail(str(error.cause if error.cause else error).splitlines()[0])
            print(f"replay shard {shard}: restored {restored['transitions']:,} transitions "
                  f"from {path} in {restored['seconds']} s", flush=True)


def write_snapshots(config: Config, shards: list) -> None:
    import ray
    paths = [snapshot_path(config, shard) for shard in range(len(shards))]
    if paths[0] is None:
        return
    for shard, written in enumerate(ray.get([replay.snapshot.remote(str(path))
                                             for replay, path in zip(shards, paths)])):
        print(f"replay shard {shard}: {written['transitions']:,} transitions to "
              f"{written['path']} ({written['bytes'] / 1e6:.1f} MB, {written['seconds']} s)",
              flush=True)


# --- Progress --------------------------------------------------------------------------------

@dataclass
class Progress:
    """Totals the launcher keeps from the roles' reports."""
    frame_skip: int
    actor_steps: dict = field(default_factory=dict)  # actor index -> its latest step count
    steps_of_lost_lives: int = 0  # steps of actor processes that were restarted
    returns: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100))
    episodes: int = 0
    learner: dict = field(default_factory=dict)
    replay: dict = field(default_factory=dict)
    restarts: int = 0

    @property
    def agent_steps(self) -> int:
        return self.steps_of_lost_lives + sum(self.actor_steps.values())

    @property
    def mean_return_100(self) -> float | None:
        return sum(self.returns) / len(self.returns) if self.returns else None

    def absorb_actor(self, index: int, report: dict) -> None:
        if report["error"]:
            raise RuntimeError(f"actor {index} failed:\n{report['error']}")
        last = self.actor_steps.get(index, 0)
        if report["agent_steps"] < last:  # the process restarted and counts from zero
            self.steps_of_lost_lives += last
            self.restarts += 1
        self.actor_steps[index] = report["agent_steps"]
        for ret, _length in report["episodes"]:
            self.returns.append(ret)
            self.episodes += 1


def replay_totals(shard_stats: list[dict]) -> dict:
    inserted = sum(stats["total_inserted"] for stats in shard_stats)
    sampled = sum(stats["total_sampled"] for stats in shard_stats)
    return {"size": sum(stats["size"] for stats in shard_stats),
            "samples_per_insert": sampled / inserted if inserted else 0.0}


def poll(roles: Roles, progress: Progress) -> None:
    import ray
    from ray.exceptions import RayActorError
    refs = [actor.report.remote() for actor in roles.actors]
    for index, ref in enumerate(refs):
        try:
            progress.absorb_actor(index, ray.get(ref, timeout=30))
        except (RayActorError, ray.exceptions.GetTimeoutError) as error:
            # Before its first answer an actor is still starting (placing, building its envs,
            # compiling); after it, a silence means a restart or a stall.
            state = ("restarting or stalled" if index in progress.actor_steps
                     else "still starting")
            print(f"actor {index} not answering within 30 s ({type(error).__name__}): {state}",
                  file=sys.stderr)
    progress.learner = ray.get(roles.learner.stats.remote(), timeout=30)
    progress.replay = replay_totals(ray.get([r.stats.remote() for r in roles.shards], timeout=30))
    if progress.learner["error"]:
        raise RuntimeError(f"learner failed:\n{progress.learner['error']}")


class ProgressLog:
    """A progress line on stdout and the same figures as TensorBoard scalars."""

    def __init__(self, logdir: Path, config: Config):
        import tensorflow as tf
        self.tf = tf
        self.writer = tf.summary.create_file_writer(str(logdir))
        self.config = config
        self.last = (time.monotonic(), 0, 0, 0.0)

    def write(self, progress: Progress) -> dict:
        now, steps, updates = time.monotonic(), progress.agent_steps, progress.learner["updates"]
        starved = progress.learner["starved_s"]
        last_time, last_steps, last_updates, last_starved = self.last
        dt = max(now - last_time, 1e-9)
        self.last = (now, steps, updates, starved)
        figures = {
            "agent_steps_per_s": (steps - last_steps) / dt,
            "env_frames_per_s": (steps - last_steps) * progress.frame_skip / dt,
            "updates_per_s": (updates - last_updates) / dt,
            # Share of the interval the learner sat without a batch, once it had begun.
            "learner_starved_fraction": min((starved - last_starved) / dt, 1.0),
            "replay_size": progress.replay["size"],
            "episodes": progress.episodes,
            "weight_version": progress.learner["weight_version"],
            "target_syncs": progress.learner["target_syncs"],
            "loss": progress.learner["loss"],
            "samples_per_insert": progress.replay["samples_per_insert"],
        }
        if progress.mean_return_100 is not None:
            figures["mean_return_100"] = progress.mean_return_100
        ladder = self.config.epsilon_ladder_base is not None  # fixed per env: no one epsilon
        if not ladder:
            figures["epsilon"] = epsilon_at(self.config, steps)
        with self.writer.as_default(step=steps):
            for name, value in figures.items():
                self.tf.summary.scalar(name, value)
        self.writer.flush()
        mean = progress.mean_return_100
        print(f"steps {steps:>9,} | {figures['agent_steps_per_s']:7.0f} steps/s "
              f"{figures['env_frames_per_s']:7.0f} frames/s | "
              f"{figures['updates_per_s']:6.1f} upd/s | replay {figures['replay_size']:>8,} | "
              f"episodes {progress.episodes:>6,} | return100 "
              f"{'   n/a' if mean is None else f'{mean:6.1f}'} | "
              f"eps {'ladder' if ladder else format(figures['epsilon'], '.3f')} | "
              f"weights v{figures['weight_version']}", flush=True)
        return figures


# --- Main ------------------------------------------------------------------------------------

def resolve_logdir(config: Config) -> Path:
    if config.logdir:
        return Path(config.logdir)
    return Path("runs") / f"{config.preset}-{time.strftime('%Y%m%d-%H%M%S')}"


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        env_info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    except EnvError as error:
        fail(str(error))
    local_cpus = os.cpu_count() or 1
    dashboard_url = connect_ray(
        config, machine_layout(config, local_cpus, local=True).num_actors)
    started_ray = dashboard_url is not None
    import ray
    try:
        cpus = local_cpus if started_ray else int(ray.cluster_resources().get("CPU", 1))
        config = machine_layout(config, cpus, local=started_ray)
        num_actors = config.num_actors
        logdir = resolve_logdir(config)
        logdir.mkdir(parents=True, exist_ok=True)
        roles = place_roles(config, env_info, num_actors)
        device = "GPU" if roles.learner_gpus else "CPU"
        print(f"{config.preset}: {config.env} | {num_actors} actors x {config.envs_per_actor} "
              f"envs | {config.replay_shards} replay shard(s) | learner on {device} | "
              f"logdir {logdir}" + (f" | dashboard {dashboard_url}" if started_ray else ""),
              flush=True)
        summary = run(config, env_info, roles, logdir)
        print(json.dumps(summary), flush=True)
        return 0
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C while stopping
        print("\nlaunch.py: interrupted; no summary written", file=sys.stderr)
        return 130
    finally:
        if started_ray:
            ray.shutdown()


def run(config: Config, env_info: EnvInfo, roles: Roles, logdir: Path) -> dict:
    import ray
    progress = Progress(frame_skip=env_info.frame_skip)
    log = ProgressLog(logdir, config)
    started = time.monotonic()
    try:
        while True:
            time.sleep(config.report_every_s)
            poll(roles, progress)
            log.write(progress)
            elapsed = time.monotonic() - started
            if config.max_seconds is not None and elapsed >= config.max_seconds:
                break
            if (config.total_agent_steps is not None
                    and progress.agent_steps >= config.total_agent_steps):
                break
            if (config.target_mean_return is not None and len(progress.returns) == 100
                    and progress.mean_return_100 >= config.target_mean_return):
                print(f"mean return of the last 100 episodes reached "
                      f"{config.target_mean_return}", flush=True)
                break
    except KeyboardInterrupt:
        print("\nCtrl-C: stopping the roles (Ctrl-C again to abort)", flush=True)
    elapsed = time.monotonic() - started
    # Stop in data-flow order: actors first, so the learner sees no new data, then the learner.
    for index, report in enumerate(ray.get([a.stop.remote() for a in roles.actors])):
        progress.absorb_actor(index, report)
    progress.learner = ray.get(roles.learner.stop.remote())
    progress.replay = replay_totals(ray.get([r.stats.remote() for r in roles.shards]))
    write_snapshots(config, roles.shards)
    weights_path = logdir / "q_network.weights.h5"
    weights_path.write_bytes(ray.get(roles.learner.weights_h5.remote()))
    summary = make_summary(config, env_info, progress, elapsed, len(roles.actors))
    summary["weights"] = str(weights_path)
    (logdir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def make_summary(config: Config, env_info: EnvInfo, progress: Progress, elapsed_s: float,
                 num_actors: int) -> dict:
    steps, updates = progress.agent_steps, progress.learner["updates"]
    return {
        "preset": config.preset, "env": config.env, "seconds": round(elapsed_s, 2),
        "num_actors": num_actors, "envs_per_actor": config.envs_per_actor,
        "learner_device": progress.learner["device"],
        "agent_steps": steps, "env_frames": steps * env_info.frame_skip, "updates": updates,
        "weight_version": progress.learner["weight_version"],
        "target_syncs": progress.learner["target_syncs"],
        "episodes": progress.episodes, "mean_return_100": progress.mean_return_100,
        "agent_steps_per_s": round(steps / elapsed_s, 2),
        "env_frames_per_s": round(steps * env_info.frame_skip / elapsed_s, 2),
        "updates_per_s": round(updates / elapsed_s, 2),
        "learner_starved_s": round(progress.learner["starved_s"], 2),
        "replay_size": progress.replay["size"],
        "samples_per_insert": round(progress.replay["samples_per_insert"], 3),
        "actor_restarts": progress.restarts,
    }


if __name__ == "__main__":
    sys.exit(main())
