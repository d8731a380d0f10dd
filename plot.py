"""Draw the learning curves of runs: `python plot.py RUNDIR [RUNDIR ...] [-o curve.png]`.

Reads the TensorBoard events `launch.py` writes into each run directory and draws one PNG with
two panels: the return against agent steps (left) and against hours of training (right: wall
clock, less the gaps between resumed sittings). Each run shows its training return (mean of the
last 100 training episodes) as a line and, when an evaluator logged them, its evaluation
returns as markers with a +-1 std band. On Breakout the left panel also shows Dopamine's
published DQN curve (common/data/dopamine_dqn_breakout.json; `--no-reference` leaves it out).
Prints one line per run once the file is written. Works on a run still training (its events so
far).

`read_curves(run_dir)` is the reading part alone, for other scripts.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path

import numpy as np

from common.config import RUN_CONFIG, OneLineErrorParser
from common.process import native_output_hidden

TRAIN_RETURN = "mean_return_100"
EVAL_MEAN, EVAL_STD = "eval/return_mean", "eval/return_std"
EVENT_FILES = "events.out.tfevents.*"
REFERENCE = "dopamine_dqn_breakout.json"


class RunDirError(ValueError):
    """A run directory cannot be plotted; the message is the one-line reason."""


def fail(message: str) -> None:
    print(f"plot.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


# --- Reading ---------------------------------------------------------------------------------

def read_curves(run_dir: str | Path) -> dict:
    """A run's curves from its event files: `train_steps`, `train_hours`, `train_return`,
    `eval_steps`, `eval_hours`, `eval_mean`, `eval_std` (numpy arrays in logging order; the eval
    ones empty when nothing was evaluated), `agent_steps` (the latest logged), `hours` (the
    run's training time), and `name`, `preset`, `env`, `finished` (whether summary.json
    exists). Hours are training time: wall clock from the run's first event, less the gaps
    between resumed sittings (each sitting writes its own event file).
    Raises RunDirError when the directory holds no readable events or no training return."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such directory")
    files = sorted(run_dir.glob(EVENT_FILES))
    if not files:
        raise RunDirError(f"{run_dir}: not a run directory (no {EVENT_FILES} files in it)")
    scalars, sittings, last_step = read_scalars(files, {TRAIN_RETURN, EVAL_MEAN, EVAL_STD})
    train = scalars.get(TRAIN_RETURN)
    if not train:
        raise RunDirError(f"{run_dir}: no training return ({TRAIN_RETURN}) logged yet")
    evals = scalars.get(EVAL_MEAN, [])
    stds = {step: value for step, _, value in scalars.get(EVAL_STD, [])}
    return {
        **run_identity(run_dir),
        "train_steps": np.array([step for step, _, _ in train], dtype=np.int64),
        "train_hours": training_hours(sittings, train),
        "train_return": np.array([value for _, _, value in train]),
        "eval_steps": np.array([step for step, _, _ in evals], dtype=np.int64),
        "eval_hours": training_hours(sittings, evals),
        "eval_mean": np.array([value for _, _, value in evals]),
        "eval_std": np.array([stds.get(step, 0.0) for step, _, _ in evals]),
        "agent_steps": last_step,
        "hours": sum(last - first for first, last in sittings) / 3600,
    }


def training_hours(sittings: list[tuple[float, float]], rows: list) -> np.ndarray:
    """Hours of training up to each row's wall time: the time inside the sittings' spans
    (first and last event of each), so the hours between two sittings do not count."""
    return np.array([sum(max(0.0, min(wall, last) - first) for first, last in sittings) / 3600
                     for _, wall, _ in rows])


def read_scalars(files: list[Path], tags: set[str]) -> tuple[dict, list, int]:
    """{tag: [(step, wall_time, value), ...] in wall-clock order} for `tags`, each file's
    (first, last) event wall time in wall-clock order (a sitting's span) and the step of the
    latest summary, over a run's files."""
    from google.protobuf.message import DecodeError
    tf = import_tensorflow()
    scalars: dict[str, list] = {}
    sittings, latest = [], (float("-inf"), 0)
    for path in files:
        walls = []
        try:
            for event in events_in(tf, path):
                walls.append(event.wall_time)
                if event.summary.value:
                    latest = max(latest, (event.wall_time, event.step))
                for value in event.summary.value:
                    if value.tag in tags:  # others may be histograms, text, ...
                        row = (event.step, event.wall_time, scalar_of(tf, value))
                        scalars.setdefault(value.tag, []).append(row)
        except (tf.errors.OpError, DecodeError, ValueError, TypeError) as error:
            reason = getattr(error, "message", None) or str(error) or "undecodable"
            raise RunDirError(f"{path}: not a readable TensorBoard event file "
                              f"({type(error).__name__}: {reason.splitlines()[0]})") from None
        if walls:
            sittings.append((min(walls), max(walls)))
    for rows in scalars.values():
        rows.sort(key=lambda row: row[1])  # a resumed sitting's file sorts by name, not time
    return scalars, sorted(sittings), latest[1]


def events_in(tf, path: Path):
    """The events of one file, without TensorFlow's warning that its record reader is
    deprecated (the replacement, tf.data, starts a whole input pipeline to read a file)."""
    logger = tf.get_logger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield from tf.compat.v1.train.summary_iterator(str(path))
    finally:
        logger.setLevel(level)


