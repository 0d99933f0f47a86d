"""`trace(..., generate=N)`: the routing of generated tokens, recorded step by step on the incremental state,
equals a plain trace of the final sequence; `generated` marks them; early stops, seeded sampling, resume, CLI."""

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import workbench as wb
from workbench import cli
from workbench.demo import EMBEDDED_MODEL
from workbench.store import StoreError, check, open_store, trace

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-random-deepseek-v3"
NAMES = ["layers.2.resid_post", "final.norm_out"]


@pytest.fixture(scope="module")
def tiny():
    return wb.load(TINY)


def prompt(n: int = 10, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n)


def stored(out: Path) -> dict[str, np.ndarray]:
    """Every variable of a store, trimmed to its committed tokens."""
    ds = open_store(out)
    return {name: ds[name].values for name in ds.variables}


@pytest.mark.parametrize("which", ["tiny", "embedded"])
def test_greedy_generation_trace_equals_a_plain_trace_of_the_final_sequence(tiny, tmp_path, which):
    model = tiny if which == "tiny" else wb.load(EMBEDDED_MODEL)
    ids = prompt() if which == "tiny" else np.asarray(model.tokenizer.encode("def add(a, b):"))
    names = NAMES if which == "tiny" else ["layers.3.resid_post"]
    # prompt chunks of 4 (the last short), then commits every 4 new tokens and a short last one
    out = trace(model, ids, tmp_path / "gen.zarr", generate=11, names=names, chunk_tokens=4, progress=False)
    full = model.generate(torch.as_tensor(ids)[None], 11)[0].numpy()
    ds = open_store(out)
    assert ds.sizes["token"] == len(full) == len(ids) + 11 and ds.attrs["complete"]
    assert np.array_equal(ds.input_ids.values, full)
    assert ds.generated.dtype == bool and ds.generated.values.tolist() == [False] * len(ids) + [True] * 11
    assert ds.attrs["generation"] == {"prompt_tokens": len(ids), "max_new_tokens": 11, "do_sample": False,
                                      "temperature": 1.0, "top_p": 1.0, "stop": [], "seed": None, "new_tokens": 11}
    plain = stored(trace(model, full, tmp_path / "plain.zarr", names=names, chunk_tokens=4, progress=False))
    got = stored(out)
    assert np.array_equal(got["topk_ids"], plain["topk_ids"])
    assert (got["topk_ids"][:, len(ids):] >= 0).all()  # every routed layer of every generated token recorded
    np.testing.assert_allclose(got["topk_weights"], plain["topk_weights"], atol=2e-3)
    for name in set(plain) - {"topk_ids", "topk_weights", "generated"}:
        np.testing.assert_allclose(got[name], plain[name], atol=1e-4, rtol=1e-4, err_msg=name)
    assert check(out) == []


def test_windows_and_an_early_stop(tiny, tmp_path):
    ids = prompt()
    free = tiny.generate(torch.as_tensor(ids)[None], 12)[0].numpy()
    stop = int(free[len(ids) + 5])
    first = len(ids) + int(np.flatnonzero(free[len(ids):] == stop)[0])  # where the stop id first comes
    out = trace(tiny, ids, tmp_path / "stop.zarr", generate=12, stop=[stop, 255], names=NAMES,
                windows=[(3, 6), (12, 22)], chunk_tokens=4, progress=False)
    ds = open_store(out)
    n = first + 1
    assert ds.sizes["token"] == n and ds.attrs["committed_tokens"] == ds.attrs["tokens_total"] == n
    assert ds.attrs["complete"] and ds.attrs["generation"]["new_tokens"] == n - len(ids)
    assert np.array_equal(ds.input_ids.values, free[:n])
    assert zarr.open_group(out, mode="r")["input_ids"].shape == (len(ids) + 12,)  # laid out for all 12, tail unwritten
    plain = stored(trace(tiny, free[:n], tmp_path / "plain.zarr", names=NAMES, windows=[(3, 6), (12, n)],
                         chunk_tokens=4, progress=False))
    got = stored(out)
    assert np.array_equal(got["topk_ids"], plain["topk_ids"])
    for name in ("resid_post", "final_norm_out"):
        np.testing.assert_allclose(got[name], plain[name], atol=1e-4, rtol=1e-4, equal_nan=True)
        x = got[name][1] if name == "resid_post" else got[name]  # layer 2 of the layers 1, 2, 3
        assert np.isnan(x[6:12]).all() and not np.isnan(x[12:n]).any() and not np.isnan(x[3:6]).any()
    assert check(out) == []


def test_seeded_sampling_is_reproducible(tiny, tmp_path):
    ids = prompt(seed=1)
    args = dict(generate=16, do_sample=True, temperature=1.5, top_p=0.9, seed=7, chunk_tokens=8, progress=False)
    a, b = (stored(trace(tiny, ids, tmp_path / f"{x}.zarr", **args)) for x in "ab")
    assert all(np.array_equal(a[k], b[k], equal_nan=True) for k in a)
    want = tiny.generate(torch.as_tensor(ids)[None], 16, do_sample=True, temperature=1.5, top_p=0.9, seed=7)[0]
    assert np.array_equal(a["input_ids"], want.numpy())
    other = stored(trace(tiny, ids, tmp_path / "c.zarr", **{**args, "seed": 8}))
    assert not np.array_equal(other["input_ids"], a["input_ids"])


