"""Routing analyses (workbench.analysis): every metric against a brute-force Python computation on small random
traces (k > 1, ties, dead experts, blocks and store chunks that do not divide the token count), against its
closed-form value under uniform random routing, and over a real store of the embedded model against the same
trace in memory; plus the specialisation notebook, executed; and over stores on a dask.distributed LocalCluster
against the same analyses run locally."""

import fcntl
import itertools
import json
import logging
import math
import os
import sys
from collections import Counter
from pathlib import Path

import distributed
import numpy as np
import pytest
import torch
import xarray as xr

import workbench as wb
from workbench import analysis as A

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- random traces


def routing(T: int, L: int, E: int, k: int, seed: int, dead: tuple[int, ...] = (), skew: float = 0.0) -> np.ndarray:
    """[L, T, k] ranked distinct expert ids; `dead` experts never chosen; skew > 0 favours low expert ids."""
    rng = np.random.default_rng(seed)
    scores = rng.random((L, T, E)) + skew * np.linspace(1, 0, E)
    scores[..., list(dead)] = -1
    return np.argsort(-scores, -1, kind="stable")[..., :k].astype(np.int16)


def dataset(ids: np.ndarray, E: int, tokens: np.ndarray | None = None, chunk: int | None = None,
            layers: list[int] | None = None) -> xr.Dataset:
    """A routing Dataset as `from_cache` builds it; dask-backed with token chunks of `chunk` if given."""
    L, T, k = ids.shape
    tokens = np.random.default_rng(1).integers(0, 40, T) if tokens is None else tokens
    layers = list(range(10, 10 + L)) if layers is None else layers
    ds = xr.Dataset({"topk_ids": (("layer", "token", "k"), ids), "input_ids": ("token", tokens.astype(np.int32))},
                    coords={"layer": layers, "token": np.arange(T)},
                    attrs={"n_experts": E, "k": k, "routed_layers": layers})
    return ds.chunk({"token": chunk}) if chunk else ds


@pytest.fixture(params=[0, 1, 2])
def case(request, monkeypatch):
    """(ds, ids, E, k): a skewed trace with dead experts over 203 tokens; seed 0 dask-chunked by 7 and scanned
    one chunk at a time, seed 1 in memory scanned 5 tokens at a time, seed 2 chunked by 7 and scanned 14 at a time."""
    seed = request.param
    E, k = (8, 2) if seed == 0 else (12, 3)
    ids = routing(203, 3, E, k, seed, dead=(E - 1, 2), skew=1.5 * seed)
    monkeypatch.setattr(A.scan, "BLOCK_BYTES", (16 if seed == 2 else 5) * ids.shape[0] * k * 2)
    return dataset(ids, E, chunk=7 if seed != 1 else None), ids, E, k


def brute_load(ids: np.ndarray, E: int) -> dict[str, np.ndarray]:
    out = {key: [] for key in ("counts", "entropy", "cv", "gini", "maxvio")}
    for layer in ids:
        c = Counter(int(e) for row in layer for e in row)
        counts = np.array([c[e] for e in range(E)], float)
        p = counts / counts.sum()
        mean = counts.mean()
        out["counts"].append(counts)
        out["entropy"].append(-sum(x * math.log(x) for x in p if x > 0) / math.log(E))
        out["cv"].append(math.sqrt(sum((x - mean) ** 2 for x in counts) / E) / mean)
        out["gini"].append(sum(abs(a - b) for a in counts for b in counts) / (2 * E * E * mean))
        out["maxvio"].append((counts.max() - mean) / mean)
    return {key: np.array(v) for key, v in out.items()}


# ---------------------------------------------------------------- against brute force


def test_expert_load_matches_brute_force(case):
    ds, ids, E, k = case
    got, want = A.expert_load(ds), brute_load(ids, E)
    np.testing.assert_array_equal(got.counts.values, want["counts"])
    for key in ("entropy", "cv", "gini", "maxvio"):
        np.testing.assert_allclose(got[key].values, want[key], rtol=1e-12, err_msg=key)
    np.testing.assert_allclose(got.relative_load.values, want["counts"] / (ids.shape[1] * k / E))
    assert got.dead.sel(expert=E - 1).all() and got.dead.sel(expert=2).all()
    assert (got.n_dead.values == (want["counts"] == 0).sum(-1)).all()
    assert got.layer.values.tolist() == [10, 11, 12] and got.counts.dims == ("layer", "expert")
    np.testing.assert_array_equal(A.eplb_weight(ds).numpy(), want["counts"])
    np.testing.assert_array_equal(A.eplb_weight(got).numpy(), want["counts"])


