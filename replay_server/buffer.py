"""Uniform replay storage: a numpy ring of transitions (obs, action, reward, discount, next_obs).

`discount` is gamma^n where the episode went on and 0 where it terminated, so the learner's
target is `reward + discount * max_a Q_target(next_obs, a)` with no special cases. Time-limit
truncation keeps its discount: it is not a real end of the game.
"""
from __future__ import annotations

import numpy as np

TRANSITION_FIELDS = ("obs", "action", "reward", "discount", "next_obs")


class InvalidTransitions(ValueError):
    """An insert does not match the buffer's transition spec; nothing was stored."""


class ReplayBuffer:
    def __init__(self, capacity: int, obs_shape: tuple[int, ...], obs_dtype: str, seed: int = 0):
        self.capacity = capacity
        self.obs_shape = tuple(obs_shape)
        self.obs_dtype = np.dtype(obs_dtype)
        # np.zeros pages memory in lazily, so an empty 100K-frame buffer costs little.
        self.storage = {
            "obs": np.zeros((capacity, *self.obs_shape), self.obs_dtype),
            "action": np.zeros(capacity, np.int32),
            "reward": np.zeros(capacity, np.float32),
            "discount": np.zeros(capacity, np.float32),
            "next_obs": np.zeros((capacity, *self.obs_shape), self.obs_dtype),
        }
        self.cursor = 0
        self.size = 0
        self.total_added = 0
        self.rng = np.random.default_rng(seed)

    def validate(self, transitions: dict[str, np.ndarray]) -> int:
        """Number of transitions in a well-formed insert; raises InvalidTransitions otherwise."""
        if set(transitions) != set(TRANSITION_FIELDS):
            raise InvalidTransitions(f"transitions must have exactly fields "
                                     f"{list(TRANSITION_FIELDS)}, got {sorted(transitions)}")
        n = len(transitions["action"]) if transitions["action"].ndim == 1 else -1
        if n <= 0:
            raise InvalidTransitions("'action' must be a non-empty 1-d array")
        for name, array in transitions.items():
            target = self.storage[name]
            if array.shape != (n, *target.shape[1:]):
                raise InvalidTransitions(f"{name!r} has shape {array.shape}, expected "
                                         f"{(n, *target.shape[1:])}")
            if array.dtype != target.dtype:
                raise InvalidTransitions(f"{name!r} has dtype {array.dtype}, expected "
                                         f"{target.dtype}")
        for name in ("reward", "discount"):
            if not np.isfinite(transitions[name]).all():
                raise InvalidTransitions(f"{name!r} holds a non-finite value")
        if ((transitions["discount"] < 0) | (transitions["discount"] > 1)).any():
            raise InvalidTransitions("'discount' must lie in [0, 1]")
        if np.issubdtype(self.obs_dtype, np.floating):
            for name in ("obs", "next_obs"):
                if not np.isfinite(transitions[name]).all():
                    raise InvalidTransitions(f"{name!r} holds a non-finite value")
        return n

    def add(self, transitions: dict[str, np.ndarray]) -> int:
        """Validate, then copy into the ring (oldest overwritten first). Returns the count."""
        n = self.validate(transitions)
        if n > self.capacity:
            transitions = {k: v[-self.capacity:] for k, v in transitions.items()}
            self.total_added += n - self.capacity
            n = self.capacity
        slots = (self.cursor + np.arange(n)) % self.capacity
        for name, array in transitions.items():
            self.storage[name][slots] = array
        self.cursor = int((self.cursor + n) % self.capacity)
        self.size = min(self.capacity, self.size + n)
        self.total_added += n
        return n

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """Uniform with replacement, as the seed does; adds the slot `index` of each item."""
        if self.size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        index = self.rng.integers(0, self.size, size=batch_size)
        batch = {name: array[index] for name, array in self.storage.items()}
        batch["index"] = index.astype(np.int64)
        return batch
