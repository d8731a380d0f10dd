"""Agent steps/s of `python launch.py` (seed preset) next to the seed script, same sitting.

    python benchmarks/seed_vs_launch.py [--seconds 60] [--num-actors N]

Runs the keras.io seed script (shared/seed/seed_dqn_restored.py, beside this checkout) for
`--seconds`, the seed preset's train step alone for up to 20 s, then `launch.py` for
`--seconds`, one after the other on the same machine, and prints the figures and the ratio,
ending with one JSON line. The launcher's figure is the whole
run's average from summary.json, start-up of the actors included (a conservative number).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SEED_SCRIPT = ROOT.parent / "shared" / "seed" / "seed_dqn_restored.py"


def run_seed(seconds: float) -> dict:
    out = subprocess.run([sys.executable, str(SEED_SCRIPT), str(seconds)], capture_output=True,
                         text=True, check=True, timeout=seconds + 300).stdout
    fields = dict(re.findall(r"(\w+)=([\d.]+)", out.strip().splitlines()[-1]))
    return {"agent_steps_per_s": float(fields["agent_steps_per_s"]),
            "updates_per_s": float(fields["updates_per_s"])}


def run_launch(seconds: float, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as logdir:
        subprocess.run([sys.executable, str(ROOT / "launch.py"), "--max-seconds", str(seconds),
                        "--logdir", logdir, *extra], check=True, timeout=seconds + 300,
                       stdout=subprocess.DEVNULL)
        return json.loads((Path(logdir) / "summary.json").read_text())


def run_bare_learner(seconds: float) -> float:
    """Updates/s of the seed preset's train step alone on a fixed in-memory batch: the bound
    the running system's learner is measured against."""
    import time
    import numpy as np
    sys.path.insert(0, str(ROOT))
    from common.config import PRESETS
    from common.envs import describe_env
    from learner.learner import DQNLearner
    config = PRESETS["seed"]
    info = describe_env(config.env)
    learner = DQNLearner(config, info)
    rng = np.random.default_rng(0)
    shape = (1, config.batch_size)
    batch = {"obs": rng.integers(0, 256, shape + info.obs_shape, dtype=np.uint8),
             "next_obs": rng.integers(0, 256, shape + info.obs_shape, dtype=np.uint8),
             "action": rng.integers(0, info.num_actions, shape).astype(np.int32),
             "reward": rng.normal(size=shape).astype(np.float32),
             "discount": np.full(shape, config.gamma, np.float32)}
    for _ in range(3):  # trace and warm up
        learner.step(batch)
    updates, started = 0, time.monotonic()
    while time.monotonic() - started < seconds:
        learner.step(batch)
        updates += 1
    return updates / (time.monotonic() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--num-actors", type=int, default=None)
    args = parser.parse_args()
    if not SEED_SCRIPT.exists():
        parser.error(f"seed script not found at {SEED_SCRIPT}")
    extra = [] if args.num_actors is None else ["--num-actors", str(args.num_actors)]
    seed = run_seed(args.seconds)
    print(f"seed script: {seed['agent_steps_per_s']:.1f} agent steps/s, "
          f"{seed['updates_per_s']:.2f} updates/s", flush=True)
    bare = run_bare_learner(min(args.seconds, 20.0))
    print(f"learner step alone: {bare:.1f} updates/s", flush=True)
    launch = run_launch(args.seconds, extra)
    print(f"launch.py:   {launch['agent_steps_per_s']:.1f} agent steps/s, "
          f"{launch['updates_per_s']:.2f} updates/s ({launch['num_actors']} actors x "
          f"{launch['envs_per_actor']} envs)", flush=True)
    result = {"seconds": args.seconds,
              "seed_agent_steps_per_s": seed["agent_steps_per_s"],
              "seed_updates_per_s": seed["updates_per_s"],
              "launch_agent_steps_per_s": launch["agent_steps_per_s"],
              "launch_updates_per_s": launch["updates_per_s"],
              "launch_num_actors": launch["num_actors"],
              "bare_learner_updates_per_s": round(bare, 2),
              "speedup_vs_seed": round(launch["agent_steps_per_s"]
                                       / seed["agent_steps_per_s"], 2)}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
