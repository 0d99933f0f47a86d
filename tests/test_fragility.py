"""Routing margins, flips between two runs of the same tokens, routing by position and the V4 indexer's pick
distances: each against a numpy computation, on an in-memory trace and on a store."""

from pathlib import Path

import numpy as np
import pytest
import torch

import workbench as wb
from workbench import analysis as A
from workbench.analysis.fragility import EDGES
from workbench.demo import EMBEDDED_MODEL
from workbench.routing import RouterSpec, selection_margin

CORPUS = sorted(Path(EMBEDDED_MODEL).parents[1].joinpath("corpus").glob("*.heldout.txt"))
N = 1024
NAMES = ["layers.*.router.topk_ids", "layers.*.router.scores", "layers.*.router.margin",
         "layers.*.attn.indexer_topk"]


@pytest.fixture(scope="module")
def ids():
    text = b"".join(f.read_bytes()[:N // len(CORPUS) + 1] for f in CORPUS)
    return torch.tensor([list(text[:N])])


@pytest.fixture(scope="module")
def runs(ids):
    """(fp32 model, fp32 cache, {dtype: Dataset}) of the same tokens in fp32 and bf16."""
    out, first = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        model = wb.load(EMBEDDED_MODEL, dtype=dtype)
        _, cache = model.run_with_cache(ids, names=NAMES)
        out[dtype] = A.from_cache(cache, ids)
        first = first or (model, cache)
    return (*first, out)


def test_margin_is_the_gap_after_the_bias(runs):
    model, cache, _ = runs
    for i in (2, 5):
        scores = cache[f"layers.{i}.router.scores"][0].double().numpy()
        bias = model.layers[str(i)].ffn.router.correction_bias.detach().double().numpy()
        ranked = -np.sort(-(scores + bias), -1)
        np.testing.assert_allclose(cache[f"layers.{i}.router.margin"][0].numpy(), ranked[:, 3] - ranked[:, 4],
                                   rtol=1e-5, atol=1e-6)
    assert "layers.0.router.margin" not in model.hook_names  # hash-routed: no score decides
    with pytest.raises(wb.HookError, match="layers.0.router.margin"):
        model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), names=["layers.0.router.margin"])


def test_margin_after_group_masking_and_at_k_equal_e():
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.05, 0.7, 0.6, 0.5, 0.4]])
    # groups {0,1,2,3} (top2sum 1.7) and {4..7} (1.3); one kept: the (k+1)-th is 0.1, not 0.7
    spec = RouterSpec(8, 2, groups=2, topk_groups=1)
    assert torch.allclose(selection_margin(scores, spec, None), torch.tensor([0.8 - 0.1]))
    assert torch.allclose(selection_margin(scores, RouterSpec(8, 2), None), torch.tensor([0.1]))
    assert selection_margin(scores, RouterSpec(8, 8), None).isinf().all()
    spec = RouterSpec(8, 4, groups=2, topk_groups=1)  # every kept expert chosen: nothing can take a place
    assert selection_margin(scores, spec, None).isinf().all()


def _numpy_flips(a, b):
    return (np.sort(a, -1) != np.sort(b, -1)).any(-1)


def test_flips_equal_numpy_on_a_known_pair(runs):
    a = runs[2][torch.float32]
    rng = np.random.default_rng(0)
    b = a.copy(deep=True)
    ids = b.topk_ids.values
    rows = rng.random(ids.shape[:2]) < 0.2
    ids[rows] = (ids[rows] + 1) % 32  # a different set (ids shifted by one, all distinct still)
    perm = rng.random(ids.shape[:2]) < 0.3
    ids[perm] = ids[perm][:, ::-1]  # reordered ranks: the same set
    out = A.flips(a, b)
    want = _numpy_flips(a.topk_ids.values, ids)
    routed = [2, 3, 4, 5]
    np.testing.assert_array_equal(out.flips.values, want.sum(1))
    np.testing.assert_array_equal(out.flipped_layers.values, want.sum(0))
    np.testing.assert_allclose(out.flip_share.values, want.mean(1))
    np.testing.assert_allclose(A.compare(a, b).agreement.values, 1 - want.mean(1))
    m = a.router_margin.sel(layer=routed).values
    for j, layer in enumerate(routed):  # AUC against the exact rank statistic (ties within a fine bin differ)
        f, k = m[j][want[layer]], m[j][~want[layer]]
        exact = ((f[:, None] < k[None]).sum() + 0.5 * (f[:, None] == k[None]).sum()) / (len(f) * len(k))
        assert abs(float(out.auc.sel(layer=layer)) - exact) < 0.01
        assert 0.35 < exact < 0.65  # flips drawn at random: the margin cannot predict them
    assert np.isnan(out.auc.sel(layer=0)) and out.flips.sel(layer=0) == want[0].sum()


