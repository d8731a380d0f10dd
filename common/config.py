"""The one typed, frozen run configuration, its presets and its command line.

Every field is one knob with one name; `launch.py --help` lists them all with their help text
and the chosen preset's values. Counts of actions taken are `*_agent_steps`; emulator frames
(agent steps x frame skip) are only ever reported, never configured.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.checkpoints import CheckpointError, CheckpointStore, is_local_root


class ConfigError(ValueError):
    """A configuration value a user gave is invalid."""


@dataclass(frozen=True)
class Rule:
    """What values a knob takes, as its error message says it."""
    holds: Callable[[float], bool]
    says: str


# Counters are int64 everywhere (checkpoints, metrics).
MAX_COUNT = 2**62


def up_to(limit: float, why: str = "", zero: bool = False) -> Rule:
    """Positive (or >= 0 with `zero`) and at most `limit`, which the message gives with its
    reason."""
    low = "be >= 0" if zero else "be positive"
    return Rule((lambda v: 0 <= v <= limit) if zero else (lambda v: 0 < v <= limit),
                f"must {low} and at most {limit:,}{why}")


# Counts (ints): also at most MAX_COUNT (`_check_field`).
POSITIVE = Rule(lambda v: v > 0, "must be positive")
NONNEGATIVE = Rule(lambda v: v >= 0, "must be >= 0")
UNIT = Rule(lambda v: 0 <= v <= 1, "must be in [0, 1]")
UNIT_OPEN = Rule(lambda v: 0 < v <= 1, "must be in (0, 1]")
ANY = Rule(lambda v: True, "")  # only ever compared: any finite number works
# Replay slots are indexed with int32.
SLOTS = Rule(lambda v: 0 < v < 2**31, "must be positive and below 2**31")
# Durations reach time.sleep, threading waits and Ray timeouts, which overflow past
# threading.TIMEOUT_MAX (~292 years); a year is longer than any run needs to wait.
MAX_DURATION_S = 365 * 24 * 3600
SECONDS = up_to(MAX_DURATION_S, " s (a year)")
SECONDS_OR_0 = up_to(MAX_DURATION_S, " s (a year)", zero=True)
# The learner's optimizer holds its learning rate and clip norm as float32.
FLOAT32 = Rule(lambda v: 1.1754943508222875e-38 <= v <= 3.4028234663852886e+38,
               "must be positive and a float32 (1.2e-38 to 3.4e38)")
# ALE's vector env takes int32 seeds. From a base seed, env j of actor i plays base + 10,000 x
# (i + 1) + j (MAX_ACTORS, MAX_ENVS), the evaluator base + 7,777,777 + 7,919 x (its
# evaluations mod 2**16) + episode: both below 2**31 for a base below 2**30 (the learner's
# Keras seed takes below 2**32). A resumed sitting's base (launch.sitting_seed), a restarted
# actor's or evaluator's, is drawn below the limit too.
SEED_LIMIT = 2**30
SEED = Rule(lambda v: 0 <= v < SEED_LIMIT, "must be in [0, 2**30)")
# Actors' seeds are 10,000 apart: more envs would replay another actor's games, and 10,000
# actors of 10,000 envs keep every seed in ALE's range (SEED_LIMIT).
MAX_ACTORS = 10_000
MAX_ENVS = 10_000
# The learner host's share (0.5) is split among the shards in Ray's resource unit, 0.0001.
MAX_REPLAY_SHARDS = 5_000
# ALE counts an episode's emulator frames (4 per agent step, plus no-op starts) in int32.
MAX_EPISODE_AGENT_STEPS = 10**8
# Ray counts resources in units of 0.0001; a learner is one process on one node.
MAX_LEARNER_GPUS = 16
GPUS = Rule(lambda v: v == 0 or 0.0001 <= v <= MAX_LEARNER_GPUS,
            f"must be 0 or in [0.0001, {MAX_LEARNER_GPUS}] (Ray's unit; one node's GPUs)")
# The rate limiter counts inserts x ratio - samples in float64: up to 10,000 it stays exact to
# a sample (below 2**53) for any run's inserts; below 0.0001 a transition would be sampled
# less than once in 10,000 inserts. Its tolerance is a count of samples.
RATIO = Rule(lambda v: 0.0001 <= v <= 10_000, "must be in [0.0001, 10,000]")
# Items one replay sample call returns, and one priority update names, at most.
MAX_SAMPLE_ITEMS = 1 << 20
MAX_WIDTH = 1 << 16
# An actor pins one CPU a thread (actors.scheduling.pin_to_cpus), the frames of a stack
# travel in every transition: beyond these, a typo.
MAX_ACTOR_THREADS = 1024
MAX_FRAME_STACK = 1024
# What the learner and the actors may compute in (common.networks.resolve_precision reads
# "auto").
PRECISIONS = ("auto", "float32", "bfloat16", "float16")


def flag(name: str) -> str:
    return name.replace("_", "-")


def knob(default, help: str, choices: tuple[str, ...] | None = None, rule: Rule | None = None):
    """A config field: its default, its --help text, and the values it takes (`choices`, or a
    `rule` for numbers; None for a knob left unset always passes)."""
    return field(default=default, metadata={"help": help, "choices": choices, "rule": rule})


@dataclass(frozen=True)
class Config:
    preset: str = knob("seed", "Preset the other values start from: 'seed' is the keras.io "
                               "Breakout example value for value, 'cartpole' learns "
                               "CartPole-v1 in minutes. `--preset P --help` shows P's values.")

    # What to play and how long.
    env: str = knob("BreakoutNoFrameskip-v4",
                    "Gymnasium env id: any ALE/... or *NoFrameskip-v4 Atari id, or a vector-"
                    "observation env such as CartPole-v1. Action count comes from the env.")
    seed: int = knob(42, "Base random seed for envs, exploration and network initialisation, "
                         "in [0, 2**30): each actor, env, evaluation and resumed sitting "
                         "plays a seed derived from it, which ALE takes below 2**31.",
                     rule=SEED)
    max_seconds: float | None = knob(
        None, "Stop after this many seconds of this sitting (a resumed sitting counts afresh "
              "and has no limit unless given again; default: no limit; at most a year).",
        rule=SECONDS)
    total_agent_steps: int | None = knob(
        None, "Stop once the run has taken this many agent steps, summed over actors and "
              "sittings (default: no limit).", rule=POSITIVE)
    target_mean_return: float | None = knob(
        None, "Stop once the mean return of the last 100 episodes reaches this (e.g. 195 "
              "solves CartPole; default: never).", rule=ANY)

    # Where it runs.
    address: str | None = knob(
        None, "Ray cluster to join ('auto' or host:port). Default: start an embedded local Ray.")
    num_actors: int | None = knob(
        None, "Actor processes (default: one per CPU left after the learner and the replay "
              "shards, at least 2; at most 10,000, and on a local machine at most 8 "
              "processes a CPU with the learner and the shards).",
        rule=up_to(MAX_ACTORS))
    envs_per_actor: int = knob(
        64, "Envs each actor steps together with one batched forward pass (larger batches "
            "use the CPU better: see benchmarks/throughput.py --scaling; at most 10,000, "
            "and a local run's envs must fit its memory).", rule=up_to(MAX_ENVS))
    actor_threads: int | None = knob(
        None, "CPU threads each actor's emulators and forward pass use (default: a local "
              "machine's CPUs shared among its actors, at least 1; 1 on a cluster; at most "
              "1,024).", rule=up_to(MAX_ACTOR_THREADS))
    pin_actor_cpus: bool | None = knob(
        None, "Pin each actor's playing threads (emulators, forward pass) to CPUs of its own: "
              "actor i takes --actor-threads CPUs from i x that count (mod the CPUs), so its "
              "emulator and network keep warm caches instead of migrating (default: on for a "
              "local machine; off on a cluster, where an actor's index says nothing about its "
              "node's CPUs). Linux only; ignored elsewhere.")
    actor_cpu_priority: str = knob(
        "idle", "CPU priority of the actors' playing threads (emulators, forward pass): 'idle' "
                "(Linux SCHED_IDLE) leaves the CPU to the learner and replay whenever they "
                "want it, so a learner sharing the actors' machine keeps its pace; 'normal' "
                "competes equally (as other OSes always do).", choices=("idle", "normal"))
    placement_timeout_s: float = knob(
        60.0, "Seconds to wait for the cluster to have room for every role (CPUs for the "
              "learner, shards and actors; a node with the learner's GPUs) before giving up "
              "with one line. Raise it on an autoscaling cluster, whose nodes take minutes "
              "(at most a year).", rule=SECONDS_OR_0)
    learner_gpus: float | None = knob(
        None, "GPUs for the learner: 0 (CPU), a fraction from 0.0001, or up to 16 "
              "(default: 1 if the cluster has a GPU, else 0).", rule=GPUS)
    dashboard_host: str = knob(
        "127.0.0.1", "Interface the local Ray dashboard listens on (0.0.0.0 exposes it, and "
                     "with it the power to run code on this machine, to the network).")
    insecure: bool = knob(
        False, "Run Ray without token authentication (RAY_AUTH_MODE=disabled), which lets "
               "anyone who reaches its ports run code here. Refused unless given.")
    logdir: str | None = knob(
        None, "The run directory: config.json, checkpoints, TensorBoard events, final weights "
              "and summary.json (default: runs/<preset>-<time>).")
    report_every_s: float = knob(5.0, "Seconds between progress lines and TensorBoard points "
                                      "(at most a year).", rule=SECONDS)
    verbose: bool = knob(False, "Also show the workers' output (TensorFlow, ALE and Ray "
                                "start-up lines) and Ray's own info; by default a run prints "
                                "its header, progress, checkpoints, failures and summary.")

    # Checkpoints and resuming.
    resume: str | None = knob(
        None, "Carry on the run in this run directory from its latest checkpoint, with its "
              "config.json; or the run whose --checkpoint-dir is this URI (s3://bucket/run: "
              "the head and its disk may be gone), in a new run directory (--logdir). Flags "
              "may change only limits, actors, address, logging, evaluation and the "
              "learner's precision and XLA.")
    checkpoint_every_s: float = knob(
        600.0, "Seconds between checkpoints (one is also written at every stop; at most a "
               "year).", rule=SECONDS)
    keep_checkpoints: int = knob(3, "Checkpoints kept; older ones are deleted.", rule=POSITIVE)
    role_timeout_s: float = knob(
        600.0, "Seconds the learner or a replay shard may stay silent (not back from a "
               "restart) before the run gives up: it stops the rest and writes what it has "
               "(at most a year).", rule=SECONDS)
    checkpoint_dir: str | None = knob(
        None, "Where checkpoints go: a local path, or a URI such as s3://bucket/run or "
              "gs://bucket/run so they outlive the node (default: <run directory>/checkpoints).")

    # Evaluation of the greedy policy, apart from training (never fed to replay).
    eval_every_s: float = knob(
        300.0, "Seconds between evaluations of the latest weights: --eval-episodes whole "
               "episodes at --eval-epsilon, reported as eval/return_mean (0: no evaluator; "
               "at most a year).", rule=SECONDS_OR_0)
    eval_episodes: int = knob(10, "Episodes per evaluation, played side by side (at most "
                                  "10,000).", rule=up_to(MAX_ENVS))
    eval_epsilon: float = knob(0.05, "Epsilon of evaluation play (Nature DQN's 0.05).", rule=UNIT)

    # Q-learning.
    gamma: float = knob(0.99, "Discount factor.", rule=UNIT)
    n_step: int = knob(1, "Steps summed into each transition's return before bootstrapping "
                          "(at most --max-episode-agent-steps).", rule=POSITIVE)
    batch_size: int = knob(32, "Transitions per learner update.", rule=POSITIVE)
    learning_rate: float = knob(0.00025, "Adam learning rate (a positive float32).",
                                rule=FLOAT32)
    grad_clip_norm: float = knob(1.0, "Gradient norm clip (per variable: Keras clipnorm, "
                                      "unless --grad-clip-global; a positive float32).",
                                 rule=FLOAT32)
    grad_clip_global: bool = knob(False, "Clip the norm of all gradients together (Ape-X) "
                                         "instead of each variable's (the seed).")
    target_sync_updates: int = knob(
        2500, "Updates between target-network syncs (seed: 10,000 agent steps / 4 per update).",
        rule=POSITIVE)
    double_dqn: bool = knob(False, "Double DQN target: the online network picks the next "
                                   "action, the target network values it.")
    dueling: bool = knob(False, "Dueling head: Q = V + A - mean(A).")
    clip_rewards: bool = knob(False, "Clip each step's training reward to [-1, 1] (episode "
                                     "returns are always reported unclipped).")
    mlp_hidden_units: tuple[int, ...] = knob(
        (256, 256), "Hidden layer widths of the MLP used for vector observations (each in "
                    "[1, 65536]; a local run's networks must fit its memory).",
        rule=up_to(MAX_WIDTH))

    # Exploration (epsilon-greedy, one global schedule over all actors' agent steps).
    epsilon_start: float = knob(1.0, "Epsilon at the first agent step.", rule=UNIT)
    epsilon_end: float = knob(0.1, "Epsilon after the decay.", rule=UNIT)
    epsilon_decay_agent_steps: int = knob(
        1_000_000, "Agent steps, counted from the first, over which epsilon falls linearly.",
        rule=POSITIVE)
    random_agent_steps: int = knob(
        50_000, "Agent steps at the start whose actions are uniformly random whatever epsilon is.",
        rule=NONNEGATIVE)
    epsilon_ladder_base: float | None = knob(
        None, "Ape-X exploration instead of the schedule: env i of all N envs of all actors "
              "keeps epsilon base^(1 + exponent * i / (N - 1)) (Ape-X: 0.4; default: off).",
        rule=UNIT_OPEN)
    epsilon_ladder_exponent: float = knob(7.0, "The exponent of the epsilon ladder.",
                                          rule=NONNEGATIVE)

    # Environment.
    max_episode_agent_steps: int = knob(
        10_000, "Agent steps after which an episode is truncated (at most 10**8: ALE counts "
                "an episode's frames in int32).", rule=up_to(MAX_EPISODE_AGENT_STEPS))
    frame_stack: int = knob(4, "Atari frames stacked into one observation (at most 1,024).",
                            rule=up_to(MAX_FRAME_STACK))

    # Replay and its rate limiter (Reverb's SampleToInsertRatio semantics).
    replay_capacity: int = knob(100_000, "Transitions each replay shard keeps.", rule=SLOTS)
    replay_shards: int = knob(1, "Replay actors; actor i sends to shard i mod shards and the "
                                 "learner samples all of them (at most 5,000).",
                              rule=up_to(MAX_REPLAY_SHARDS))
    priority_exponent: float = knob(
        0.0, "Prioritized replay exponent alpha in [0, 1]: P(i) ~ priority_i^alpha (0 = "
             "uniform, 1 = proportional; Ape-X: 0.6).", rule=UNIT)
    importance_exponent: float = knob(
        0.4, "Importance-sampling exponent beta at the first update; it rises linearly to 1.",
        rule=UNIT)
    importance_anneal_updates: int = knob(
        1_000_000, "Updates over which beta rises to 1.", rule=POSITIVE)
    initial_priority: str = knob(
        "max", "Priority of a new transition: 'max' (the largest seen so far) or 'actor' (its "
               "n-step TD error under the actor's network, as in Ape-X).",
        choices=("max", "actor"))
    min_replay_size: int = knob(32, "Transitions stored before the learner may sample.",
                                rule=NONNEGATIVE)
    samples_per_insert: float = knob(
        8.0, "Sampled transitions per inserted one (seed: batch 32 every 4 agent steps = 8). "
             "The learner waits when it runs ahead, actors wait when they do. In "
             "[0.0001, 10,000].", rule=RATIO)
    samples_per_insert_tolerance: float | None = knob(
        None, "How far, in sampled transitions, the ratio may drift before a side waits "
              "(default: 2 x chunk_transitions x samples_per_insert + one learner call's samples; "
              "at most 2**62).", rule=up_to(MAX_COUNT))

    # Data flow between roles.
    chunk_transitions: int = knob(
        128, "Transitions an actor sends to replay per call (fewer, larger calls cost Ray "
             "less work per transition).", rule=POSITIVE)
    max_inflight_chunks: int = knob(2, "Unacknowledged sends per actor before it waits.",
                                    rule=POSITIVE)
    weight_publish_updates: int = knob(
        50, "Updates between weight publishes; actors pick up each new version.", rule=POSITIVE)
    weight_refresh_env_frames: int = knob(
        0, "Emulator frames each env of an actor plays between the actor's checks for newer "
           "weights (Ape-X: 400; 0: after every chunk sent).", rule=NONNEGATIVE)
    learner_precision: str = knob(
        "auto", "What the learner computes in: 'float32'; 'bfloat16' or 'float16' (Keras mixed "
                "precision: float32 weights, low-precision compute; the output layer, the TD "
                "target and the loss stay float32, and float16 scales the loss). The weights "
                "actors get and checkpoints are float32 in every mode. 'auto', for the CNN: "
                "bfloat16 on a GPU of compute capability 8.0 or newer and on a CPU with "
                "AVX512-BF16, AMX or Arm BF16; float16 on a GPU of 7.x (Volta, Turing); float32 "
                "otherwise, and always for the MLP (too small to gain).",
        choices=PRECISIONS)
    xla: str = knob(
        "auto", "Compile the learner's train step with XLA ('on'), as a plain tf.function "
                "('off'), or 'auto': at start, time a few train steps each way on the learner's "
                "device (a few seconds) and keep the faster.", choices=("auto", "on", "off"))
    actor_precision: str = knob(
        "auto", "What the actors' forward pass computes in: 'float32', 'bfloat16' or 'float16' "
                "(mixed precision, as for the learner; the actors' weights are float32 in "
                "every mode), or 'auto': each actor times float32 and what "
                "--learner-precision auto would pick on its CPU, on its envs' first "
                "observations (about a second), and keeps the faster. The evaluator plays in "
                "float32.", choices=PRECISIONS)
    learner_batches_per_call: int = knob(
        2, "Batches per replay call, trained one after the other in one compiled call: "
           "amortizes the per-call cost of replay and of the compiled step. Sync and publish "
           "periods must be multiples of it, and it x --batch-size at most 2**20 (one replay "
           "call's items).", rule=POSITIVE)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _check_field(f, getattr(self, f.name))
        self._check_together()

    def _check_together(self):
        """The rules that tie knobs together."""
        if self.min_replay_size > self.replay_capacity:
            raise ConfigError(f"--min-replay-size ({self.min_replay_size}) exceeds "
                              f"--replay-capacity ({self.replay_capacity})")
        for name in ["batch_size", "chunk_transitions"]:
            if getattr(self, name) > self.replay_capacity:
                raise ConfigError(f"--{flag(name)} ({getattr(self, name)}) exceeds "
                                  f"--replay-capacity ({self.replay_capacity})")
        if self.n_step > self.max_episode_agent_steps:  # the whole episode's return already
            raise ConfigError(f"--n-step ({self.n_step:,}) exceeds --max-episode-agent-steps "
                              f"({self.max_episode_agent_steps:,})")
        if self.batch_size * self.learner_batches_per_call > MAX_SAMPLE_ITEMS:
            raise ConfigError(f"--batch-size x --learner-batches-per-call "
                              f"({self.batch_size:,} x {self.learner_batches_per_call:,}) "
                              f"exceeds one replay call's {MAX_SAMPLE_ITEMS:,} items")
        for name in ["target_sync_updates", "weight_publish_updates"]:
            if getattr(self, name) % self.learner_batches_per_call:
                raise ConfigError(f"--{flag(name)} ({getattr(self, name)}) must be a multiple "
                                  f"of --learner-batches-per-call "
                                  f"({self.learner_batches_per_call})")
        if self.rate_tolerance < self.chunk_transitions * self.samples_per_insert:
            raise ConfigError(
                f"--samples-per-insert-tolerance ({self.rate_tolerance}) must be at least "
                f"chunk_transitions x samples_per_insert "
                f"({self.chunk_transitions * self.samples_per_insert}) or actors deadlock")

    @property
    def rate_tolerance(self) -> float:
        if self.samples_per_insert_tolerance is not None:
            return self.samples_per_insert_tolerance
        return (2 * self.chunk_transitions * self.samples_per_insert
                + self.batch_size * self.learner_batches_per_call)

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def _check_field(f: dataclasses.Field, value) -> None:
    """One knob's own rules: finite numbers within its rule and MAX_COUNT, one of its
    choices, no empty paths, widths each within the rule."""
    if value is None:
        return
    name, choices, rule = f"--{flag(f.name)}", f.metadata["choices"], f.metadata["rule"]
    if isinstance(value, tuple):  # widths: each one a number of the rule
        if not value or not all(type(v) is int and rule.holds(v) for v in value):
            raise ConfigError(f"{name} must be positive widths, each at most {MAX_WIDTH:,}, "
                              f"got {value}")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value}")
    if rule is not None and not rule.holds(value):
        raise ConfigError(f"{name} {rule.says}, got {value:,}" if type(value) is int
                          else f"{name} {rule.says}, got {value}")
    if type(value) is int and value > MAX_COUNT:
        raise ConfigError(f"{name} must be at most {MAX_COUNT:,}, got {value:,}")
    if choices and value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{name} must not be empty")


def epsilon_at(config: Config, agent_steps: int) -> float:
    """The schedule: probability of a random action at the step taken after `agent_steps`
    earlier steps (all actors together)."""
    if agent_steps < config.random_agent_steps:
        return 1.0
    decayed = config.epsilon_start - (config.epsilon_start - config.epsilon_end) * (
        agent_steps / config.epsilon_decay_agent_steps)
    return max(config.epsilon_end, decayed)


def importance_exponent_at(config: Config, updates: int) -> float:
    """Beta after `updates` learner updates: linear from its start value to 1."""
    progress = min(1.0, updates / config.importance_anneal_updates)
    return config.importance_exponent + (1.0 - config.importance_exponent) * progress


PRESETS: dict[str, Config] = {
    # The keras.io "Deep Q-Learning for Atari Breakout" example, value for value.
    "seed": Config(preset="seed"),
    # Learns CartPole-v1 (mean return >= 195) in a few minutes on 2 cores.
    "cartpole": Config(
        preset="cartpole", env="CartPole-v1", envs_per_actor=4,
        batch_size=64, learning_rate=0.0005, grad_clip_norm=10.0, target_sync_updates=512,
        mlp_hidden_units=(128, 128),
        epsilon_start=1.0, epsilon_end=0.02, epsilon_decay_agent_steps=10_000,
        random_agent_steps=1_000, max_episode_agent_steps=500,
        replay_capacity=100_000, min_replay_size=1_000, samples_per_insert=16.0,
        chunk_transitions=32, weight_publish_updates=16, learner_batches_per_call=8,
        report_every_s=2.0, eval_every_s=30.0),
    # Ape-X (Horgan et al. 2018) on Breakout: n-step double DQN with a dueling head,
    # prioritized replay fed actor-computed priorities, the epsilon ladder.
    "apex": Config(
        preset="apex", n_step=3, priority_exponent=0.6, importance_exponent=0.4,
        initial_priority="actor", batch_size=512, learning_rate=0.00025 / 4,
        grad_clip_norm=40.0, grad_clip_global=True, target_sync_updates=2500,
        double_dqn=True, dueling=True, clip_rewards=True,
        epsilon_ladder_base=0.4, random_agent_steps=0, max_episode_agent_steps=27_000,
        replay_capacity=2_000_000, min_replay_size=50_000,
        # Ape-X's learner took 19 batches of 512 a second from actors adding ~12,500
        # transitions a second: about 0.8 samples per insert.
        samples_per_insert=0.8, weight_publish_updates=10,
        weight_refresh_env_frames=400),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """Bad input ends with the one line that names it (and exit code 2), no usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _field_parser(annotation: str):
    """(argparse type, nargs) for a field annotation written as a string."""
    hint = annotation.replace(" | None", "")
    if hint == "tuple[int, ...]":
        return int, "+"
    return {"int": int, "float": float, "str": str}[hint], None


