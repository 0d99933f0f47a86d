"""DeepSeek-V4 against the oracle: every attention kind, hash and learned routing, hc_mult 2-4, compress rates
that do and do not divide T, both tensor-name styles; chunked forward, state size, hooks, bad tables."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import workbench as wb
from workbench.models import indexer
from workbench.models.indexer import topk_entries
from oracle import (B, assert_chunked_equals_whole, assert_parity, input_ids, make_checkpoint,
                    routing_is_nontrivial)

VOCAB = 80
S, CSA, HCA = "sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention"
# Exact-zero index scores (every head's ReLU clipped) tie; we keep the earlier entry, torch.topk's choice is
# unspecified. 8 indexer heads make such ties improbable in these tiny models (2 heads hit them).


def v4(**kw) -> tf.DeepseekV4Config:
    base = dict(vocab_size=VOCAB, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=4,
                num_attention_heads=4, head_dim=16, q_lora_rank=12, partial_rotary_factor=0.5,
                num_experts_per_tok=2, n_routed_experts=6, sliding_window=5, o_groups=2, o_lora_rank=8,
                index_n_heads=8, index_head_dim=12, index_topk=3, max_position_embeddings=512)
    return tf.DeepseekV4Config(**{**base, **kw})


CONFIGS = {  # name -> (config, sequence length)
    "hc2-every-kind-rates-not-dividing-yarn": (lambda: v4(
        hc_mult=2, layer_types=[S, CSA, HCA, CSA], mlp_layer_types=["hash_moe", "moe", "moe", "hash_moe"],
        compress_rates={CSA: 4, HCA: 8},
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128}), 13),
    "hc3-rates-dividing": (lambda: v4(
        hc_mult=3, num_hidden_layers=3, layer_types=[HCA, CSA, S], mlp_layer_types=["hash_moe", "hash_moe", "moe"],
        compress_rates={CSA: 2, HCA: 4}), 16),
    "hc4-default-schedule": (lambda: v4(hc_mult=4, compress_rates={CSA: 4, HCA: 8}), 16),
}


def make_v4(config, folder, seed: int = 0):
    """An oracle checkpoint whose hash tables send each token to distinct random experts."""
    hf = make_checkpoint(config, folder, seed)
    g = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for name, table in hf.named_buffers():
            if name.endswith("tid2eid"):
                E = config.n_routed_experts
                table.copy_(torch.stack([torch.randperm(E, generator=g)[: table.shape[1]] for _ in range(len(table))]))
    hf.save_pretrained(folder)
    return hf


def oracle_selection(hf, ids) -> dict[int, torch.Tensor]:
    """The pooled entries the oracle's indexer keeps, per CSA layer [B, T, k] (-1 = none)."""
    got, handles = {}, []
    for name, mod in hf.named_modules():
        m = re.search(r"layers\.(\d+)\.self_attn\.compressor\.indexer$", name)
        if m:
            handles.append(mod.register_forward_hook(lambda mod, a, out, i=int(m[1]): got.__setitem__(i, out)))
    with torch.no_grad():
        hf(ids)
    for h in handles:
        h.remove()
    return got


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request, tmp_path_factory):
    config, length = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    return folder, make_v4(config(), folder), length


def test_parity_with_oracle(case):
    folder, hf, length = case
    out = assert_parity(folder, hf, VOCAB, length=length)
    assert routing_is_nontrivial(out["cache"])
    model, ids = out["model"], out["ids"]
    for i, layer in model.layers.items():  # hash layers route by token id
        if hasattr(layer.ffn.router, "tid2eid"):
            assert torch.equal(out["cache"][f"layers.{i}.router.topk_ids"], layer.ffn.router.tid2eid[ids])
    # the indexer keeps the same entries as the oracle's, and some queries have more than it keeps
    _, cache = model.run_with_cache(ids, names=["*.indexer_topk"])
    ref = oracle_selection(hf, ids)
    assert ref and sorted(ref) == sorted(int(n.split(".")[1]) for n in cache)
    for i, chosen in ref.items():
        ours = cache[f"layers.{i}.attn.indexer_topk"]
        k = min(ours.shape[-1], chosen.shape[-1])
        assert torch.equal(ours[..., :k].sort(-1).values, chosen.sort(-1).values), f"layer {i}"
        assert (ours >= 0).sum(-1).max() == ours.shape[-1]