def test_load_of_tied_counts():
    """Two experts with equal counts, one dead: Gini and MaxVio by hand."""
    ids = np.array([[[0, 1], [1, 0], [0, 2], [1, 2]]], np.int16)  # experts 0 and 1: 3 each, 2: 2, 3: none
    got = A.expert_load(dataset(ids, 4))
    assert got.counts.values.tolist() == [[3, 3, 2, 0]]
    assert got.maxvio.item() == pytest.approx((3 - 2) / 2)
    assert got.gini.item() == pytest.approx(sum(abs(a - b) for a in (3, 3, 2, 0) for b in (3, 3, 2, 0)) / (2 * 16 * 2))
    assert got.n_dead.item() == 1 and got.cv.item() == pytest.approx(math.sqrt(6 / 4) / 2)


@pytest.mark.parametrize("mode", ["all_pairs", "adjacent_ranks"])
def test_coactivation_matches_brute_force(case, mode):
    ds, ids, E, k = case
    got = A.coactivation(ds, mode=mode)
    for li, layer in enumerate(ids):
        pairs, single = np.zeros((E, E)), np.zeros(E)
        for row in layer.tolist():
            single[row] += 1
            chosen = itertools.combinations(row, 2) if mode == "all_pairs" else zip(row, row[1:])
            for a, b in chosen:
                pairs[a, b] += 1
                pairs[b, a] += 1
        np.testing.assert_array_equal(got.pairs.values[li], pairs)
        with np.errstate(invalid="ignore"):
            np.testing.assert_allclose(got.coactivation.values[li], pairs / single[:, None], equal_nan=True)
    assert np.isnan(got.coactivation.sel(expert_i=E - 1)).all()  # dead: N(i) = 0


def test_domain_specialisation_matches_brute_force(case):
    ds, ids, E, k = case
    domains = np.array(["code", "prose", "math"])[np.random.default_rng(5).integers(0, 3, ids.shape[1])]
    got = A.domain_specialisation(ds, domains)
    assert got.domain.values.tolist() == ["code", "math", "prose"]
    for d in got.domain.values:
        rows = ids[:, domains == d]
        for li in range(ids.shape[0]):
            c = Counter(int(e) for row in rows[li] for e in row)
            want = np.array([c[e] for e in range(E)]) / rows.shape[1]
            np.testing.assert_allclose(got.specialisation.sel(domain=d).values[li], want)
    np.testing.assert_allclose(got.relative.values, got.specialisation.values * E / k)
    assert got.specialisation.attrs["baseline"] == k / E


@pytest.mark.parametrize("against", ["input", "next", "predicted"])
@pytest.mark.parametrize("top1", [False, True])
def test_vocabulary_specialisation_matches_brute_force(case, against, top1):
    ds, ids, E, k = case
    T = ids.shape[1]
    tokens = ds.input_ids.values
    predicted = np.random.default_rng(9).integers(0, 30, T)
    ds = ds.assign(predicted_ids=("token", predicted.astype(np.int32)))
    target = {"input": list(tokens), "next": list(tokens[1:]) + [None], "predicted": list(predicted)}[against]
    got = A.vocabulary_specialisation(ds, against, min_count=6, top1=top1)
    occurrences = Counter(x for x in target if x is not None)
    kept = sorted(x for x, n in occurrences.items() if n >= 6)
    assert got.token_id.values.tolist() == kept and got.occurrences.values.tolist() == [occurrences[x] for x in kept]
    for li in range(ids.shape[0]):
        for x in kept:
            c = Counter(int(e) for t in range(T) if target[t] == x for e in ids[li, t, :1 if top1 else k])
            want = np.array([c[e] for e in range(E)]) / occurrences[x]
            np.testing.assert_allclose(got.specialisation.sel(token_id=x).values[li], want)
            assert got.top_expert.sel(token_id=x).values[li] == int(np.argmax(want))  # ties: lowest expert
    np.testing.assert_allclose(got.mean_top_share.values, got.specialisation.max("expert").mean("token_id"))


