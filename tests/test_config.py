"""Presets, the epsilon schedule and the command line."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from actors.actor import epsilon_ladder
from common.config import (
    MAX_COUNT,
    PRESETS,
    Config,
    ConfigError,
    epsilon_at,
    importance_exponent_at,
    parse_args,
)

ROOT = Path(__file__).resolve().parents[1]


def test_seed_preset_holds_the_keras_io_values():
    # Values from the keras.io "Deep Q-Learning for Atari Breakout" example.
    seed = PRESETS["seed"]
    assert seed.env == "BreakoutNoFrameskip-v4"
    assert seed.frame_stack == 4
    assert seed.gamma == 0.99
    assert (seed.epsilon_start, seed.epsilon_end) == (1.0, 0.1)
    assert seed.epsilon_decay_agent_steps == 1_000_000
    assert seed.random_agent_steps == 50_000
    assert seed.batch_size == 32
    assert seed.learning_rate == 0.00025
    assert seed.grad_clip_norm == 1.0
    assert seed.replay_capacity == 100_000
    assert seed.max_episode_agent_steps == 10_000
    # One update of 32 every 4 agent steps: 8 sampled transitions per inserted one.
    agent_steps_per_update = seed.batch_size / seed.samples_per_insert
    assert agent_steps_per_update == 4
    # Target sync every 10,000 agent steps = every 2,500 updates at that ratio.
    assert seed.target_sync_updates * agent_steps_per_update == 10_000
    # The seed learns as soon as it holds more than one batch.
    assert seed.min_replay_size == seed.batch_size
    # Two updates per compiled call: the same ratio, a train call's fixed cost halved.
    assert seed.learner_batches_per_call == 2 and seed.target_sync_updates % 2 == 0


def test_apex_preset_holds_the_ape_x_values():
    apex, seed = PRESETS["apex"], PRESETS["seed"]
    assert apex.n_step == 3
    assert (apex.priority_exponent, apex.importance_exponent) == (0.6, 0.4)
    assert apex.initial_priority == "actor"
    assert apex.batch_size == 512 and apex.learning_rate == 0.00025 / 4
    assert apex.grad_clip_norm == 40 and apex.grad_clip_global
    assert apex.target_sync_updates == 2500
    assert apex.weight_refresh_env_frames == 400
    assert apex.replay_capacity == 2_000_000
    assert apex.double_dqn and apex.dueling
    assert (apex.epsilon_ladder_base, apex.epsilon_ladder_exponent) == (0.4, 7.0)
    # The seed preset keeps uniform one-step replay and the plain DQN target.
    assert (seed.n_step, seed.priority_exponent, seed.double_dqn, seed.dueling) == (1, 0, False,
                                                                                    False)
    assert seed.epsilon_ladder_base is None and not seed.grad_clip_global


def test_epsilon_ladder_and_importance_annealing():
    apex = PRESETS["apex"]
    ladder = [epsilon_ladder(apex, i, 8) for i in range(8)]
    assert ladder[0] == pytest.approx(0.4) and ladder[-1] == pytest.approx(0.4 ** 8)
    assert all(a > b for a, b in zip(ladder, ladder[1:]))
    assert epsilon_ladder(apex, 0, 1) == pytest.approx(0.4)
    assert importance_exponent_at(apex, 0) == pytest.approx(0.4)
    assert importance_exponent_at(apex, apex.importance_anneal_updates // 2) == \
        pytest.approx(0.7)
    assert importance_exponent_at(apex, 10 * apex.importance_anneal_updates) == 1.0


def seed_script_exploration(total_steps: int) -> list[float]:
    """The seed's loop, line for line: probability that step t (0-based) acts at random."""
    epsilon, epsilon_min, epsilon_max = 1.0, 0.1, 1.0
    interval, greedy_frames, random_frames = epsilon_max - epsilon_min, 1_000_000.0, 50_000
    frame_count, out = 0, []
    for _ in range(total_steps):
        frame_count += 1
        out.append(1.0 if frame_count < random_frames else epsilon)
        epsilon -= interval / greedy_frames
        epsilon = max(epsilon, epsilon_min)
    return out


