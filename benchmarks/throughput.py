"""Throughput of every role, against the raw emulator and the seed script, in one run.

    python benchmarks/throughput.py [--seconds 30] [--num-actors N] [--envs-per-actor K]
                                    [--scaling] [--quick] [--address ADDR] [--seed-script PATH]

Each figure is measured for the same `--seconds`, one after the other on the same machine
(these machines are noisy: the ratios are the result), then one JSON line:
- raw_env_agent_steps_per_s: one vector env (the actors' AtariVectorEnv, as the actors set
  it up) holding all N x K envs, stepped with random actions; nothing else runs.
- acting_agent_steps_per_s: N actors x K envs and a replay shard under Ray, the learner
  placed but not training (replay never reaches its minimum size, so weights stay fixed).
  Epsilon is the seed's floor, 0.1, so nine envs in ten go through the network each step.
  acting_ratio = acting / raw (target >= 0.6).
- bare_updates_per_s: the seed preset's train step alone on one fixed in-memory batch.
  system_updates_per_s: the learner inside the whole running system (seed preset, N x K,
  8 samples per inserted transition enforced by the rate limiter).
  learner_ratio = system / bare (target >= 0.8). system_learner_starved_fraction: the share
  of that window the learner waited for a batch (the rest it was training or publishing).
- seed_agent_steps_per_s: the single-process baseline, benchmarks/single_process.py (the
  keras.io "Deep Q-Learning for Atari Breakout" example's loop, untuned), or the script
  `--seed-script` names, for `--seconds`, past its random phase (random-steps argument 0),
  like the system run, in the environment this script was started with (the project's TF
  defaults are not passed on); its steps before its first update are left out, as the
  system's start-up is (the rate as the script prints it is in `baselines`).
  system_agent_steps_per_s: that system run. speedup_vs_seed = system / seed (target >= 8).
- old_default_agent_steps_per_s: the same system run with the learner in float32 compiled
  with XLA and the actors in float32 (the defaults before precision and compile mode were
  chosen for the device); run right before and right after the system run.
  speedup_vs_old_default = system / old default (target >= 1.4). `system_compute` says what
  the system's learner and actors chose (--learner-precision, --xla and --actor-precision
  auto) and the rates they timed to choose.
- learner_modes: the bare train step in float32 and in the precision `auto` picks on this
  machine (when another), each compiled with XLA and as a plain tf.function, timed in turns.
  acting_float32_agent_steps_per_s: the acting run again with the actors in float32.
System rates are taken over a window that opens `--warm-up` seconds after the learner's
first update (the seed script's timer likewise starts after its set-up). Each baseline runs
right before and right after the run it is the other side of, with Ray stopped (raw around
the acting runs; bare and seed around the system runs), and each ratio divides by the mean
of the two, so a host that speeds up or slows down moves both sides of a ratio alike; every
baseline run is in the JSON (`baselines`). `--scaling` adds acting rates for 1, 2, 4 actors
and for K = 16, 32, 128 (each with its raw figure, measured just before). `--quick` runs
every part for a few seconds: a check that the script works, not a measurement.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SINGLE_PROCESS_SCRIPT = ROOT / "benchmarks" / "single_process.py"
# The seed runs as a user would run it: in the environment this script started with, not with
# the TensorFlow defaults the project's modules set when imported (oneDNN on, which makes the
# seed itself ~7% faster on this machine).
SEED_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
from actors.env_batch import EnvBatch  # noqa: E402
from common.config import PRESETS, Config  # noqa: E402
from common.envs import describe_env  # noqa: E402
from common.timing import calls_per_second_in_turns  # noqa: E402

TARGETS = {"acting_ratio": 0.6, "learner_ratio": 0.8, "speedup_vs_seed": 8.0,
           "speedup_vs_old_default": 1.4}
ACTING_EPSILON = 0.1  # the seed's floor: nine envs in ten go through the network each step
ACTING_REPLAY_CAPACITY = 2_000_000  # never filled in a run: the learner never starts
# The defaults before the learner's and the actors' precision and compile mode were chosen
# for the device.
OLD_DEFAULT = {"learner_precision": "float32", "xla": "on", "actor_precision": "float32"}


def raw_env_rate(config: Config, num_envs: int, seconds: float) -> float:
    """Agent steps/s of the actors' vector env alone, random actions."""
    batch = EnvBatch(config.env, num_envs, config.seed, config.max_episode_agent_steps,
                     config.frame_stack)
    batch.reset()
    rng = np.random.default_rng(0)
    actions = batch.envs.single_action_space
    assert isinstance(actions, gym.spaces.Discrete)  # as make_env requires
    num_actions = int(actions.n)
    for _ in range(20):  # untimed warm-up
        batch.envs.step(rng.integers(0, num_actions, num_envs))
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        batch.envs.step(rng.integers(0, num_actions, num_envs))
        steps += num_envs
    rate = steps / (time.perf_counter() - started)
    batch.close()
    return rate


