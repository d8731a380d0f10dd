"""Does it learn, and how does it compare with Dopamine's DQN: a learning curve, resumable.

    python benchmarks/learning.py RUNDIR [--preset seed] [--agent-steps 1000000 | --hours H]
                                         [--max-seconds S] [--final-episodes 30] [launch flags]

Trains `--preset` to `--agent-steps` agent steps in RUNDIR with the evaluator on
(`launch.py --total-agent-steps`), or for `--hours` of training over all sittings (to compare
presets at equal wall-clock; an `--agent-steps` given with it is a cap: whichever comes
first). Run again with the same RUNDIR, it resumes from the latest checkpoint (so hours of
training can span sittings: stop it with Ctrl-C or `--max-seconds`). Once the run has its
agent steps (or hours), the final weights play `--final-episodes` episodes at epsilon 0.05
twice, without and with sticky actions 0.25 (the protocol of Dopamine's published numbers),
and the curve is drawn beside Dopamine's DQN (`plot.py`). Writes RUNDIR/learning.json (the
curve points: agent steps, wall-clock hours, training return, evaluation return; the final
evaluations) and RUNDIR/curve.png, and ends with one JSON line.
Flags it does not know go to `launch.py` on the first sitting (e.g. `--num-actors 4`).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import plot  # noqa: E402

STICKY_PROTOCOL = 0.25  # Machado et al. 2018, Dopamine's default for its published curves


def train(run_dir: Path, args: argparse.Namespace, launch_flags: list[str]) -> dict:
    """One sitting of launch.py, resumed when the run exists; its summary."""
    limits = [] if args.agent_steps is None else ["--total-agent-steps", str(args.agent_steps)]
    seconds = [args.max_seconds] if args.max_seconds is not None else []
    if args.hours is not None:
        seconds.append(args.hours * 3600 - trained_seconds(run_dir))
    if seconds:
        limits += ["--max-seconds", str(max(1.0, min(seconds)))]
    if (run_dir / "config.json").exists():
        command = ["--resume", str(run_dir), *limits]
    else:
        command = ["--preset", args.preset, "--logdir", str(run_dir), *limits, *launch_flags]
    result = subprocess.run([sys.executable, "launch.py", *command], cwd=ROOT)
    summary = read_summary(run_dir)
    if result.returncode != 0 or summary is None:
        raise SystemExit(f"learning.py: launch.py exited {result.returncode}")
    return summary


def read_summary(run_dir: Path) -> dict | None:
    """The summary launch.py wrote at the end of the run's last sitting, if any."""
    summary_path = run_dir / "summary.json"
    return json.loads(summary_path.read_text()) if summary_path.exists() else None


def trained_seconds(run_dir: Path) -> float:
    """Seconds of training in the run's sittings so far."""
    summary = read_summary(run_dir)
    return summary["run_seconds"] if summary is not None else 0.0


def reached_goal(summary: dict, args: argparse.Namespace) -> bool:
    steps_done = args.agent_steps is not None and summary["agent_steps"] >= args.agent_steps
    hours_done = args.hours is not None and summary["run_seconds"] >= args.hours * 3600
    return steps_done or hours_done


def final_evaluation(run_dir: Path, episodes: int, sticky: float | None) -> dict:
    flags = ["--episodes", str(episodes)]
    if sticky is not None:
        flags += ["--sticky-actions", str(sticky)]
    result = subprocess.run([sys.executable, "evaluate.py", str(run_dir), *flags], cwd=ROOT,
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"learning.py: evaluate.py failed: {result.stderr.strip()}")
    report = json.loads(result.stdout)
    return {name: report[name] for name in ("mean", "std", "episodes", "sticky_actions")}


def curve_points(run_dir: Path) -> dict:
    curves = plot.read_curves(run_dir)
    rounded = lambda values: [round(float(v), 4) for v in values]  # noqa: E731
    return {"train": {"agent_steps": [int(s) for s in curves["train_steps"]],
                      "hours": rounded(curves["train_hours"]),
                      "return_100": rounded(curves["train_return"])},
            "eval": {"agent_steps": [int(s) for s in curves["eval_steps"]],
                     "hours": rounded(curves["eval_hours"]),
                     "return_mean": rounded(curves["eval_mean"]),
                     "return_std": rounded(curves["eval_std"])}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--agent-steps", type=int, default=None,
                        help="train to this many agent steps (default 1,000,000 without "
                             "--hours; with it, a cap)")
    parser.add_argument("--hours", type=float, default=None,
                        help="train for this many hours, all sittings together")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="end this sitting after this long (resume later)")
    parser.add_argument("--final-episodes", type=int, default=30)
    args, launch_flags = parser.parse_known_args()
    if args.agent_steps is None and args.hours is None:
        args.agent_steps = 1_000_000
    summary = train(args.run_dir, args, launch_flags)
    done = reached_goal(summary, args)
    result = {"run_dir": str(args.run_dir), "preset": summary["preset"],
              "agent_steps": summary["agent_steps"], "done": done,
              "run_hours": round(summary["run_seconds"] / 3600, 3),
              "agent_steps_per_s": summary["agent_steps_per_s"],
              "train_return_100": summary["mean_return_100"],
              "eval_return_mean": summary.get("eval_return_mean", {})}
    if done:
        result["final_eval"] = {
            "no_sticky": final_evaluation(args.run_dir, args.final_episodes, 0.0),
            "sticky_0.25": final_evaluation(args.run_dir, args.final_episodes, STICKY_PROTOCOL)}
    try:
        curve = curve_points(args.run_dir)
    except plot.RunDirError:  # a first sitting too short for a progress line
        curve, png = None, None
    else:
        png = args.run_dir / "curve.png"
        subprocess.run([sys.executable, "plot.py", str(args.run_dir), "-o", str(png)],
                       cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    (args.run_dir / "learning.json").write_text(
        json.dumps({**result, "curve": curve}, indent=1) + "\n")
    print(json.dumps({**result, "curve_png": png and str(png)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