def interrupted(model, ids: np.ndarray, out: Path, at: int, **kwargs) -> None:
    """Leave an incomplete store: a hook raises in the forward that reaches token position `at`."""
    def boom(x, ctx):
        if int(ctx.positions[0]) <= at <= int(ctx.positions[-1]):
            raise RuntimeError("interrupted")

    with model.hooks({"layers.0.resid_pre": boom}), pytest.raises(RuntimeError, match="interrupted"):
        trace(model, ids, out, progress=False, **kwargs)


@pytest.mark.parametrize("sample", [False, True])
def test_resume_inside_the_generation_replays_it(tiny, tmp_path, sample):
    ids = prompt(seed=2)
    args = dict(generate=14, names=NAMES, chunk_tokens=4, do_sample=sample, seed=3 if sample else None)
    ref = stored(trace(tiny, ids, tmp_path / "ref.zarr", progress=False, **args))
    out = tmp_path / "run.zarr"
    interrupted(tiny, ids, out, 19, **args)  # new tokens commit at 14 and 18; the step of token 19 raises
    assert open_store(out).sizes["token"] == 18 and not open_store(out).attrs["complete"]
    trace(tiny, ids, out, progress=False, **args)
    got = stored(out)
    assert open_store(out).attrs["summary"]["resumed_at"] == 18
    assert all(np.array_equal(got[k], ref[k], equal_nan=True) for k in ref)


def test_resume_refuses_a_generation_that_does_not_replay(tiny, tmp_path):
    ids, out = prompt(seed=2), tmp_path / "run.zarr"
    interrupted(tiny, ids, out, 19, generate=14, chunk_tokens=4)
    stored_ids = zarr.open_group(out, mode="r+")["input_ids"]
    stored_ids[15] = (int(stored_ids[15]) + 1) % 256  # as if another draw had been stored
    with pytest.raises(StoreError, match="token drawn at position 15 .* differs from the stored one"):
        trace(tiny, ids, out, generate=14, chunk_tokens=4, progress=False)
    with pytest.raises(StoreError, match="different trace.*generation"):
        trace(tiny, ids, out, generate=13, chunk_tokens=4, progress=False)


def test_bad_generation_arguments_leave_nothing_behind(tiny, tmp_path):
    out = tmp_path / "run.zarr"
    for kwargs, message in [(dict(generate=-1), "generate must be at least 0"),
                            (dict(generate=2, do_sample=True, temperature=0.0), "temperature must be"),
                            (dict(generate=2, top_p=1.5), "top_p must lie"),
                            (dict(generate=2, stop=[300]), "stop ids \\[300\\] must lie"),
                            (dict(generate=2, windows=[(0, 13)]), "stop <= 12")]:
        with pytest.raises(ValueError, match=message):
            trace(tiny, prompt(), out, progress=False, **kwargs)
    assert not out.exists()


def test_cli_generate(tiny, tmp_path, capsys):
    np.save(tmp_path / "prompt.npy", prompt())
    out = tmp_path / "cli.zarr"
    argv = ["trace", str(TINY), "--tokens", str(tmp_path / "prompt.npy"), "--out", str(out), "--generate", "6",
            "--do-sample", "--seed", "5", "--top-p", "0.8"]
    assert cli.main(argv) == 0
    assert "traced 16 tokens into" in capsys.readouterr().out
    ds = open_store(out)
    want = tiny.generate(torch.as_tensor(prompt())[None], 6, do_sample=True, top_p=0.8, seed=5)[0].numpy()
    assert np.array_equal(ds.input_ids.values, want) and ds.attrs["seed"] == 5
    assert cli.main(["info", str(out)]) == 0
    assert "'max_new_tokens': 6" in capsys.readouterr().out
    assert cli.main(["trace", str(TINY), "--random-tokens", "5", "--out", str(tmp_path / "e.zarr"), "--stop", "3"]) == 2
    assert "apply only with --generate N" in capsys.readouterr().err


def test_sae_latents_of_generated_tokens_are_encode_of_their_activations(tmp_path):
    """`saes=` with `generate=`: each decoding step stores the SAE's latents of its token as a prompt chunk does."""
    from workbench.sae import dense, load_sae
    from workbench.sae import stored as sae_stored

    model, hook = wb.load(EMBEDDED_MODEL), "layers.3.resid_post"
    sae = load_sae("wb-v4-mini-layers.3.resid_post")
    ids = np.asarray(model.tokenizer.encode("def add(a, b):"))
    out = trace(model, ids, tmp_path / "gen.zarr", generate=6, names=[hook], saes={hook: sae}, sae_k=16,
                chunk_tokens=8, progress=False)
    ds = open_store(out)
    assert ds.generated.values.sum() == 6
    got = dense(*sae_stored(ds, hook), sae.cfg["d_sae"])
    want = sae.encode(torch.from_numpy(ds.resid_post.sel(layer=3).values))
    assert got.shape == want.shape and (want[len(ids):] != 0).any()
    torch.testing.assert_close(got, want)