def test_bf16_flips_have_smaller_margins(runs):
    ds = runs[2]
    out = A.flips(ds[torch.float32], ds[torch.bfloat16])
    learned = out.sel(layer=[2, 3, 4, 5])
    assert (learned.flips > 0).all() and (out.sel(layer=[0, 1]).flips == 0).all()  # hash layers never flip
    agreement = A.compare(ds[torch.float32], ds[torch.bfloat16]).agreement.values
    np.testing.assert_allclose(out.flips.values, (1 - agreement) * N)
    assert (learned.median_margin_flipped < learned.median_margin_kept / 5).all()
    assert (learned.auc > 0.8).all()


def test_margins_distribution_equals_numpy(runs):
    a = runs[2][torch.float32]
    out = A.margins(a, nearest=5)
    for layer in (2, 4):
        m = a.router_margin.sel(layer=layer).values.astype(np.float64)
        for q in (0.1, 0.5, 0.9):
            got = float(out.margin_quantile.sel(layer=layer, q=q))
            assert abs(np.log10(got / np.quantile(m, q))) < 2 / 64
        order = np.lexsort((np.arange(N), m))[:5]
        np.testing.assert_array_equal(out.nearest_token.sel(layer=layer).values, order)
        np.testing.assert_allclose(out.nearest_margin.sel(layer=layer).values, m[order])
        np.testing.assert_array_equal(out.nearest_id.sel(layer=layer).values, a.input_ids.values[order])
        edges = out.bin_edges.values
        want = np.histogram(np.clip(m, edges[0] * 1.0001, edges[-1] / 1.0001), edges)[0]
        np.testing.assert_array_equal(out.hist.sel(layer=layer).values, want)
    assert (out.tokens.sel(layer=[0, 1]) == 0).all() and out.tokens.sel(layer=2) == N
    assert len(EDGES) > 800


def test_a_store_gives_what_its_values_in_memory_give(runs, ids, tmp_path):
    model, _, ds = runs
    path = model.trace(ids[0, :256], out=tmp_path / "run.zarr", names=["layers.*.router.margin"], chunk_tokens=128,
                       progress=False)
    store = wb.open_store(path)
    assert store.router_margin.dims == ("layer", "token") and store.router_margin.chunks is not None
    memory = store.compute()
    for f in (A.margins, A.by_position):
        x, y = f(store), f(memory)
        for var in x.data_vars:
            np.testing.assert_array_equal(x[var].values, y[var].values)
    other = ds[torch.bfloat16].isel(token=slice(0, 256))
    x, y = A.flips(store, other), A.flips(memory, other)
    for var in x.data_vars:
        np.testing.assert_array_equal(x[var].values, y[var].values)
    assert x.flips.sum() > 0


