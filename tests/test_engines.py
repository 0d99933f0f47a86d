"""Engine routing dumps read as routing Datasets, compared with our own runs, and replayed into the model."""

import base64
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf

import workbench as wb
from oracle import make_checkpoint
from workbench import InputError, analysis
from workbench.engines import read_sglang, read_vllm
from workbench.interventions import replay

TINY_V3 = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-random-deepseek-v3"

T, E, K = 24, 8, 2
IDS = torch.randint(0, 96, (1, T), generator=torch.Generator().manual_seed(3))


def dump(layers: int, seed: int = 0, dtype=np.int16) -> np.ndarray:
    """Random routing in an engine's layout [tokens, layers, k]: k distinct experts per token and layer."""
    rng = np.random.default_rng(seed)
    rows = [[rng.choice(E, K, replace=False) for _ in range(layers)] for _ in range(T)]
    return np.asarray(rows).astype(dtype)


def b64(a: np.ndarray) -> str:
    return base64.b64encode(a.astype("<i4").tobytes()).decode()


def test_vllm_dump_round_trips_with_the_from_cache_schema():
    d = dump(3)
    ds = read_vllm(d, IDS, n_experts=E, layers=[1, 3, 4])
    np.testing.assert_array_equal(ds.topk_ids.values, d.transpose(1, 0, 2))
    np.testing.assert_array_equal(ds.input_ids.values, IDS[0].numpy())
    ours = analysis.from_cache({f"layers.{i}.router.topk_ids": torch.as_tensor(d[None, :, j].astype(np.int64))
                                for j, i in enumerate([1, 3, 4])}, IDS, n_experts=E)
    assert set(ds.data_vars) == set(ours.data_vars) == {"input_ids", "topk_ids"}  # ids only: no topk_weights
    for var in ours.data_vars:
        assert ds[var].dims == ours[var].dims and ds[var].dtype == ours[var].dtype
    assert ds.layer.values.tolist() == [1, 3, 4] and ds.attrs["routed_layers"] == [1, 3, 4]
    assert ds.attrs["engine"] == "vllm" and not ds.attrs["layers_assumed"]
    assert read_vllm(d.astype(np.int32).tolist(), IDS[0], n_experts=E).attrs["layers_assumed"]
    analysis.expert_load(ds)  # every analysis takes it


def test_a_full_depth_dump_keeps_the_moe_layers_rows():
    d = dump(4)
    d[:, 0] = 0  # a dense first layer: the engines' capture buffer leaves its rows 0
    ds = read_vllm(d, IDS, n_experts=E, layers=[1, 2, 3])
    np.testing.assert_array_equal(ds.topk_ids.values, d[:, 1:].transpose(1, 0, 2))
    with pytest.raises(InputError, match="layer 0 repeats an expert"):
        read_vllm(d, IDS, n_experts=E)


def test_sglang_base64_dump_round_trips():
    d = dump(3, dtype=np.int32)
    ds = read_sglang(b64(d), IDS, n_experts=E, k=K, layers=[0, 1, 2])
    np.testing.assert_array_equal(ds.topk_ids.values, d.transpose(1, 0, 2))
    decoded = read_sglang(d, IDS, n_experts=E)
    np.testing.assert_array_equal(decoded.topk_ids.values, ds.topk_ids.values)
    assert ds.attrs["engine"] == "sglang"


@pytest.mark.parametrize("call,message", [
    (lambda d: read_vllm(d[:, 0], IDS, n_experts=E), "tokens, layers, k"),
    (lambda d: read_vllm(d, IDS, n_experts=E - 1), "outside"),
    (lambda d: read_vllm(d[:-1], IDS, n_experts=E), "covers 23 tokens, input_ids has 24"),
    (lambda d: read_vllm(d.astype(np.float32), IDS, n_experts=E), "dtype float32"),
    (lambda d: read_vllm(d, IDS.float(), n_experts=E), "input_ids"),
    (lambda d: read_vllm(d, IDS, n_experts=E, layers=[5, 9]), "3 layer rows"),
    (lambda d: read_sglang(b64(d) + "*", IDS, n_experts=E, k=K), "base64"),
    (lambda d: read_sglang(b64(d)[:-8], IDS, n_experts=E, k=K), "bytes"),
    (lambda d: read_sglang(b64(d), IDS, n_experts=E), "k="),
    (lambda d: read_sglang(d, IDS, n_experts=E, k=3), "k=2"),
])
def test_malformed_dumps_raise_input_error(call, message):
    d = dump(3)
    d[5, 2] = [7, 1]  # expert E - 1 appears
    with pytest.raises(InputError, match=message):
        call(d)