def test_repetition_matches_brute_force(case):
    ds, ids, E, k = case
    got = A.repetition(ds)
    labels = np.random.default_rng(3).integers(0, 2, ids.shape[1])
    by_label = A.repetition(ds, labels=labels)
    for li, layer in enumerate(ids.tolist()):
        stats = {g: [0, 0, 0, 0] for g in (None, 0, 1)}
        for t in range(1, len(layer)):
            a, b = layer[t - 1], layer[t]
            for g in (None, labels[t]):
                if g is not None and labels[t - 1] != g:
                    continue
                s = stats[g]
                s[0] += 1
                s[1] += a[0] == b[0]
                s[2] += bool(set(a[:2]) & set(b[:2]))
                s[3] += len(set(a) & set(b))
        for g, out in ((None, got), (0, by_label.sel(domain=0)), (1, by_label.sel(domain=1))):
            n, first, second, shared = stats[g]
            assert out.pairs.values[li] == n
            assert out["first"].values[li] == pytest.approx(first / n)
            assert out.first_or_second.values[li] == pytest.approx(second / n)
            assert out.overlap.values[li] == pytest.approx(shared / n / k)


def test_saturation_matches_brute_force(case):
    ds, ids, E, k = case
    other = routing(ids.shape[1], ids.shape[0], E, k, seed=77)
    other[:, ::3] = ids[:, ::3]  # a third of the tokens routed identically
    got = A.saturation(ds, dataset(other, E, chunk=11))
    for li in range(ids.shape[0]):
        inter = [len(set(a) & set(b)) for a, b in zip(ids[li].tolist(), other[li].tolist())]
        assert got.saturation.values[li] == pytest.approx(np.mean(inter) / k)
        assert got.jaccard.values[li] == pytest.approx(np.mean([i / (2 * k - i) for i in inter]))
        assert got.top1.values[li] == pytest.approx(np.mean(ids[li, :, 0] == other[li, :, 0]))
    top1 = A.saturation(ds, dataset(other, E), k=1)
    np.testing.assert_allclose(top1.saturation.values, got.top1.values)
    with pytest.raises(ValueError, match="different tokens"):
        A.saturation(ds, dataset(other, E, tokens=np.zeros(ids.shape[1], int)))


def test_cross_layer_matches_brute_force(case):
    ds, ids, E, k = case
    got = A.cross_layer(ds)
    assert got.layer_from.values.tolist() == [10, 11] and got.layer_to.values.tolist() == [11, 12]
    picked = A.cross_layer(ds, pairs=[(12, 10)], top1=True)
    for p, (a, b) in enumerate([(0, 1), (1, 2)]):
        want = np.zeros((E, E))
        for ra, rb in zip(ids[a].tolist(), ids[b].tolist()):
            for i in ra:
                for j in rb:
                    want[i, j] += 1
        np.testing.assert_array_equal(got.counts.values[p], want)
    want = np.zeros((E, E))
    for ra, rb in zip(ids[2].tolist(), ids[0].tolist()):
        want[ra[0], rb[0]] += 1
    np.testing.assert_array_equal(picked.counts.values[0], want)
    with np.errstate(invalid="ignore"):
        np.testing.assert_allclose(picked.conditional.values[0], want / want.sum(1, keepdims=True), equal_nan=True)


def brute_mi(pairs: list[tuple]) -> float:
    n = len(pairs)
    joint, left, right = Counter(pairs), Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    return sum(c / n * math.log2(c * n / (left[a] * right[b])) for (a, b), c in joint.items())


def test_mutual_information_matches_brute_force(case):
    ds, ids, E, k = case
    tokens = ds.input_ids.values
    got = A.mutual_information(ds, seed=4)
    domains = tokens % 3
    by_domain = A.mutual_information(ds, domains, top1=True)
    perm = np.random.default_rng(4).permutation(len(tokens))
    for li in range(ids.shape[0]):
        slots = [(int(x), int(e)) for x, row in zip(tokens, ids[li]) for e in row]
        assert got.mi.values[li] == pytest.approx(brute_mi(slots))
        shuffled = [(int(x), int(e)) for x, row in zip(tokens[perm], ids[li]) for e in row]
        assert got.mi_shuffled.values[li] == pytest.approx(brute_mi(shuffled))
        first = [(int(d), int(row[0])) for d, row in zip(domains, ids[li])]
        assert by_domain.mi.values[li] == pytest.approx(brute_mi(first))
        h = Counter(e for _, e in slots)
        assert got.h_expert.values[li] == pytest.approx(-sum(c / len(slots) * math.log2(c / len(slots))
                                                             for c in h.values()))


