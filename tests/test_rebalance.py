"""Load-rebalancing what-if (workbench.rebalance): EPLB's hierarchical placement against hand-computed cases and
DeepSeek's published example, never less even than the contiguous placement, and the random-token flag."""

import warnings

import numpy as np
import pytest

from workbench import engines
from workbench.errors import InputError
from workbench.rebalance import _gpu_load, rebalance

# DeepSeek's EPLB README example: 2 layers x 12 experts, 16 slots, 4 groups, 2 nodes, 8 GPUs, and the placement
# its implementation prints (github.com/deepseek-ai/EPLB)
EPLB_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                        [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
EPLB_PLACEMENT = np.array([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                           [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def test_the_published_example_gets_the_published_gpu_loads():
    plan = rebalance(EPLB_WEIGHT, gpus=8, nodes=2, slots=16, groups=4)
    assert plan.attrs["policy"] == "hierarchical"
    for layer in range(2):
        theirs = _gpu_load(EPLB_WEIGHT[layer].astype(float), EPLB_PLACEMENT[layer], 8)
        np.testing.assert_allclose(plan.gpu_load.values[layer], theirs)
        assert sorted(plan.replicas.values[layer]) == sorted(np.bincount(EPLB_PLACEMENT[layer], minlength=12))


def test_hand_computed_replication_and_packing():
    """[8, 1, 1, 2] on 2 GPUs of 3 slots: expert 0 gets 3 replicas of 8/3; packing heaviest first onto the lighter
    GPU gives {8/3, 8/3, 1} and {8/3, 2, 1}: 19/3 and 17/3 against the contiguous 9 and 3."""
    plan = rebalance(np.array([[8, 1, 1, 2]]), gpus=2, slots=6)
    assert plan.replicas.values.tolist() == [[3, 1, 1, 1]]
    np.testing.assert_allclose(plan.gpu_load.values[0], [19 / 3, 17 / 3])
    np.testing.assert_allclose(plan.identity_gpu_load.values[0], [9, 3])
    np.testing.assert_allclose(plan.imbalance.values, [19 / 18])
    np.testing.assert_allclose(plan.identity_imbalance.values, [1.5])
    assert sorted(plan.placement.values[0][:3].tolist()) == [0, 0, 2]


def test_without_spare_slots_greedy_packing_or_the_contiguous_split_whichever_is_more_even():
    """[4, 3, 1, 2] on 2 GPUs: heaviest first onto the lighter GPU gives {4, 1} {3, 2}, against the contiguous
    {4, 3} {1, 2}. [7, 6, 5, 9, 8, 1]: greedy gives {9, 6, 5} {8, 7, 1} = 20/16, the contiguous split 18/18,
    which is kept."""
    plan = rebalance(np.array([[4, 3, 1, 2], [1, 5, 4, 2]]), gpus=2)
    np.testing.assert_allclose(plan.gpu_load.values, [[5, 5], [6, 6]])
    np.testing.assert_allclose(plan.identity_gpu_load.values, [[7, 3], [6, 6]])
    kept = rebalance(np.array([[7, 6, 5, 9, 8, 1]]), gpus=2)
    assert kept.kept_identity.values.tolist() == [True]
    np.testing.assert_allclose(kept.gpu_load.values, [[18, 18]])
    assert kept.placement.values.tolist() == [[0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("seed", range(40))
def test_never_less_even_than_the_contiguous_placement(seed):
    rng = np.random.default_rng(seed)
    nodes = int(rng.choice([1, 2, 4]))
    gpus = nodes * int(rng.integers(1, 4))
    groups = nodes * int(rng.integers(1, 3))
    experts = groups * gpus * int(rng.integers(1, 3))
    slots = experts + gpus * int(rng.integers(0, 3))
    load = rng.pareto(1.5, (3, experts)) * 100
    plan = rebalance(load, gpus=gpus, nodes=nodes, slots=slots, groups=groups)
    assert (plan.imbalance.values <= plan.identity_imbalance.values + 1e-12).all()
    assert (plan.replicas.values >= 1).all() and (plan.replicas.values.sum(-1) == slots).all()
    np.testing.assert_allclose(plan.gpu_load.values.sum(-1), load.sum(-1))
    # the hierarchical policy keeps each group's replicas on one node
    gpu_of_slot = np.arange(slots) // (slots // gpus)
    node_of_slot = gpu_of_slot // (gpus // nodes)
    for layer in range(3):
        if plan.kept_identity.values[layer]:
            continue
        group = plan.placement.values[layer] // (experts // groups)
        for g in range(groups):
            assert len(set(node_of_slot[group == g])) == 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=3), "multiple of gpus"),
    (dict(gpus=4, slots=2), "at least the 4 experts"),
    (dict(gpus=2, nodes=4), "multiple of nodes"),
    (dict(gpus=2, groups=3), "groups \\(3\\) must divide"),
    (dict(gpus=0), "gpus must be a positive integer"),
])
def test_arguments_that_do_not_fit_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        rebalance(np.ones((1, 4)), **kwargs)


def test_load_must_be_counts():
    with pytest.raises(InputError, match="\\[layer, expert\\]"):
        rebalance(np.ones(4), gpus=2)
    with pytest.raises(InputError, match="non-negative"):
        rebalance(-np.ones((1, 4)), gpus=2)


def _dump(ids: np.ndarray, seed: int = 0):
    rng = np.random.default_rng(seed)
    routed = np.stack([rng.permutation(8)[:2] for _ in range(len(ids) * 2)]).reshape(len(ids), 2, 2)
    return engines.read_vllm(routed, ids, n_experts=8)


def test_random_tokens_are_flagged_and_text_is_not():
    text = np.frombuffer(("the cat sat on the mat and the dog lay by the door " * 200).encode(), np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan = rebalance(_dump(text.astype(np.int64)), gpus=2)
    assert plan.attrs["tokens_note"] == ""
    np.testing.assert_allclose(plan.gpu_load.values.sum(-1), len(text) * 2)  # k slots per token
    uniform = np.random.default_rng(1).integers(0, 256, len(text))
    with pytest.warns(UserWarning, match="uniform random ids"):
        rebalance(_dump(uniform), gpus=2)
    wide = np.random.default_rng(2).integers(0, 100_000, 4096)  # large vocabulary, few tokens
    with pytest.warns(UserWarning, match="uniform random ids"):
        rebalance(_dump(wide), gpus=2)
    seeded = _dump(text.astype(np.int64))
    seeded.attrs["seed"] = 0
    with pytest.warns(UserWarning, match="records their seed"):
        rebalance(seeded, gpus=2)
