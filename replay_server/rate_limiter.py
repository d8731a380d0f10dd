"""Samples-per-insert rate limiting with Reverb's SampleToInsertRatio semantics.

The learner may sample while the observed ratio stays within `tolerance` samples of the
target; actors may insert while it does too. Both sides wait rather than drift, so a slow
learner slows actors and a slow actor pool slows the learner, and the data each update sees
stays as fresh as the seed's one-update-every-4-steps loop made it.
"""
from __future__ import annotations

import math

# Relative slack for checking counters: the limiter's float arithmetic may have rounded the
# ratio it held (`diff`) by an ulp or so.
ROUNDING = 1e-9


class RateLimiter:
    def __init__(self, samples_per_insert: float, min_size_to_sample: int, tolerance: float):
        if tolerance < samples_per_insert:
            raise ValueError(f"tolerance {tolerance} < samples_per_insert {samples_per_insert}: "
                             "no single insert could ever pass")
        self.samples_per_insert = samples_per_insert
        self.min_size_to_sample = min_size_to_sample
        offset = samples_per_insert * min_size_to_sample
        self.min_diff = offset - tolerance
        self.max_diff = offset + tolerance
        self.inserts = 0
        self.samples = 0

    @property
    def diff(self) -> float:
        return self.inserts * self.samples_per_insert - self.samples

    def can_sample(self, num_samples: int) -> bool:
        return (self.inserts >= self.min_size_to_sample
                and self.diff - num_samples >= self.min_diff)

    def insert_budget(self) -> int:
        """Transitions that may be inserted now without leaving the tolerance. (Below the
        minimum size Reverb always admits inserts; max_diff >= offset makes that implied.)"""
        return max(0, math.floor((self.max_diff - self.diff) / self.samples_per_insert))

    def check(self) -> None:
        """Raises ValueError unless this limiter's counters are ones it could have reached:
        it records samples only while inserts reach the minimum size and the ratio stays
        above its low end, and inserts only raise the ratio; so counts that put it below
        (e.g. forged samples) would refuse every sample until as many inserts came."""
        if self.samples and (self.inserts < self.min_size_to_sample
                             or self.diff < self.min_diff - ROUNDING * max(1.0, self.samples)):
            raise ValueError(
                f"{self.samples} samples after {self.inserts} inserts: more than "
                f"{self.samples_per_insert} per insert allows (tolerance included)")

    def record_insert(self, n: int) -> None:
        self.inserts += n

    def record_sample(self, n: int) -> None:
        self.samples += n

    def observed_samples_per_insert(self) -> float:
        """Samples per insert past the minimum size: the ratio the limiter holds to its target
        (the inserts that filled replay up to the minimum were never sampled against), so a
        learner held by the limiter shows the target, not less."""
        past_minimum = self.inserts - self.min_size_to_sample
        return self.samples / past_minimum if past_minimum > 0 else 0.0
