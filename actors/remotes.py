"""The Ray side of `InsertPacer` and `WeightClient`: a replay shard's and the learner's actor
handles behind the small interfaces those plain classes are given, and Ray's errors for a dead
actor turned into theirs."""
from __future__ import annotations

from typing import Any

import ray

from actors.insert_pacer import ReplayLost
from actors.weight_client import SourceLost
from common import wire
from common.records import InsertAck


class RayReplay:
    """A `ReplayLink` over a `ReplayService` handle."""

    def __init__(self, shard):
        self.shard = shard

    def send(self, message: wire.Message) -> ray.ObjectRef:
        return self.shard.insert.remote(wire.for_ray(message))

    def ready(self, handles: list, num: int, timeout: float | None) -> list:
        return ray.wait(handles, num_returns=num, timeout=timeout)[0]

    def result(self, handle) -> InsertAck:
        return self._get(handle)

    def ask_budget(self, transitions: int, wait_s: float) -> int:
        return self._get(self.shard.insert_budget.remote(transitions, wait_s))

    @staticmethod
    def _get(handle: ray.ObjectRef) -> Any:
        try:
            return ray.get(handle)
        except ray.exceptions.RayActorError as error:
            raise ReplayLost(str(error)) from error


class RayWeightSource:
    """A `WeightSource` over a `LearnerService` handle: its `latest_weights` answers with a
    reference to the weights, fetched only when there is news."""

    def __init__(self, learner):
        self.learner = learner

    def query(self, known_version: int, wait_s: float, known_life: str | None):
        return self.learner.latest_weights.remote(known_version, wait_s, known_life)

    def ready(self, handle, timeout: float | None) -> bool:
        return bool(ray.wait([handle], timeout=timeout)[0])

    def fetch(self, handle):
        try:
            answer = ray.get(handle)
            if answer is None:
                return None
            version, ref, life = answer
            return version, ray.get(ref), life
        except (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError) as error:
            raise SourceLost(str(error)) from error
