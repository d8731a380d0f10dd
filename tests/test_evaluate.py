"""evaluate.py as users run it (from the repo root) on a real Breakout network and ALE."""
import json
import subprocess

import cv2
import pytest

from common.config import PRESETS, config_to_json
from common.envs import describe_env
from common.networks import build_q_network
from tests.conftest import ROOT, evaluate

MAX_STEPS = 300  # agent steps per episode: keeps an untrained agent's games short


@pytest.fixture(scope="module")
def breakout_run(tmp_path_factory):
    """A run directory as launch.py leaves it: config.json and the final weights."""
    run_dir = tmp_path_factory.mktemp("breakout")
    config = PRESETS["seed"].replace(max_episode_agent_steps=MAX_STEPS)
    (run_dir / "config.json").write_text(json.dumps(config_to_json(config)))
    info = describe_env(config.env)
    build_q_network(info.obs_shape, info.num_actions).save_weights(
        str(run_dir / "q_network.weights.h5"))
    return run_dir


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("evaluate.py: error: "), result.stderr
    return lines[0]


def test_scores_as_json_and_a_full_colour_video_of_the_game(breakout_run, tmp_path):
    video, scores = tmp_path / "play.mp4", tmp_path / "scores.json"
    result = evaluate(breakout_run, "--episodes", 3, "--epsilon", 0.5, "--video", video,
                      "--json", scores, "--sticky-actions", 0.25)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""  # no TensorFlow, CUDA or ALE start-up lines
    report = json.loads(result.stdout)
    assert report == json.loads(scores.read_text())
    assert report["episodes"] == 3 and len(report["returns"]) == 3
    assert all(score >= 0 and score == int(score) for score in report["returns"])
    assert report["weights"].endswith("q_network.weights.h5")
    assert report["sticky_actions"] == 0.25 and report["epsilon"] == 0.5
    # Every emulator frame (4 per agent step, plus the reset's), in colour, scaled 2x.
    capture = cv2.VideoCapture(str(video))
    frames, fps = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), capture.get(cv2.CAP_PROP_FPS)
    ok, frame = capture.read()
    assert ok
    size = frame.shape
    colours = len({tuple(pixel) for pixel in frame.reshape(-1, 3)[::7]})
    capture.release()
    assert frames == report["video_frames"] >= 4 * 20
    assert report["video_frames"] <= 4 * MAX_STEPS + 32
    assert size == (420, 320, 3) and colours > 5  # the game's palette, not gray 84x84
    assert fps == report["video_fps"] == 60  # the Atari's own rate: the game at its speed


def test_bad_input_ends_with_one_line_naming_it(breakout_run, tmp_path):
    assert "no such file or directory" in one_error_line(evaluate(tmp_path / "missing"))
    assert "no config.json" in one_error_line(evaluate(tmp_path))
    garbage = tmp_path / "run"
    garbage.mkdir()
    (garbage / "config.json").write_text((breakout_run / "config.json").read_text())
    (garbage / "q_network.weights.h5").write_bytes(b"\x89HDF\r\n" + b"\x00" * 100)
    assert "not weights of this run's network" in one_error_line(evaluate(garbage))
    (garbage / "config.json").write_text('{"format": "dqn-run-config", "config": {"x": 1}}')
    assert "unknown field 'x'" in one_error_line(evaluate(garbage))
    assert "--epsilon must be in [0, 1]" in one_error_line(
        evaluate(breakout_run, "--epsilon", 2))
    assert "name it *.mp4" in one_error_line(evaluate(breakout_run, "--video", "x.avi"))
    # Seeds ALE cannot take, episodes no machine can play side by side: refused at once.
    assert "--seed must be in [0, 2**30), got -1" in one_error_line(
        evaluate(breakout_run, "--seed", -1))
    assert "--episodes must be in [1, 10,000], got 4,611,686,018,427,387,904" in \
        one_error_line(evaluate(breakout_run, "--episodes", 2**62))


@pytest.mark.slow
def test_the_shipped_agent_plays_breakout_far_better_than_random_play():
    """What the README shows first: the trained agent in the repository plays from a fresh
    clone, with no training, and scores well above random play on the same games."""
    def mean_score(*flags) -> float:
        result = evaluate(ROOT / "pretrained" / "breakout-seed", "--episodes", 6, *flags)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout)
        return sum(report["returns"]) / len(report["returns"])

    trained, random_play = mean_score(), mean_score("--epsilon", 1)
    assert trained >= max(6.0, 3 * random_play), (trained, random_play)