def test_epsilon_schedule_matches_the_seed():
    seed = PRESETS["seed"]
    reference = seed_script_exploration(1_100_000)
    for t in list(range(0, 1_100_000, 997)) + [49_998, 50_000, 50_001, 999_999, 1_000_000]:
        assert epsilon_at(seed, t) == pytest.approx(reference[t], abs=1e-9), t
    # The seed's `frame_count < 50000` makes its 50,000th step the first non-forced one; we
    # make the first 50,000 random as documented. That single step is the only difference.
    assert reference[49_999] == pytest.approx(1.0 - 0.9 * 49_999 / 1e6)
    assert epsilon_at(seed, 49_999) == 1.0


def test_flags_override_the_preset():
    config = parse_args(["--preset", "cartpole", "--num-actors", "3", "--gamma", "0.9",
                         "--mlp-hidden-units", "32", "16"])
    assert config.env == "CartPole-v1" and config.num_actors == 3
    assert config.gamma == 0.9 and config.mlp_hidden_units == (32, 16)


def test_every_field_is_a_flag_in_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for name in Config.__dataclass_fields__:
        assert f"--{name.replace('_', '-')}" in text


@pytest.mark.parametrize("argv, needle", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--num-actors", "0"], "--num-actors must be positive"),
    (["--num-actors", "-2"], "--num-actors must be positive"),
    (["--gamma", "abc"], "invalid float value: 'abc'"),
    (["--batch-size", "1.5"], "invalid int value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--gamma", "1.5"], "--gamma must be in [0, 1]"),
    (["--target-sync-updates", "10", "--learner-batches-per-call", "4"], "multiple"),
    (["--n-step", "0"], "--n-step must be positive"),
    (["--replay-shards", "0"], "--replay-shards must be positive"),
    (["--priority-exponent", "-1"], "--priority-exponent must be in [0, 1]"),
    (["--initial-priority", "td"], "invalid choice: 'td'"),
    (["--epsilon-ladder-base", "0"], "--epsilon-ladder-base must be in (0, 1]"),
    (["--importance-exponent", "2"], "--importance-exponent must be in [0, 1]"),
    # NaN fails every comparison, so each rule is checked as what must hold, not what must not.
    (["--priority-exponent", "nan"], "--priority-exponent must be finite, got nan"),
    (["--epsilon-ladder-exponent", "nan"], "--epsilon-ladder-exponent must be finite"),
    (["--learner-gpus", "nan"], "--learner-gpus must be finite"),
    (["--learning-rate", "inf"], "--learning-rate must be finite, got inf"),
    (["--report-every-s", "inf"], "--report-every-s must be finite"),
    (["--gamma=-inf"], "--gamma must be finite"),
    (["--chunk-transitions", "200000"], "--chunk-transitions (200000) exceeds --replay-capacity"),
    (["--batch-size", "64", "--replay-capacity", "32", "--min-replay-size", "8"],
     "--batch-size (64) exceeds --replay-capacity (32)"),
    (["--replay-capacity", str(2**31)], "--replay-capacity must be positive and below 2**31"),
    (["--total-agent-steps", str(2**63)], "--total-agent-steps must be at most"),
    (["--logdir", ""], "--logdir must not be empty"),
    (["--checkpoint-dir", " "], "--checkpoint-dir must not be empty"),
    (["--mlp-hidden-units", "64", "0"], "--mlp-hidden-units must be positive widths"),
    (["--eval-epsilon", "1.5"], "--eval-epsilon must be in [0, 1]"),
    # Each knob's range is what its consumers take (ALE's int32 seeds, time.sleep, Ray, ...).
    (["--seed", "-1"], "--seed must be in [0, 2**30), got -1"),
    (["--seed", "4294967296"], "--seed must be in [0, 2**30), got 4,294,967,296"),
    (["--seed", str(2**30)], "--seed must be in [0, 2**30)"),
    (["--report-every-s", "1e300"],
     "--report-every-s must be positive and at most 31,536,000 s (a year), got 1e+300"),
    (["--checkpoint-every-s", "1e10"], "--checkpoint-every-s must be positive and at most"),
    (["--placement-timeout-s", "-1"], "--placement-timeout-s must be >= 0 and at most"),
    (["--max-seconds", "1e300"], "--max-seconds must be positive and at most"),
    (["--priority-exponent", "10"], "--priority-exponent must be in [0, 1], got 10.0"),
    (["--num-actors", "1000000"], "--num-actors must be positive and at most 10,000"),
    (["--envs-per-actor", str(2**62)], "--envs-per-actor must be positive and at most 10,000"),
    (["--eval-episodes", str(2**62)], "--eval-episodes must be positive and at most 10,000"),
    (["--n-step", str(2**62)], "--n-step (4,611,686,018,427,387,904) exceeds "
                               "--max-episode-agent-steps (10,000)"),
    (["--replay-shards", "5001"], "--replay-shards must be positive and at most 5,000"),
    (["--learner-gpus", "1e300"], "--learner-gpus must be 0 or in [0.0001, 16]"),
    (["--learner-gpus", "0.00001"], "--learner-gpus must be 0 or in [0.0001, 16]"),
    (["--max-episode-agent-steps", str(2**29)], "--max-episode-agent-steps must be positive "
                                                "and at most 100,000,000"),
    (["--learning-rate", "1e300"], "--learning-rate must be positive and a float32"),
    (["--samples-per-insert", "1e-300"], "--samples-per-insert must be in [0.0001, 10,000]"),
    (["--samples-per-insert-tolerance", "1e300"], "--samples-per-insert-tolerance must be"),
    (["--batch-size", "4096", "--learner-batches-per-call", "512", "--replay-capacity",
      "100000"], "--batch-size x --learner-batches-per-call (4,096 x 512) exceeds one "
                 "replay call's 1,048,576 items"),
    (["--actor-threads", str(2**62)], "--actor-threads must be positive and at most 1,024"),
    (["--frame-stack", str(2**40)], "--frame-stack must be positive and at most 1,024"),
    (["--learner-precision", "float64"], "invalid choice: 'float64'"),
    (["--xla", "maybe"], "invalid choice: 'maybe'"),
    (["--no-xla"], "unrecognized arguments: --no-xla"),  # the flag of before: now --xla off
])
def test_bad_flags_exit_2_with_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_config_rejects_a_tolerance_that_would_deadlock():
    with pytest.raises(ConfigError, match="deadlock"):
        Config(chunk_transitions=64, samples_per_insert=8, samples_per_insert_tolerance=100)


