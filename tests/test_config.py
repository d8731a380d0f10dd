"""Presets, the epsilon schedule and the command line."""
import subprocess
import sys
from pathlib import Path

import pytest

from actors.actor import epsilon_ladder
from common.config import (
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
    (["--priority-exponent", "-1"], "--priority-exponent must be >= 0"),
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
])
def test_a_bad_run_config_is_refused_with_one_line(tmp_path, capsys, content, needle):
    if content is not None:
        (tmp_path / "config.json").write_bytes(content)
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--resume", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
