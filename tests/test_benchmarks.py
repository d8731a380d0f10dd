"""The benchmark scripts run (their quick modes: a check that they work, not measurements)."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


def quick_figures(script: str, ray_address: str, *flags, cwd=ROOT, timeout=600,
                  env=None) -> dict:
    """The JSON line a benchmark script ends with, run in its quick mode on the test Ray."""
    try:
        result = subprocess.run(
            [sys.executable, f"benchmarks/{script}", "--quick", "--address", ray_address,
             *flags], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired as expired:  # say where it was
        pytest.fail(f"{script} ran past {timeout} s; its output so far:\n"
                    f"{tail(expired.stdout)}\n{tail(expired.stderr)}")
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def tail(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        output = output.decode(errors="replace")
    return (output or "")[-3000:]


def test_replay_benchmark_quick_mode_prints_its_figures(ray_address):
    figures = quick_figures("replay.py", ray_address, timeout=240)
    for name in ("bytes_per_transition", "insert_transitions_per_s", "sample_batches_per_s",
                 "sampler_ops_per_s", "snapshot_s_per_100k", "restore_s_per_100k"):
        assert figures[name] > 0, name
    assert figures["quick"] is True


def copy_of_project(folder):
    """The project's files alone in `folder` (nothing beside them), as a user's clone is."""
    clone = folder / "clone"
    shutil.copytree(ROOT, clone, ignore=shutil.ignore_patterns(
        ".git", "runs", "__pycache__", "*.egg-info", ".pytest_cache"))
    return clone


def test_throughput_benchmark_quick_mode_prints_its_figures(ray_address, tmp_path):
    user_env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    clone = copy_of_project(tmp_path)
    figures = quick_figures("throughput.py", ray_address, "--num-actors", "2",
                            "--envs-per-actor", "8", cwd=clone, env=user_env)
    assert figures["quick"] is True
    # The single-process baseline is the project's own, run from the copy.
    assert figures["seed_script"] == str(clone / "benchmarks" / "single_process.py")
    for name in ("raw_env_agent_steps_per_s", "acting_agent_steps_per_s", "acting_ratio",
                 "bare_updates_per_s", "system_updates_per_s", "learner_ratio",
                 "seed_agent_steps_per_s", "system_agent_steps_per_s", "speedup_vs_seed",
                 "old_default_agent_steps_per_s", "speedup_vs_old_default",
                 "acting_float32_agent_steps_per_s"):
        assert figures[name] > 0, name
    assert set(figures["targets_met"]) == {"acting_ratio", "learner_ratio", "speedup_vs_seed",
                                           "speedup_vs_old_default"}
    # The old default ran as it was; the system as --learner-precision/--xla/--actor-precision
    # auto chose on this machine, and every train-step mode was timed beside it.
    assert [(run["compute"]["learner_precision"], run["compute"]["learner_xla"],
             run["compute"]["actor_precision"]) for run in figures["baselines"]["old_default"]] \
        == [("float32", True, "float32")] * 2
    chosen = figures["system_compute"]
    rates = chosen["learner_compile_updates_per_s"]
    assert chosen["learner_xla"] == (rates["xla"] >= rates["plain"])
    modes = {(row["precision"], row["xla"]): row["updates_per_s"]
             for row in figures["learner_modes"]}
    assert {("float32", True), ("float32", False), (chosen["learner_precision"], True),
            (chosen["learner_precision"], False)} == set(modes) and min(modes.values()) > 0
    # Each actor times its own choice: at 8 envs, under load, they may differ.
    for compute in (chosen, figures["acting_compute"]):
        assert set(compute["actor_precision"].split(", ")) <= {"float32",
                                                               chosen["learner_precision"]}
    assert figures["acting_cpus_busy"]["actors"] > 0
    assert 0 <= figures["system_learner_starved_fraction"] <= 1
    # Each baseline ran before and after the run it is the other side of; the ratios divide
    # by their mean.
    raw_runs = figures["baselines"]["around_acting"]
    learner_runs = figures["baselines"]["around_system"]
    assert all(run["raw_env_agent_steps_per_s"] > 0 for run in raw_runs.values())
    mean_raw = sum(raw_runs[when]["raw_env_agent_steps_per_s"] for when in raw_runs) / 2
    assert abs(figures["raw_env_agent_steps_per_s"] - mean_raw) < 0.1
    mean_bare = sum(learner_runs[when]["bare_updates_per_s"] for when in learner_runs) / 2
    assert abs(figures["bare_updates_per_s"] - mean_bare) < 0.01
    # The seed's rate leaves out its steps before training starts, which the printed one has.
    assert all(0 < run["seed_agent_steps_per_s"] < run["seed_printed_agent_steps_per_s"]
               for run in learner_runs.values())
    # The project turns oneDNN on for itself; the seed runs with the user's environment.
    assert figures["tf_enable_onednn_opts"] == {"project": "1", "seed": None}


def test_recovery_benchmark_quick_mode_prints_its_figures(ray_address):
    figures = quick_figures("recovery.py", ray_address)
    assert figures["quick"] is True and figures["replay_transitions"] == 2_000
    for name in ("actor_back_s", "shard_back_s", "learner_back_s", "checkpoint_s",
                 "checkpoint_mb", "resume_s"):
        assert figures[name] > 0, name
    assert figures["checkpoint_updates_during"] >= 0
    assert 0 <= figures["shard_transitions_lost"]
    assert 0 < figures["shard_transitions_at_last_checkpoint"] <= 2_000
    assert set(figures["targets_met"]) == {"actor_back_s", "shard_back_s", "learner_back_s",
                                           "checkpoint_s"}


def test_learning_benchmark_trains_resumes_evaluates_and_plots(ray_address, tmp_path):
    """CartPole at 20,000 agent steps: one sitting stopped by --max-seconds short of
    the goal, then the same command resumes it to the goal, plays the final evaluations
    (without and with sticky actions) and writes the curve; a third sitting's goal is hours
    of training (the equal wall-clock comparison), a few seconds past the run's."""
    run_dir = tmp_path / "run"
    # Out of reach of the first sitting's one second, and of what the actors play while the
    # learner starts (times its compile modes): the rate limiter holds them to a few thousand
    # agent steps until it samples.
    goal_steps = 20_000

    def learning(*flags, goal=("--agent-steps", str(goal_steps))) -> dict:
        result = subprocess.run(
            [sys.executable, "benchmarks/learning.py", str(run_dir), "--preset", "cartpole",
             *goal, "--final-episodes", "2", *flags], cwd=ROOT,
            capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first = learning("--max-seconds", "1", "--address", ray_address, "--num-actors", "2",
                     "--eval-every-s", "1")
    assert not first["done"] and "final_eval" not in first, first
    second = learning("--address", ray_address)
    assert second["done"] and second["agent_steps"] >= goal_steps, second
    assert json.loads((run_dir / "summary.json").read_text())["sitting"] == 2, second
    finals = second["final_eval"]
    assert finals["no_sticky"]["episodes"] == finals["sticky_0.25"]["episodes"] == 2
    assert finals["sticky_0.25"]["sticky_actions"] == 0.25
    saved = json.loads((run_dir / "learning.json").read_text())
    steps = saved["curve"]["train"]["agent_steps"]
    assert steps == sorted(steps) and steps[-1] >= goal_steps - 1_000, steps
    assert (run_dir / "curve.png").stat().st_size > 10_000
    hours = second["run_hours"] + 5 / 3600
    third = learning("--address", ray_address,
                     goal=("--hours", str(hours), "--agent-steps", "1000000"))
    assert third["done"] and third["run_hours"] >= round(hours, 3) - 0.001, third
    assert third["agent_steps"] > second["agent_steps"] and "final_eval" in third, third


def test_soak_benchmark_quick_mode_prints_its_figures(ray_address):
    figures = quick_figures("soak.py", ray_address, timeout=300)
    assert figures["quick"] is True
    assert {"learner", "replay", "actor", "evaluator"} <= set(figures["rss_mb"])
    assert all(sizes[when] > 50 for sizes in figures["rss_mb"].values()
               for when in ("at_full", "warm", "end"))
    # RSS in its parts (private heap, mapped object store pages): neither exceeds the whole.
    for role, sizes in figures["rss_mb"].items():
        for when in ("at_full", "warm", "end"):
            heap, shared = figures["anon_mb"][role][when], figures["shmem_mb"][role][when]
            assert 0 < heap and 0 <= shared and heap + shared <= sizes[when], (role, when)
    for figure in ("rss_growth_pct_after_full", "rss_growth_pct_after_warm",
                   "rss_growth_pct_second_half", "anon_growth_pct_after_warm"):
        assert set(figures[figure]) == set(figures["rss_mb"]), figure
    # The evaluator is warm only once it has played; every sample is kept for a closer look.
    series = json.loads(Path(figures["series"]).read_text())
    assert len(series) >= 10 and all(s["t"] > 0 for s in series)
    assert any("evaluator" in s for s in series)
    # ... with who used the CPU: every role, the launcher and the machine (here Ray is joined,
    # so Ray's own processes are not the launcher's). At shutdown the roles exit one by one.
    running = [s["cpu_s"] for s in series if {"learner", "replay", "actor"} <= set(s["cpu_s"])]
    assert len(running) >= len(series) // 2
    cpu = running[-1]
    assert {"launcher", "machine"} <= set(cpu)
    assert cpu["machine"] >= cpu["learner"] > 0 and cpu["actor"] > 0
    assert set(figures["targets_met"]) == {"rss_growth_pct_after_warm", "rate"}
    assert figures["agent_steps_per_s_last"] > 0 and figures["updates"] > 0
