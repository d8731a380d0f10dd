"""plot.py on real TensorBoard event files, run as users run it (from the repo root)."""
import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from common.config import PRESETS, config_to_json
from tests.conftest import ROOT


def write_scalars(run_dir, rows: list[tuple[int, dict]]) -> None:
    """One sitting's event file: `rows` of (agent steps, {tag: value})."""
    import tensorflow as tf
    writer = tf.summary.create_file_writer(str(run_dir))
    with writer.as_default():
        for step, figures in rows:
            for tag, value in figures.items():
                tf.summary.scalar(tag, value, step=step)
    writer.close()


def make_run(run_dir, preset: str, env: str, sittings: list[list]) -> None:
    run_dir.mkdir()
    record = config_to_json(PRESETS[preset].replace(env=env))
    (run_dir / "config.json").write_text(json.dumps(record))
    for rows in sittings:
        write_scalars(run_dir, rows)


def train_rows(first: int, last: int, evaluated: bool) -> list:
    rows = []
    for i in range(first, last + 1):
        figures = {"mean_return_100": 0.5 * i, "epsilon": 0.1, "agent_steps_per_s": 900.0}
        if evaluated and i % 5 == 0:
            figures.update({"eval/return_mean": 0.6 * i, "eval/return_std": 1.5})
        rows.append((60_000 * i, figures))
    return rows


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # Breakout resumed once: a second event file whose steps carry on from the first's.
    make_run(root / "breakout", "seed", "ALE/Breakout-v5",
             [train_rows(1, 10, evaluated=True), train_rows(11, 20, evaluated=True)])
    (root / "breakout" / "summary.json").write_text(json.dumps({"status": "ok"}))
    make_run(root / "cartpole", "cartpole", "CartPole-v1", [train_rows(1, 8, evaluated=False)])
    return root


def plot(*args, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "plot.py", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_plots_runs_with_and_without_eval_into_one_png(runs, tmp_path):
    out = tmp_path / "curve.png"
    done = plot(runs / "breakout", runs / "cartpole", "-o", out, "--title", "two runs")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""  # TensorFlow's start-up lines and warnings are kept out
    image = cv2.imread(str(out))
    assert image is not None and image.shape == (500, 1300, 3)
    assert image.std() > 10  # something was drawn
    breakout, cartpole = done.stdout.splitlines()
    assert breakout.startswith(f"wrote {out}: breakout (seed) 1,200,000 agent steps in ")
    assert breakout.endswith("last train return 10.0, last eval 12.0 +- 1.5")
    assert cartpole.startswith(f"wrote {out}: cartpole (cartpole) 480,000 agent steps in ")
    assert cartpole.endswith("last train return 4.0, no eval (no summary.json: still running?)")


def test_read_curves_joins_sittings_and_eval(runs):
    from plot import read_curves
    curves = read_curves(runs / "breakout")
    assert list(curves["train_steps"]) == [60_000 * i for i in range(1, 21)]
    assert np.all(np.diff(curves["train_hours"]) >= 0) and curves["train_hours"][0] >= 0
    assert list(curves["eval_steps"]) == [60_000 * i for i in (5, 10, 15, 20)]
    np.testing.assert_allclose(curves["eval_mean"], [3.0, 6.0, 9.0, 12.0])
    np.testing.assert_allclose(curves["eval_std"], 1.5)
    assert (curves["preset"], curves["env"], curves["finished"]) == (
        "seed", "ALE/Breakout-v5", True)


def test_dopamine_reference_is_dqn_breakout_by_agent_steps():
    from plot import load_reference
    reference = load_reference()
    assert reference["source"]["repository"] == "https://github.com/google/dopamine"
    assert len(reference["source"]["commit"]) == 40
    steps, returns = np.array(reference["points"], dtype=float).T
    assert steps[0] == 250_000 and np.all(np.diff(steps) > 0)
    assert 3 < returns[steps == 1_000_000][0] < 12
    assert 1 < returns[0] < 2.5 and returns.max() > 100  # Dopamine's DQN passes 100 later


def garbage_events(run_dir):
    run_dir.mkdir()
    (run_dir / "events.out.tfevents.1.host.1.0.v2").write_bytes(b"\x07not an event file" * 9)


def truncated_events(run_dir):
    run_dir.mkdir()
    write_scalars(run_dir, train_rows(1, 5, evaluated=False))
    (events,) = run_dir.glob("events.out.tfevents.*")
    data = events.read_bytes()
    events.write_bytes(data[: len(data) - 20])  # cut inside the last record


def no_training_return(run_dir):
    run_dir.mkdir()
    write_scalars(run_dir, [(1_000, {"epsilon": 1.0, "agent_steps_per_s": 800.0})])


@pytest.mark.parametrize("make, problem", [
    (lambda run_dir: run_dir.mkdir(), "not a run directory"),
    (lambda run_dir: None, "no such directory"),
    (garbage_events, "not a readable TensorBoard event file"),
    (truncated_events, "not a readable TensorBoard event file"),
    (no_training_return, "no training return (mean_return_100) logged yet"),
])
def test_bad_run_dir_is_one_line_and_exit_2(tmp_path, make, problem):
    run_dir = tmp_path / "run"
    make(run_dir)
    done = plot(run_dir, "-o", tmp_path / "curve.png")
    assert done.returncode == 2
    (line,) = done.stderr.splitlines()
    assert line.startswith("plot.py: error: ") and problem in line, line
    assert str(run_dir) in line
    assert not (tmp_path / "curve.png").exists()


def write_events_at(path, rows: list[tuple[float, int, dict]]) -> None:
    """An event file whose events carry the given wall times: rows of (wall time, agent steps,
    {tag: value}), as a sitting hours apart from the previous one leaves them."""
    import tensorflow as tf
    Event, Summary = tf.compat.v1.Event, tf.compat.v1.Summary
    with tf.io.TFRecordWriter(str(path)) as writer:
        writer.write(Event(wall_time=rows[0][0], file_version="brain.Event:2")
                     .SerializeToString())
        for wall, step, figures in rows:
            values = [Summary.Value(tag=tag, simple_value=value)
                      for tag, value in figures.items()]
            writer.write(Event(wall_time=wall, step=step, summary=Summary(value=values))
                         .SerializeToString())


def test_hours_are_training_time_without_the_gaps_between_sittings(tmp_path):
    """A first sitting of an hour, ten hours of nothing, a second sitting of half an hour:
    1.5 hours of training, the second sitting's rows counted from 1.0."""
    from plot import read_curves
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(config_to_json(PRESETS["seed"])))
    start, hour = 1_700_000_000.0, 3600.0
    write_events_at(run / "events.out.tfevents.1.host.1.0.v2",
                    [(start + i * hour / 4, 1000 * i, {"mean_return_100": 1.0 * i})
                     for i in range(5)])
    resumed = start + 11 * hour
    write_events_at(run / "events.out.tfevents.2.host.2.0.v2",
                    [(resumed + i * hour / 4, 5000 + 1000 * i, {"mean_return_100": 5.0 + i,
                                                                "eval/return_mean": 9.0})
                     for i in range(3)])
    curves = read_curves(run)
    assert curves["hours"] == pytest.approx(1.5)
    np.testing.assert_allclose(curves["train_hours"],
                               [0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.25, 1.5], atol=1e-6)
    np.testing.assert_allclose(curves["eval_hours"], [1.0, 1.25, 1.5], atol=1e-6)
