"""The sum-tree alone: sums, sampling frequencies, edge cases; and the bound on what the
buffer puts in it (priorities and exponent), which keeps its total finite."""
import numpy as np
import pytest

from replay_server.buffer import MAX_PRIORITY, InvalidSpec, ReplaySpec
from replay_server.sumtree import SumTree
from tests.test_replay import (
    SPEC,
    altered,
    insert_all,
    interleaved_chunks,
    make_buffer,
    sampled_items,
)


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


def test_a_tree_that_set_could_not_have_built_is_refused_by_check():
    tree = SumTree(6)
    tree.set(np.arange(6), np.arange(6.0))
    tree.check()
    # Nodes 8..13 are the leaves, 14 and 15 padding.
    for broken, needle in [((9, 5.0), "disagree with its leaves"),  # a leaf, sums not redone
                           ((10, -1.0), "finite and >= 0"), ((12, np.nan), "finite and >= 0"),
                           ((14, 1.0), "outside its leaves"), ((2, 7.0), "disagree")]:
        node, value = broken
        copy = SumTree(6)
        copy.nodes[:] = tree.nodes
        copy.nodes[node] = value
        with pytest.raises(ValueError, match=needle):
            copy.check()
    huge = SumTree(4)
    with np.errstate(over="ignore"):
        huge.set_all(np.full(4, 1e308))
    with pytest.raises(ValueError, match="total inf is not finite"):
        huge.check()


def full_buffer(alpha):
    buffer = make_buffer(200, alpha=alpha)
    insert_all(buffer, interleaved_chunks(np.random.default_rng(0), senders=2, steps=80)[0])
    assert buffer.size == 200
    return buffer


def test_huge_priorities_are_clipped_so_the_total_and_the_weights_stay_finite():
    """Exponent 1 (the most accepted), every row at 1e308 (through the buffer's float64 API),
    or at 1e31 and 3.4e38 (float32's largest): the total was inf (NaN weights), or the rows
    at 3.4e38 took every draw."""
    buffer = full_buffer(alpha=1.0)
    keys = np.arange(buffer.total_added - 200, buffer.total_added)
    assert buffer.update_priorities(keys, np.full(200, 1e308)) == 200
    assert np.isfinite(buffer.priority_mass())
    assert np.isfinite(sampled_items(buffer, 64, beta=1.0)["weight"]).all()
    buffer.update_priorities(keys, np.where(keys % 2, 1e31, 3.4e38))
    items = sampled_items(buffer, 2_000, beta=1.0)
    assert 800 < np.count_nonzero(items["key"] % 2) < 1_200  # 1e31 is drawn as often
    assert np.isfinite(items["weight"]).all() and (items["weight"] > 0.99).all()
    assert buffer.tree.leaves.max() == pytest.approx(MAX_PRIORITY)
    assert buffer.max_priority == MAX_PRIORITY and np.isfinite(buffer.priority_mass())
    buffer.check_invariants()


def test_one_huge_actor_priority_does_not_take_every_draw():
    """An insert's priorities (float32 from the actor) at the default exponent 0.6: one of
    3.4e38 among priorities of 1 took every draw; clipped, it is drawn often, not always."""
    buffer = full_buffer(alpha=0.6)
    keys = np.arange(buffer.total_added - 200, buffer.total_added)
    buffer.update_priorities(keys, np.full(200, 1e6))  # the clipped largest, everywhere
    (arrays, meta), = [altered({})]
    arrays["priority"] = np.where(np.arange(len(arrays["action"])) == 0, 3.4e38,
                                  1e6).astype(np.float32)
    assert buffer.add(arrays, meta) == len(arrays["action"])
    items = sampled_items(buffer, 1_000, beta=0.4)
    assert len(set(items["key"].tolist())) > 100 and np.isfinite(items["weight"]).all()
    assert buffer.max_priority == MAX_PRIORITY and np.isfinite(buffer.priority_mass())
    buffer.check_invariants()


@pytest.mark.parametrize("exponent", [10, 1.0000001, -0.1, float("nan"), float("inf"), True,
                                      "0.6", None])
def test_a_priority_exponent_outside_0_1_is_refused(exponent):
    """Exponent 10 turned a priority of 1e31 into an infinite total."""
    with pytest.raises(InvalidSpec, match=r"priority exponent must be a number in \[0, 1\]"):
        ReplaySpec(200, **SPEC, priority_exponent=exponent)
    for accepted in (0, 0.0, 0.6, 1, 1.0):
        ReplaySpec(200, **SPEC, priority_exponent=accepted)