def build_parser(prog: str, defaults: Config,
                 explicit_only: bool = False) -> argparse.ArgumentParser:
    """The command line for `defaults`; with `explicit_only`, parsing yields only the flags
    given (what a resumed run may override is judged on those)."""
    parser = OneLineErrorParser(
        prog=prog,
        description="Distributed DQN on Ray: actors play, a replay service stores, a learner "
                    f"trains. Presets: {', '.join(PRESETS)}. Defaults shown are the "
                    f"'{defaults.preset}' preset's.")
    for f in dataclasses.fields(Config):
        if f.name == "preset":
            parser.add_argument("--preset", choices=list(PRESETS),
                                default=argparse.SUPPRESS if explicit_only else defaults.preset,
                                help=f"{f.metadata['help']} (default: seed)")
            continue
        assert isinstance(f.type, str)  # annotations are postponed (`from __future__`)
        default = argparse.SUPPRESS if explicit_only else getattr(defaults, f.name)
        help_text = f.metadata["help"].replace("%", "%%")  # argparse %-formats help
        if default not in (None, argparse.SUPPRESS):  # None is described in the help text
            help_text += f" (default: {default})"
        if f.type in ("bool", "bool | None"):
            parser.add_argument(f"--{flag(f.name)}", dest=f.name, default=default,
                                action=argparse.BooleanOptionalAction, help=help_text)
            continue
        arg_type, nargs = _field_parser(f.type)
        choices = f.metadata["choices"]
        parser.add_argument(f"--{flag(f.name)}", dest=f.name, type=arg_type, nargs=nargs,
                            default=default, help=help_text, choices=choices,
                            metavar=None if choices else
                            {int: "N", float: "X", str: "TEXT"}[arg_type])
    return parser


