"""The streaming activation store: `trace` to zarr, `open_store` back, crash safety, and the CLI commands."""

import errno
import hashlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors import safe_open

import workbench as wb
from workbench import cli
from workbench.demo import EMBEDDED_MODEL
from workbench.store import StoreError, open_store, trace
from workbench.store.snapshot import REPLAY_ENV
from oracle import by_expert

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = Path(__file__).resolve().parent.parent / "data" / "models" / "tiny-random-deepseek-v3"
ROUTED = [1, 2, 3]  # the embedded model: 4 layers, the first dense
TIMING = ("created", "completed", "summary")


@pytest.fixture(scope="module")
def model():
    return wb.load(MODEL)


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n)


def whole(model, tokens: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    """Hooked tensors of one whole-sequence forward, batch row 0."""
    _, cache = model.run_with_cache(torch.as_tensor(tokens)[None], names=names)
    return {k: v[0].numpy() for k, v in cache.items()}


def files(store: Path) -> dict[str, bytes]:
    """Every file of a store but the root metadata (which holds the timing attrs), by relative path."""
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*"))
            if p.is_file() and p != store / "zarr.json"}


def assert_same_store(got: Path, want: Path) -> None:
    """Bit-identical: same files with the same bytes, same array contents, same attrs but timing fields."""
    assert files(got) == files(want)
    a, b = zarr.open_group(got, mode="r"), zarr.open_group(want, mode="r")
    assert sorted(a.array_keys()) == sorted(b.array_keys())
    for name in a.array_keys():
        assert a[name][...].tobytes() == b[name][...].tobytes(), name
    untimed = [{k: v for k, v in g.attrs.items() if k not in TIMING} for g in (a, b)]
    assert untimed[0] == untimed[1]
    assert a.attrs["complete"] and b.attrs["complete"]


# ---------------------------------------------------------------- what is stored


def test_routing_of_a_chunked_trace_equals_the_whole_forward(model, tmp_path):
    tokens = random_tokens(3072)
    out = trace(model, tokens, tmp_path / "run.zarr", chunk_tokens=512, progress=False, seed=0)
    ds = open_store(out)
    ref = whole(model, tokens, ["layers.*.router.topk_*"])
    assert dict(ds.sizes) == {"token": 3072, "layer": 3, "k": 4}
    assert ds.layer.values.tolist() == ROUTED
    assert np.array_equal(ds.token.values, np.arange(3072))
    assert np.array_equal(ds.input_ids.values, tokens) and ds.input_ids.dtype == np.int32
    assert ds.topk_ids.dims == ("layer", "token", "k") and ds.topk_ids.dtype == np.int16
    assert ds.topk_weights.dtype == np.float16
    for layer in ROUTED:  # as sets: the slot order of near-tied experts follows the CPU's rounding
        ids, weights = by_expert(ds.topk_ids.sel(layer=layer).values, ds.topk_weights.sel(layer=layer).values)
        ref_ids, ref_weights = by_expert(ref[f"layers.{layer}.router.topk_ids"],
                                         ref[f"layers.{layer}.router.topk_weights"])
        assert np.array_equal(ids, ref_ids)
        assert ids.min() >= 0 and ids.max() < 16
        # float16 of weights that equal the whole forward's up to float32 rounding
        np.testing.assert_allclose(weights.astype(np.float32), ref_weights, rtol=2**-10, atol=0)
    a = ds.attrs
    assert a["committed_tokens"] == 3072 and a["complete"] and a["tokens_total"] == 3072
    want_sha = hashlib.sha256((MODEL / "model.safetensors").read_bytes()).hexdigest()
    assert a["weights_sha256"] == {"model.safetensors": want_sha}
    assert len(a["config_sha256"]) == 64 and a["source"] == str(MODEL) and a["commit"] is None
    assert a["workbench_version"] == wb.__version__ and a["versions"]["torch"] == torch.__version__
    assert set(a["versions"]) >= {"torch", "zarr", "xarray", "numpy"}
    assert a["seed"] == 0 and a["chunk_tokens"] == 512 and a["names"] == [] and a["routed_layers"] == ROUTED
    assert a["chunks"]["topk_ids"] == [3, 512, 4] and a["k"] == 4 and a["n_experts"] == 16  # all layers per chunk
    s = a["summary"]
    assert (s["tokens"], s["traced_tokens"], s["resumed_at"], s["layers"], s["k"]) == (3072, 3072, 0, 3, 4)
    assert s["bytes_per_routing_entry"] == s["routing_bytes"] / (3072 * 3 * 4)
    assert 0.5 < s["bytes_per_routing_entry"] < 4  # int16 + float16 = 4 bytes before compression
    assert s["wall_s"] > 0 and s["peak_rss_bytes"] > 10 * 2**20


