"""Test oracle: tiny random HF transformers checkpoints and the parity checks against them.

transformers is a dev-only dependency; only tests import it.
"""

from __future__ import annotations

import importlib.util
import json
import re
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import workbench as wb

B, T = 2, 13  # batch 2, odd length


def perturb(model: torch.nn.Module, seed: int = 0, scale: float = 0.3) -> torch.nn.Module:
    """Add noise to every floating parameter and buffer (except derived rotary tables) so routing is non-trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.dtype.is_floating_point and "inv_freq" not in name:
                t.add_(torch.randn(t.shape, generator=g) * scale)
    return model


def make_checkpoint(config, folder: Path, seed: int = 0, scale: float = 0.3):
    """Build an HF model from `config`, perturb it, save it in HF layout; return the (fp32, eval) model."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    perturb(model, seed, scale)
    model.save_pretrained(folder)
    return model


def legacy_rope(folder: Path):
    """Rewrite folder's config.json in the pre-5.x transformers layout (top-level `rope_theta`, a `rope_scaling` dict
    keyed `type`, null when unscaled, instead of `rope_parameters`) and return transformers' model read from it: the
    oracle run with the same config file."""
    import transformers

    path = folder / "config.json"
    config = json.loads(path.read_text())
    rope = dict(config.pop("rope_parameters"))
    config["rope_theta"], kind = rope.pop("rope_theta"), rope.pop("rope_type")
    assert kind != "default" or not rope, rope
    config["rope_scaling"] = None if kind == "default" else {"type": kind, **rope}
    path.write_text(json.dumps(config, indent=2))
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def input_ids(vocab: int, seed: int = 1, length: int = T) -> torch.Tensor:
    return torch.randint(0, vocab, (B, length), generator=torch.Generator().manual_seed(seed))


@contextmanager
def capture_routing(hf_model):
    """Record the oracle's router logits and the (ids, weights) its experts receive, per layer."""
    got: dict[int, dict[str, torch.Tensor]] = {}
    handles = []

    def layer_of(name: str) -> int:
        return int(re.search(r"layers\.(\d+)\.", name)[1])

    for name, mod in hf_model.named_modules():
        if re.search(r"layers\.\d+\.(mlp|block_sparse_moe)\.(gate|router)$", name):
            def on_router(m, args, out, i=layer_of(name)):
                got.setdefault(i, {})["logits"] = (out[0] if isinstance(out, tuple) else out).detach()
            handles.append(mod.register_forward_hook(on_router))
        elif re.search(r"layers\.\d+\.(mlp|block_sparse_moe)\.experts$", name):
            def on_experts(m, args, kwargs, i=layer_of(name)):
                a = list(args) + [kwargs.get("top_k_index"), kwargs.get("top_k_weights")]
                got.setdefault(i, {}).update(ids=a[1].detach(), weights=a[2].detach())
            handles.append(mod.register_forward_pre_hook(on_experts, with_kwargs=True))
    try:
        yield got
    finally:
        for h in handles:
            h.remove()


def by_expert(ids: np.ndarray, *per_slot: np.ndarray) -> tuple[np.ndarray, ...]:
    """Each token's expert ids sorted, and each per-slot array (weights, per-expert activations: the ids' shape
    first) permuted alike, so two routings compare as sets: the slot order of near-tied experts follows the
    CPU's rounding."""
    order = np.argsort(ids, axis=-1, kind="stable")
    out = [np.take_along_axis(ids, order, -1)]
    for a in per_slot:
        index = order.reshape(order.shape + (1,) * (a.ndim - order.ndim))
        out.append(np.take_along_axis(a, index, order.ndim - 1))
    return tuple(out)


def assert_close_scaled(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str) -> None:
    err = ((ours.float() - ref.float()).abs() / ref.float().abs().clamp(min=1)).max().item()
    assert err <= tol, f"{what}: max scaled error {err:.3g} > {tol}"