def test_compare_matches_numpy():
    d = dump(4, seed=1)
    a = read_vllm(d, IDS, n_experts=E, layers=[0, 1, 2, 3])
    same = analysis.compare(a, a)
    assert (same.agreement == 1).all() and (same.jaccard == 1).all() and (same.first_divergence == -1).all()
    # a copy with a quarter of its (token, layer) rows taken from a shuffled order of the tokens
    rng = np.random.default_rng(2)
    e = d.copy()
    rows = rng.random((T, 4)) < 0.25
    e[rows] = d[rng.permutation(T)][rows]
    b = read_vllm(e, IDS, n_experts=E, layers=[0, 1, 2, 3])
    got = analysis.compare(a, b)
    sa, sb = np.sort(d, -1), np.sort(e, -1)
    equal = (sa == sb).all(-1)  # [T, L]
    inter = np.array([[len(set(d[t, j]) & set(e[t, j])) for j in range(4)] for t in range(T)])
    np.testing.assert_allclose(got.agreement.values, equal.mean(0))
    np.testing.assert_allclose(got.jaccard.values, (inter / (2 * K - inter)).mean(0))
    first = np.array([np.flatnonzero(~equal[t])[0] if (~equal[t]).any() else -1 for t in range(T)])
    np.testing.assert_array_equal(got.first_divergence.values, first)
    assert 0 < got.agreement.mean() < 1 and got.hash_routed.dims == ("layer",)
    with pytest.raises(InputError, match="layers"):
        analysis.compare(a, read_vllm(e, IDS, n_experts=E, layers=[0, 1, 2, 5]))
    with pytest.raises(InputError, match="different tokens"):
        analysis.compare(a, read_vllm(e, IDS.flip(-1), n_experts=E, layers=[0, 1, 2, 3]))
    with pytest.raises(InputError, match="tokens"):
        analysis.compare(a, read_vllm(e[:-1], IDS[:, :-1], n_experts=E, layers=[0, 1, 2, 3]))


def test_stores_traces_and_engine_dumps_compare_alike(mixtral, tmp_path):
    tokens = IDS[0].numpy()
    stores = [wb.open_store(wb.trace(mixtral, tokens, tmp_path / f"{i}.zarr", chunk_tokens=10, progress=False))
              for i in range(2)]
    _, cache = mixtral.run_with_cache(IDS, names=["layers.*.router.topk_ids"])
    ours = analysis.from_cache(cache, IDS, n_experts=6)
    engine = np.stack([cache[f"layers.{i}.router.topk_ids"][0].numpy() for i in range(3)], 1).astype(np.int16)
    theirs = read_vllm(engine, IDS, n_experts=6, layers=[0, 1, 2])
    for a, b in [stores, (stores[0], ours), (ours, theirs)]:
        out = analysis.compare(a, b)
        assert (out.agreement == 1).all() and (out.first_divergence == -1).all()


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory):
    config = tf.DeepseekV3Config(
        vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
        num_attention_heads=4, kv_lora_rank=16, q_lora_rank=24, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=12, n_shared_experts=1, max_position_embeddings=256, n_routed_experts=8, num_experts_per_tok=2,
        n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True)
    folder = tmp_path_factory.mktemp("deepseek-v3")
    make_checkpoint(config, folder)
    return wb.load(folder, dtype=torch.float32)


@pytest.mark.parametrize("family", ["mixtral", "deepseek"])
def test_replay_reproduces_and_forces_routing(family, request):
    model = request.getfixturevalue(family)
    names = ["layers.*.router.topk_ids"]
    logits, cache = model.run_with_cache(IDS, names=names)
    trace = analysis.from_cache(cache, IDS, n_experts=6 if family == "mixtral" else 8)
    with model.hooks(replay(trace)):
        again = model(IDS)
    torch.testing.assert_close(again, logits, atol=1e-5, rtol=0)
    # a modified trace: the forced ids are exactly those the experts receive
    layers = trace.layer.values.tolist()
    ids = trace.topk_ids.values.copy()
    ids[0, 3:7] = ids[0, 3:7, ::-1]  # reordered ranks
    ids[-1, 10] = [e for e in range(6) if e not in ids[-1, 10]][:2]  # other experts
    modified = trace.copy()
    modified["topk_ids"] = (trace.topk_ids.dims, ids)
    with model.hooks(replay(modified)):
        forced, c2 = model.run_with_cache(IDS, names=names)
    for j, i in enumerate(layers):
        np.testing.assert_array_equal(c2[f"layers.{i}.router.topk_ids"][0].numpy(), ids[j])
    assert not torch.allclose(forced, logits)
    with model.hooks(replay({layers[0]: ids[0]})):
        _, c3 = model.run_with_cache(IDS, names=names)
    np.testing.assert_array_equal(c3[f"layers.{layers[0]}.router.topk_ids"][0].numpy(), ids[0])


def test_replayed_and_free_runs_are_both_recorded(tmp_path):
    """`trace` under `replay` records the replayed run: its stored routing is the dump's, while the free run's
    differs exactly at the tokens the dump changed."""
    model = wb.load(TINY_V3)
    ids = np.random.default_rng(0).integers(0, model.vocab_size, 40)
    free = wb.open_store(wb.trace(model, ids, tmp_path / "free.zarr", chunk_tokens=16, progress=False))
    layers, E = free.attrs["routed_layers"], int(free.attrs["n_experts"])
    rows = free.topk_ids.sel(layer=layers).transpose("token", "layer", "k").values.copy()
    rng = np.random.default_rng(1)
    changed = np.sort(rng.choice(40, 10, replace=False))
    for t in changed:  # another expert set at the last layer
        rows[t, -1] = np.setdiff1d(np.arange(E), rows[t, -1])[:rows.shape[-1]]
    dump = read_vllm(rows, ids, n_experts=E, layers=layers)
    with model.hooks(replay(dump)):
        replayed = wb.open_store(wb.trace(model, ids, tmp_path / "replayed.zarr", chunk_tokens=16, progress=False))
    assert np.array_equal(replayed.topk_ids.sel(layer=layers).transpose("token", "layer", "k").values, rows)
    diff = analysis.compare(free, replayed)
    assert diff.agreement.values.tolist() == [1.0] * (len(layers) - 1) + [0.75]
    assert np.flatnonzero(diff.first_divergence.values >= 0).tolist() == changed.tolist()
