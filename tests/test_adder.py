"""The actor-side adder: n-step returns by hand, frames sent once, actor priorities."""
import numpy as np
import pytest

from actors.adder import FrameAdder
from common import wire
from tests.synthetic import FRAME_SHAPE, STACK

GAMMA = 0.9


def frame(value):
    return np.full(FRAME_SHAPE, value, np.uint8)


def stacks(values):
    """Stacks of an episode whose frames are 0, 1, 2, ...: the first repeats frame 0."""
    history = [values[0]] * (STACK - 1) + list(values)
    return [np.stack([frame(v) for v in history[t:t + STACK]]) for t in range(len(values))]


class Decoder:
    """Turns an adder's chunks back into transitions with real stacks, like replay would."""

    def __init__(self):
        self.frames = {}

    def __call__(self, message):
        arrays, meta = wire.decode(message, expect_kind=wire.TRANSITIONS)
        for i, f in enumerate(arrays["frames"]):
            self.frames[meta["first_frame"] + i] = f
        rebuild = lambda refs: np.stack([self.frames[r] for r in refs])  # noqa: E731
        return [{"obs": rebuild(o), "next_obs": rebuild(n), "action": int(a), "reward": r,
                 "discount": d, "priority": arrays.get("priority", [None] * len(o))[i]}
                for i, (o, n, a, r, d) in enumerate(zip(
                    arrays["obs_frames"], arrays["next_obs_frames"], arrays["action"],
                    arrays["reward"], arrays["discount"]))], len(arrays["frames"])


def run_episode(rewards, end, n_step=3, q_taken=None, values=None, final_value=None):
    """One env, one episode of len(rewards) steps ending in `end` ('terminated',
    'truncated' or None); returns the transitions decoded from the adder's chunks."""
    priorities = q_taken is not None
    adder = FrameAdder(1, STACK, FRAME_SHAPE, "uint8", n_step, GAMMA, chunk_transitions=1,
                       compute_priorities=priorities)
    episode = stacks(range(len(rewards) + 1))
    adder.observe_first(0, episode[0])
    decode, out = Decoder(), []
    for t, reward in enumerate(rewards):
        if priorities:
            adder.observe_values(np.array([values[t]]))
        last = t == len(rewards) - 1
        adder.observe(0, t % 4, reward, episode[t + 1],
                      terminated=last and end == "terminated",
                      truncated=last and end == "truncated",
                      q_taken=None if q_taken is None else q_taken[t],
                      final_value=final_value if last else None)
        while (chunk := adder.take_chunk()) is not None:
            out.extend(decode(chunk[0])[0])
    return out, episode


def test_n_step_returns_of_an_ongoing_episode():
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0]
    transitions, episode = run_episode(rewards, end=None)
    assert len(transitions) == 3  # steps 3 and 4 still wait for their n-th step
    for t, tr in enumerate(transitions):
        assert tr["reward"] == pytest.approx(rewards[t] + 0.9 * rewards[t + 1]
                                             + 0.81 * rewards[t + 2])
        assert tr["discount"] == pytest.approx(0.729)
        np.testing.assert_array_equal(tr["obs"], episode[t])
        np.testing.assert_array_equal(tr["next_obs"], episode[t + 3])
        assert tr["action"] == t % 4


def test_termination_flushes_with_zero_discount():
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0]
    transitions, episode = run_episode(rewards, end="terminated")
    assert len(transitions) == 5
    assert [tr["reward"] for tr in transitions[2:]] == pytest.approx(
        [3 + 0.9 * 4 + 0.81 * 5, 4 + 0.9 * 5, 5])
    assert [tr["discount"] for tr in transitions] == pytest.approx([0.729, 0.729, 0, 0, 0])
    for tr in transitions[2:]:
        np.testing.assert_array_equal(tr["next_obs"], episode[5])


def test_truncation_bootstraps_with_the_steps_left():
    rewards = [1.0, 2.0, 3.0, 4.0, 5.0]
    transitions, episode = run_episode(rewards, end="truncated")
    assert [tr["reward"] for tr in transitions[2:]] == pytest.approx(
        [3 + 0.9 * 4 + 0.81 * 5, 4 + 0.9 * 5, 5])
    assert [tr["discount"] for tr in transitions] == pytest.approx(
        [0.729, 0.729, 0.729, 0.81, 0.9])
    for tr in transitions[2:]:
        np.testing.assert_array_equal(tr["next_obs"], episode[5])


def test_one_step_episode_shorter_than_n():
    transitions, episode = run_episode([7.0, 1.0], end="terminated", n_step=5)
    assert [tr["reward"] for tr in transitions] == pytest.approx([7 + 0.9, 1.0])
    assert [tr["discount"] for tr in transitions] == [0.0, 0.0]


def test_actor_priorities_are_n_step_td_errors():
    rewards = [1.0, 0.0, 2.0, 0.0, 1.0]
    q_taken = [0.5, 1.0, -1.0, 2.0, 0.0]
    values = [0.0, 0.3, 0.6, 0.9, 1.2]  # max_a Q of the obs at steps 0..4
    transitions, _ = run_episode(rewards, end="truncated", n_step=2, q_taken=q_taken,
                                 values=values, final_value=3.0)
    expected = []
    for t in range(5):
        k = min(2, 5 - t)
        ret = sum(0.9 ** j * rewards[t + j] for j in range(k))
        bootstrap = values[t + 2] if t + 2 < 5 else 3.0
        expected.append(abs(ret + 0.9 ** k * bootstrap - q_taken[t]))
    assert [tr["priority"] for tr in transitions] == pytest.approx(expected, rel=1e-6)


def test_clipped_rewards():
    adder = FrameAdder(1, STACK, FRAME_SHAPE, "uint8", 1, GAMMA, 2, clip_rewards=True)
    episode = stacks(range(3))
    adder.observe_first(0, episode[0])
    adder.observe(0, 0, 5.0, episode[1], False, False)
    adder.observe(0, 0, -0.5, episode[2], True, False)
    transitions, _ = Decoder()(adder.take_chunk()[0])
    assert [tr["reward"] for tr in transitions] == [1.0, -0.5]


def test_frames_are_sent_once_and_padding_reuses_a_frame():
    adder = FrameAdder(2, STACK, FRAME_SHAPE, "uint8", 1, GAMMA, chunk_transitions=4)
    decode = Decoder()
    first = stacks(range(3))
    # Zero padding, as some vector envs stack: [0, 0, 0, f] then [0, 0, f, g].
    zero_padded = [np.stack([frame(0)] * 3 + [frame(50)]),
                   np.stack([frame(0)] * 2 + [frame(50), frame(51)]),
                   np.stack([frame(0), frame(50), frame(51), frame(52)])]
    adder.observe_first(0, first[0])
    adder.observe_first(1, zero_padded[0])
    for t in (1, 2):
        adder.observe(0, 0, 0.0, first[t], False, False)
        adder.observe(1, 0, 0.0, zero_padded[t], False, False)
    transitions, frames_sent = decode(adder.take_chunk()[0])
    # Env 0: frames 0, 1, 2; env 1: the zero frame, 50, 51, 52. Seven in all.
    assert frames_sent == 7
    np.testing.assert_array_equal(transitions[3]["next_obs"], zero_padded[2])
    np.testing.assert_array_equal(transitions[2]["obs"], first[1])


def test_observe_before_a_first_observation_is_an_error():
    adder = FrameAdder(1, STACK, FRAME_SHAPE, "uint8", 1, GAMMA, 1)
    with pytest.raises(RuntimeError, match="observe before observe_first"):
        adder.observe(0, 0, 0.0, stacks([1])[0], False, False)