def scalar_of(tf, value) -> float:
    # tf.summary.scalar writes a tensor; older writers (TF1, tensorboardX) a simple_value.
    if value.WhichOneof("value") == "simple_value":
        return float(value.simple_value)
    return float(tf.make_ndarray(value.tensor))


def import_tensorflow():
    with native_output_hidden():  # TensorFlow's start-up lines
        from common.networks import tf
    return tf


def run_identity(run_dir: Path) -> dict:
    """Name, preset and env id from config.json; a missing or odd one only leaves them out,
    since the curves alone are worth plotting."""
    config = {}
    try:
        saved = json.loads((run_dir / RUN_CONFIG).read_text())
        if isinstance(saved, dict) and isinstance(saved.get("config"), dict):
            config = saved["config"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    env = config.get("env") or config.get("env_id")
    return {"name": run_dir.resolve().name, "preset": str(config.get("preset") or "?"),
            "env": str(env) if env else None, "finished": (run_dir / "summary.json").exists()}


def load_reference() -> dict:
    """Dopamine's DQN Breakout curve and where it comes from (package data)."""
    text = (resources.files("common") / "data" / REFERENCE).read_text()
    return json.loads(text)


# --- Drawing ---------------------------------------------------------------------------------

def draw(runs: list[dict], out: Path, title: str, reference: dict | None) -> None:
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    from matplotlib.ticker import FuncFormatter
    figure = Figure(figsize=(13, 5), layout="constrained")
    by_steps, by_hours = figure.subplots(1, 2, sharey=True)
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        label = f"{run['name']} ({run['preset']})"
        draw_run(by_steps, run, "steps", color, label)
        draw_run(by_hours, run, "hours", color, label)
    if reference is not None:
        draw_reference(by_steps, reference, max(run["agent_steps"] for run in runs))
    by_steps.set_xlabel("agent steps")
    by_steps.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M"))
    by_hours.set_xlabel("hours of training (gaps between resumed sittings left out)")
    by_steps.set_ylabel("episode return")
    by_steps.legend(fontsize="small", loc="upper left")  # the right panel's lines are the same
    for axes in (by_steps, by_hours):
        axes.grid(alpha=0.3)
    figure.suptitle(title)
    figure.savefig(out, dpi=100)


def draw_run(axes, run: dict, x: str, color: str, label: str) -> None:
    axes.plot(run[f"train_{x}"], run["train_return"], color=color, lw=1.5,
              label=f"{label} train (mean of last 100)")
    if len(run["eval_mean"]):
        xs, mean, std = run[f"eval_{x}"], run["eval_mean"], run["eval_std"]
        axes.plot(xs, mean, color=color, ls="--", marker="o", ms=4, label=f"{label} eval")
        axes.fill_between(xs, mean - std, mean + std, color=color, alpha=0.15, lw=0)


def draw_reference(axes, reference: dict, max_steps: int) -> None:
    """Only as far as the runs go (and one iteration more), so a short run is not squeezed
    into the left edge of Dopamine's 50M steps."""
    points = np.array(reference["points"], dtype=float)
    shown = points[: max(int(np.searchsorted(points[:, 0], max_steps)) + 1, 2)]
    axes.plot(shown[:, 0], shown[:, 1], color="0.4", ls=":", lw=2,
              label=f"Dopamine DQN ({reference['source']['runs']} runs, sticky actions)")


# --- Command line ----------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineErrorParser(
        prog="plot.py", description="Draw the learning curves of launch.py runs into one PNG: "
        "return against agent steps (left) and against hours of training (right).")
    parser.add_argument("run_dirs", nargs="+", metavar="RUNDIR",
                        help="a run directory (launch.py --logdir), finished or still running")
    parser.add_argument("-o", "--output", default="curve.png", type=Path, metavar="PNG",
                        help="PNG file to write (default: curve.png)")
    parser.add_argument("--no-reference", action="store_true",
                        help="leave out Dopamine's published DQN Breakout curve, which is "
                             "drawn on the agent-steps panel when a run plays Breakout")
    parser.add_argument("--title", help="figure title (default: the runs' env ids)")
    return parser.parse_args(argv)


def summary_line(out: Path, run: dict) -> str:
    evaluated = (f"last eval {run['eval_mean'][-1]:.1f} +- {run['eval_std'][-1]:.1f}"
                 if len(run["eval_mean"]) else "no eval")
    return (f"wrote {out}: {run['name']} ({run['preset']}) {run['agent_steps']:,} agent steps "
            f"in {run['hours']:.2f} h, last train return {run['train_return'][-1]:.1f}, "
            f"{evaluated}" + ("" if run["finished"] else " (no summary.json: still running?)"))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output.suffix.lower() != ".png":
        fail(f"-o {args.output}: the output is a PNG; name it *.png")
    if not args.output.parent.resolve().is_dir():
        fail(f"-o {args.output}: directory {args.output.parent} does not exist")
    try:
        runs = [read_curves(run_dir) for run_dir in args.run_dirs]
    except RunDirError as error:
        fail(str(error))
    envs = sorted({run["env"] or "unknown env" for run in runs})
    breakout = any("Breakout" in (run["env"] or "") for run in runs)
    reference = load_reference() if breakout and not args.no_reference else None
    try:
        draw(runs, args.output, args.title or ", ".join(envs), reference)
    except OSError as error:
        fail(f"-o {args.output}: cannot be written ({error.strerror or error})")
    for run in runs:
        print(summary_line(args.output, run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