def test_launch_rejects_unknown_env_before_starting_anything():
    result = subprocess.run([sys.executable, "launch.py", "--env", "NoSuchGame-v0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "unknown env id 'NoSuchGame-v0'" in result.stderr
    assert "Started a local Ray" not in result.stderr + result.stdout


def test_launch_reports_an_address_nobody_answers_quickly():
    import socket
    with socket.socket() as probe:  # a free loopback port: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = subprocess.run([sys.executable, "launch.py", "--address", f"127.0.0.1:{port}"],
                            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert f"no Ray cluster answers at --address 127.0.0.1:{port}" in result.stderr
    assert result.stderr.strip().count("\n") == 0


def saved_run(tmp_path, config):
    import json

    from common.config import config_to_json
    (tmp_path / "config.json").write_text(json.dumps(config_to_json(config)))
    return str(tmp_path)


def test_resume_takes_the_saved_config_and_only_flags_that_may_change(tmp_path, capsys):
    saved = parse_args(["--preset", "cartpole", "--gamma", "0.95", "--mlp-hidden-units", "64",
                        "--max-seconds", "30"])
    run_dir = saved_run(tmp_path, saved)
    resumed = parse_args(["--resume", run_dir, "--max-seconds", "90", "--num-actors", "3",
                          "--total-agent-steps", "5000"])
    assert resumed == saved.replace(max_seconds=90.0, num_actors=3, total_agent_steps=5000,
                                    resume=run_dir, logdir=run_dir)
    assert parse_args(["--resume", run_dir]).gamma == 0.95
    # The first sitting's time limit was that sitting's; the run's step limit carries on.
    assert parse_args(["--resume", run_dir]).max_seconds is None
    for flag in (["--gamma", "0.9"], ["--preset", "seed"], ["--replay-capacity", "10"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(["--resume", run_dir, *flag])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{flag[0]} cannot change when a run is resumed" in err


def test_resume_from_a_bucket_reads_its_config_there_into_a_new_run_directory(
        s3_bucket, monkeypatch, capsys):
    """What is left when the head and its disk are gone: the checkpoint store's URI."""
    from common.checkpoints import CheckpointStore
    from common.config import config_to_json
    for name, value in s3_bucket.env.items():
        monkeypatch.setenv(name, value)
    root = s3_bucket.uri(f"config-{os.getpid()}")
    saved = parse_args(["--preset", "cartpole", "--gamma", "0.95", "--checkpoint-dir", root,
                        "--logdir", "/lost/head/run"])
    CheckpointStore(root).write_json("config.json", config_to_json(saved))
    resumed = parse_args(["--resume", root, "--logdir", "runs/again", "--num-actors", "3"])
    assert resumed == saved.replace(resume=root, logdir="runs/again", num_actors=3,
                                    max_seconds=None)
    assert parse_args(["--resume", root]).logdir is None  # a new runs/<preset>-<time>
    for argv, needle in [
        (["--resume", root, "--gamma", "0.9"], "--gamma cannot change when a run is resumed"),
        (["--resume", f"{root}-missing"], f"{root}-missing/config.json: cannot be read"),
        (["--resume", "s3:/bucket/run"], "--resume 's3:/bucket/run': give a local path, "
                                         "file:///path, s3://bucket/path or gs://bucket/path"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err


def test_the_learner_precision_and_compile_mode_are_auto_unless_given(tmp_path):
    assert (Config().learner_precision, Config().xla) == ("auto", "auto")
    config = parse_args(["--learner-precision", "bfloat16", "--xla", "off"])
    assert (config.learner_precision, config.xla) == ("bfloat16", "off")
    # A checkpoint restores into every precision and compile mode: both may change on resume.
    resumed = parse_args(["--resume", saved_run(tmp_path, config), "--learner-precision",
                          "float32", "--xla", "on"])
    assert (resumed.learner_precision, resumed.xla) == ("float32", "on")


def test_a_run_config_from_before_the_precision_knob_keeps_what_it_trained_with(tmp_path,
                                                                              capsys):
    """Its `mixed_precision` (None meant float32 on the CPUs such runs trained on) and
    boolean `xla` read as today's knobs, as evaluate.py and --resume read them."""
    import json

    from common.config import read_run_config
    shipped = ROOT / "pretrained" / "breakout-seed"
    saved = json.loads((shipped / "config.json").read_text())
    assert (saved["config"]["mixed_precision"], saved["config"]["xla"]) == (None, True)
    config = read_run_config(str(shipped))
    assert (config.learner_precision, config.xla) == ("float32", "on")
    assert parse_args(["--resume", str(shipped)]).learner_precision == "float32"
    for mixed, xla, expected in [(True, False, ("float16", "off")),
                                 (False, True, ("float32", "on"))]:
        saved["config"].update(mixed_precision=mixed, xla=xla)
        (tmp_path / "config.json").write_text(json.dumps(saved))
        config = read_run_config(str(tmp_path))
        assert (config.learner_precision, config.xla) == expected
    saved["config"]["mixed_precision"] = 1
    (tmp_path / "config.json").write_text(json.dumps(saved))
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--resume", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "config.json: mixed_precision holds 1, not a bool" in err


@pytest.mark.parametrize("content, needle", [
    (None, "config.json: cannot be read"),
    (b"\x00\x01", "config.json: not JSON"),
    (b'{"format": "other", "config": {}}', "config.json: not a run config of this project"),
    (b'{"format": "dqn-run-config", "config": {"preset": "seed", "warp": 9}}',
     "config.json: unknown field 'warp'"),
    (b'{"format": "dqn-run-config", "config": {"preset": "seed", "gamma": "high"}}',
     "config.json: gamma holds 'high', not a float"),
    (b'{"format": "dqn-run-config", "config": {"preset": "seed", "batch_size": -4}}',
     "config.json: --batch-size must be positive"),
    (b'{"format": "dqn-run-config", "config": {"preset": "seed", "xla": "fast"}}',
     "config.json: --xla must be one of auto, on, off, got 'fast'"),
])
def test_a_bad_run_config_is_refused_with_one_line(tmp_path, capsys, content, needle):
    if content is not None:
        (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--resume", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def numeric_knobs() -> list:
    """Config's knobs that hold numbers (or widths), as (field, kind)."""
    import dataclasses
    kinds = {"int": int, "float": float, "tuple[int, ...]": tuple}
    return [(f, kinds[f.type.replace(" | None", "")]) for f in dataclasses.fields(Config)
            if f.type.replace(" | None", "") in kinds]


# Each kind's values that some consumer cannot take: beyond int64, time.sleep's range or
# float32, negative, not finite.
HOSTILE = {int: [2**62, 2**63, 10**30, -1, -(2**63)],
           float: [1e300, 1e20, -1.0, -1e300, float("nan"), float("inf"), float("-inf"), 1e-320],
           tuple: [(2**62,), (65537,), (-1,), (0,), ()]}


# Knobs whose consumers take any finite value: a return only compared, and the exponent of a
# base in (0, 1] (epsilon_ladder).
ANY_FINITE = {"target_mean_return", "epsilon_ladder_exponent"}
# Knobs the learner's optimizer holds as float32.
FLOAT32 = {"learning_rate", "grad_clip_norm"}


def test_every_numeric_knob_has_a_rule():
    """A new knob without a range fails here: its consumers' range must be decided."""
    assert len(numeric_knobs()) > 30
    for f, _kind in numeric_knobs():
        assert f.metadata["rule"] is not None, f"--{f.name.replace('_', '-')} has no rule"


def test_every_numeric_knob_refuses_what_its_consumers_cannot_take():
    """Huge, negative and non-finite values of every numeric knob: refused naming the flag,
    or accepted only where every consumer takes them (int64 counts, sleeps and waits below
    threading.TIMEOUT_MAX, negative numbers only where they are merely compared)."""
    import threading
    seed = PRESETS["seed"]
    for f, kind in numeric_knobs():
        name = f"--{f.name.replace('_', '-')}"
        for value in HOSTILE[kind]:
            try:
                seed.replace(**{f.name: value})
            except ConfigError as error:
                assert name in str(error), (name, value, str(error))
                continue
            assert kind is not tuple and math.isfinite(value), (name, value)
            assert value >= 0 or f.name == "target_mean_return", (name, value)
            if f.name in FLOAT32:  # as the optimizer holds it
                assert 0 < np.float32(value) < np.inf, (name, value)
            elif f.name not in ANY_FINITE:
                assert value <= MAX_COUNT, (name, value)  # int64 counters, checkpoints, metrics
            if f.name.endswith("_s"):
                assert value <= threading.TIMEOUT_MAX, (name, value)
    # What the ladder's exponent becomes, whatever its size: an epsilon.
    apex = PRESETS["apex"].replace(epsilon_ladder_exponent=1e300)
    assert [epsilon_ladder(apex, i, 3) for i in range(3)] == [0.4, 0.0, 0.0]


def test_every_derived_seed_stays_in_ales_range():
    """ALE's vector env takes int32 seeds: the largest base, actor, env, evaluator and
    resumed-sitting offsets together stay below 2**31 (strides as actors/actor.py,
    actors/evaluator_service.py and launch.py derive them)."""
    import types

    from actors.env_batch import EnvBatch
    from actors.evaluator import Evaluator
    from actors.evaluator_service import EVALUATOR_SEED_OFFSET
    from common.config import MAX_ACTORS, MAX_ENVS, SEED_LIMIT
    from launch import sitting_seed
    base = SEED_LIMIT - 1
    assert parse_args(["--seed", str(base)]).seed == base
    # Every sitting plays other games, from a base within the range.
    sittings = [sitting_seed(base, sitting) for sitting in (*range(1, 2_000), 2**40)]
    assert len(set(sittings)) == len(sittings) and max(sittings) < SEED_LIMIT
    PRESETS["seed"].replace(seed=max(sittings))  # what launch.py makes the roles' config
    actor_env = 10_000 * MAX_ACTORS + MAX_ENVS - 1  # actor MAX_ACTORS - 1's last env
    evaluator = EVALUATOR_SEED_OFFSET + 7_919 * (2**16 - 1) + MAX_ENVS - 1
    largest = SEED_LIMIT - 1 + max(actor_env, evaluator)
    assert largest < 2**31
    # However many evaluations one evaluator plays, its offset stays within that bound.
    playing = types.SimpleNamespace(seed=0, evaluations=2**40 - 1)
    assert Evaluator.last_seed.fget(playing) <= 7_919 * (2**16 - 1)
    # The consumer: ALE's envs take the largest (env j of a batch plays seed + j), not 2**31.
    EnvBatch("BreakoutNoFrameskip-v4", 2, largest - 1, 100).reset()
    with pytest.raises(TypeError):
        EnvBatch("BreakoutNoFrameskip-v4", 2, 2**31 - 1, 100).reset()


def machine_check(argv: list[str], cpus: int, memory_gib: float, capsys) -> str | None:
    """The line check_fits_this_machine ends a local launch with, or None when it passes."""
    from common.envs import describe_env
    from launch import check_fits_this_machine
    config = parse_args(argv)
    info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    try:
        check_fits_this_machine(config, info, cpus, int(memory_gib * 2**30))
    except SystemExit as exit_info:
        assert exit_info.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        return err
    return None


def test_a_local_run_is_checked_against_the_machines_cpus_and_memory(capsys):
    """Sizes the config alone cannot judge, refused before a local Ray starts."""
    assert machine_check([], 2, 24, capsys) is None
    assert machine_check(["--preset", "apex"], 2, 24, capsys) is None
    assert machine_check(["--preset", "cartpole", "--num-actors", "14"], 2, 24, capsys) is None
    assert machine_check(["--preset", "cartpole", "--replay-shards", "1000"], 2, 24, capsys) == (
        "launch.py: error: the run needs 1,003 processes (learner 1, replay shards 1,000, "
        "actors 2) and this machine's 2 CPUs take at most 16 (8 a CPU)\n")
    assert "(8 a CPU; --num-actors 14 fits)" in machine_check(
        ["--preset", "cartpole", "--num-actors", "15"], 2, 24, capsys)
    wide = machine_check(["--preset", "cartpole", "--mlp-hidden-units", "65536", "65536",
                          "65536"], 2, 24, capsys)
    assert wide.startswith("launch.py: error: the run needs ~288.0 GiB and this machine has "
                           "24.0 GiB: ") and "networks (8,590,524,418 weights x 9 copies)" in wide
    envs = machine_check(["--envs-per-actor", "10000"], 2, 24, capsys)
    assert "envs (2 actors x --envs-per-actor 10,000 + --eval-episodes 10) 39.1 GiB" in envs
    replay = machine_check(["--replay-capacity", "2000000000"], 64, 256, capsys)
    assert "replay (--replay-capacity 2,000,000,000 x 1 shard(s))" in replay


def test_messages_larger_than_the_wire_takes_are_refused_before_ray_starts(capsys):
    """A chunk or a learner call whose message could pass 2 GiB: the shard would refuse every
    insert, or fail every sample, inside a running cluster."""
    from common.envs import describe_env
    from launch import check_messages_fit

    def refusal(argv: list[str]) -> str | None:
        config = parse_args(argv)
        info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
        try:
            check_messages_fit(config, info)
        except SystemExit as exit_info:
            assert exit_info.code == 2
            return capsys.readouterr().err
        return None

    for preset in PRESETS:
        assert refusal(["--preset", preset]) is None
    assert refusal(["--chunk-transitions", "100000", "--replay-capacity", "2000000"]) == (
        "launch.py: error: an actor's insert may take 5.3 GiB, more than the 2 GiB a message "
        "may: lower --chunk-transitions or --envs-per-actor\n")
    assert refusal(["--batch-size", "300000", "--replay-capacity", "2000000"]) == (
        "launch.py: error: a learner call's batch may take 31.5 GiB, more than the 2 GiB a "
        "message may: lower --batch-size or --learner-batches-per-call\n")


def test_the_network_is_counted_as_keras_builds_it():
    from common.envs import describe_env
    from common.networks import build_q_network
    from launch import network_parameters
    for preset in ("cartpole", "seed"):
        for dueling in (False, True):
            config = PRESETS[preset].replace(dueling=dueling)
            info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
            built = build_q_network(info.obs_shape, info.num_actions, config.mlp_hidden_units,
                                    dueling)
            assert network_parameters(config, info) == built.count_params()


def test_launch_refuses_bad_values_and_sizes_before_ray_starts(tmp_path):
    """As a user sees it: one line, exit 2, no run directory, and too quick for a Ray start
    (that takes seconds before the roles' failures would come)."""
    import time
    cpus = os.cpu_count() or 1
    for flags, line in [
            (["--seed", "-1"], "launch.py: error: --seed must be in [0, 2**30), got -1"),
            (["--preset", "cartpole", "--replay-shards", "5000"],
             "launch.py: error: the run needs 5,003 processes (learner 1, replay shards "
             f"5,000, actors 2) and this machine's {cpus} CPUs take at most {8 * cpus:,} "
             "(8 a CPU)")]:
        started = time.monotonic()
        result = subprocess.run([sys.executable, "launch.py", *flags, "--logdir",
                                 str(tmp_path / "run")], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert (result.returncode, result.stderr, result.stdout) == (2, line + "\n", "")
        assert time.monotonic() - started < 10 and not (tmp_path / "run").exists()


def test_help_gives_each_bounded_knobs_range(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    helps: dict[str, str] = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("  --"):  # an option's first line; its help goes on below it
            flag = line.split()[0][2:].split(",")[0]
            helps[flag] = ""
        if helps:
            helps[flag] += " " + " ".join(line.split())
    for flag, bound in [
            ("seed", "[0, 2**30)"), ("priority-exponent", "[0, 1]"),
            ("importance-exponent", "to 1"), ("report-every-s", "at most a year"),
            ("max-seconds", "at most a year"), ("checkpoint-every-s", "at most a year"),
            ("role-timeout-s", "at most a year"), ("eval-every-s", "at most a year"),
            ("placement-timeout-s", "at most a year"), ("num-actors", "at most 10,000"),
            ("num-actors", "8 processes a CPU"), ("envs-per-actor", "at most 10,000"),
            ("eval-episodes", "at most 10,000"), ("replay-shards", "at most 5,000"),
            ("learner-gpus", "up to 16"), ("n-step", "at most --max-episode-agent-steps"),
            ("max-episode-agent-steps", "at most 10**8"), ("frame-stack", "at most 1,024"),
            ("actor-threads", "at most 1,024"), ("mlp-hidden-units", "[1, 65536]"),
            ("learning-rate", "float32"), ("grad-clip-norm", "float32"),
            ("samples-per-insert", "[0.0001, 10,000]"),
            ("samples-per-insert-tolerance", "at most 2**62"),
            ("learner-batches-per-call", "at most 2**20")]:
        assert bound in helps[flag], (flag, helps[flag])
