"""The adder (in Acme's sense): K env streams of steps in, replay insert messages out.

- **Frames once.** Every distinct frame gets a number in this sender's stream and is sent once;
  transitions name the frames of their observation stack and next observation stack by number.
  Within an episode a new stack is the previous one slid by one frame, so each step adds one
  frame; at an episode start the stack's padding (repeats of the first frame) reuses one
  number. Stacks are compared, not assumed, so any env's stacking is stored exactly.
- **n-step returns.** Transition t carries R = sum_k gamma^k r_{t+k} over the k <= n steps that
  followed it and discount gamma^k, or 0 if the episode terminated within them. At a time-limit
  truncation the pending steps are flushed with their shorter k and still bootstrap from the
  last observation: a truncation is not a game over.
- **Priorities (Ape-X).** With `compute_priorities`, each transition's initial priority is its
  n-step TD error under the actor's network, |R + discount * max_a Q(s_{t+k}, a) - Q(s_t, a_t)|.
  The bootstrap value of an ongoing episode is known at the next action selection, so those
  transitions wait for `observe_values`.
"""
from __future__ import annotations

import collections
import secrets
from typing import NamedTuple

import numpy as np

from common.wire import encode_transitions


class PendingStep(NamedTuple):
    """A step waiting for the steps after it to complete its n-step return."""
    obs_refs: tuple[int, ...]
    action: int
    reward: float
    q_taken: float | None  # Q(s_t, a_t), when computing priorities


class NStepTransition(NamedTuple):
    """A transition as the adder completes it; a chunk sends its fields as columns."""
    obs_refs: tuple[int, ...]
    next_refs: tuple[int, ...]
    action: int
    reward: float  # the n-step return
    discount: float  # gamma^k, or 0 where the episode terminated
    priority: float | None = None  # its initial |TD error|, when computing priorities


