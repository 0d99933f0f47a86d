"""Sparse autoencoders (workbench.sae): SAELens' format, exact splicing, latent edits, latents in traces."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import workbench as wb
from workbench import CheckpointError, HookError
from workbench.interventions import patch
from workbench.sae import (SAE, dense, latents, load_sae, scale_latents, set_latents, splice, stored, top_contexts,
                           top_latents)
from oracle import input_ids
from test_deepseek_v4 import CONFIGS as V4_CONFIGS, make_v4

SHIPPED = Path(__file__).resolve().parent.parent / "data" / "saes" / "wb-v4-mini-layers.3.resid_post"
V4 = "hc2-every-kind-rates-not-dividing-yarn"  # hc_mult 2


def random_sae(d_in: int, d_sae: int, architecture: str = "topk", hook: str | None = None, seed: int = 0,
               **extra) -> SAE:
    cfg = {"d_in": d_in, "d_sae": d_sae, "architecture": architecture, "hook_name": hook, **extra}
    if architecture == "topk":
        cfg.setdefault("k", 4)
    sae = SAE(cfg)
    g = torch.Generator().manual_seed(seed)
    for p in sae.parameters():
        p.data = torch.randn(p.shape, generator=g) * 0.3
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def v4(tmp_path_factory):
    folder = tmp_path_factory.mktemp("deepseek-v4")
    make_v4(V4_CONFIGS[V4][0](), folder)
    return wb.load(folder)


def write_saelens(folder: Path, cfg: dict, tensors: dict) -> Path:
    """A folder as SAELens writes one: cfg.json and sae_weights.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, folder / "sae_weights.safetensors")
    return folder


