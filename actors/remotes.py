"""The Ray side of `InsertPacer`: a replay shard's actor handle behind the small interface
that plain class is given, and Ray's error for a dead actor turned into its own."""
from __future__ import annotations

import ray

from actors.insert_pacer import ReplayLost
from common import wire


class RayReplay:
    """A `ReplayLink` over a `ReplayService` handle."""

    def __init__(self, shard):
        self.shard = shard

    def send(self, message: bytes):
        return self.shard.insert.remote(wire.for_ray(message))

    def ready(self, handles: list, num: int, timeout: float | None) -> list:
        return ray.wait(handles, num_returns=num, timeout=timeout)[0]

    def result(self, handle) -> dict:
        try:
            return ray.get(handle)
        except ray.exceptions.RayActorError as error:
            raise ReplayLost(str(error)) from error

    def ask_budget(self, transitions: int, wait_s: float) -> int:
        return self.result(self.shard.insert_budget.remote(transitions, wait_s))