def test_by_position_equals_numpy(runs):
    a = runs[2][torch.float32]
    labels = np.repeat(np.arange(4), N // 4)
    edges = [0, 100, 500, 800, N]
    out = A.by_position(a, edges, labels=labels)
    ids = a.topk_ids.sel(layer=3).values
    for b, (s, e) in enumerate(zip(edges[:-1], edges[1:])):
        counts = np.bincount(ids[s:e].ravel(), minlength=32)
        share = counts / counts.sum()
        np.testing.assert_allclose(out.share.sel(layer=3, bin=b).values, share)
        p = share[share > 0]
        np.testing.assert_allclose(float(out.entropy.sel(layer=3, bin=b)), -(p * np.log(p)).sum() / np.log(32))
        for d in range(4):
            rows = ids[s:e][labels[s:e] == d]
            want = np.bincount(rows.ravel(), minlength=32) / max(len(rows), 1)
            np.testing.assert_allclose(out.specialisation.sel(domain=d, layer=3, bin=b).values, want)
    even = A.by_position(a, 8)
    np.testing.assert_array_equal(even.bin_start.values, np.arange(8) * N // 8)
    assert (even.tokens == N // 8).all()


def test_pick_distances_on_tiny_v4(runs):
    a = runs[2][torch.float32]
    out = A.pick_distances(a, 4, window=128)
    assert out.layer.values.tolist() == [1, 4]  # the CSA layers
    for layer in (1, 4):
        picks = a.attn_indexer_topk.sel(layer=layer).values
        t = np.arange(N)[:, None].repeat(picks.shape[1], 1)
        d = (t - picks * 4)[picks >= 0]
        assert d.min() >= 3  # entry w is complete from position (w + 1) * 4 - 1
        assert out.picks.sel(layer=layer) == d.size and out.max_distance.sel(layer=layer) == d.max()
        np.testing.assert_allclose(float(out.mean_distance.sel(layer=layer)), d.mean())
        np.testing.assert_allclose(float(out.beyond_window.sel(layer=layer)), (d >= 128).mean())
        edges = np.append(out.bin_start.values, out.bin_stop.values[-1])
        np.testing.assert_array_equal(out.hist.sel(layer=layer).values, np.histogram(d, edges)[0])
    with pytest.raises(wb.InputError, match="rate="):
        A.pick_distances(a)


def test_widgets_show_margins_and_entropy(runs):
    from workbench.widgets import LongContextNavigator, TokenView

    a = runs[2][torch.float32]
    view = TokenView(a, layer=3, start=10, length=5)
    for pos in range(10, 15):
        margin = float(a.router_margin.sel(layer=3)[pos])
        assert f"token {pos}:" in view.html() and f"margin {margin:.2e}" in view.html()
    assert "margin" not in TokenView(a, layer=0, start=10, length=5).html()  # hash-routed: none
    nav = LongContextNavigator(a, layer=3, bins=8, entropy=True)
    want = A.by_position(a, 8).entropy.sel(layer=3).values
    np.testing.assert_allclose(nav.figure.data[-1].y, want, rtol=1e-6)
    nav.view(100, 300)  # a zoom re-bins the entropy with the load
    np.testing.assert_allclose(nav.figure.data[-1].y,
                               A.by_position(a.isel(token=slice(100, 300)), 8).entropy.sel(layer=3).values, rtol=1e-6)
    assert len(LongContextNavigator(a, layer=3, bins=8).figure.data) == 1 + 8


def test_flips_of_two_stores_on_a_cluster_equal_the_local_ones(runs, ids, tmp_path, monkeypatch):
    import logging

    import distributed
    import xarray as xr

    model = runs[0]
    a = wb.open_store(model.trace(ids[0, :256], out=tmp_path / "a.zarr", names=["layers.*.router.margin"],
                                  chunk_tokens=64, progress=False))
    b = wb.open_store(wb.load(EMBEDDED_MODEL, dtype=torch.bfloat16).trace(
        ids[0, :256], out=tmp_path / "b.zarr", chunk_tokens=64, progress=False))
    other = wb.open_store(model.trace(ids[0, 256:512], out=tmp_path / "c.zarr", chunk_tokens=64, progress=False))
    local = A.flips(a, b)
    x, y = A.routed_view(a).topk_ids.values, A.routed_view(b).topk_ids.values
    np.testing.assert_array_equal(local.flips.values, _numpy_flips(x, y).sum(1))
    np.testing.assert_array_equal(local.flipped_layers.values, _numpy_flips(x, y).sum(0))
    assert local.flips.sum() > 0 and np.isfinite(local.auc.values[2:]).any()
    submitted = []
    with distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None,
                                  silence_logs=logging.CRITICAL) as cluster, \
            distributed.Client(cluster, set_as_default=False) as client:
        submit = client.submit
        monkeypatch.setattr(client, "submit", lambda fn, *args, **kw: submitted.append(fn) or submit(fn, *args, **kw))
        with client.as_current():
            got = A.flips(a, b)
            compared = A.compare(a, b)
            with pytest.raises(wb.InputError, match="different tokens"):
                A.flips(a, other)
            with pytest.raises(wb.InputError, match="different tokens"):
                A.compare(a, other)
    assert submitted.count(A.cluster._task) >= 8  # one task per 64-token chunk, for each analysis
    xr.testing.assert_identical(got, local)
    # compare, on the same two stores: identical to the local scan, whose figures numpy gives
    xr.testing.assert_identical(compared, A.compare(a, b))
    same = ~_numpy_flips(x, y)
    np.testing.assert_array_equal(compared.agreement.values, same.mean(1))
    changed = (~same).any(0)
    np.testing.assert_array_equal(compared.first_divergence.values,
                                  np.where(changed, A.routed_view(a).layer.values[(~same).argmax(0)], -1))