def warmed_learner(config: Config):
    """A learner of `config` for the train step alone, its compile mode chosen as the
    system's learner chooses it, and a fixed in-memory batch it has compiled and warmed up on."""
    from learner.learner import DQNLearner, synthetic_batch
    info = describe_env(config.env)
    learner = DQNLearner(config, info)
    if config.xla == "auto":  # as LearnerService does
        learner.choose_compile_mode()
    batch = synthetic_batch(info, config.batch_size, config.learner_batches_per_call,
                            np.random.default_rng(0))
    for _ in range(3):  # trace, compile, warm up
        learner.step(batch)
    return learner, batch


def bare_learner_rate(config: Config, seconds: float) -> float:
    """Updates/s of the train step alone on a fixed in-memory batch, in the precision and
    compile mode the system's learner resolves to."""
    learner, batch = warmed_learner(config)
    calls = calls_per_second_in_turns({"bare": functools.partial(learner.step, batch)}, seconds)
    return calls["bare"] * config.learner_batches_per_call


def learner_modes(config: Config, seconds: float) -> list[dict]:
    """The bare train step in float32 and in the precision `auto` resolves to here (if
    another), each with XLA and plain, timed in turns for `seconds` each."""
    from common.networks import resolve_precision
    obs_shape = describe_env(config.env).obs_shape
    precisions = dict.fromkeys(["float32", resolve_precision("auto", obs_shape)])
    modes = [(precision, xla) for precision in precisions for xla in ("on", "off")]
    steps = {}
    for precision, xla in modes:
        learner, batch = warmed_learner(config.replace(learner_precision=precision, xla=xla))
        steps[precision, xla] = functools.partial(learner.step, batch)
    calls = calls_per_second_in_turns(steps, seconds)
    rows = [{"precision": precision, "xla": xla == "on",
             "updates_per_s": round(calls[precision, xla] * config.learner_batches_per_call, 2)}
            for precision, xla in modes]
    for row in rows:
        print(f"train step alone, {row['precision']}, XLA {'on' if row['xla'] else 'off'}: "
              f"{row['updates_per_s']:.1f} updates/s", flush=True)
    return rows


# The seed trains from its 36th step on (once 32 transitions are stored, every 4th step). The
# 35 steps before cost no training: counted, they would inflate its rate by ~35 / (4 x its
# updates), 8-12% in a 20-30 s run, while the system's window opens after its start-up. (Their
# ~0.05 s stays in the seed's time: its rate comes out <0.5% low.)
SEED_STEPS_BEFORE_TRAINING = 35


def seed_script_rate(script: Path, seconds: float) -> dict:
    """The single-process script's agent steps/s in its training phase, and its updates/s.
    Its last line holds agent_steps, agent_steps_per_s, updates and updates_per_s: as a JSON
    object (benchmarks/single_process.py) or as name=value pairs."""
    out = subprocess.run([sys.executable, str(script), str(seconds), "0"],
                         capture_output=True, text=True, check=True, timeout=seconds + 300,
                         env=SEED_ENV).stdout
    fields = parse_rates(out.strip().splitlines()[-1] if out.strip() else "")
    missing = {"agent_steps", "agent_steps_per_s", "updates", "updates_per_s"} - set(fields)
    if missing:
        raise SystemExit(f"{script} printed no {', '.join(sorted(missing))} on its last line")
    steps, printed_rate = int(fields["agent_steps"]), float(fields["agent_steps_per_s"])
    if int(fields["updates"]) == 0:
        raise SystemExit(f"{script} did not start training within {seconds} s "
                         f"({steps} agent steps); give it more --seconds")
    return {"agent_steps_per_s": round(
                printed_rate * (steps - SEED_STEPS_BEFORE_TRAINING) / steps, 2),
            "updates_per_s": float(fields["updates_per_s"]),
            "printed_agent_steps_per_s": printed_rate}