def test_router_confidence_matches_brute_force(case):
    ds, ids, E, k = case
    rng = np.random.default_rng(6)
    weights = rng.random(ids.shape).astype(np.float16)
    weights[..., 0] += 1
    got = A.router_confidence(ds.assign(topk_weights=(("layer", "token", "k"), weights)), bins=4)
    assert got.attrs["source"] == "topk_weights"
    for li in range(ids.shape[0]):
        p = weights[li].astype(np.float64)
        p /= p.sum(-1, keepdims=True)
        h = -(p * np.log2(p)).sum(-1)
        top = np.sort(p, -1)
        margin = top[:, -1] - top[:, -2]
        assert got.entropy.values[li] == pytest.approx(h.mean(), rel=1e-5)
        assert got.margin.values[li] == pytest.approx(margin.mean(), rel=1e-5)
        np.testing.assert_array_equal(got.margin_hist.values[li], np.histogram(margin, bins=4, range=(0, 1))[0])
        assert got.entropy_hist.values[li].sum() == ids.shape[1]
    logits = rng.normal(size=(ids.shape[0], ids.shape[1], E)).astype(np.float32)
    soft = A.router_confidence(ds.assign(router_logits=(("layer", "token", "expert"), logits)))
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    np.testing.assert_allclose(soft.entropy.values, (-(p * np.log2(p)).sum(-1)).mean(-1), rtol=1e-5)
    assert soft.attrs["source"] == "router_logits"


def test_super_experts_match_brute_force(case):
    ds, ids, E, k = case
    L, T, _ = ids.shape
    rng = np.random.default_rng(8)
    out = rng.normal(size=(L, T, k, 5)).astype(np.float32)
    out[1, 100:140] = np.nan  # tokens outside the recorded window
    out[2, 50, 1, 3] = -400.0  # one massive activation
    got = A.super_experts(ds.assign(experts_out=(("layer", "token", "k", "hidden"), out)))
    for li in range(L):
        for e in range(E):
            vals = [(abs(out[li, t, s, h]), t, h) for t in range(T) for s in range(k) for h in range(5)
                    if ids[li, t, s] == e and not np.isnan(out[li, t, s, h])]
            if not vals:
                assert np.isnan(got.max_abs.values[li, e]) and got.token.values[li, e] == -1
                continue
            m, t, h = max(vals, key=lambda v: v[0])
            assert got.max_abs.values[li, e] == pytest.approx(m)
            assert (got.token.values[li, e], got.hidden.values[li, e]) == (t, h)
    assert got.super.values.sum() == 1 and got.super.values[2, ids[2, 50, 1]]


def test_hash_routed_layers_are_detected():
    T = 600
    tokens = np.random.default_rng(2).integers(0, 50, T)
    table = routing(50, 1, 16, 4, seed=3)[0]
    ids = routing(T, 3, 16, 4, seed=4)
    ids[0] = table[tokens]
    got = A.hash_routed(dataset(ids, 16, tokens=tokens))
    assert got.values.tolist() == [True, False, False]
    assert A.expert_load(dataset(ids, 16, tokens=tokens)).hash_routed.values.tolist() == [True, False, False]


# ---------------------------------------------------------------- uniform random routing


