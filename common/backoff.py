"""Exponential backoff for a caller that asks again after a refusal (a throttled actor asking
the replay shard for insert budget): doubling waits keep a waiting role from spending the CPU
the others need on asks that will be refused."""
from __future__ import annotations

import time


class Backoff:
    def __init__(self, first_s: float, longest_s: float):
        self.longest_s = longest_s
        self.next_s = first_s

    def wait(self) -> None:
        """Sleep, and make the next wait twice as long (up to `longest_s`)."""
        time.sleep(self.next_s)
        self.next_s = min(2 * self.next_s, self.longest_s)