def parse_rates(line: str) -> dict:
    try:
        fields = json.loads(line)
    except json.JSONDecodeError:
        return dict(re.findall(r"(\w+)=([\d.]+)", line))
    return fields if isinstance(fields, dict) else {}


def learner_baselines(config: Config, seconds: float, seed_script: Path) -> dict:
    """The train step alone and the single-process script, each for `seconds`."""
    bare = bare_learner_rate(config, seconds)
    print(f"train step alone: {bare:.1f} updates/s", flush=True)
    seed = seed_script_rate(seed_script, seconds)
    print(f"single process ({seed_script.name}): {seed['agent_steps_per_s']:.1f} agent "
          f"steps/s training "
          f"({seed['printed_agent_steps_per_s']:.1f} as it prints them, start included), "
          f"{seed['updates_per_s']:.2f} updates/s", flush=True)
    return {"bare_updates_per_s": round(bare, 2),
            "seed_agent_steps_per_s": seed["agent_steps_per_s"],
            "seed_updates_per_s": seed["updates_per_s"],
            "seed_printed_agent_steps_per_s": seed["printed_agent_steps_per_s"]}


def raw_baseline(config: Config, num_envs: int, seconds: float) -> dict:
    raw = raw_env_rate(config, num_envs, seconds)
    print(f"raw vector env ({num_envs} envs): {raw:,.0f} agent steps/s", flush=True)
    return {"raw_env_agent_steps_per_s": round(raw, 1)}


def under_ray(config: Config, num_actors: int, run):
    """`run()` in a Ray session started (or joined) for it and stopped after."""
    import ray

    import launch
    launch.connect_ray(config, num_actors)
    try:
        return run()
    finally:
        ray.shutdown()


def mean_of(runs: list[dict], name: str) -> float:
    return float(np.mean([run[name] for run in runs]))


def run_roles(config: Config, num_actors: int, seconds: float, warm_up_s: float,
              training: bool) -> dict:
    """Place the roles as launch.py does, wait until they run (and the learner trains, if
    `training`), then measure agent steps, updates and replay traffic over `seconds`."""
    from launch import Progress, place_roles, poll, stop_roles
    env_info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    roles = place_roles(config, env_info, num_actors)
    progress = Progress(frame_skip=env_info.frame_skip)
    try:
        deadline = time.monotonic() + 300
        while True:
            time.sleep(0.5)
            poll(roles, progress)
            running = len(progress.actor_steps) == num_actors and min(
                progress.actor_steps.values()) > 0
            learner = progress.learner
            if running and (not training or (learner is not None and learner.updates > 0)):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the roles did not start within 300 s")
        time.sleep(warm_up_s)
        before = snapshot(roles, progress)
        time.sleep(seconds)
        after = snapshot(roles, progress)
    finally:
        stop_roles(roles)
    elapsed = after["time"] - before["time"]
    rates = {name: (after[name] - before[name]) / elapsed
             for name in ("agent_steps", "updates", "inserted", "sampled", "starved_s")}
    rates["samples_per_insert"] = (rates["sampled"] / rates["inserted"]
                                   if rates["inserted"] else 0.0)
    # Seconds starved per second: the share of the window the learner waited for a batch.
    rates["learner_starved_fraction"] = rates.pop("starved_s")
    # CPUs each role kept busy over the window (the sum is at most the machine's CPUs).
    rates["cpus_busy"] = {role: round((after["cpu"][role] - before["cpu"][role]) / elapsed, 2)
                          for role in before["cpu"]}
    # What the learner and the actors compute in, as launch.py's summary says it.
    rates["compute"] = {**progress.latest()[0].compute(), **progress.actors_compute()}
    return rates


ROLE_PROCESSES = {"actors": "ray::ActorService", "learner": "ray::LearnerService",
                  "replay": "ray::ReplayService"}


def cpu_seconds() -> dict[str, float]:
    """CPU time used so far by the processes of each role, and by everything else."""
    import psutil
    used = dict.fromkeys([*ROLE_PROCESSES, "other"], 0.0)
    for process in psutil.process_iter(["cmdline", "cpu_times"]):
        times, cmdline = process.info["cpu_times"], " ".join(process.info["cmdline"] or [])
        if times is None:
            continue
        role = next((r for r, name in ROLE_PROCESSES.items() if cmdline.startswith(name)),
                    "other")
        used[role] += times.user + times.system
    return used


