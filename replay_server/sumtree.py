"""A sum-tree over `capacity` non-negative leaves, vectorised over batches (Schaul et al. 2016).

Binary and implicit: node i has children 2i and 2i+1, the root is node 1 and leaf j is node
`size + j`, with `size` the capacity rounded up to a power of two. Every batch operation is
one numpy call per tree level (about 21 levels at 2M leaves), never one Python step per item.
Parents are recomputed from their children rather than patched by deltas, so sums never drift.
"""
from __future__ import annotations

import numpy as np


class SumTree:
    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError(f"sum-tree capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.size = 1 << max(0, (capacity - 1).bit_length())
        self.depth = self.size.bit_length() - 1
        self.nodes = np.zeros(2 * self.size, np.float64)

    @property
    def total(self) -> float:
        return float(self.nodes[1])

    @property
    def leaves(self) -> np.ndarray:
        """A view of the leaf values, one per slot."""
        return self.nodes[self.size:self.size + self.capacity]

    def get(self, slots: np.ndarray) -> np.ndarray:
        return self.nodes[self.size + np.asarray(slots)]

    def set(self, slots: np.ndarray, values: np.ndarray) -> None:
        """Leaf `slots[i]` becomes `values[i]` (the last one wins for repeated slots)."""
        nodes = self.nodes
        node = self.size + np.asarray(slots, np.int64)
        nodes[node] = values
        width = self.size  # nodes on the level being updated
        while width > 1:
            node >>= 1
            width >>= 1
            if width <= 2 * len(node):
                break
            nodes[node] = nodes[2 * node] + nodes[2 * node + 1]
        else:
            return
        # Near the root a level has few nodes: recomputing whole levels with two slices is
        # cheaper than gathering the batch's paths (and touches memory in order).
        while width >= 1:
            np.add(nodes[2 * width:4 * width:2], nodes[2 * width + 1:4 * width:2],
                   out=nodes[width:2 * width])
            width >>= 1

    def set_all(self, values: np.ndarray) -> None:
        """Replace every leaf at once (restore, bulk fills): O(capacity), level by level."""
        self.nodes[:] = 0.0
        self.nodes[self.size:self.size + self.capacity] = values
        start = self.size
        while start > 1:
            parents = self.nodes[start // 2:start]
            children = self.nodes[start:2 * start].reshape(-1, 2)
            np.add(children[:, 0], children[:, 1], out=parents)
            start //= 2

    def check(self) -> None:
        """Raises ValueError unless the tree is one `set` and `set_all` could have built:
        leaves finite and >= 0, the padding past `capacity` empty, every parent exactly the
        sum of its children (both compute it that way), the total finite."""
        leaves = self.leaves
        if not np.isfinite(leaves).all() or (leaves < 0).any():
            raise ValueError("priorities must be finite and >= 0")
        if self.nodes[0] != 0.0 or self.nodes[self.size + self.capacity:].any():
            raise ValueError("the sum-tree holds values outside its leaves")
        with np.errstate(over="ignore"):  # an overflowing sum is refused below
            children = self.nodes[2::2] + self.nodes[3::2]
        if not np.array_equal(self.nodes[1:self.size], children):
            raise ValueError("the sum-tree's sums disagree with its leaves")
        if not np.isfinite(self.total):
            raise ValueError(f"the sum-tree's total {self.total} is not finite")

    def find(self, values: np.ndarray) -> np.ndarray:
        """Slot of the leaf whose cumulative interval contains each of `values` (each in
        [0, total)): leaf j is chosen for values in [sum of leaves < j, that + leaf j)."""
        values = np.array(values, np.float64)
        node = np.ones(len(values), np.int64)
        for _ in range(self.depth):
            node <<= 1
            left = self.nodes[node]
            go_right = values >= left
            values -= left * go_right
            node += go_right
        slots = node - self.size
        # Rounding can push a value onto an empty leaf at an interval edge: walk back to the
        # nearest non-empty one on its left (rare, and only ever a step or two).
        empty = self.nodes[node] <= 0.0
        if empty.any():
            slots[empty] = [self._nearest_nonempty(s) for s in slots[empty]]
        return slots

    def _nearest_nonempty(self, slot: int) -> int:
        leaves = self.leaves
        nonzero = np.flatnonzero(leaves[:slot + 1] > 0)
        if len(nonzero):
            return int(nonzero[-1])
        return int(np.flatnonzero(leaves > 0)[0])

    def sample(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        """Stratified sampling: one value uniform in each of `batch_size` equal segments of
        [0, total), so a batch covers the distribution evenly. Needs total > 0."""
        total = self.total
        if not total > 0.0:
            raise ValueError("cannot sample from a sum-tree whose total is zero")
        values = (np.arange(batch_size) + rng.random(batch_size)) * (total / batch_size)
        return self.find(np.minimum(values, np.nextafter(total, 0.0)))
