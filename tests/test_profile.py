"""analysis.expert_profile against a numpy computation over the routing arrays, for an in-memory trace, a
dask-chunked one read in small blocks, and without weights."""

import numpy as np
import pytest

from test_analysis import dataset, routing
from workbench import analysis as A
from workbench.analysis import profile as P


def brute(ids, inputs, weights, layer_index, expert, labels, tokens, context, bins, partners):
    """Every field of the profile, by plain numpy over the whole arrays."""
    L, T, k = ids.shape
    E = 8
    sel = ids[layer_index]
    chosen = sel == expert
    hit = chosen.any(1)
    w = np.where(chosen, weights[layer_index], 0).sum(1)
    out = {}
    counts = {t: int(((inputs == t) & hit).sum()) for t in np.unique(inputs)}
    ranked = sorted((t for t in counts if counts[t]), key=lambda t: (-counts[t], t))[:tokens]
    out["frequent_ids"] = ranked
    out["frequent_count"] = [counts[t] for t in ranked]
    out["frequent_occurrences"] = [int((inputs == t).sum()) for t in ranked]
    example = []
    for t in ranked:
        where = np.flatnonzero((inputs == t) & hit)
        example.append(int(where[np.argmax(w[where])]))  # argmax: the first of equal weights
    out["frequent_position"] = example
    strong = sorted(np.flatnonzero(hit), key=lambda p: (-w[p], p))[:tokens]
    out["strongest_position"] = strong
    out["strongest_weight"] = w[strong]
    out["strongest_ids"] = inputs[strong]
    padded = np.concatenate([np.full(context, -1), inputs, np.full(context, -1)])
    out["frequent_context"] = [padded[p:p + 2 * context + 1] for p in example]
    out["strongest_context"] = [padded[p:p + 2 * context + 1] for p in strong]
    names = sorted(set(labels))
    out["domain_tokens"] = [int((labels == d).sum()) for d in names]
    out["domain_count"] = [int(((labels == d) & hit).sum()) for d in names]
    out["domain_share"] = [hit[labels == d].mean() for d in names]
    nb = min(bins, T)
    b = np.arange(T) * nb // T
    out["position_share"] = [chosen[b == i].sum() / (sel[b == i] >= 0).sum() for i in range(nb)]
    pair = {j: int((hit & (sel == j).any(1)).sum()) for j in range(E) if j != expert}
    best = sorted((j for j in pair if pair[j]), key=lambda j: (-pair[j], j))[:partners]
    out["partner_expert"] = best
    out["partner_count"] = [pair[j] for j in best]
    out["partner_coactivation"] = [pair[j] / hit.sum() for j in best]
    return out


@pytest.fixture(scope="module")
def trace():
    ids = routing(203, 3, 8, 2, seed=3, dead=(6,), skew=1.0)
    rng = np.random.default_rng(7)
    weights = np.round(rng.random(ids.shape), 2).astype(np.float16)  # rounded: equal weights occur, ties tested
    inputs = rng.integers(0, 25, 203)
    labels = np.array(["code", "prose", "math"])[rng.integers(0, 3, 203)]
    return ids, inputs, weights, labels


@pytest.mark.parametrize("chunk, block", [(None, 1 << 20), (7, 10)])
@pytest.mark.parametrize("layer, expert", [(10, 0), (12, 5)])
def test_profile_matches_numpy(trace, monkeypatch, chunk, block, layer, expert):
    ids, inputs, weights, labels = trace
    monkeypatch.setattr(P, "BLOCK_ENTRIES", block)  # 10 entries: blocks of 5 tokens
    ds = dataset(ids, 8, tokens=inputs, chunk=chunk)
    ds = ds.assign(topk_weights=(("layer", "token", "k"), weights))
    got = A.expert_profile(ds, layer, expert, labels=labels, tokens=6, context=3, bins=9, partners=4)
    want = brute(ids, inputs, weights.astype(np.float64), layer - 10, expert, labels, 6, 3, 9, 4)
    for name, value in want.items():
        np.testing.assert_allclose(np.asarray(got[name].values, float), np.asarray(value, float), rtol=1e-12,
                                   err_msg=name)
    assert got.offset.values.tolist() == list(range(-3, 4))
    assert got.domain.values.tolist() == ["code", "math", "prose"]
    assert got.bin_start.values.tolist() == [p for p in range(203) if p * 9 // 203 != (p - 1) * 9 // 203]
    chosen = (ids[layer - 10] == expert).any(1)
    assert got.attrs["count"] == chosen.sum() and got.attrs["share"] == pytest.approx(chosen.sum() / (203 * 2))
    assert got.domain_share.attrs["baseline"] == 2 / 8 and got.position_share.attrs["baseline"] == 1 / 8


def test_profile_without_weights_or_labels(trace):
    ids, inputs, _, labels = trace
    ds = dataset(ids, 8, tokens=inputs)
    got = A.expert_profile(ds, 11, 1, tokens=4, context=2)
    want = brute(ids, inputs, np.zeros(ids.shape), 1, 1, labels, 4, 2, 20, 10)
    for name in ("frequent_ids", "frequent_count", "frequent_position", "frequent_context", "position_share",
                 "partner_expert", "partner_coactivation"):
        np.testing.assert_allclose(np.asarray(got[name].values, float), np.asarray(want[name], float), err_msg=name)
    # without weights the example is the first position
    first = [int(np.flatnonzero((inputs == t) & (ids[1] == 1).any(1))[0]) for t in want["frequent_ids"]]
    assert got.frequent_position.values.tolist() == first
    assert got.sizes["strong"] == 0 and got.sizes["domain"] == 0 and not got.attrs["weighted"]


def test_profile_of_a_dead_expert_is_empty(trace):
    ids, inputs, _, _ = trace
    got = A.expert_profile(dataset(ids, 8, tokens=inputs), 10, 6)
    assert got.attrs["count"] == 0 and got.sizes["top"] == 0 and got.sizes["partner"] == 0
    assert (got.position_share.values == 0).all()


@pytest.mark.parametrize("kw, message", [(dict(layer=13), r"layer .*\[10, 11, 12\]"), (dict(expert=8), "expert"),
                                         (dict(tokens=0), "tokens"), (dict(bins=True), "bins")])
def test_profile_checks_arguments(trace, kw, message):
    ids, inputs, _, _ = trace
    args = dict(layer=10, expert=0) | kw
    with pytest.raises(ValueError, match=message):
        A.expert_profile(dataset(ids, 8, tokens=inputs), args.pop("layer"), args.pop("expert"), **args)
    with pytest.raises(ValueError, match="input_ids"):
        A.expert_profile(dataset(ids, 8).drop_vars("input_ids"), 10, 0)