def test_official_names_load_the_same(case, tmp_path):
    """The inference checkpoint's names (no `model.` prefix, `embed`, `hc_head_fn`) load to the same model."""
    folder, hf, length = case
    tensors = load_file(folder / "model.safetensors")
    renamed = {}
    for name, t in tensors.items():
        name = name.replace("model.embed_tokens.", "embed.").replace("model.hc_head.hc_", "hc_head_")
        renamed[name.removeprefix("model.")] = t
    assert "embed.weight" in renamed and "layers.0.attn.wq_a.weight" in renamed and "hc_head_fn" in renamed
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    ids = input_ids(VOCAB, length=length)
    assert torch.equal(wb.load(tmp_path)(ids), wb.load(folder)(ids))


@pytest.mark.parametrize("size", [1, 7, 64])
def test_chunked_equals_whole(case, size):
    folder, _, _ = case
    model = wb.load(folder)
    ids = input_ids(VOCAB, seed=3, length=150)
    names = [n for n in model.hook_names if n.endswith(("topk_ids", "indexer_topk"))]
    assert_chunked_equals_whole(model, ids, names, chunks=size, tol=1e-4)


@pytest.mark.parametrize("seed", range(4))
def test_topk_entries_breaks_ties_by_index(seed):
    """Against a brute-force sort by (score descending, index ascending) on scores full of ties, -inf masks
    and rows with fewer candidates than k."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (40, 23), generator=g).float()
    scores[torch.rand(scores.shape, generator=g) < 0.3] = float("-inf")
    scores[:5, 2:] = float("-inf")  # at most 2 candidates
    scores[5] = 1.0  # one score everywhere
    for k, cols in ((5, 23), (8, 23), (30, 23), (3, 2)):
        got = topk_entries(scores[:, :cols], k)
        for row, picks in zip(scores[:, :cols].tolist(), got.tolist()):
            best = sorted((j for j, v in enumerate(row) if v != float("-inf")), key=lambda j: (-row[j], j))[:k]
            assert picks == best + [-1] * (k - len(best))


@pytest.mark.parametrize("shape", [(7, 2, 50, 8), (33, 3, 400, 16), (5, 2, 3, 8), (70, 1, 2000, 32), (40, 2, 9000, 8)])
@pytest.mark.parametrize("tiles", [(128, 4096), (4, 16)])
def test_tiled_index_topk_equals_reference(shape, tiles, monkeypatch):
    """The tiled CPU path (bf16 matmul per tile, fused numba bounds, exact rescoring of the kept) picks exactly
    what `topk_entries` of the whole score map picks: on integer dot products (ties everywhere, zero and
    negative head weights: queries with too many tied bounds are scored exactly), on random ones, with
    per-query limits including 0, with tiles smaller than the sequence, and over many 256-entry strips (most
    skipped once the kept bounds are high)."""
    monkeypatch.setattr(indexer, "INDEX_ROWS", tiles[0])
    monkeypatch.setattr(indexer, "INDEX_TILE", tiles[1])
    t, heads, n, k = shape
    g = torch.Generator().manual_seed(n)
    limit = torch.randint(0, n + 1, (t,), generator=g)
    for q, keys_t, w in ((torch.randint(-2, 3, (t, heads, 4), generator=g).float(),
                          torch.randint(-1, 2, (4, n), generator=g).float(),
                          torch.randint(-2, 3, (t, heads), generator=g).float()),
                         (torch.randn(t, heads, 16, generator=g), torch.randn(16, n, generator=g),
                          torch.randn(t, heads, generator=g))):
        got = indexer.index_topk(q, w, keys_t, limit, k)
        assert torch.equal(got, topk_entries(indexer.index_scores(q, w, keys_t, limit), k))
        assert ((got >= 0).sum(-1) == limit.clamp(max=k)).all()


@pytest.mark.parametrize("inputs", ["bf16", "fp32"])
def test_bounded_index_topk_is_exact_on_near_ties(inputs, monkeypatch):
    """The CPU path keeps every entry whose bf16-bounded score could be picked: on keys in groups of near-copies
    (scores ulps apart, equal in bf16), queries whose head weights are all negative (many exact-zero scores)
    and per-query limits, it picks what the exact reference picks, with no query scored exactly in full."""
    exact_rows = []
    full = indexer._index_topk_exact
    monkeypatch.setattr(indexer, "_index_topk_exact", lambda q, *a: exact_rows.append(len(q)) or full(q, *a))
    g = torch.Generator().manual_seed(1)
    t, heads, dim, n, k = 64, 2, 32, 3000, 8
    base = torch.randn(n // 4, dim, generator=g).repeat_interleave(4, 0)
    if inputs == "bf16":  # near-copies one bf16 ulp apart in one coordinate
        bits = base.bfloat16().view(torch.int16)
        bump = torch.nn.functional.one_hot(torch.randint(0, dim, (n,), generator=g), dim).to(torch.int16)
        keys = (bits + bump).view(torch.bfloat16).float()
        q = torch.randn(t, heads, dim, generator=g).bfloat16().float()
    else:
        keys = base * (1 + 2**-20 * torch.randn(n, dim, generator=g))
        q = torch.randn(t, heads, dim, generator=g)
    w = torch.randn(t, heads, generator=g)
    w[: t // 2] = -w[: t // 2].abs()
    limit = torch.randint(n // 2, n + 1, (t,), generator=g)
    got = indexer.index_topk(q, w, keys.T, limit, k)
    scores = indexer.index_scores(q, w, keys.T, limit)
    assert torch.equal(got, topk_entries(scores, k))
    assert exact_rows == []
    assert (scores.gather(1, got[: t // 2]) == 0).all()  # the all-negative queries' picks: exact-zero ties


@pytest.mark.parametrize("dim", [32, 128])
def test_bf16_matmul_error_is_within_the_indexer_bound(dim):
    """The CPU indexer's bound on torch's bf16 matmul, without its margins: |exact - bf16 dot| <= 2^-8 |bf16 dot|
    (rounding the fp32 sum once) + dim 2^-24 |q| |k| (fp32 accumulation). Fails if torch rounds or accumulates
    otherwise (in bf16, or truncating)."""
    g = torch.Generator().manual_seed(dim)
    q = (torch.randn(512, dim, generator=g) * torch.rand(512, 1, generator=g) * 8).bfloat16()
    keys_t = (torch.randn(dim, 2048, generator=g) * torch.rand(1, 2048, generator=g) * 8).bfloat16()
    approx = (q @ keys_t).double()
    exact = q.double() @ keys_t.double()
    bound = 2**-8 * approx.abs() + dim * 2**-24 * q.double().norm(dim=1)[:, None] * keys_t.double().norm(dim=0)
    assert ((exact - approx).abs() <= bound).all()
    assert ((exact - approx).abs() > 0.5 * bound).any()  # the rounding term is what it says, not far looser


def test_numba_kernels_keep_torch_thread_count():
    """numba's OpenMP layer shares torch's thread count: the indexer kernel (and the analyses) must leave it
    as set, or later forwards change their summation order (and training stops being reproducible)."""
    code = """