def test_uniform_routing_gives_the_closed_form_baselines():
    E, k, T, L = 16, 4, 60_000, 2
    ds = dataset(routing(T, L, E, k, seed=11), E, tokens=np.random.default_rng(12).integers(0, 20, T))
    tol = 5 * math.sqrt(0.25 / T)  # five standard errors of a proportion over T tokens
    co = A.coactivation(ds)
    off = co.coactivation.values[:, ~np.eye(E, dtype=bool)]
    assert abs(off.mean() - (k - 1) / (E - 1)) < 1e-3 and abs(off - (k - 1) / (E - 1)).max() < 0.02
    adj = A.coactivation(ds, "adjacent_ranks").coactivation.values[:, ~np.eye(E, dtype=bool)]
    assert abs(adj.mean() - 2 * (k - 1) / (k * (E - 1))) < 1e-3
    rep = A.repetition(ds)
    assert abs(rep["first"] - 1 / E).max() < tol
    assert abs(rep.first_or_second - (1 - math.comb(E - 2, 2) / math.comb(E, 2))).max() < tol
    assert abs(rep.overlap - k / E).max() < tol
    assert rep["first"].attrs["baseline"] == 1 / E
    sat = A.saturation(ds, dataset(routing(T, L, E, k, seed=13), E, tokens=ds.input_ids.values))
    assert abs(sat.saturation - k / E).max() < tol and abs(sat.top1 - 1 / E).max() < tol
    assert abs(sat.jaccard - sat.jaccard.attrs["baseline"]).max() < tol
    load = A.expert_load(ds)
    assert abs(load.relative_load - 1).max() < 0.05 and (load.entropy > 0.999).all()
    assert abs(load.cv / math.sqrt((E - k) / (T * k)) - 1).max() < 0.5
    dom = A.domain_specialisation(ds, np.arange(T) % 3)
    assert abs(dom.specialisation - k / E).max() < 0.02
    voc = A.vocabulary_specialisation(ds)
    assert abs(voc.specialisation.mean() - k / E) < 1e-3
    cross = A.cross_layer(ds)
    assert abs(cross.conditional.mean() - k / E) < 1e-3
    mi = A.mutual_information(ds)
    assert (mi.mi < 3 * mi.mi_shuffled).all() and (mi.mi < 0.01).all()


# ---------------------------------------------------------------- a real store of the embedded model


@pytest.fixture(scope="module")
def stored(embedded, tmp_path_factory):
    """A store of 1,300 corpus tokens traced in 512-token chunks (store chunks do not divide it), with experts.out
    and the logits, and the whole-sequence run_with_cache of the same tokens."""
    text = (ROOT / "data" / "corpus" / "code.heldout.txt").read_bytes()[:1300]
    tokens = np.frombuffer(text, np.uint8).astype(np.int64)
    out = wb.trace(embedded, tokens, tmp_path_factory.mktemp("analysis") / "run.zarr", chunk_tokens=512,
                   names=["layers.*.experts.out", "logits"], progress=False)
    names = ["layers.*.router.topk_ids", "layers.*.router.topk_weights", "layers.*.experts.out"]
    logits, cache = embedded.run_with_cache(torch.as_tensor(tokens)[None], names=names)
    return wb.open_store(out), cache, logits, tokens


def test_from_cache_builds_the_store_layout(stored):
    ds, cache, logits, tokens = stored
    mem = A.from_cache(cache, tokens, n_experts=32, logits=logits)
    assert set(mem.data_vars) == {"topk_ids", "topk_weights", "experts_out", "input_ids", "predicted_ids"}
    for var in ("topk_ids", "topk_weights", "experts_out", "input_ids"):
        assert mem[var].dims == ds[var].dims and mem[var].dtype == ds[var].dtype, var
    assert mem.layer.values.tolist() == ds.layer.values.tolist() == list(range(6))
    assert {key: mem.attrs[key] for key in ("n_experts", "k", "routed_layers")} == \
        {key: ds.attrs[key] for key in ("n_experts", "k", "routed_layers")}
    np.testing.assert_array_equal(mem.predicted_ids.values, logits[0].argmax(-1).numpy())
    agree = (mem.topk_ids.values == ds.topk_ids.values).all(-1).mean()
    assert agree > 0.99  # the chunked trace and the whole forward route (almost) every token alike
    with pytest.raises(ValueError, match="n_experts"):
        A.from_cache(cache, tokens)


def test_public_reading_helpers(stored):
    """routed_view, expert_count and token_reader: what the widgets build on, on a store and in memory."""
    ds, *_ = stored
    assert A.expert_count(ds) == 32 and A.routed_view(ds).topk_ids.dims == ("layer", "token", "k")
    for source in (ds.encoding["source"], None):
        read = A.token_reader(ds.topk_ids, source)
        np.testing.assert_array_equal(read(500, 700), ds.topk_ids.isel(token=slice(500, 700)).values)
    np.testing.assert_array_equal(A.token_reader(ds.input_ids.compute())(3, 9), ds.input_ids.values[3:9])
    with pytest.raises(ValueError, match="n_experts"):
        A.expert_count(ds.assign_attrs(n_experts=None))
    with pytest.raises(ValueError, match="no topk_ids"):
        A.routed_view(ds.drop_vars("topk_ids"))