# What may change when a run is resumed: its limits, where and how many actors play, logging,
# and how the learner computes (a checkpoint restores into every precision and compile mode).
RESUME_OVERRIDES = frozenset({
    "resume", "max_seconds", "total_agent_steps", "target_mean_return", "address",
    "num_actors", "envs_per_actor", "actor_threads", "pin_actor_cpus", "actor_cpu_priority",
    "learner_gpus", "dashboard_host", "report_every_s", "checkpoint_every_s",
    "keep_checkpoints", "role_timeout_s", "verbose", "eval_every_s", "eval_episodes",
    "eval_epsilon", "placement_timeout_s", "insecure", "learner_precision", "xla",
    "actor_precision"})
RUN_CONFIG = "config.json"
# A run directory's networks: the learner's at the stop, and the one of the best evaluation.
FINAL_WEIGHTS = "q_network.weights.h5"
BEST_WEIGHTS = "best.weights.h5"
RUN_CONFIG_FORMAT = "dqn-run-config"
MAX_RUN_CONFIG_BYTES = 1 << 20


def parse_args(argv: list[str] | None = None, prog: str = "launch.py") -> Config:
    """Preset first, then every flag overrides it; or, with --resume, the run's saved config
    with the few flags that may change. Bad input exits 2 with one line."""
    argv = sys.argv[1:] if argv is None else argv
    pre = OneLineErrorParser(prog=prog, add_help=False)
    pre.add_argument("--preset", default="seed")
    pre.add_argument("--resume", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.preset not in PRESETS:
        pre.error(f"unknown preset {known.preset!r}; choose from {', '.join(PRESETS)}")
    parser = build_parser(prog, PRESETS[known.preset])
    values = _tuples(vars(parser.parse_args(argv)))
    if known.resume is not None:
        return _resumed(parser, argv, known.resume)
    try:
        return Config(**values)
    except ConfigError as error:
        parser.error(str(error))


def _resumed(parser: argparse.ArgumentParser, argv: list[str], run_dir: str) -> Config:
    given = _tuples(vars(build_parser(parser.prog, PRESETS["seed"], explicit_only=True)
                         .parse_args(argv)))
    from_store = not _is_local(parser, run_dir)
    refused = sorted(set(given) - RESUME_OVERRIDES - ({"logdir"} if from_store else set()))
    if refused:
        parser.error(f"--{flag(refused[0])} cannot change when a run is resumed (its "
                     f"config.json holds it); only limits, actors, address, logging, "
                     f"evaluation and the learner's precision and XLA can")
    try:
        saved = read_run_config(run_dir)
        # A sitting's time limit is that sitting's: the next one runs until its own (if any).
        where = ({"checkpoint_dir": run_dir, "logdir": given.get("logdir")} if from_store
                 else {"logdir": run_dir})
        return saved.replace(**{"max_seconds": None, **given, **where})
    except ConfigError as error:
        parser.error(str(error))


def _is_local(parser: argparse.ArgumentParser, root: str) -> bool:
    try:
        return is_local_root(root)
    except CheckpointError as error:
        parser.error(str(error).replace("checkpoint directory", "--resume", 1))


def _tuples(values: dict) -> dict:
    if values.get("mlp_hidden_units") is not None:
        values["mlp_hidden_units"] = tuple(values["mlp_hidden_units"])
    return values


def _typed(path: str, f: dataclasses.Field, value):
    """`value` as field `f` holds it, or ConfigError: JSON has no tuples, and a hand-edited
    file may hold anything."""
    hint = f.type.replace(" | None", "")
    if value is None and f.type.endswith("| None"):
        return None
    if hint == "tuple[int, ...]" and isinstance(value, list) \
            and all(type(v) is int for v in value):
        return tuple(value)
    if hint == "float" and type(value) in (int, float):
        return float(value)
    if {"int": int, "str": str, "bool": bool}.get(hint) is type(value):
        return value
    raise ConfigError(f"{path}: {f.name} holds {value!r}, not a {f.type}")


def config_to_json(config: Config) -> dict:
    return {"format": RUN_CONFIG_FORMAT, "config": dataclasses.asdict(config)}


def _current_knobs(path: str, saved: dict) -> dict:
    """A config.json's knobs under today's names and values. Runs written before the learner's
    precision and compile mode were chosen at start held `mixed_precision` (None: float16 on
    a GPU with tensor cores, else float32) and `xla` as a bool. A resumed run keeps what it
    trained with: None becomes float32, what it meant on the CPUs every such run here
    trained on (`--learner-precision` may change it on resume)."""
    saved = dict(saved)
    if "mixed_precision" in saved and "learner_precision" not in saved:
        mixed = saved.pop("mixed_precision")
        if mixed is not None and type(mixed) is not bool:
            raise ConfigError(f"{path}: mixed_precision holds {mixed!r}, not a bool | None")
        saved["learner_precision"] = "float16" if mixed else "float32"
    if type(saved.get("xla")) is bool:
        saved["xla"] = "on" if saved["xla"] else "off"
    return saved


def read_run_config(run_dir: str) -> Config:
    """The config a run was started with: its run directory's config.json, or the copy in its
    checkpoint store when `run_dir` is that store's URI. Checked as strictly as the command
    line; ConfigError naming the file."""
    if not is_local_root(run_dir):
        path = f"{run_dir.rstrip('/')}/{RUN_CONFIG}"
        try:
            data = CheckpointStore(run_dir).read_json(RUN_CONFIG)
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
    else:
        path = str(Path(run_dir) / RUN_CONFIG)
        try:
            with open(path, "rb") as file:
                data = json.loads(file.read(MAX_RUN_CONFIG_BYTES + 1) or b"null")
        except OSError as error:
            raise ConfigError(f"{path}: cannot be read ({error.strerror or error})") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"{path}: not JSON") from None
    if not isinstance(data, dict) or data.get("format") != RUN_CONFIG_FORMAT \
            or not isinstance(data.get("config"), dict):
        raise ConfigError(f"{path}: not a run config of this project")
    saved = _current_knobs(path, data["config"])
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(saved) - names)
    if unknown or saved.get("preset") not in PRESETS:
        raise ConfigError(f"{path}: unknown field {unknown[0]!r}" if unknown
                          else f"{path}: unknown preset {saved.get('preset')!r}")
    for f in dataclasses.fields(Config):
        if f.name in saved:
            saved[f.name] = _typed(path, f, saved[f.name])
    try:
        return PRESETS[saved["preset"]].replace(**saved)
    except (ConfigError, TypeError) as error:
        raise ConfigError(f"{path}: {error}") from None