import numpy as np, torch, xarray as xr
from workbench import analysis
from workbench.models import indexer
torch.set_num_threads(1)
q, w, keys_t = torch.randn(9, 2, 8), torch.randn(9, 2), torch.randn(8, 40)
for _ in range(2):
    indexer.index_topk(q, w, keys_t, torch.full((9,), 40), 4)
    print(torch.get_num_threads())
ids = np.random.default_rng(0).integers(0, 8, (2, 500, 2)).astype(np.int16)
analysis.expert_load(xr.Dataset({"topk_ids": (("layer", "token", "k"), ids)}, attrs={"n_experts": 8, "k": 2}))
print(torch.get_num_threads())
"""
    env = {**os.environ, "NUMBA_NUM_THREADS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1", "1"]


def test_indexer_tiling_does_not_change_picks(case, monkeypatch):
    """Scoring a few queries against a few entries at a time (bounded memory at 1M tokens) picks the same
    entries as all at once."""
    folder, _, _ = case
    ids = input_ids(VOCAB, seed=5, length=150)
    names = [n for n in wb.load(folder).hook_names if n.endswith(("topk_ids", "indexer_topk"))]
    whole = wb.load(folder).run_with_cache(ids, names=names)
    monkeypatch.setattr(indexer, "INDEX_ROWS", 8)
    monkeypatch.setattr(indexer, "INDEX_TILE", 5)
    tiled = wb.load(folder).run_with_cache(ids, names=names)
    assert torch.equal(whole[0], tiled[0])
    assert all(torch.equal(whole[1][n], tiled[1][n]) for n in names) and any("indexer" in n for n in names)


def test_state_is_bounded_by_the_architecture(tmp_path):
    """Sliding keys stay at window - 1; HCA/CSA keep T / rate pooled entries and fewer than `rate` pending tokens."""
    config, _ = CONFIGS["hc2-every-kind-rates-not-dividing-yarn"]
    make_v4(config(), tmp_path)
    model = wb.load(tmp_path)
    state = wb.State()
    for step in range(6):
        model(input_ids(VOCAB, seed=step, length=50), cache=state)
        T = state.offset
        for i, rate in (("1", 4), ("2", 8), ("3", 4)):
            comp = state.layers[i]["compressor"]
            assert comp["entries"].shape[1] == T // rate and comp["kv"].shape[1] == T % rate
        assert state.layers["3"]["indexer"]["entries"].shape[1] == T // 4
        assert all(len(state.layers[i]["window"]["pos"]) == 4 for i in "0123")
        pooled = sum(d["entries"].nbytes for layer in state.layers.values() for d in layer.values() if "entries" in d)
        assert state.nbytes - pooled < 16384  # everything else stays bounded (window keys, pending tokens)


def test_hooks(tmp_path):
    config, length = CONFIGS["hc3-rates-dividing"]
    make_v4(config(), tmp_path)
    model = wb.load(tmp_path)
    ids = input_ids(VOCAB, length=length)
    names = model.hook_names
    assert names.index("layers.0.resid_pre") < names.index("layers.0.hc.attn.pre") < names.index(
        "layers.0.attn.out") < names.index("layers.0.resid_mid") < names.index("layers.0.hc.ffn.comb") < names.index(
        "layers.0.router.logits") < names.index("layers.0.resid_post")
    assert names[-3:] == ["final.hc_pre", "final.norm_out", "logits"]
    logits, cache = model.run_with_cache(ids, names=["layers.1.*", "final.hc_pre"])
    assert cache["layers.1.resid_pre"].shape == (B, length, 3, 32)
    comb = cache["layers.1.hc.ffn.comb"]
    assert comb.shape == (B, length, 3, 3)
    torch.testing.assert_close(comb.sum(-2), torch.ones(B, length, 3), atol=1e-5, rtol=0)  # Sinkhorn: columns
    torch.testing.assert_close(comb.sum(-1), torch.ones(B, length, 3), atol=0.1, rtol=0)  # rows: nearly (20 iters)
    assert cache["final.hc_pre"].shape == (B, length, 3)
    chosen = cache["layers.1.attn.indexer_topk"]
    assert chosen.shape == (B, length, 3) and chosen.dtype == torch.long
    assert (chosen[:, 0] == -1).all()  # the first token has no complete pooled entry
    # rewriting the selection changes what CSA attends to; writing back the same selection changes nothing
    with model.hooks({"layers.1.attn.indexer_topk": lambda t, ctx: t}):
        assert torch.equal(model(ids), logits)
    with model.hooks({"layers.1.attn.indexer_topk": lambda t, ctx: torch.full_like(t, -1)}):
        blind = model(ids)
    assert not torch.allclose(blind, logits)
    assert torch.allclose(blind[:, :1], logits[:, :1])


@pytest.mark.parametrize("table, message", [
    (lambda t: t.clone().fill_(6), r"values must lie in \[0, 6\)"),
    (lambda t: t.float(), "expected an integer table"),
])
def test_bad_hash_table(tmp_path, table, message):
    config, _ = CONFIGS["hc3-rates-dividing"]
    make_v4(config(), tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.ffn.gate.tid2eid"
    tensors[name] = table(tensors[name])
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(wb.CheckpointError, match=message) as err:
        wb.load(tmp_path)
    assert name in str(err.value)


def test_config_errors(tmp_path):
    config, _ = CONFIGS["hc3-rates-dividing"]
    make_v4(config(), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    for bad, message in [({"layer_types": [S, "full_attention", S]}, "layer_types must list 3"),
                         ({"num_key_value_heads": 2}, "one shared KV head"),
                         ({"o_groups": 3}, "o_groups=3 does not divide"),
                         ({"compress_rates": {CSA: 0}}, "compress rate")]:
        (tmp_path / "config.json").write_text(json.dumps({**data, **bad}))
        with pytest.raises(wb.CheckpointError, match=message):
            wb.load(tmp_path)


def test_bf16_close_to_fp32(case):
    folder, _, length = case
    ids = input_ids(VOCAB, length=length)
    ref = wb.load(folder)(ids)
    model = wb.load(folder, dtype=torch.bfloat16)
    layer = model.layers["0"]
    assert layer.hc_attn.fn.dtype == layer.attn.attn_sink.dtype == torch.float32  # mixings and sinks stay fp32
    assert layer.attn.wq_a.weight.dtype == torch.bfloat16
    out = model(ids)
    assert out.dtype == torch.bfloat16
    # a bf16 rounding can flip a near-tied expert choice, so compare on average, not per logit
    assert ((out.float() - ref).abs().mean() / ref.abs().mean()) < 0.05


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_pooled_attention_equals_the_reference(dtype, tol):
    """HCA's pooled part on CPU (torch's flash kernel) gives the reference's outputs and log-sum-exps, with -inf
    and zeros for queries that see no entry yet (the kernel itself reports 0 there), and the reference under
    autograd."""
    from workbench.models.deepseek_v4 import attend_pooled

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 37, 16, generator=g).to(dtype)
    pooled = torch.randn(2, 1, 300, 16, generator=g).to(dtype)
    visible = torch.arange(300)[None] < torch.randint(0, 300, (37,), generator=g)[:, None]
    visible[:3] = False
    with torch.no_grad():
        out, lse = attend_pooled(q, pooled, visible, 0.25)
        ref_out, ref_lse = attend_pooled(q, pooled, visible, 0.25, fused=False)
    assert torch.isneginf(lse[:, :, :3]).all() and torch.isneginf(ref_lse[:, :, :3]).all()
    assert (out[:, :, :3] == 0).all() and (ref_out[:, :, :3] == 0).all()
    torch.testing.assert_close(lse[:, :, 3:], ref_lse[:, :, 3:], atol=tol, rtol=tol)
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=tol)
    q.requires_grad_(True)
    grad_out, _ = attend_pooled(q, pooled, visible, 0.25)
    assert torch.equal(grad_out, attend_pooled(q, pooled, visible, 0.25, fused=False)[0])


@pytest.mark.parametrize("n", [4, 3])
def test_sinkhorn_kernel_equals_the_reference_bit_for_bit(n):
    """The numba Sinkhorn (CPU, no autograd) makes the reference's divisions in the same order: equal bits."""
    from workbench.models.deepseek_v4 import sinkhorn

    comb = torch.softmax(torch.randn(2, 300, n, n, generator=torch.Generator().manual_seed(n)) * 3, -1) + 1e-6
    with torch.no_grad():
        fast = sinkhorn(comb, 20, 1e-6)
    reference = sinkhorn(comb.clone().requires_grad_(True), 20, 1e-6)  # autograd takes the PyTorch path
    assert reference.requires_grad and torch.equal(fast, reference.detach())
    torch.testing.assert_close(fast.sum(-2), torch.ones(2, 300, n), atol=1e-5, rtol=0)