class FrameAdder:
    def __init__(self, num_envs: int, stack: int, frame_shape: tuple[int, ...], frame_dtype: str,
                 n_step: int, gamma: float, chunk_transitions: int, clip_rewards: bool = False,
                 compute_priorities: bool = False, stream: int | None = None):
        self.stack, self.frame_shape = stack, tuple(frame_shape)
        self.frame_dtype = np.dtype(frame_dtype)
        self.n_step, self.gamma = n_step, gamma
        self.chunk_transitions = chunk_transitions
        self.clip_rewards, self.compute_priorities = clip_rewards, compute_priorities
        # A fresh stream per adder: a restarted actor never collides with its old numbers.
        self.stream = secrets.randbits(63) if stream is None else stream
        self.next_number = 0
        self.unsent_frames: list[np.ndarray] = []
        self.first_unsent = 0
        # Per env: the last stack's frames as bytes (equal bytes, equal frames: comparing two
        # 84x84 frames so costs ~0.5 us against ~3.4 for np.array_equal).
        self.last_frames: list[list[bytes] | None] = [None] * num_envs
        self.last_refs: list[tuple[int, ...] | None] = [None] * num_envs
        # Per env: steps not yet turned into transitions.
        self.pending: list[collections.deque[PendingStep]] = [
            collections.deque() for _ in range(num_envs)]
        # Per env: transitions waiting for the value of the env's current observation, each
        # with its Q(s_t, a_t).
        self.awaiting_value: list[list[tuple[NStepTransition, float]]] = [
            [] for _ in range(num_envs)]
        self.complete: list[NStepTransition] = []

    # --- Frames ---------------------------------------------------------------------------

    def _new_frame(self, frame: np.ndarray) -> int:
        self.unsent_frames.append(np.array(frame, dtype=self.frame_dtype, copy=True))
        self.next_number += 1
        return self.next_number - 1

    def _register_stack(self, obs: np.ndarray, env: int, continues: bool) -> tuple[int, ...]:
        """Numbers of the frames of `obs`, registering only frames not seen in this stack's
        predecessor (`continues`: the previous stack slid by one) or earlier in itself."""
        frames = np.asarray(obs, dtype=self.frame_dtype).reshape(self.stack, *self.frame_shape)
        keys = [frame.tobytes() for frame in frames]
        previous = self.last_frames[env] if continues else None  # the stack this one slides
        previous_refs = self.last_refs[env] or ()  # set with last_frames
        refs: list[int] = []
        for j, key in enumerate(keys):
            if previous is not None and j + 1 < self.stack and key == previous[j + 1]:
                refs.append(previous_refs[j + 1])
            elif j > 0 and key == keys[j - 1]:
                refs.append(refs[-1])  # padding at an episode start repeats a frame
            else:
                refs.append(self._new_frame(frames[j]))
        self.last_frames[env], self.last_refs[env] = keys, tuple(refs)
        return tuple(refs)

    # --- Steps ----------------------------------------------------------------------------

    def observe_first(self, env: int, obs: np.ndarray) -> None:
        """The first observation of a new episode in `env`."""
        if self.pending[env]:
            raise RuntimeError(f"env {env} starts an episode with {len(self.pending[env])} "
                               "steps of the previous one unflushed")
        self._register_stack(obs, env, continues=False)

    def observe(self, env: int, action: int, reward: float, next_obs: np.ndarray,
                terminated: bool, truncated: bool, q_taken: float | None = None,
                final_value: float | None = None) -> None:
        """One step of `env`. After an episode end the caller passes the new episode's first
        observation to `observe_first`. `q_taken` = Q(s_t, a_t) and, at a truncation,
        `final_value` = max_a Q(next_obs, a) are needed when computing priorities."""
        obs_refs = self.last_refs[env]
        if obs_refs is None:
            raise RuntimeError(f"env {env}: observe before observe_first")
        if self.compute_priorities and q_taken is None:
            raise ValueError("a step needs q_taken when computing priorities")
        if truncated and not terminated and self.compute_priorities and final_value is None:
            raise ValueError("a truncated step needs final_value when computing priorities")
        if self.clip_rewards:
            reward = float(np.clip(reward, -1.0, 1.0))
        next_refs = self._register_stack(next_obs, env, continues=True)
        pending = self.pending[env]
        pending.append(PendingStep(obs_refs, int(action), float(reward), q_taken))
        if terminated:
            self._flush(env, next_refs, bootstrap=False, value=0.0)
        elif truncated:
            self._flush(env, next_refs, bootstrap=True, value=final_value)
        elif len(pending) == self.n_step:
            self._emit(env, next_refs, bootstrap=True, value=None)

    def observe_values(self, values: np.ndarray) -> None:
        """max_a Q(s, a) of each env's current observation: completes the priorities of the
        transitions that bootstrap from it."""
        for env, waiting in enumerate(self.awaiting_value):
            for transition, q_taken in waiting:
                self._complete(transition, q_taken, float(values[env]))
            waiting.clear()

    def _flush(self, env: int, next_refs: tuple[int, ...], bootstrap: bool,
               value: float | None) -> None:
        while self.pending[env]:
            self._emit(env, next_refs, bootstrap, value)

    def _emit(self, env: int, next_refs: tuple[int, ...], bootstrap: bool,
              value: float | None) -> None:
        """Turn the oldest pending step of `env` into a transition ending at next_refs."""
        steps = self.pending[env]
        first = steps[0]
        ret = sum(self.gamma ** k * step.reward for k, step in enumerate(steps))
        discount = self.gamma ** len(steps) if bootstrap else 0.0
        steps.popleft()
        transition = NStepTransition(first.obs_refs, next_refs, first.action, ret, discount)
        if not self.compute_priorities:
            self.complete.append(transition)
            return
        assert first.q_taken is not None  # observe() refuses a step without it
        if discount == 0.0 or value is not None:
            self._complete(transition, first.q_taken, value or 0.0)
        else:
            self.awaiting_value[env].append((transition, first.q_taken))

    def _complete(self, transition: NStepTransition, q_taken: float, value: float) -> None:
        priority = abs(transition.reward + transition.discount * value - q_taken)
        self.complete.append(transition._replace(priority=priority))

    # --- Chunks ---------------------------------------------------------------------------

    def take_chunk(self) -> tuple[memoryview, int] | None:
        """(insert message, transition count) once `chunk_transitions` are complete. The
        message carries every frame registered since the last chunk, so later chunks can
        name them."""
        if len(self.complete) < self.chunk_transitions:
            return None
        taken = self.complete[:self.chunk_transitions]
        del self.complete[:self.chunk_transitions]
        obs_refs, next_refs, action, ret, discount, priority = zip(*taken)
        frames = (np.stack(self.unsent_frames) if self.unsent_frames
                  else np.zeros((0, *self.frame_shape), self.frame_dtype))
        message = encode_transitions(
            frames, np.array(obs_refs, np.int64), np.array(next_refs, np.int64),
            np.array(action, np.int32), np.array(ret, np.float32),
            np.array(discount, np.float32), stream=self.stream, first_frame=self.first_unsent,
            priority=np.array(priority, np.float32) if self.compute_priorities else None)
        self.unsent_frames.clear()
        self.first_unsent = self.next_number
        return message, len(taken)