@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu"])
def test_saelens_folder_encodes_as_written(tmp_path, architecture):
    g = torch.Generator().manual_seed(3)
    t = {"W_enc": torch.randn(8, 12, generator=g), "b_enc": torch.randn(12, generator=g) * 0.1,
         "W_dec": torch.randn(12, 8, generator=g), "b_dec": torch.randn(8, generator=g)}
    if architecture == "jumprelu":
        t["threshold"] = torch.rand(12, generator=g)
    cfg = {"d_in": 8, "d_sae": 12, "architecture": architecture, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": "layers.1.resid_post", "model_name": "tiny", "sae_lens_version": "6.12.1"}}
    if architecture == "topk":
        cfg["k"] = 3
    sae = load_sae(write_saelens(tmp_path / "sae", cfg, t))
    assert sae.hook_name == "layers.1.resid_post" and sae.architecture == architecture
    x = torch.randn(5, 8, generator=g)
    pre = (x - t["b_dec"]) @ t["W_enc"] + t["b_enc"]
    want = {"standard": pre.relu(),
            "jumprelu": torch.where(pre > t.get("threshold", 0), pre.relu(), 0),
            "topk": torch.where(pre >= pre.topk(3).values[:, -1:], pre, 0).relu()}[architecture]
    z = sae.encode(x)
    torch.testing.assert_close(z, want)
    torch.testing.assert_close(sae(x), want @ t["W_dec"] + t["b_dec"])
    again = load_sae(sae.save(tmp_path / "again"))  # our own writer gives the same SAE back
    assert again.cfg == sae.cfg and all(torch.equal(a, b) for a, b in zip(again.parameters(), sae.parameters()))


def test_refuses_pickles_and_mismatches(tmp_path):
    cfg = {"d_in": 4, "d_sae": 6, "architecture": "standard"}
    good = {"W_enc": torch.zeros(4, 6), "b_enc": torch.zeros(6), "W_dec": torch.zeros(6, 4), "b_dec": torch.zeros(4)}
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    (folder / "sae_weights.pt").write_bytes(b"\x80\x04not to be opened")
    with pytest.raises(CheckpointError, match="pickled") as e:
        load_sae(folder)
    assert e.value.file.endswith("sae_weights.pt")
    bad = write_saelens(tmp_path / "shape", cfg, {**good, "W_dec": torch.zeros(4, 6)})
    with pytest.raises(CheckpointError, match=r"shape \[4, 6\], expected \[6, 4\]") as e:
        load_sae(bad)
    assert e.value.tensor == "W_dec" and e.value.file.endswith("sae_weights.safetensors")
    extra = write_saelens(tmp_path / "extra", cfg, {**good, "W_gate": torch.zeros(4)})
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_sae(extra)
    assert e.value.tensor == "W_gate"
    for field, value in [("architecture", "gated"), ("normalize_activations", "expected_average_only_in")]:
        with pytest.raises(CheckpointError, match=field):
            load_sae(write_saelens(tmp_path / field, {**cfg, field: value}, good))
    with pytest.raises(CheckpointError, match="k"):
        load_sae(write_saelens(tmp_path / "nok", {**cfg, "architecture": "topk"}, good))


def test_hub_cache_layout(tmp_path, monkeypatch):
    from huggingface_hub import constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--saes"
    sae = random_sae(4, 6, "standard", "layers.0.resid_post")
    sae.save(repo / "snapshots" / commit / "layer_0" / "width_6")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for revision in (None, commit):
        got = load_sae("org/saes/layer_0/width_6", revision=revision)
        assert torch.equal(got.W_dec, sae.W_dec) and got.hook_name == "layers.0.resid_post"
    with pytest.raises(CheckpointError, match="org/saes/layer_0/width_6@no-such"):
        load_sae("org/saes/layer_0/width_6", revision="no-such")
    with pytest.raises(CheckpointError, match="no sae_weights"):
        load_sae("org/saes/layer_1")
    monkeypatch.setenv("WORKBENCH_TRUSTED_REPOS", "trusted/*")  # the checkpoints' allow-list holds for SAEs too
    with pytest.raises(CheckpointError, match=r"allow-list \$WORKBENCH_TRUSTED_REPOS"):
        load_sae("org/saes/layer_0/width_6")
    got = load_sae("org/saes/layer_0/width_6", trusted_repos=["org/*"])
    assert torch.equal(got.W_dec, sae.W_dec)


@pytest.mark.parametrize("which", ["mixtral", "v4", "embedded"])
def test_splice_with_error_term_changes_nothing(request, which):
    model = request.getfixturevalue(which)
    ids = input_ids(model.vocab_size, length=11)
    hook = "layers.1.resid_post"
    _, cache = model.run_with_cache(ids, names=[hook])
    x = cache[hook]
    sae = random_sae(x.shape[-1], 24, "standard", hook)
    ref = model(ids)
    with model.hooks(splice(model, sae)):
        out, spliced = model.run_with_cache(ids, names=[hook, f"{hook}.sae.latents"])
    assert torch.equal(out, ref) and torch.equal(spliced[hook], x)
    z = spliced[f"{hook}.sae.latents"]
    assert z.shape == (*x.shape[:-1], 24) and torch.equal(z, sae.encode(x))  # one dictionary per stream
    assert (z > 0).any()
    with model.hooks(splice(model, sae, error=False)):
        _, recon = model.run_with_cache(ids, names=[hook])
    torch.testing.assert_close(recon[hook], sae(x))
    assert model.hook_names.index(f"{hook}.sae.latents") == model.hook_names.index(hook) + 1


def test_editing_a_latent_is_the_hand_computed_patch(v4):
    hook = "layers.1.resid_mid"
    ids = input_ids(v4.vocab_size, length=11)
    x = v4.run_with_cache(ids, names=[hook])[1][hook]  # [B, T, hc, H]
    sae = random_sae(x.shape[-1], 24, "topk", hook, k=6)
    z = sae.encode(x)
    j = int(z[0, 4, 0].argmax())
    edited = z.clone()
    edited[:, 3:7, :, j] = 0.0
    with v4.hooks(patch(hook, x + sae.decode(edited) - sae.decode(z))):
        want = v4(ids)
    with v4.hooks(splice(v4, sae) + set_latents(sae, [j], 0.0, tokens=range(3, 7))):
        got, cache = v4.run_with_cache(ids, names=[f"{hook}.sae.latents"])
    torch.testing.assert_close(got, want)
    assert torch.equal(cache[f"{hook}.sae.latents"], edited)
    assert not torch.allclose(got, v4(ids))
    with v4.hooks(splice(v4, sae) + scale_latents(hook, [j], 3.0)):
        tripled = v4(ids)
    edited = z.clone()
    edited[..., j] *= 3
    with v4.hooks(patch(hook, x + sae.decode(edited) - sae.decode(z))):
        torch.testing.assert_close(tripled, v4(ids))
    with pytest.raises(HookError, match="latent 99 does not exist"), v4.hooks(splice(v4, sae) +
                                                                              set_latents(hook, [99], 0.0)):
        v4(ids)


def test_an_sae_over_the_concatenated_streams(v4):
    hook = "layers.0.resid_post"
    ids = input_ids(v4.vocab_size, length=9)
    x = v4.run_with_cache(ids, names=[hook])[1][hook]
    sae = random_sae(x.shape[-2] * x.shape[-1], 16, "topk", hook, k=3)
    with v4.hooks(splice(v4, sae) + set_latents(hook, [0, 1, 2], 1.0)):
        got, cache = v4.run_with_cache(ids, names=[f"{hook}.sae.latents"])
    z = sae.encode(x.flatten(-2))
    assert torch.equal(latents(sae, x), z) and cache[f"{hook}.sae.latents"].shape == (*x.shape[:2], 16)
    edited = z.clone()
    edited[..., :3] = 1.0
    with v4.hooks(patch(hook, x + (sae.decode(edited) - sae.decode(z)).unflatten(-1, x.shape[-2:]))):
        torch.testing.assert_close(got, v4(ids))
    with pytest.raises(HookError, match="does not fit"), v4.hooks(splice(v4, random_sae(5, 8, hook=hook))):
        v4(ids)


@pytest.mark.parametrize("which", ["mixtral", "v4"])
def test_stored_latents_are_encode_of_the_stored_activations(request, which, tmp_path):
    model = request.getfixturevalue(which)
    hooks = ["layers.0.resid_post", "layers.2.resid_post"]
    tokens = input_ids(model.vocab_size, length=40)[0]
    acts = model.run_with_cache(tokens, names=hooks[:1])[1][hooks[0]]
    saes = {hooks[0]: random_sae(acts.shape[-1], 20, "topk", k=5), hooks[1]: random_sae(acts.shape[-1], 20, "standard")}
    out = wb.trace(model, tokens, tmp_path / "s.zarr", names=hooks, saes=saes, sae_k=8, chunk_tokens=16,
                   progress=False)
    ds = wb.open_store(out)
    assert ds.attrs["saes"][hooks[0]]["cfg"]["k"] == 5 and ds.attrs["saes"][hooks[1]]["k"] == 8
    for hook, sae in saes.items():
        ids, values = stored(ds, hook)
        assert ids.dtype == np.int32 and values.dtype == np.float32 and ids.shape[-1] == 8
        x = torch.from_numpy(ds.resid_post.sel(layer=int(hook.split(".")[1])).values)
        z = sae.encode(x)
        if sae.architecture == "topk":  # at most k <= sae_k active: stored exactly
            assert torch.equal(dense(ids, values, 20), z)
        else:  # the sae_k largest of each token
            assert torch.equal(torch.from_numpy(values.values), z.topk(8).values)
            assert (z > 0).sum(-1).max() > 8  # so the truncation was tested
    hook, j = hooks[0], int(np.bincount(stored(ds, hooks[0])[0].values[..., 0].ravel()).argmax())
    z = saes[hook].encode(torch.from_numpy(ds.resid_post.sel(layer=0).values)).reshape(40, -1, 20)[..., j]
    best = top_contexts(ds, hook, j, n=3, width=4)
    torch.testing.assert_close(torch.from_numpy(best.value.values), z.max(1).values.topk(3).values)
    t = int(best.token[0])
    assert best.context.values[0, -1] == tokens[t] and (best.context.values[0, :max(0, 3 - t)] == -1).all()
    at = top_latents(ds, hook, t)
    assert j in at.latent.values and float(at.value.max()) == float(z[t].max())


def test_shipped_sae_matches_its_card(embedded):
    sae = load_sae(SHIPPED)
    assert torch.equal(load_sae(SHIPPED.name).W_dec, sae.W_dec)  # found by name from anywhere
    card = json.loads((SHIPPED / "eval.json").read_text())
    assert sae.hook_name == "layers.3.resid_post" and sae.architecture == "topk" and sae.W_enc.dtype == torch.float32
    assert sae.d_in == 192 and sae.d_sae == 4 * 192 and sae.cfg["k"] == 16
    corpus = Path(__file__).resolve().parent.parent / "data" / "corpus"
    rows = torch.stack([torch.tensor(list((corpus / f"{d}.heldout.txt").read_bytes()[:128]))
                        for d in ("code", "prose", "german")])
    kept = []

    def grab(x, ctx):  # the layers after the SAE's have nothing to add
        kept.append(x.flatten(0, 2))
        raise StopIteration

    with pytest.raises(StopIteration), embedded.hooks({sae.hook_name: grab}):
        embedded(rows, head=False)
    x = kept[0]
    err = (sae(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert abs((1 - float(err)) - card["explained_variance"]) < 0.05, float(1 - err)
    assert card["explained_variance"] > 0.5 and card["l0"] <= 16


def test_cli_trace_stores_the_latents_the_api_stores(embedded, tmp_path, capsys):
    """`workbench trace --sae` stores what `trace(saes=)` stores, `info` names the SAE, and a bad --sae is one
    error line with nothing written."""
    from workbench import cli

    tokens = np.random.default_rng(3).integers(0, 256, 200)
    np.save(tmp_path / "tokens.npy", tokens)
    out = tmp_path / "cli.zarr"
    argv = ["trace", str(SHIPPED.parent.parent / "models" / "wb-v4-mini"), "--tokens", str(tmp_path / "tokens.npy"),
            "--dtype", "float32", "--backend", embedded.backend, "--chunk-tokens", "64", "--window", "50:150"]
    assert cli.main([*argv, "--out", str(out), "--sae", SHIPPED.name, "--sae-k", "8"]) == 0
    sae = load_sae(SHIPPED)
    want = wb.open_store(wb.trace(embedded, tokens, tmp_path / "api.zarr", saes={sae.hook_name: sae}, sae_k=8,
                                  chunk_tokens=64, windows=[(50, 150)], progress=False))
    got = wb.open_store(out)
    for name in ("resid_post_sae_ids", "resid_post_sae_values"):
        assert got[name].shape == want[name].shape and got[name].shape[-1] == 8
        np.testing.assert_array_equal(got[name].values, want[name].values)
    assert got.attrs["saes"] == want.attrs["saes"]
    capsys.readouterr()
    assert cli.main(["info", str(out)]) == 0
    assert "sae                layers.3.resid_post: topk, d_in 192, d_sae 768; 8 latents stored per token" in \
        capsys.readouterr().out

    errors = [
        ([str(tmp_path / "missing")], "no such SAE folder"),
        (["layers.99.resid_post=" + SHIPPED.name], "'layers.99.resid_post' is not a hook point"),
        ([SHIPPED.name, "layers.3.resid_post=" + str(SHIPPED)], "two SAEs at 'layers.3.resid_post'"),
    ]
    for saes, message in errors:
        sae_args = [a for s in saes for a in ("--sae", s)]
        assert cli.main([*argv, "--out", str(tmp_path / "e.zarr"), *sae_args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("workbench trace: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "e.zarr").exists()
