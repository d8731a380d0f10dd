"""What every role needs to know about an env, without holding one: a plain record with no
heavy imports, so the replay service reads it without loading ale_py or gymnasium."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class EnvInfo:
    """What every role needs to know about an env, without holding one."""
    env_id: str
    obs_shape: tuple[int, ...]
    obs_dtype: str
    num_actions: int
    frame_skip: int  # emulator frames per agent step

    @property
    def stack(self) -> int:
        """Frames per observation: the leading axis of stacked images, 1 for vectors."""
        return self.obs_shape[0] if len(self.obs_shape) == 3 else 1

    @property
    def frame_shape(self) -> tuple[int, ...]:
        """One frame, the unit replay stores once: an image, or the whole vector."""
        return tuple(self.obs_shape[1:]) if len(self.obs_shape) == 3 else tuple(self.obs_shape)