def snapshot(roles, progress) -> dict:
    import ray

    from launch import poll
    poll(roles, progress)
    shard_stats = ray.get([shard.stats.remote() for shard in roles.shards])
    learner = progress.learner
    if learner is None:
        raise RuntimeError("the learner has not answered yet")
    return {"time": time.monotonic(), "agent_steps": progress.agent_steps,
            "updates": learner.updates, "starved_s": learner.starved_s,
            "inserted": sum(stats.total_inserted for stats in shard_stats),
            "sampled": sum(stats.total_sampled for stats in shard_stats),
            "cpu": cpu_seconds()}


def machine_config(base: Config, num_actors: int | None, envs_per_actor: int) -> Config:
    """`base` with the actors laid out on this machine as launch.py lays them out."""
    from launch import machine_layout
    return machine_layout(base.replace(num_actors=num_actors, envs_per_actor=envs_per_actor),
                          os.cpu_count() or 1, local=True)


def acting_config(base: Config, num_actors: int, envs_per_actor: int) -> Config:
    return machine_config(base, num_actors, envs_per_actor).replace(
        epsilon_start=ACTING_EPSILON, epsilon_end=ACTING_EPSILON, random_agent_steps=0,
        replay_capacity=ACTING_REPLAY_CAPACITY, min_replay_size=ACTING_REPLAY_CAPACITY)