def test_store_analyses_equal_in_memory(stored, monkeypatch):
    """Every analysis over the dask-backed store (direct zarr reads, blocks of whole chunks) equals the same
    data in memory scanned in 333-token blocks, and the hash-routed layers show."""
    ds, *_ = stored
    mem = ds.compute()
    assert A.scan.locate(ds.topk_ids, ds.encoding["source"]) is not None
    runs = {
        "load": lambda d: A.expert_load(d),
        "coact": lambda d: A.coactivation(d, "adjacent_ranks"),
        "domain": lambda d: A.domain_specialisation(d, np.arange(d.sizes["token"]) // 400),
        "vocab": lambda d: A.vocabulary_specialisation(d, "predicted", min_count=3),
        "rep": lambda d: A.repetition(d),
        "sat": lambda d: A.saturation(d, d.isel(token=slice(None))),
        "cross": lambda d: A.cross_layer(d),
        "mi": A.mutual_information,
        "conf": lambda d: A.router_confidence(d),
        "super": lambda d: A.super_experts(d),
        "subset": lambda d: A.repetition(d.sel(layer=[1, 4]).isel(token=slice(100, 1000))),
    }
    from_store = {name: f(ds) for name, f in runs.items()}
    monkeypatch.setattr(A.scan, "BLOCK_BYTES", 333 * 6 * 4 * 2)
    for name, f in runs.items():
        xr.testing.assert_identical(from_store[name], f(mem))
    assert from_store["load"].hash_routed.values.tolist() == [True, True, False, False, False, False]
    assert (from_store["sat"].saturation == 1).all()
    assert from_store["subset"].layer.values.tolist() == [1, 4] and from_store["subset"].pairs.values[0] == 899


def test_a_modified_store_variable_is_read_through_dask(stored):
    """A variable that is no longer a plain selection of the stored array is not read from zarr directly."""
    ds, *_ = stored
    shifted = ds.assign(topk_ids=(ds.topk_ids + 1) % 32)
    assert A.scan.locate(shifted.topk_ids, ds.encoding["source"]) is None
    swapped = ds.assign(topk_ids=ds.topk_ids.isel(k=[1, 0, 2, 3]))
    assert A.scan.locate(swapped.topk_ids, ds.encoding["source"]) is None
    want = A.expert_load(ds.compute().assign(topk_ids=(ds.topk_ids.compute() + 1) % 32))
    xr.testing.assert_identical(A.expert_load(shifted), want)


def test_super_experts_of_the_store_match_the_cached_outputs(stored):
    ds, cache, _, _ = stored
    got = A.super_experts(ds)
    layer = 3
    out = ds.experts_out.sel(layer=layer).values
    ids = ds.topk_ids.sel(layer=layer).values
    for e in range(32):
        routed = out[ids == e]
        if routed.size:
            assert got.max_abs.sel(layer=layer, expert=e).item() == pytest.approx(np.abs(routed).max())
    assert got.attrs["threshold"] > 0 and got.super.sum() >= 1


# ---------------------------------------------------------------- the specialisation notebook


def test_specialisation_notebook_runs_and_finds_specialised_experts():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(ROOT / "notebooks" / "specialisation.ipynb", as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}}).execute()
    outputs = {cell.metadata.get("tags", ["?"])[0]: cell.outputs for cell in nb.cells if cell.cell_type == "code"}
    facts = json.loads("".join(o["text"] for o in outputs["summary"] if o.get("name") == "stdout"))
    assert facts["max_domain_relative"] > 2  # some expert takes more than twice k/E of some domain
    assert facts["baseline"] == pytest.approx(4 / 32)
    assert facts["mean_top_share_input"] > 2 * facts["vocabulary_baseline"]  # tokens go to "their" expert
    assert facts["mean_top_share_next"] > 2 * facts["vocabulary_baseline"]
    assert 2 * facts["coactivation_baseline"] < facts["coactivation_max"] <= 1
    assert any(o.get("data", {}).get("application/vnd.plotly.v1+json") for o in outputs["figures"])


# ---------------------------------------------------------------- on a dask.distributed cluster