def test_named_hooks_restricted_to_layers_and_windows(model, tmp_path):
    tokens = random_tokens(1024, seed=1)
    windows = [(100, 200), (700, 1000)]
    names = ["layers.*.resid_post", "layers.*.experts.out", "final.norm_out", "layers.*.router.*"]
    out = trace(model, tokens, tmp_path / "run.zarr", names=names, layers=[0, 2], windows=windows,
                chunk_tokens=256, progress=False)
    ds = open_store(out)
    ref = whole(model, tokens, ["layers.*.resid_post", "layers.2.experts.out", "final.norm_out",
                                "layers.*.router.*"])
    assert ds.layer.values.tolist() == [0, 1, 2, 3]  # routed layers plus the named layers
    assert ds.resid_post.dims == ("layer", "token", "hidden")
    assert ds.experts_out.dims == ("layer", "token", "k", "hidden")
    assert ds.router_logits.dims == ("layer", "token", "expert") and ds.sizes["expert"] == 16
    assert ds.final_norm_out.dims == ("token", "hidden")
    assert ds.resid_post.attrs["hook"] == "layers.{layer}.resid_post"
    inside = np.zeros(1024, bool)
    for a, b in windows:
        inside[a:b] = True
    for layer in (0, 2):
        got = ds.resid_post.sel(layer=layer).values
        np.testing.assert_allclose(got[inside], ref[f"layers.{layer}.resid_post"][inside], rtol=1e-4, atol=1e-4)
        assert np.isnan(got[~inside]).all()
    for layer in (1, 3):  # outside `layers`
        assert np.isnan(ds.resid_post.sel(layer=layer).values).all()
    experts = ds.experts_out.sel(layer=2).values
    np.testing.assert_allclose(experts[inside], ref["layers.2.experts.out"][inside], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds.router_logits.sel(layer=2).values[inside], ref["layers.2.router.logits"][inside],
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds.final_norm_out.values[inside], ref["final.norm_out"][inside], rtol=1e-4, atol=1e-4)
    assert np.isnan(ds.final_norm_out.values[~inside]).all()
    # routing is recorded everywhere whatever the restrictions; the dense layer reads as the fill value
    for layer in ROUTED:
        assert np.array_equal(ds.topk_ids.sel(layer=layer).values, ref[f"layers.{layer}.router.topk_ids"])
    assert (ds.topk_ids.sel(layer=0).values == -1).all() and np.isnan(ds.topk_weights.sel(layer=0).values).all()
    # only chunks (layer index / token chunk / hidden) holding recorded values are on disk
    stored = {str(p.relative_to(out / "resid_post" / "c")) for p in (out / "resid_post" / "c").rglob("*")
              if p.is_file()}
    assert stored == {f"{i}/{t}/0" for i in (0, 2) for t in (0, 2, 3)}
    assert sorted(p.name for p in (out / "topk_ids" / "c" / "0").iterdir()) == ["0", "1", "2", "3"]  # all layers


def test_open_store_is_lazy(model, tmp_path):
    tokens = random_tokens(1024, seed=2)
    out = trace(model, tokens, tmp_path / "run.zarr", chunk_tokens=128, progress=False)
    ds = open_store(out)
    assert ds.topk_ids.chunks == ((3,), (128,) * 8, (4,))  # a routing chunk holds every layer
    sel = ds.topk_ids.sel(layer=2).isel(token=slice(10, 300))
    assert sel.data.numblocks == (3, 1)  # token chunks 0..2 only
    want = sel.values.copy()
    # a chunk outside the selection that cannot be decoded: the selection still reads, the whole array not
    (out / "topk_ids" / "c" / "0" / "5" / "0").write_bytes(b"not a blosc chunk")
    ds = open_store(out)
    assert np.array_equal(ds.topk_ids.sel(layer=2).isel(token=slice(10, 300)).values, want)
    with pytest.raises(StoreError, match=r"topk_ids chunk \(0, 5, 0\) .*tokens 640..768"):
        ds.topk_ids.values


# ---------------------------------------------------------------- crash safety

# One process loads the model once, then forks a writer per store, wave after wave; each writer traces the
# same sequence and SIGKILLs itself at its crash point (CHUNK:POINT), or runs until the test kills it.
# Single-threaded throughout: results are only bit-reproducible at a fixed thread count (the store records it).
WRITERS = """
import json, os, sys
import numpy as np
import workbench as wb
from workbench.store import trace
spec = json.loads(sys.argv[1])
model = wb.load(spec["model"])
tokens = np.random.default_rng(spec["seed"]).integers(0, 256, spec["n"])
for wave in spec["waves"]:
    pids = {}
    for out, crash in wave:
        pid = os.fork()
        if pid == 0:
            if crash:
                os.environ["WORKBENCH_TRACE_CRASH"] = crash
            trace(model, tokens, out, progress=False, **spec["args"])
            os._exit(0)
        pids[pid] = out
        print("start", out, pid, flush=True)
    for _ in wave:
        pid, status = os.wait()
        print("exit", pids[pid], -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status),
              flush=True)
"""
N, CHUNK = 600, 80  # the last chunk is short
TRACE_ARGS = dict(names=["layers.2.resid_post", "final.norm_out"], windows=[(150, 450)], chunk_tokens=CHUNK)


