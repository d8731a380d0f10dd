"""The sum-tree alone: sums, sampling frequencies, edge cases."""
import numpy as np
import pytest

from replay_server.sumtree import SumTree


def test_sums_follow_sets_including_repeated_slots():
    tree = SumTree(1000)
    rng = np.random.default_rng(0)
    values = rng.random(1000)
    tree.set(np.arange(1000), values)
    assert tree.total == pytest.approx(values.sum())
    tree.set(np.array([3, 3, 7]), np.array([10.0, 20.0, 0.0]))  # the last write wins
    values[3], values[7] = 20.0, 0.0
    assert tree.total == pytest.approx(values.sum())
    np.testing.assert_array_equal(tree.leaves, values)
    bulk = SumTree(1000)
    bulk.set_all(values)
    np.testing.assert_allclose(bulk.nodes, tree.nodes)


def test_sampling_frequencies_match_priorities():
    """Chi-square test with a fixed seed: draws follow leaf_i / total, zeros never drawn."""
    tree = SumTree(50)
    rng = np.random.default_rng(1)
    priorities = rng.random(50) ** 2
    priorities[[4, 17, 49]] = 0.0
    tree.set(np.arange(50), priorities)
    draws = np.concatenate([tree.sample(512, rng) for _ in range(400)])
    counts = np.bincount(draws, minlength=50)
    assert counts[[4, 17, 49]].sum() == 0
    positive = priorities > 0
    expected = len(draws) * priorities[positive] / priorities.sum()
    chi2 = ((counts[positive] - expected) ** 2 / expected).sum()
    assert chi2 < 85.0  # 46 degrees of freedom, p = 0.0005


def test_find_maps_values_to_their_intervals():
    tree = SumTree(4)
    tree.set(np.arange(4), np.array([1.0, 0.0, 2.0, 3.0]))
    np.testing.assert_array_equal(tree.find(np.array([0.0, 0.999, 1.0, 2.999, 3.0, 5.999])),
                                  [0, 0, 2, 2, 3, 3])


def test_empty_tree_refuses_to_sample():
    tree = SumTree(8)
    with pytest.raises(ValueError, match="total is zero"):
        tree.sample(4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="positive"):
        SumTree(0)


def test_tiny_and_bulk_trees():
    one = SumTree(1)
    one.set(np.array([0]), np.array([3.0]))
    assert one.total == 3.0 and (one.sample(4, np.random.default_rng(0)) == 0).all()
    tree = SumTree(1 << 12)
    values = np.random.default_rng(2).random(1 << 12)
    tree.set(np.arange(1 << 12), values)  # a batch wider than most levels
    assert tree.total == pytest.approx(values.sum())
    reference = SumTree(1 << 12)
    reference.set_all(values)
    np.testing.assert_allclose(tree.nodes, reference.nodes)
