"""Watch a trained agent play: `python evaluate.py RUNDIR|WEIGHTS [--episodes N] [--video out.mp4]`.

Plays `--episodes` whole episodes (one per env, side by side) at `--epsilon` with the network
of a run directory (its latest checkpoint, or its final `q_network.weights.h5`) or of a
`.weights.h5` file with the run's `config.json` beside it (such as the run's
`best.weights.h5`), on the run's own preprocessing, and prints the raw game scores as one
JSON object. `--video out.mp4` also plays one more episode on gymnasium's own wrappers and
writes every frame of it as a person sees the game (full colour, every emulator frame, at the
game's frame rate). `--sticky-actions 0.25` plays with the protocol of Dopamine's published
scores (Machado et al. 2018).
Nothing loaded is unpickled: configs are JSON, weights are HDF5 or TensorFlow tensors.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
from pathlib import Path

from common import checkpoints
from common.checkpoints import CheckpointError, CheckpointStore
from common.config import (
    FINAL_WEIGHTS,
    MAX_ENVS,
    RUN_CONFIG,
    SEED,
    Config,
    ConfigError,
    OneLineErrorParser,
    read_run_config,
)
from common.envs import EnvError, describe_env
from common.process import native_output_hidden

ATARI_FPS = 60
VIDEO_MIN_HEIGHT = 400  # small frames (Atari's 210 rows) are scaled up by a whole factor


class EvaluateError(ValueError):
    """The input cannot be evaluated; the message is the one-line reason."""


def fail(message: str) -> None:
    print(f"evaluate.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="evaluate.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("source", type=Path,
                        help=f"a run directory, or a .weights.h5 file with {RUN_CONFIG} beside it")
    parser.add_argument("--episodes", type=int, default=10, help="episodes to score")
    parser.add_argument("--epsilon", type=float, default=0.05,
                        help="probability of a random action (Nature DQN evaluates at 0.05)")
    parser.add_argument("--sticky-actions", type=float, default=None, metavar="P",
                        help="Atari: repeat the previous action with probability P (0.25 is "
                             "Dopamine's protocol; default: the env id's own)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the games and the policy, in [0, 2**30)")
    parser.add_argument("--video", type=Path, default=None, metavar="OUT.mp4",
                        help="also play one episode and write it as an mp4")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT.json",
                        help="also write the scores to this file")
    args = parser.parse_args(argv)
    if not 1 <= args.episodes <= MAX_ENVS:  # played side by side, an env each
        parser.error(f"--episodes must be in [1, {MAX_ENVS:,}], got {args.episodes:,}")
    if not SEED.holds(args.seed):
        parser.error(f"--seed {SEED.says}, got {args.seed:,}")
    if not 0.0 <= args.epsilon <= 1.0:
        parser.error(f"--epsilon must be in [0, 1], got {args.epsilon}")
    if args.sticky_actions is not None and not 0.0 <= args.sticky_actions <= 1.0:
        parser.error(f"--sticky-actions must be in [0, 1], got {args.sticky_actions}")
    for flag, path, suffix in (("--video", args.video, ".mp4"), ("--json", args.json, ".json")):
        if path is not None and path.suffix.lower() != suffix:
            parser.error(f"{flag} {path}: name it *{suffix}")
        if path is not None and not path.parent.resolve().is_dir():
            parser.error(f"{flag} {path}: directory {path.parent} does not exist")
    return args


# --- What to evaluate ------------------------------------------------------------------------

def resolve_source(source: Path) -> tuple[Config, Path | None, str | None]:
    """(config, weights file, checkpoint root): a run directory's latest checkpoint when it
    has one (a running run has no weights file yet), else its weights file."""
    if source.is_dir():
        run_dir, weights = source, source / FINAL_WEIGHTS
    elif source.is_file():
        run_dir, weights = source.parent, source
        if not source.name.endswith(".weights.h5"):
            raise EvaluateError(f"{source}: not a .weights.h5 file or a run directory")
    else:
        raise EvaluateError(f"{source}: no such file or directory")
    if not (run_dir / RUN_CONFIG).is_file():
        raise EvaluateError(f"{run_dir}: no {RUN_CONFIG} (the network and env to play come "
                            f"from the run's config)")
    config = read_run_config(str(run_dir))
    if source.is_dir():
        from launch import checkpoint_root
        root = checkpoint_root(config, run_dir)
        if CheckpointStore(root).latest() is not None:
            return config, None, root
        if not weights.is_file():
            raise EvaluateError(f"{run_dir}: neither a checkpoint nor {FINAL_WEIGHTS} yet")
    return config, weights, None


def load_network(policy, weights: Path | None, root: str | None) -> str:
    """Loads the weights into `policy`; returns what was loaded, for the report."""
    if weights is not None:
        try:
            policy.load_weights(str(weights))
        except Exception as error:  # h5py and Keras raise many kinds for a bad file
            raise EvaluateError(f"{weights}: not weights of this run's network "
                                f"({first_line(error)})") from None
        return str(weights)
    from common.networks import tf
    assert root is not None  # resolve_source gives weights or a checkpoint root
    store = CheckpointStore(root)
    with store.latest_part(checkpoints.LEARNER) as latest:
        if latest is None:
            raise EvaluateError(f"{store.describe('')}: no checkpoint any more")
        name, folder, passed_over = latest
        prefix = os.path.join(folder, "state")
        try:
            tf.train.Checkpoint(online=policy.model).read(prefix).expect_partial() \
                .assert_existing_objects_matched()
        except Exception as error:  # TF's reader raises many kinds for a damaged file
            raise EvaluateError(f"{store.describe(name)}: not a checkpoint of this run's "
                                f"network ({first_line(error)})") from None
    return store.describe(name) + (f" (newer ones passed over: {passed_over})"
                                   if passed_over else "")


def first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# --- Playing ---------------------------------------------------------------------------------

def record_episode(config: Config, policy, args, path: Path) -> dict:
    """One episode of `policy` on gymnasium's wrappers, every full-colour frame written to
    `path`."""
    import cv2
    import gymnasium as gym

    from common.envs import is_atari, make_env
    writer: cv2.VideoWriter | None = None  # opened at the first frame, which gives the size
    frames = 0

    def on_frame(rgb):
        nonlocal writer, frames
        scale = max(1, math.ceil(VIDEO_MIN_HEIGHT / rgb.shape[0]))
        frame = cv2.resize(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), None, fx=scale, fy=scale,
                           interpolation=cv2.INTER_NEAREST)
        if writer is None:
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps,
                                     (frame.shape[1], frame.shape[0]))
            if not writer.isOpened():
                raise EvaluateError(f"--video {path}: OpenCV cannot write an mp4 here")
        writer.write(frame)
        frames += 1

    env = make_env(config.env, config.max_episode_agent_steps, config.frame_stack,
                   repeat_action_probability=args.sticky_actions, on_frame=on_frame)
    # Every emulator frame is recorded, and the Atari showed 60 a second (ALE's metadata
    # says 30, the rate of frame-skipping play).
    fps = ATARI_FPS if is_atari(config.env) else env.metadata.get("render_fps") or 30
    try:
        obs, _ = env.reset(seed=args.seed + 1_000_003)
        score, done = 0.0, False
        while not done:
            action = policy.select_actions(obs[None], args.epsilon)[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            score, done = score + float(reward), terminated or truncated
    except gym.error.DependencyNotInstalled as error:  # e.g. CartPole draws with pygame
        raise EvaluateError(f"--video for {config.env}: {first_line(error)}") from None
    finally:
        env.close()
        if writer is not None:
            writer.release()
    return {"video": str(path), "video_return": score, "video_frames": frames,
            "video_fps": fps}


def evaluate(args: argparse.Namespace) -> dict:
    from actors.evaluator import Evaluator
    config, weights, root = resolve_source(args.source)
    env_info = describe_env(config.env, config.max_episode_agent_steps, config.frame_stack)
    evaluator = Evaluator(config, env_info, args.episodes, args.seed,
                          repeat_action_probability=args.sticky_actions, num_threads=0)
    try:
        loaded = load_network(evaluator.policy, weights, root)  # once: scores and video
        returns = evaluator.play(args.epsilon)
        report = {"source": str(args.source), "weights": loaded, "env": config.env,
                  "episodes": len(returns), "epsilon": args.epsilon,
                  "sticky_actions": args.sticky_actions, "seed": args.seed,
                  "mean": statistics.fmean(returns), "std": statistics.pstdev(returns),
                  "min": min(returns), "max": max(returns), "returns": returns}
        if args.video is not None:
            report.update(record_episode(config, evaluator.policy, args, args.video))
    finally:
        evaluator.close()
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Expected failures are caught inside, so TensorFlow's and ALE's start-up lines stay
    # hidden and the one line naming the problem is all that shows.
    error = None
    with native_output_hidden():
        try:
            report = evaluate(args)
        except (EvaluateError, ConfigError, CheckpointError, EnvError) as caught:
            error = str(caught)
    if error is not None:
        fail(error)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