def committed(out: Path) -> int:
    try:
        return json.loads((out / "zarr.json").read_text())["attributes"]["committed_tokens"]
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return -1


def test_killed_traces_resume_bit_identical(model, tmp_path):
    tokens = random_tokens(N, seed=3)
    ref = trace(model, tokens, tmp_path / "ref.zarr", progress=False, **TRACE_ARGS)
    # SIGKILL before any write, inside a chunk's writes, before and after its marker, on the last chunk; one
    # writer killed from outside at a random moment; then a resumed writer killed again after its replay
    points = ["0:forward", "1:write", "3:marker", "5:committed", "7:marker"]
    store = {p: str(tmp_path / p.replace(":", "-")) for p in points}
    live = tmp_path / "random"
    waves = [[*((store[p], p) for p in points), (str(live), None)], [(store["1:write"], "6:forward")]]
    spec = dict(model=str(MODEL), seed=3, n=N, args=TRACE_ARGS, waves=waves)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WORKBENCH_TRACE_CRASH", None)
    proc = subprocess.Popen([sys.executable, "-c", WRITERS, json.dumps(spec)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    exits = []
    for line in proc.stdout:
        event, out, value = line.split()
        if event == "exit":
            exits.append((out, int(value)))
        elif out == str(live):
            deadline = time.monotonic() + 60
            while committed(live) < 2 * CHUNK and time.monotonic() < deadline:
                time.sleep(0.005)
            with pytest.raises(StoreError, match="another live trace"):  # a second writer is refused meanwhile
                trace(model, tokens, live, progress=False, **TRACE_ARGS)
            time.sleep(random.Random(0).uniform(0, 0.05))
            os.kill(int(value), signal.SIGKILL)
    assert proc.wait(timeout=60) == 0, proc.stderr.read()
    assert sorted(exits) == sorted([*((store[p], -9) for p in points), (str(live), -9), (store["1:write"], -9)])
    want = open_store(ref)
    for out in [*map(Path, store.values()), live]:
        done = committed(out)
        assert done in range(0, N, CHUNK), (out, done)
        if done > 0:  # readers see exactly the committed prefix, whatever temporaries a killed write left
            (out / "zarr.json.0123abcd.partial").write_bytes(b'{"half": ')
            (out / "topk_ids" / "c" / "0" / "0" / "0.4567cdef.partial").write_bytes(b"half a chunk")
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                ds = open_store(out)
            assert ds.sizes["token"] == done and not ds.attrs["complete"]
            assert np.array_equal(ds.topk_ids.values, want.topk_ids.values[:, :done])
            assert np.array_equal(ds.resid_post.values, want.resid_post.values[:, :done], equal_nan=True)
        trace(model, tokens, out, progress=False, **TRACE_ARGS)
        assert not list(out.rglob("*.partial"))
        assert_same_store(out, ref)
        assert zarr.open_group(out, mode="r").attrs["summary"]["resumed_at"] == max(done, 0)
    assert [committed(Path(store[p])) for p in points] == [N] * 5


# ---------------------------------------------------------------- resume from state snapshots (DeepSeek-V4)

V4_N, V4_CHUNK = 400, 80  # five chunks; the last one removes the snapshots before its marker
V4_ARGS = dict(names=["layers.5.resid_post"], windows=[(200, 400)], chunk_tokens=V4_CHUNK)


@pytest.fixture(scope="module")
def v4_reference(tmp_path_factory):
    """(model, tokens, store) of an uninterrupted trace of the embedded V4 model (bf16, one thread)."""
    model, tokens, threads = wb.load(EMBEDDED_MODEL), random_tokens(V4_N, seed=7), torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return model, tokens, trace(model, tokens, tmp_path_factory.mktemp("v4") / "ref.zarr", progress=False,
                                    **V4_ARGS)
    finally:
        torch.set_num_threads(threads)


def snapshots(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "resume").glob("*")) if (out / "resume").exists() else []


def resumed(model, tokens: np.ndarray, out: Path, warning: str | None = None) -> str | None:
    """Resume the V4 trace at `out` (a warning matching `warning` expected, else none); how it resumed."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trace(model, tokens, out, progress=False, **V4_ARGS)
    messages = [str(w.message) for w in seen if issubclass(w.category, UserWarning)]
    if warning is None:
        assert not messages, messages
    else:
        assert len(messages) == 1 and re.search(warning, messages[0]), messages
    return zarr.open_group(out, mode="r").attrs["summary"]["resumed_from"]


def test_killed_v4_traces_resume_from_snapshots_bit_identical(v4_reference, tmp_path):
    """SIGKILL at every point of a commit (after the forward, inside the writes, between writing a snapshot and
    renaming it, before and after the marker, on the last chunk); a writer resumed from a snapshot killed again.
    Each resumes from the last committed snapshot without replaying and ends bit-identical to the uninterrupted
    store; killed on the last chunk (snapshots already removed) it warns and replays."""
    model, tokens, ref = v4_reference
    points = ["0:forward", "1:write", "1:snapshot", "2:marker", "2:committed", "3:snapshot", "4:marker"]
    store = {p: tmp_path / p.replace(":", "-") for p in points}
    waves = [[(str(store[p]), p) for p in points], [(str(store["1:snapshot"]), "3:snapshot")]]
    spec = dict(model=str(EMBEDDED_MODEL), seed=7, n=V4_N, args=V4_ARGS, waves=waves)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    env.pop("WORKBENCH_TRACE_CRASH", None)
    run = subprocess.run([sys.executable, "-c", WRITERS, json.dumps(spec)], env=env, text=True, capture_output=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.count(" -9\n") == len(points) + 1, run.stdout
    done = {p: committed(store[p]) for p in points}
    assert done == {"0:forward": 0, "1:write": 80, "1:snapshot": 240, "2:marker": 160, "2:committed": 240,
                    "3:snapshot": 240, "4:marker": 320}
    # a killed write's temporary and a snapshot renamed just before the kill, past the marker: both removed
    assert snapshots(store["3:snapshot"])[-2:] == ["000000000320.safetensors.partial", "zarr.json"]
    assert snapshots(store["2:marker"])[-2:] == ["000000000240.safetensors", "zarr.json"]
    assert snapshots(store["4:marker"]) == []
    for p in points:
        how = resumed(model, tokens, store[p], "no snapshot at token 320" if p == "4:marker" else None)
        assert how == {"0:forward": None, "4:marker": "replay"}.get(p, "snapshot"), p
        assert_same_store(store[p], ref)


DAMAGE = {
    # case -> (what it does to the snapshots of a store committed to token 240, the warning)
    "a flipped byte": (lambda d: flip(d / "000000000160.safetensors"), "tensor .* fails its checksum"),
    "a truncated file": (lambda d: truncate(d / "000000000240.safetensors"), "cannot be used"),
    "a missing file": (lambda d: (d / "000000000160.safetensors").unlink(), r"continues at row \d+, the earlier "
                                                                           r"files hold \d+"),
    "no snapshot at the marker": (lambda d: (d / "000000000240.safetensors").unlink(), "no snapshot at token 240"),
}


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 1  # the last tensor's data
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_damaged_snapshot_falls_back_to_replay(v4_reference, tmp_path, case):
    """A snapshot that does not read whole is never used: a warning, a replay, the same store; the snapshots
    written after the fallback start afresh, and a later resume uses them."""
    model, tokens, ref = v4_reference
    out = tmp_path / "run.zarr"
    interrupted(model, tokens, out, 240, **V4_ARGS)
    assert snapshots(out) == [f"{t:012d}.safetensors" for t in (80, 160, 240)] + ["zarr.json"]
    with safe_open(out / "resume" / "000000000240.safetensors", framework="pt") as f:  # appended rows only
        assert f.get_slice("1.compressor.entries").get_shape() == [1, 20, 64]
        assert json.loads(f.metadata()["rows_before"])["1.compressor.entries"] == 40
        assert f.get_slice("0.window.kv").get_shape() == [1, 1, 127, 64]  # the window whole
    damage, warning = DAMAGE[case]
    damage(out / "resume")
    with pytest.warns(UserWarning, match=warning + ".*resuming by replaying"):
        interrupted(model, tokens, out, 320, **V4_ARGS)
    assert snapshots(out) == ["000000000320.safetensors", "zarr.json"]
    assert resumed(model, tokens, out) == "snapshot"
    assert_same_store(out, ref)


def test_cli_reports_how_a_trace_resumed(v4_reference, tmp_path, capsys):
    model, _, _ = v4_reference
    out = tmp_path / "run.zarr"
    interrupted(model, random_tokens(300, seed=4), out, 200, chunk_tokens=100, seed=4)
    argv = ["trace", str(EMBEDDED_MODEL), "--random-tokens", "300", "--seed", "4", "--out", str(out),
            "--chunk-tokens", "100"]
    assert cli.main(argv) == 0
    assert "traced 100 tokens into" in (text := capsys.readouterr().out)
    assert "resumed at token 200 from its state snapshot in " in text
    interrupted(model, random_tokens(300, seed=4), out, 200, chunk_tokens=100, seed=4, overwrite=True)
    os.environ[REPLAY_ENV] = "1"  # as bench/resume.py times it
    try:
        assert cli.main(argv) == 0
    finally:
        del os.environ[REPLAY_ENV]
    assert "resumed at token 200 by replaying the committed tokens in " in capsys.readouterr().out


# ---------------------------------------------------------------- refusals and errors


def test_complete_store_refused_unless_overwrite(model, tmp_path):
    out = trace(model, random_tokens(64), tmp_path / "run.zarr", chunk_tokens=32, progress=False)
    before = files(out)
    with pytest.raises(StoreError, match="complete trace; pass overwrite=True"):
        trace(model, random_tokens(64), out, chunk_tokens=32, progress=False)
    assert files(out) == before
    trace(model, random_tokens(80, seed=5), out, chunk_tokens=32, overwrite=True, progress=False)
    assert np.array_equal(open_store(out).input_ids.values, random_tokens(80, seed=5))


def interrupted(model, tokens: np.ndarray, out: Path, at: int, **kwargs) -> None:
    """Leave an incomplete store: a hook of the caller raises in the forward of the chunk starting at token `at`."""
    def boom(x, ctx):
        if int(ctx.positions[0]) == at:
            raise RuntimeError("interrupted")

    with model.hooks({"layers.0.resid_pre": boom}), pytest.raises(RuntimeError, match="interrupted"):
        trace(model, tokens, out, progress=False, **kwargs)


def test_resume_checks_identity(model, tmp_path):
    tokens, out = random_tokens(256), tmp_path / "run.zarr"
    args = dict(names=["layers.1.resid_post"], chunk_tokens=64)
    interrupted(model, tokens, out, 128, **args)
    assert open_store(out).sizes["token"] == 128
    with pytest.raises(StoreError, match="different trace.*tokens_sha256"):
        trace(model, random_tokens(256, seed=9), out, progress=False, **args)
    with pytest.raises(StoreError, match="different trace.*names"):
        trace(model, tokens, out, chunk_tokens=64, progress=False)
    with pytest.raises(StoreError, match="incomplete trace \\(128 of 256 tokens\\)"):
        trace(model, tokens, out, resume=False, progress=False, **args)
    assert not (out / "resume").exists()  # full attention: no snapshot, resume replays
    trace(model, tokens, out, progress=False, **args)
    assert open_store(out).attrs["summary"]["resumed_at"] == 128
    assert open_store(out).attrs["summary"]["resumed_from"] == "replay"
    assert_same_store(out, trace(model, tokens, tmp_path / "ref.zarr", progress=False, **args))


def test_bad_arguments_leave_nothing_behind(model, tmp_path):
    out = tmp_path / "run.zarr"
    cases = [
        (dict(tokens=[]), ValueError, "tokens is empty"),
        (dict(tokens=[1, 2, 256]), ValueError, "token id 256 at position 2 is outside the vocabulary \\[0, 256\\)"),
        (dict(tokens=[1.0, 2.0]), ValueError, "integer ids"),
        (dict(tokens=np.zeros((2, 3), int)), ValueError, "one sequence"),
        (dict(names=["layers.*.resid_pst"]), wb.HookError, "no hook point matches .*did you mean layers.3.resid_post"),
        (dict(layers=[9], names=["layers.*.resid_post"]), ValueError, "layers \\[9\\] are not in this model"),
        (dict(windows=[(5, 3)]), ValueError, "0 <= start < stop <= 10"),
        (dict(windows=[(0, 11)]), ValueError, "0 <= start < stop <= 10"),
        (dict(chunk_tokens=0), ValueError, "chunk_tokens must be at least 1"),
    ]
    for kwargs, error, message in cases:
        kwargs = {"tokens": random_tokens(10), **kwargs}
        with pytest.raises(error, match=message):
            trace(model, kwargs.pop("tokens"), out, progress=False, **kwargs)
        assert not out.exists()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="not a workbench store"):
        trace(model, random_tokens(10), tmp_path / "notes", progress=False, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
    with pytest.raises(StoreError, match="no store here"):
        open_store(tmp_path / "missing.zarr")


# ---------------------------------------------------------------- faults: disk full, permissions, format, writers


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    """(tokens, store) of an uninterrupted trace that every faulted run must end up identical to."""
    tokens, threads = random_tokens(N, seed=3), torch.get_num_threads()
    torch.set_num_threads(1)  # module-scoped: set up before the per-test one_thread fixture
    try:
        return tokens, trace(model, tokens, tmp_path_factory.mktemp("ref") / "ref.zarr", progress=False, **TRACE_ARGS)
    finally:
        torch.set_num_threads(threads)


def fail_one_write(monkeypatch, error: int, when) -> list[Path]:
    """Make the first store write for which when(path, data) holds fail with OSError `error` half way through
    its temporary file, as a full disk or a denied permission does; returns the path once it has failed."""
    from zarr.storage import _local

    real, failed = _local._put, []

    def put(path, value, exclusive=False):
        data = value.to_bytes()
        if failed or not when(Path(path), data):
            return real(path, value, exclusive=exclusive)
        failed.append(Path(path))
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with _local._atomic_write(Path(path), "wb") as f:
            f.write(data[: len(data) // 2])
            raise (PermissionError if error == errno.EACCES else OSError)(error, os.strerror(error), str(path))

    monkeypatch.setattr(_local, "_put", put)
    return failed


def no_temporaries_once_settled(out: Path, timeout: float = 5.0) -> bool:
    """No temporary files once zarr's in-flight writes end: zarr writes a node's metadata and its parent's together
    (asyncio.gather), so when one fails the other may still be finishing (its temporary briefly visible on a
    loaded machine) as the error arrives."""
    deadline = time.monotonic() + timeout
    while list(out.rglob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not list(out.rglob("*.partial"))


FAULTS = {
    # case -> (errno, the write that fails (store-relative path, data), tokens committed before it, message)
    "disk full in a chunk's arrays": (errno.ENOSPC, lambda p, d: p.parts[-5:] == ("topk_weights", "c", "0", "2", "0"),
                                      160, "writing tokens 160..240 failed: no space left on the device at .*"
                                           "topk_weights/c/0/2/0; 160 tokens stay committed.*Free some space"),
    "disk full writing the marker": (errno.ENOSPC, lambda p, d: p.name == "zarr.json" and
                                     b'"committed_tokens": 240' in d, 160,
                                     r"writing tokens 160..240 failed: no space left on the device at .*zarr.json; "
                                     "160 tokens stay committed"),
    "permission denied in a chunk": (errno.EACCES, lambda p, d: p.parts[-5:] == ("resid_post", "c", "1", "3", "0"), 240,
                                     "writing tokens 240..320 failed: permission denied at .*resid_post/c/1/3/0; "
                                     "240 tokens stay committed.*Make the store's directory writable"),
    "disk full creating the store": (errno.ENOSPC, lambda p, d: p.parts[-2:] == ("topk_ids", "zarr.json"), 0,
                                     "preparing the store failed: no space left on the device at .*topk_ids/zarr.json"
                                     r"\. Free some space"),
}


@pytest.mark.parametrize("case", sorted(FAULTS))
def test_write_faults_leave_a_store_that_resumes(model, reference, tmp_path, monkeypatch, case):
    """A full disk or a denied write at any point: a StoreError saying what failed and how far the store got, a
    store holding only whole committed chunks, and a rerun that completes it bit-identical to an uninterrupted run."""
    tokens, ref = reference
    error, when, done, message = FAULTS[case]
    out = tmp_path / "run.zarr"
    failed = fail_one_write(monkeypatch, error, lambda p, d: p.is_relative_to(out) and when(p, d))
    with pytest.raises(StoreError, match=message) as err:
        trace(model, tokens, out, progress=False, **TRACE_ARGS)
    assert len(failed) == 1 and isinstance(err.value.__cause__, OSError) and err.value.__cause__.errno == error
    assert committed(out) == done and no_temporaries_once_settled(out)
    if done:
        ds, want = open_store(out), open_store(ref)
        assert ds.sizes["token"] == done and not ds.attrs["complete"]
        assert np.array_equal(ds.topk_ids.values, want.topk_ids.values[:, :done])
        assert np.array_equal(ds.resid_post.values, want.resid_post.values[:, :done], equal_nan=True)
    monkeypatch.undo()
    trace(model, tokens, out, progress=False, **TRACE_ARGS)
    assert_same_store(out, ref)
    assert zarr.open_group(out, mode="r").attrs["summary"]["resumed_at"] == done


@pytest.mark.skipif(os.geteuid() == 0, reason="file permissions do not deny root")
def test_read_only_store_refused_then_resumed(model, reference, tmp_path):
    tokens, ref = reference
    out = tmp_path / "run.zarr"
    interrupted(model, tokens, out, 240, **TRACE_ARGS)
    before = files(out)
    dirs = [out, *(p for p in out.rglob("*") if p.is_dir())]
    for d in dirs:
        d.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="writing tokens 240..320 failed: permission denied at .*; 240 tokens "
                                             "stay committed"):
            trace(model, tokens, out, progress=False, **TRACE_ARGS)
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert files(out) == before and committed(out) == 240
    trace(model, tokens, out, progress=False, **TRACE_ARGS)
    assert_same_store(out, ref)


def test_store_of_another_format_refused(model, reference, tmp_path):
    """A store of another format version is neither read nor resumed (nothing touched); overwrite replaces it."""
    tokens, ref = reference
    out = tmp_path / "run.zarr"
    interrupted(model, tokens, out, 240, **TRACE_ARGS)
    meta = json.loads((out / "zarr.json").read_text())
    meta["attributes"]["workbench_store"] = 2
    (out / "zarr.json").write_text(json.dumps(meta))
    before = {**files(out), "zarr.json": (out / "zarr.json").read_bytes()}
    with pytest.raises(StoreError, match="is a workbench store of format 2; this workbench reads and writes format 1: "
                                         "open it with a workbench version that reads it"):
        open_store(out)
    with pytest.raises(StoreError, match="format 2; .*: pass overwrite=True"):
        trace(model, tokens, out, progress=False, **TRACE_ARGS)
    assert {**files(out), "zarr.json": (out / "zarr.json").read_bytes()} == before
    trace(model, tokens, out, progress=False, overwrite=True, **TRACE_ARGS)
    assert_same_store(out, ref)


def test_concurrent_writer_refused(model, reference, tmp_path):
    """While another process holds the store's lock a writer is refused and changes nothing; then it resumes."""
    import fcntl

    tokens, ref = reference
    out = tmp_path / "run.zarr"
    interrupted(model, tokens, out, 160, **TRACE_ARGS)
    before = {**files(out), "zarr.json": (out / "zarr.json").read_bytes()}
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreError, match="is being written by another live trace"):
            trace(model, tokens, out, progress=False, **TRACE_ARGS)
        with pytest.raises(StoreError, match="another live trace"):
            trace(model, tokens, out, progress=False, overwrite=True, **TRACE_ARGS)
    finally:
        os.close(fd)
    assert {**files(out), "zarr.json": (out / "zarr.json").read_bytes()} == before
    assert open_store(out).sizes["token"] == 160  # readers are not blocked
    trace(model, tokens, out, progress=False, **TRACE_ARGS)
    assert_same_store(out, ref)