@pytest.fixture(scope="module")
def client():
    """A LocalCluster of two single-threaded worker processes; its client is current only where a test says so."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.CRITICAL) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        yield client


@pytest.fixture(scope="module")
def chunked(embedded, tmp_path_factory):
    """A store of 200 tokens in 64-token chunks, with experts.out; the token at each chunk's end repeats at the
    next chunk's start, so the hash-routed layers 0 and 1 route the same experts across every chunk boundary."""
    tokens = np.random.default_rng(0).integers(0, 256, 200)
    tokens[64::64] = tokens[63::64]
    out = wb.trace(embedded, tokens, tmp_path_factory.mktemp("chunked") / "run.zarr", chunk_tokens=64,
                   names=["layers.*.experts.out"], progress=False)
    return wb.open_store(out)


def submissions(client, monkeypatch) -> list:
    """The functions submitted to `client` from now on in this test."""
    seen, submit = [], client.submit

    def record(fn, *args, **kwargs):
        seen.append(fn)
        return submit(fn, *args, **kwargs)

    monkeypatch.setattr(client, "submit", record)
    return seen


CLUSTER_RUNS = {
    "load": A.expert_load,
    "coact": lambda d: A.coactivation(d, "adjacent_ranks"),
    "domain": lambda d: A.domain_specialisation(d, np.arange(d.sizes["token"]) * 3 // d.sizes["token"]),
    "vocab": lambda d: A.vocabulary_specialisation(d, "next", min_count=2, top1=True),
    "mi": A.mutual_information,
    "rep": lambda d: A.repetition(d, labels=np.arange(d.sizes["token"]) // 50),
    "cross": lambda d: A.cross_layer(d, pairs=[(0, 5), (3, 2)]),
    "conf": A.router_confidence,
    "super": A.super_experts,
    "subset": lambda d: A.repetition(d.sel(layer=[1, 4]).isel(token=slice(30, -20))),
}


def test_analyses_on_a_cluster_equal_the_local_ones(chunked, client, monkeypatch):
    """Every analysis of a store of 4 chunks (one task each, merged in a tree) run on the cluster equals the same
    analysis run in this process exactly; the cluster is used while its client is current, and only then."""
    assert A.cluster._client() is None
    local = {name: run(chunked) for name, run in CLUSTER_RUNS.items()}
    submitted = submissions(client, monkeypatch)
    with client.as_current():
        for name, run in CLUSTER_RUNS.items():
            submitted.clear()
            xr.testing.assert_identical(run(chunked), local[name])
            assert A.cluster._task in submitted, name
    assert submitted.count(A.cluster._task) == 3  # the last run: tokens 30 to 179 lie in three of the 64-token chunks


def test_repetition_on_a_cluster_counts_pairs_across_chunk_boundaries(chunked, client):
    ids = chunked.topk_ids.values
    assert (ids[:2, 63::64] == ids[:2, 64::64]).all()  # repeated experts across each chunk boundary
    with client.as_current():
        got = A.repetition(chunked)
    pairs = ids.shape[1] - 1
    assert (got.pairs.values == pairs).all()
    np.testing.assert_array_equal(got["first"].values, (ids[:, 1:, 0] == ids[:, :-1, 0]).sum(1) / pairs)


def test_an_in_memory_dataset_runs_here_even_with_a_client(stored, client, monkeypatch):
    _, cache, logits, tokens = stored
    mem = A.from_cache(cache, tokens, n_experts=32, logits=logits)
    local = {name: run(mem) for name, run in CLUSTER_RUNS.items()}
    submitted = submissions(client, monkeypatch)
    with client.as_current():
        for name, run in CLUSTER_RUNS.items():
            xr.testing.assert_identical(run(mem), local[name])
    assert submitted == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs /proc/self/fd")
def test_a_store_the_workers_cannot_read_is_a_clear_error(stored, client):
    """The store opened through one of this process's file descriptors, /proc/self/fd/N: a path the workers
    cannot read, as a store on the client's local disk is for workers on other machines."""
    opened = os.open(stored[0].encoding["source"], os.O_RDONLY)
    fd = fcntl.fcntl(opened, fcntl.F_DUPFD, 900)  # a number the workers are unlikely to have open
    os.close(opened)
    try:
        private = wb.open_store(f"/proc/self/fd/{fd}")
        xr.testing.assert_identical(A.expert_load(private), A.expert_load(stored[0]))  # readable here
        with client.as_current(), pytest.raises(FileNotFoundError, match=rf"cannot read the store /proc/self/fd/"
                                                rf"{fd} .* filesystem they share"):
            A.expert_load(private)
    finally:
        os.close(fd)