def acting_row(base: Config, num_actors: int, envs_per_actor: int, seconds: float,
               warm_up_s: float) -> dict:
    raw = raw_env_rate(base, num_actors * envs_per_actor, seconds)
    acting = run_roles(acting_config(base, num_actors, envs_per_actor), num_actors, seconds,
                       warm_up_s, training=False)["agent_steps"]
    row = {"num_actors": num_actors, "envs_per_actor": envs_per_actor,
           "raw_env_agent_steps_per_s": round(raw, 1),
           "acting_agent_steps_per_s": round(acting, 1), "acting_ratio": round(acting / raw, 3)}
    print(f"acting {num_actors} x {envs_per_actor}: raw {raw:,.0f} steps/s, acting "
          f"{acting:,.0f} steps/s, ratio {acting / raw:.2f}", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warm-up", type=float, default=10.0,
                        help="Seconds the roles run before a measurement window opens.")
    parser.add_argument("--num-actors", type=int, default=None,
                        help="Actors (default: launch.py's default for this machine).")
    parser.add_argument("--envs-per-actor", type=int, default=None,
                        help="Envs per actor (default: launch.py's default).")
    parser.add_argument("--scaling", action="store_true",
                        help="Also measure acting for 1, 2, 4 actors and K = 16, 32, 128.")
    parser.add_argument("--quick", action="store_true",
                        help="Every part for a few seconds: checks the script, measures nothing.")
    parser.add_argument("--address", default=None, help="Join this Ray cluster instead of "
                                                        "starting a local one.")
    parser.add_argument("--seed-script", type=Path, default=SINGLE_PROCESS_SCRIPT,
                        help="The single-process baseline: a script taking [seconds] "
                             "[random_agent_steps] whose last line gives agent_steps, "
                             "agent_steps_per_s, updates and updates_per_s (default: "
                             "benchmarks/single_process.py).")
    args = parser.parse_args()
    if not args.seed_script.is_file():
        parser.error(f"--seed-script {args.seed_script} is not a file")
    seconds, warm_up = (4.0, 1.0) if args.quick else (args.seconds, args.warm_up)

    import launch
    seed_preset = PRESETS["seed"].replace(address=args.address)
    envs_per_actor = args.envs_per_actor or seed_preset.envs_per_actor
    system_config = machine_config(seed_preset, args.num_actors, envs_per_actor).replace(
        random_agent_steps=0)
    num_actors = launch.actor_count(system_config)
    num_envs = num_actors * envs_per_actor

    def system_run(config: Config, name: str) -> dict:
        rates = under_ray(config, num_actors, lambda: run_roles(
            config, num_actors, seconds, warm_up, training=True))
        print(f"system ({name}): {rates['agent_steps']:,.1f} agent steps/s, "
              f"{rates['updates']:.1f} updates/s, {rates['samples_per_insert']:.2f} samples "
              f"per insert, learner waiting for batches "
              f"{rates['learner_starved_fraction']:.1%} of the time; {rates['compute']}",
              flush=True)
        return rates

    def acting_run(actor_precision: str) -> dict:
        config = acting_config(seed_preset, num_actors, envs_per_actor).replace(
            actor_precision=actor_precision)
        rates = under_ray(system_config, num_actors, lambda: run_roles(
            config, num_actors, seconds, warm_up, training=False))
        print(f"acting ({num_actors} actors x {envs_per_actor} envs, epsilon "
              f"{ACTING_EPSILON}, actors in {rates['compute']['actor_precision']}): "
              f"{rates['agent_steps']:,.0f} agent steps/s", flush=True)
        return rates

    raw_runs = [raw_baseline(seed_preset, num_envs, seconds)]
    acting = acting_run(seed_preset.actor_precision)
    acting_float32 = acting_run("float32")
    raw_runs.append(raw_baseline(seed_preset, num_envs, seconds))
    learner_runs = [learner_baselines(seed_preset, seconds, args.seed_script)]
    old_config = system_config.replace(**OLD_DEFAULT)
    old_default_runs = [system_run(old_config, "float32, XLA on: the old default")]
    system = system_run(system_config, "seed preset")
    old_default_runs.append(system_run(old_config, "float32, XLA on: the old default"))
    learner_runs.append(learner_baselines(seed_preset, seconds, args.seed_script))
    modes = learner_modes(seed_preset, seconds)
    raw = mean_of(raw_runs, "raw_env_agent_steps_per_s")
    bare = mean_of(learner_runs, "bare_updates_per_s")
    seed_steps = mean_of(learner_runs, "seed_agent_steps_per_s")
    seed_updates = mean_of(learner_runs, "seed_updates_per_s")
    old_default = mean_of(old_default_runs, "agent_steps")
    scaling = []
    if args.scaling and not args.quick:
        launch.connect_ray(system_config, max(num_actors, 4))
        shapes = [(a, envs_per_actor) for a in (1, 2, 4)] + [
            (num_actors, k) for k in (16, 32, 128) if k != envs_per_actor]
        scaling = [acting_row(seed_preset, a, k, seconds, warm_up) for a, k in shapes]

    result = {
        "quick": args.quick, "seconds": seconds, "num_actors": num_actors,
        "envs_per_actor": envs_per_actor, "cpus": os.cpu_count(),
        "raw_env_agent_steps_per_s": round(raw, 1),
        "acting_agent_steps_per_s": round(acting["agent_steps"], 1),
        "acting_ratio": round(acting["agent_steps"] / raw, 3),
        "bare_updates_per_s": round(bare, 2),
        "system_updates_per_s": round(system["updates"], 2),
        "learner_ratio": round(system["updates"] / bare, 3),
        "system_samples_per_insert": round(system["samples_per_insert"], 2),
        "system_learner_starved_fraction": round(system["learner_starved_fraction"], 3),
        "acting_cpus_busy": acting["cpus_busy"], "system_cpus_busy": system["cpus_busy"],
        "seed_script": str(args.seed_script),
        "seed_agent_steps_per_s": round(seed_steps, 2),
        "seed_updates_per_s": round(seed_updates, 2),
        "system_agent_steps_per_s": round(system["agent_steps"], 1),
        "speedup_vs_seed": round(system["agent_steps"] / seed_steps, 2),
        "old_default_agent_steps_per_s": round(old_default, 1),
        "speedup_vs_old_default": round(system["agent_steps"] / old_default, 3),
        "system_compute": system["compute"],
        "learner_modes": modes,
        "acting_float32_agent_steps_per_s": round(acting_float32["agent_steps"], 1),
        "acting_float32_ratio": round(acting_float32["agent_steps"] / raw, 3),
        "acting_compute": acting["compute"],
        "baselines": {"around_acting": {"before": raw_runs[0], "after": raw_runs[1]},
                      "around_system": {"before": learner_runs[0], "after": learner_runs[1]},
                      "old_default": [{"agent_steps_per_s": round(run["agent_steps"], 1),
                                       "updates_per_s": round(run["updates"], 2),
                                       "compute": run["compute"]}
                                      for run in old_default_runs]},
        "tf_enable_onednn_opts": {"project": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
                                  "seed": SEED_ENV.get("TF_ENABLE_ONEDNN_OPTS")},
    }
    result["targets_met"] = {name: result[name] >= target for name, target in TARGETS.items()}
    if scaling:
        result["scaling"] = scaling
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