def assert_parity(folder: Path, hf_model, vocab: int, *, backend: str = "torch", length: int = T) -> dict:
    """Logits, router logits, top-k sets and weights of `wb.load(folder)` against the oracle."""
    ids = input_ids(vocab, length=length)
    N = B * length
    with torch.no_grad(), capture_routing(hf_model) as ref:
        ref_logits = hf_model(ids).logits
    model = wb.load(folder, dtype=torch.float32, backend=backend)
    logits, cache = model.run_with_cache(ids, names=[n for n in model.hook_names if ".router." in n])
    assert logits.shape == ref_logits.shape
    assert_close_scaled(logits, ref_logits, 1e-4, "logits")
    moe_layers = sorted(ref)
    ours_layers = sorted({int(n.split(".")[1]) for n in cache})
    assert ours_layers == moe_layers, f"MoE layers differ: ours {ours_layers}, oracle {moe_layers}"
    for i in moe_layers:
        k = cache[f"layers.{i}.router.topk_ids"].shape[-1]
        # the logits' tolerance: a layer in, transformers' own fp32 router logits are up to 2.3e-5 from float64
        # (GPT-OSS MXFP4, layer 1), ours 1.3e-5, so the two fp32 results may differ by more than 1e-5
        torch.testing.assert_close(cache[f"layers.{i}.router.logits"].reshape(N, -1), ref[i]["logits"].float(),
                                   atol=1e-4, rtol=1e-4, msg=lambda m: f"layer {i} router logits: {m}")
        our_ids = cache[f"layers.{i}.router.topk_ids"].reshape(N, k)
        our_w = cache[f"layers.{i}.router.topk_weights"].reshape(N, k)
        ref_ids, ref_w = ref[i]["ids"].reshape(N, k), ref[i]["weights"].reshape(N, k)
        o_sorted, o_perm = our_ids.sort(dim=-1)
        r_sorted, r_perm = ref_ids.sort(dim=-1)
        assert torch.equal(o_sorted, r_sorted), f"layer {i}: top-k expert sets differ"
        torch.testing.assert_close(our_w.gather(1, o_perm).float(), ref_w.gather(1, r_perm).float(),
                                   atol=1e-5, rtol=0, msg=lambda m: f"layer {i} top-k weights: {m}")
    if backend == "torch":
        assert_backends_agree(folder, ids, model)
    return {"model": model, "ids": ids, "cache": cache, "logits": logits}


def fast_backends() -> list[str]:
    """The backends checked against the reference: grouped always, triton where it is installed (its kernels run
    under the interpreter here: conftest sets TRITON_INTERPRET=1)."""
    return ["grouped"] + (["triton"] if importlib.util.find_spec("triton") else [])


def assert_backends_agree(folder: Path, ids: torch.Tensor, reference, tol: float = 1e-4) -> None:
    """Every fast backend gives the reference backend's logits and every hooked tensor (the same expert ids, router
    tensors within 1e-5, activations within `tol`: kernels sum in another order) on `ids`, and the same result
    of a hook editing per-expert hidden states."""
    moe = [int(n.split(".")[1]) for n in reference.hook_names if n.endswith("experts.hidden")]
    if not moe:
        return  # a dense model: the backends differ only in routed experts
    names, layer = ["*"], moe[0]
    want_logits, want = reference.run_with_cache(ids, names=names)

    def edit(x, ctx):
        return x * 0.5

    with reference.hooks({f"layers.{layer}.experts.hidden": edit}):
        want_edited = reference(ids)
    for backend in fast_backends():
        model = wb.load(folder, dtype=torch.float32, backend=backend)
        assert model.backend == backend
        logits, cache = model.run_with_cache(ids, names=names)
        assert_close_scaled(logits, want_logits, tol, f"{backend} logits")
        assert cache.keys() == want.keys()
        for name, t in want.items():
            if t.is_floating_point():
                assert_close_scaled(cache[name], t, 1e-5 if ".router." in name else tol, f"{backend} {name}")
            else:
                assert torch.equal(cache[name], t), f"{backend} {name} differs"
        assert_close_scaled(model(ids), want_logits, tol, f"{backend} logits without hooks")
        with model.hooks({f"layers.{layer}.experts.hidden": edit}):
            assert_close_scaled(model(ids), want_edited, tol, f"{backend} logits with an edited experts.hidden")


def routing_is_nontrivial(cache: dict[str, torch.Tensor]) -> bool:
    """Routing varies across tokens (so the parity check exercises real selection)."""
    return all(cache[n].reshape(-1, cache[n].shape[-1]).sort(-1)[0].unique(dim=0).shape[0] > 1
               for n in cache if n.endswith("topk_ids"))


def assert_chunked_equals_whole(model, ids: torch.Tensor, names: list[str], chunks=(5, 1, 7),
                                tol: float = 1e-5) -> "wb.State":
    """Feeding `ids` chunk by chunk with a State gives the whole-sequence logits and identical hooked tensors.

    `chunks`: the chunk sizes in order, or one size repeated over the sequence.
    """
    if isinstance(chunks, int):
        chunks = [chunks] * (ids.shape[1] // chunks) + ([ids.shape[1] % chunks] if ids.shape[1] % chunks else [])
    whole, cache = model.run_with_cache(ids, names=names or ["logits"])
    state, parts, caches, start = wb.State(), [], [], 0
    for size in chunks:
        logits, c = model.run_with_cache(ids[:, start:start + size], names=names or ["logits"], cache=state)
        parts.append(logits)
        caches.append(c)
        start += size
    assert start == ids.shape[1] and state.offset == ids.shape[1]
    assert_close_scaled(torch.cat(parts, dim=1), whole, tol, "chunked logits")
    for n in names:
        assert torch.equal(torch.cat([c[n] for c in caches], dim=1), cache[n]), n
    return state
