"""The causal sweep (`workbench.causal`): its deltas against ablations computed by hand, resume after a kill equal
to an uninterrupted run, refusal of a store from other inputs, and the rank correlations against pandas."""

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import zarr

import workbench as wb
from workbench import analysis
from workbench.demo import EMBEDDED_MODEL
from workbench.causal import CRASH_ENV, observational_vs_causal, open_sweep, sweep
from workbench.errors import InputError, StoreError
from workbench.interventions import ablate

TINY = EMBEDDED_MODEL.parent / "tiny-random-deepseek-v3"
T = 24


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return wb.load(TINY, dtype=torch.float32, backend="torch")


@pytest.fixture(scope="module")
def texts():
    g = torch.Generator().manual_seed(0)
    return {d: torch.randint(0, 256, (T,), generator=g) for d in ("code", "prose", "french")}


@pytest.fixture(scope="module")
def full(model, texts, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "full.zarr"
    sweep(model, texts, out, progress=False)
    return open_sweep(out)


def by_hand(model, ids: torch.Tensor, hooks=()) -> float:
    with torch.no_grad(), model.hooks(list(hooks)):
        logits = model(ids[None])[0, :-1]
    return float(torch.nn.functional.cross_entropy(logits, ids[1:]))


def test_delta_equals_ablation_by_hand(model, texts, full):
    layers = [1, 2, 3]  # layer 0 is dense
    assert full.delta_loss.dims == ("domain", "layer", "expert") and full.layer.values.tolist() == layers
    assert full.domain.values.tolist() == ["code", "prose", "french"] and full.tokens.values.tolist() == [T - 1] * 3
    assert full.attrs["complete"] and full.attrs["committed_layers"] == layers
    for d, i, e in [("code", 1, 0), ("prose", 2, 5), ("french", 3, 15), ("code", 3, 7)]:
        clean = by_hand(model, texts[d])
        assert full.clean_loss.sel(domain=d) == pytest.approx(clean, abs=1e-5)
        want = by_hand(model, texts[d], ablate(i, [e])) - clean
        assert full.delta_loss.sel(domain=d, layer=i, expert=e) == pytest.approx(want, abs=1e-5)
    assert np.abs(full.delta_loss.values).max() > 1e-3  # ablations change the loss


def test_labelled_sequence_and_windows(model, texts, full, tmp_path):
    """(ids, labels) over the concatenation with windows of T tokens: each window is one domain's text, each
    prediction labelled by the token it predicts; the first token of each window predicts nothing."""
    ids = torch.cat(list(texts.values()))
    labels = np.repeat(["code", "prose", "french"], T)
    ds = open_sweep(sweep(model, (ids, labels), tmp_path / "labelled.zarr", layers=[2],
                          chunk_tokens=T, progress=False))
    assert ds.domain.values.tolist() == ["code", "french", "prose"] and ds.tokens.values.tolist() == [T - 1] * 3
    np.testing.assert_allclose(ds.delta_loss.sel(layer=2), full.delta_loss.sel(layer=[2], domain=ds.domain)[:, 0],
                               atol=1e-6)


def test_resume_after_kill_equals_uninterrupted(model, texts, full, tmp_path, monkeypatch):
    """A sweep killed (SIGKILL) after writing layer 2's row, before its marker, resumes to the uninterrupted
    result bit for bit."""
    out = tmp_path / "killed.zarr"
    script = (f"import torch, workbench as wb\nfrom workbench.causal import sweep\ntorch.set_num_threads(1)\n"
              f"model = wb.load({str(TINY)!r}, dtype=torch.float32, backend='torch')\n"
              f"texts = {{d: torch.tensor(v) for d, v in {({d: t.tolist() for d, t in texts.items()})!r}.items()}}\n"
              f"sweep(model, texts, {str(out)!r}, progress=False)\n")
    run = subprocess.run([sys.executable, "-c", script], env={**os.environ, CRASH_ENV: "2"}, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-2000:]
    part = open_sweep(out)
    assert part.attrs["committed_layers"] == [1] and not part.attrs["complete"]
    assert np.isnan(part.delta_loss.sel(layer=[2, 3])).all()  # written but not committed: invisible
    resumed = open_sweep(sweep(model, texts, out, progress=False))
    assert resumed.delta_loss.values.tobytes() == full.delta_loss.values.tobytes()
    assert resumed.clean_loss.values.tobytes() == full.clean_loss.values.tobytes()
    # a complete sweep is not swept again
    monkeypatch.setattr("workbench.causal.ablate", lambda *a, **k: pytest.fail("committed layers reswept"))
    sweep(model, texts, out, progress=False)


def test_other_inputs_refused(model, texts, tmp_path):
    out = tmp_path / "s.zarr"
    sweep(model, texts, out, layers=[3], progress=False)
    other = dict(texts, code=texts["code"].flip(0))
    with pytest.raises(StoreError, match="tokens_sha256"):
        sweep(model, other, out, layers=[3], progress=False)
    with pytest.raises(StoreError, match="layers"):
        sweep(model, texts, out, layers=[2], progress=False)
    sweep(model, other, out, layers=[3], progress=False, overwrite=True)
    assert open_sweep(out).attrs["complete"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(StoreError, match="not a causal sweep"):
        sweep(model, texts, tmp_path / "junk", progress=False)
    with pytest.raises(InputError, match="MoE layers"):
        sweep(model, texts, tmp_path / "x.zarr", layers=[0], progress=False)


def test_provenance(full):
    a = full.attrs
    assert a["weights_sha256"] and len(a["tokens_sha256"]) == 64 and a["dtype"] == "float32"
    assert a["domains"] == ["code", "prose", "french"] and a["versions"]["zarr"] == zarr.__version__


def np_spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson's correlation of mean ranks, in numpy."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(1, len(x) + 1)
        _, inverse = np.unique(x, return_inverse=True)
        return (np.bincount(inverse, weights=r) / np.bincount(inverse))[inverse]
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def test_spearman_against_numpy(model, texts, full):
    ids = torch.cat(list(texts.values()))
    labels = np.repeat(list(texts), T)
    _, cache = model.run_with_cache(ids[None], ["layers.*.router.*"])
    routing = analysis.from_cache(cache, ids)
    r = observational_vs_causal(full, routing, labels)
    share = analysis.expert_load(routing).share
    spec = analysis.domain_specialisation(routing, labels).specialisation
    w = full.tokens.values / full.tokens.values.sum()
    for i in (1, 2, 3):
        overall = (full.delta_loss.sel(layer=i).values * w[:, None]).sum(0)
        want = np_spearman(overall, share.sel(layer=i).values)
        assert r.vs_load.sel(layer=i) == pytest.approx(want, abs=1e-12)
        d = full.delta_loss.sel(layer=i).values.ravel()
        s = spec.sel(layer=i, domain=["code", "prose", "french"]).values.ravel()
        assert r.vs_specialisation.sel(layer=i) == pytest.approx(np_spearman(d, s), abs=1e-12)
    assert np.isfinite(r.vs_load).all() and r.vs_specialisation_by_domain.dims == ("domain", "layer")