# ---------------------------------------------------------------- command line


def test_cli_trace_and_info(model, tmp_path, capsys, monkeypatch):
    text = "Routing through experts: ünïcode, digits 12345, code `x = f(y)`.\n" * 40
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(cli, "TEXT_BLOCK", 7)  # read in blocks that split multi-byte characters
    out = tmp_path / "text.zarr"
    argv = ["trace", str(MODEL), "--text", str(tmp_path / "corpus.txt"), "--out", str(out), "--chunk-tokens", "256",
            "--names", "layers.1.resid_post"]
    assert cli.main(argv) == 0
    n = len(text.encode("utf-8"))
    stdout = capsys.readouterr().out
    assert f"traced {n:,} tokens into {out} in " in stdout
    assert f"{n:,} tokens, 3 layers (3 routed, k=4); " in stdout and "bytes per routing entry" in stdout
    ds = open_store(out)
    assert ds.input_ids.values.tolist() == model.tokenizer.encode(text)
    assert ds.resid_post.dims == ("layer", "token", "hidden") and not np.isnan(ds.resid_post.sel(layer=1)).any()

    assert cli.main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"tokens     {n:,} of {n:,} committed (complete)" in info
    assert f"dims       layer 3, token {n:,}, k 4, hidden 64" in info
    assert "layer      1 2 3" in info
    assert "topk_ids      (layer, token, k)" in info and "int16" in info and "chunks (3, 256, 4)" in info
    sha = hashlib.sha256((MODEL / "model.safetensors").read_bytes()).hexdigest()
    assert f"weights_sha256     model.safetensors {sha}" in info
    assert f"source             {MODEL}" in info and "names              ['layers.1.resid_post']" in info

    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "already holds a complete trace" in err and "--overwrite" in err
    assert cli.main([*argv, "--overwrite"]) == 0


def test_cli_resumes_and_reports_user_errors(model, tmp_path, capsys):
    out = tmp_path / "random.zarr"
    interrupted(model, random_tokens(300, seed=4), out, 200, chunk_tokens=100, seed=4)
    assert cli.main(["info", str(out)]) == 0
    assert "tokens     200 of 300 committed (incomplete: rerun `workbench trace`" in capsys.readouterr().out
    argv = ["trace", str(MODEL), "--random-tokens", "300", "--seed", "4", "--out", str(out), "--chunk-tokens", "100"]
    assert cli.main(argv) == 0
    assert (f"traced 100 tokens into {out}, resumed at token 200 by replaying the committed tokens (full attention: "
            "its state is not snapshot) in ") in capsys.readouterr().out
    ds = open_store(out)
    assert np.array_equal(ds.input_ids.values, random_tokens(300, seed=4))
    assert ds.attrs["seed"] == 4 and ds.attrs["summary"]["resumed_at"] == 200

    np.save(tmp_path / "bad.npy", np.array([3, 1000, 5]))
    errors = [
        (["--tokens", str(tmp_path / "bad.npy")], "token id 1000 at position 1 is outside the vocabulary"),
        (["--random-tokens", "5", "--names", "layers.*.resid_pst"], "did you mean"),
        (["--text", str(tmp_path / "missing.txt")], "No such file or directory"),
        (["--tokens", str(tmp_path / "bad.npy"), "--seed", "1"], "--seed applies only to --random-tokens"),
    ]
    for extra, message in errors:
        assert cli.main(["trace", str(MODEL), "--out", str(tmp_path / "e.zarr"), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("workbench trace: error: ") and message in err and "\n" not in err
    assert not (tmp_path / "e.zarr").exists()
    assert cli.main(["info", str(tmp_path / "missing.zarr")]) == 2
    assert "no store here" in capsys.readouterr().err


def test_trace_runs_the_output_head_only_when_asked(model, tmp_path):
    """Routing alone never reaches the output head (a real vocabulary makes it a chunk's costliest matmul);
    asking for logits does, and a forward with head=False still advances the cache."""
    shapes = []
    handle = model.lm_head.register_forward_hook(lambda module, args, out: shapes.append(tuple(out.shape)))
    try:
        trace(model, random_tokens(300), tmp_path / "a.zarr", chunk_tokens=128, progress=False)
        assert (1, 128, 256) not in shapes
        out = trace(model, random_tokens(300), tmp_path / "b.zarr", names=["logits"], chunk_tokens=128,
                    progress=False)
        assert shapes.count((1, 128, 256)) == 2
    finally:
        handle.remove()
    ids = torch.as_tensor(random_tokens(300))[None]
    state = wb.State()
    with torch.no_grad():
        assert model(ids[:, :128], cache=state, head=False) is None and state.offset == 128
        rest, whole_logits = model(ids[:, 128:], cache=state), model(ids)
    torch.testing.assert_close(rest, whole_logits[:, 128:], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(open_store(out).logits.values, whole_logits[0].numpy(), rtol=1e-2, atol=1e-2)


def test_embedded_model_20k_chunked_trace_equals_whole_forward(tmp_path):
    """20,000 tokens through the embedded V4 model (sliding, CSA with its indexer, HCA, hash and learned
    routing) in chunks that do not divide the sequence: the stored routing is the whole forward's."""
    v4 = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    tokens = random_tokens(20_000, seed=5)
    ds = open_store(trace(v4, tokens, tmp_path / "run.zarr", chunk_tokens=3000, progress=False))
    ref = whole(v4, tokens, ["layers.*.router.topk_*"])
    assert ds.layer.values.tolist() == list(range(6)) and ds.sizes["token"] == 20_000
    for layer in range(6):  # the slot order of near-tied experts follows the CPU's rounding: compare sets
        ids, weights = by_expert(ds.topk_ids.sel(layer=layer).values, ds.topk_weights.sel(layer=layer).values)
        ref_ids, ref_weights = by_expert(ref[f"layers.{layer}.router.topk_ids"],
                                         ref[f"layers.{layer}.router.topk_weights"])
        assert np.array_equal(ids, ref_ids), layer
        np.testing.assert_allclose(weights.astype(np.float32), ref_weights, rtol=2**-10, atol=0)


def test_cli_trace_restricted_to_layers_windows_and_dtype(model, tmp_path, capsys):
    out = tmp_path / "some.zarr"
    argv = ["trace", str(MODEL), "--random-tokens", "500", "--out", str(out), "--chunk-tokens", "128",
            "--names", "layers.*.resid_post", "--layers", "2", "--window", "10:60", "--window", "300:310",
            "--dtype", "float32"]
    assert cli.main(argv) == 0
    ds = open_store(out)
    assert ds.attrs["dtype"] == "float32" and ds.attrs["windows"] == [[10, 60], [300, 310]]
    recorded = ~np.isnan(ds.resid_post.values).any(-1)  # [layer, token]
    assert ds.resid_post.layer.values.tolist() == ROUTED
    assert np.flatnonzero(recorded[ROUTED.index(2)]).tolist() == [*range(10, 60), *range(300, 310)]
    assert recorded.sum() == 60
    ref = whole(wb.load(MODEL, dtype=torch.float32), random_tokens(500), ["layers.2.resid_post"])
    # 128-token chunks against one 500-token forward: an expert's rows may stream in one and run as a matmul in
    # the other (workbench.models.stream), so fp32 sums differ in order: the project's 1e-4
    np.testing.assert_allclose(ds.resid_post.sel(layer=2).values[10:60], ref["layers.2.resid_post"][10:60],
                               rtol=1e-4, atol=1e-5)
    with pytest.raises(SystemExit):
        cli.main([*argv, "--overwrite", "--window", "7"])
    assert "expected START:END" in capsys.readouterr().err
