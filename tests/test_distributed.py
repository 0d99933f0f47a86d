"""Expert parallelism with torch.distributed (gloo, 2 and 3 processes under torchrun) against one process, bit for bit
in fp32 and bf16: logits, every routing and per-expert hook, chunked and hook-edited forwards, the trace store, with
each routed-experts backend; each rank reads only its experts; failures on one rank reach every rank."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import workbench as wb
from workbench.demo import EMBEDDED_MODEL
from workbench.distributed import ExpertParallel, expert_bounds
from oracle import assert_close_scaled, by_expert, make_checkpoint, routing_is_nontrivial
from test_deepseek import v3
from test_deepseek_v4 import CSA, HCA, make_v4, v4

sys.path.insert(0, str(Path(__file__).parent))
from distributed_worker import run  # noqa: E402

WORKER = Path(__file__).with_name("distributed_worker.py")
LENGTH = 17


def torchrun(n: int, *args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run the worker (or `-m workbench ...`) on n local gloo processes; single-threaded ranks importing the
    workbench this process imports (the caller's PYTHONPATH kept behind the tests folder)."""
    path = os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


CASES = {
    "v3-grouped": lambda: v3(n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=3,
                             first_k_dense_replace=1),
    "v4-hash-csa-hca": lambda: v4(hc_mult=2, layer_types=[CSA, HCA, CSA, HCA],
                                  mlp_layer_types=["hash_moe", "moe", "moe", "moe"], compress_rates={CSA: 2, HCA: 4}),
}


# (case, dtype) of the `reference` fixture: the fp32 ones, and all
FP32 = [(case, "float32") for case in sorted(CASES)]
EVERY_DTYPE = [(case, dtype) for case in sorted(CASES) for dtype in ("float32", "bfloat16")]


def named(params: list[tuple[str, str]]) -> list:
    return [pytest.param(p, id="-".join(p)) for p in params]


@pytest.fixture(scope="module")
def reference(request, tmp_path_factory):
    """A perturbed checkpoint and what one process computes on it in the dtype of the (case, dtype) parameter."""
    case, dtype = request.param
    folder = tmp_path_factory.mktemp(case)
    (make_v4 if case.startswith("v4") else make_checkpoint)(CASES[case](), folder)
    out = tmp_path_factory.mktemp(f"{case}-{dtype}-single")
    torch.set_num_threads(1)
    model = wb.load(folder, dtype=getattr(torch, dtype))
    assert model.parallel is None and model.load_report["world"] == 1
    got = run(model, out, LENGTH, 0)
    assert routing_is_nontrivial({k.removeprefix("cache."): v for k, v in got.items() if k.endswith("topk_ids")})
    # the per-expert hooks change nothing: hooked and plain forwards combine the expert outputs alike
    assert torch.equal(got["logits"], got["plain"])
    return folder, out, got, model.load_report, dtype


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("reference", named(EVERY_DTYPE), indirect=True)
def test_expert_parallel_equals_one_process(reference, world, tmp_path):
    """Bit for bit: each expert's matmuls see the rows one process gives them, in the same order, the shared expert
    runs on every token, and every path sums a token's expert outputs in fp32 in slot order."""
    folder, single, want, report, dtype = reference
    r = torchrun(world, str(WORKER), str(folder), str(tmp_path), str(LENGTH), "--dtype", dtype)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(world):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got.keys() == want.keys()
        for name, ref in want.items():
            assert got[name].dtype == ref.dtype and torch.equal(got[name], ref), f"rank {rank}: {name} differs"
        # each rank read the non-expert tensors and exactly its own share of the experts
        loaded = json.loads((tmp_path / f"rank{rank}.json").read_text())
        experts = int(want["cache.layers.1.router.scores"].shape[-1])
        owned = expert_bounds(experts, world)[rank + 1] - expert_bounds(experts, world)[rank]
        assert loaded["world"] == world and loaded["rank"] == rank
        assert loaded["experts_held"] and set(loaded["experts_held"].values()) == {owned}
        assert loaded["expert_bytes_total"] == report["expert_bytes_total"] > 0
        assert loaded["expert_bytes_read"] == report["expert_bytes_total"] * owned // experts
        assert loaded["bytes_read"] - loaded["expert_bytes_read"] == report["bytes_read"] - report["expert_bytes_read"]
        assert loaded["backend"] == "grouped" and loaded["backend_calls"]["grouped"] > 0  # `auto` on a CPU
    # the store rank 0 wrote is the single-process one
    a, b = wb.open_store(single / "store.zarr"), wb.open_store(tmp_path / "store.zarr")
    assert b.attrs["world_size"] == world and a.attrs["world_size"] == 1
    assert_same_store(a, b)
    assert not list((tmp_path).glob("store.zarr/**/*.partial"))


def assert_same_store(a, b) -> None:
    """Two complete stores hold the same variables with equal values, bit for bit (NaN where a layer has no experts,
    in both)."""
    assert set(a.data_vars) == set(b.data_vars) and a.attrs["complete"] and b.attrs["complete"]
    assert {"topk_ids", "topk_weights", "input_ids"} <= set(a.data_vars)
    for name in a.data_vars:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(b[name].values, a[name].values, err_msg=name)


@pytest.fixture(scope="module", params=["torch", "triton"])
def backend_reference(request, tmp_path_factory):
    """A V3 checkpoint and what one process computes on it with the `torch` or `triton` backend (Triton kernels
    under the interpreter: conftest sets TRITON_INTERPRET=1)."""
    backend = request.param
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if backend == "triton" and torch.cuda.is_available():  # the gloo ranks hold CPU tensors: interpreter only
        pytest.skip("with a GPU Triton does not interpret CPU tensors; the cuda-marked kernel tests cover it")
    folder = tmp_path_factory.mktemp(f"v3-{backend}")
    make_checkpoint(CASES["v3-grouped"](), folder)
    torch.set_num_threads(1)
    model = wb.load(folder, dtype=torch.float32, backend=backend)
    assert model.backend == backend
    return folder, backend, run(model, tmp_path_factory.mktemp(f"v3-{backend}-single"), LENGTH, 0)


def test_expert_parallel_runs_the_model_backend(backend_reference, tmp_path):
    """Each rank runs its received rows with the model's backend (and no other), hooks included: logits, routing
    and per-expert tensors equal one process running the same backend."""
    folder, backend, want = backend_reference
    r = torchrun(2, str(WORKER), str(folder), str(tmp_path), str(LENGTH), "--backend", backend)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in range(2):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        assert got.keys() == want.keys()
        for name, ref in want.items():
            if ref.dtype.is_floating_point:
                assert_close_scaled(got[name], ref, 1e-5, f"{backend} rank {rank} {name}")
            else:
                assert torch.equal(got[name], ref), f"{backend} rank {rank}: {name} differs"
        loaded = json.loads((tmp_path / f"rank{rank}.json").read_text())
        calls = loaded["backend_calls"]
        assert loaded["backend"] == backend and calls[backend] > 0, calls
        assert all(calls[other] == 0 for other in ("torch", "grouped", "triton") if other != backend), calls
        assert (calls["triton kernel"] > 0) == (backend == "triton"), calls  # the kernel, not its reference


@pytest.mark.parametrize("world,tp", [(2, 2), (4, 2)])
@pytest.mark.parametrize("reference", named(FP32), indirect=True)
def test_tensor_parallel_attention_equals_one_process(reference, world, tp, tmp_path):
    """DeepSeek-V4 attention split by heads over groups of `tp` ranks (experts over all): same outputs, each
    rank holding and reading 1/tp of the head weights."""
    folder, single, want, report, _ = reference
    if "v4" not in folder.name:
        if world == 2:
            r = torchrun(2, str(WORKER), str(folder), str(tmp_path), str(LENGTH), "--tensor-parallel", "2",
                         timeout=120)
            assert r.returncode != 0 and "not available for 'deepseek_v3'" in r.stderr
        return
    r = torchrun(world, str(WORKER), str(folder), str(tmp_path), str(LENGTH), "--tensor-parallel", str(tp))
    assert r.returncode == 0, r.stderr[-3000:]
    whole = wb.load(folder, dtype=torch.float32)
    heads = whole.config.int("num_attention_heads")
    split = sum(4 * p.numel() for n, p in whole.named_parameters()  # the head-split tensors, in fp32 on disk
                if n.endswith(("wq_b.weight", "wo_a.weight", "wo_b.weight", "attn_sink")) and ".indexer." not in n)
    for rank in range(world):
        got = load_file(str(tmp_path / f"rank{rank}.safetensors"))
        for name, ref in want.items():
            if ref.dtype.is_floating_point:  # attention outputs are summed across ranks: activations, router
                # logits among them, move by up to the project's logit tolerance (1.2e-5 seen on an AMD EPYC)
                assert_close_scaled(got[name], ref, 1e-4, f"rank {rank} {name}")
            else:
                assert torch.equal(got[name], ref), f"rank {rank}: {name} differs"
        loaded = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert set(loaded["heads"].values()) == {heads // tp}
        assert loaded["bytes_read"] - loaded["expert_bytes_read"] == \
            report["bytes_read"] - report["expert_bytes_read"] - split + split // tp
    b = wb.open_store(tmp_path / "store.zarr")
    a = wb.open_store(single / "store.zarr")
    np.testing.assert_array_equal(by_expert(b.topk_ids.values)[0], by_expert(a.topk_ids.values)[0])


def test_expert_ranges():
    assert expert_bounds(8, 3) == (0, 2, 5, 8)
    assert expert_bounds(6, 4) == (0, 1, 3, 4, 6)
    ep = ExpertParallel(rank=1, world=3, experts=8)
    assert ep.owned == range(2, 5)
    assert ep.owner(torch.arange(8)).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    assert [ep.rows(10, r) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert [ExpertParallel(r, 3, 8).rows(1) for r in range(3)] == [(0, 0), (0, 0), (0, 1)]


def test_one_rank_more_than_experts_and_single_token(tmp_path):
    """More ranks than tokens in a forward (decode-like) and ranks without experts still agree."""
    folder = tmp_path / "ckpt"
    make_checkpoint(v3(n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=0), folder)
    script = tmp_path / "one.py"
    script.write_text(
        "import sys, torch, workbench as wb\n"
        "from workbench import distributed\n"
        "from safetensors.torch import save_file\n"
        "rank, world = distributed.init()\n"
        f"m = wb.load({str(folder)!r}, dtype=torch.float32)\n"
        "ids = torch.tensor([[3]])\n"
        "logits, cache = m.run_with_cache(ids, names=['layers.*.experts.out'])\n"
        f"save_file({{'logits': logits, **cache}}, {str(tmp_path)!r} + f'/r{{rank}}.safetensors')\n"
        "distributed.shutdown()\n"
        "distributed.leave(0)  # no interpreter finalization, which can abort a gloo rank (distributed.leave)\n")
    r = torchrun(3, str(script))
    assert r.returncode == 0, r.stderr[-3000:]
    model = wb.load(folder, dtype=torch.float32)
    logits, cache = model.run_with_cache(torch.tensor([[3]]), names=["layers.*.experts.out"])
    for rank in range(3):
        got = load_file(str(tmp_path / f"r{rank}.safetensors"))
        assert_close_scaled(got["logits"], logits, 1e-5, "logits")
        for name, t in cache.items():
            assert_close_scaled(got[name], t, 1e-5, name)


@pytest.mark.parametrize("reference", named(FP32), indirect=True)
def test_different_hooks_on_ranks_fail_everywhere(reference, tmp_path):
    folder = reference[0]
    r = torchrun(2, str(WORKER), str(folder), str(tmp_path), str(LENGTH), "--mismatch-hooks", timeout=120)
    assert r.returncode != 0
    assert r.stderr.count("different hooks registered") >= 2, r.stderr[-3000:]


def test_a_corrupt_file_found_by_one_rank_fails_every_rank(tmp_path):
    folder = tmp_path / "ckpt"
    make_checkpoint(v3(first_k_dense_replace=0), folder)
    (folder / "SHA256SUMS").write_text(f"{'0' * 64}  model.safetensors\n")
    r = torchrun(2, str(WORKER), str(folder), str(tmp_path), str(LENGTH), timeout=120)
    assert r.returncode != 0
    err = r.stderr
    assert "sha256" in err and "rank 0 failed: CheckpointError" in err, err[-3000:]


def test_cli_trace_under_torchrun_equals_one_process(tmp_path):
    folder = tmp_path / "ckpt"
    make_v4(v4(num_hidden_layers=2, layer_types=[CSA, HCA], mlp_layer_types=["hash_moe", "moe"],
               compress_rates={CSA: 2, HCA: 4}), folder)
    args = ["trace", str(folder), "--random-tokens", "40", "--seed", "3", "--chunk-tokens", "16", "--dtype", "float32",
            "--names", "layers.1.experts.hidden"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "workbench", *args, "--out", str(tmp_path / "one.zarr")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "-m", "workbench", *args, "--out", str(tmp_path / "two.zarr"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("traced 40 tokens") == 1  # rank 0 reports
    a, b = wb.open_store(tmp_path / "one.zarr"), wb.open_store(tmp_path / "two.zarr")
    b_ids, b_w, b_h = by_expert(b.topk_ids.values, b.topk_weights.values, b.experts_hidden.values)
    a_ids, a_w, a_h = by_expert(a.topk_ids.values, a.topk_weights.values, a.experts_hidden.values)
    np.testing.assert_array_equal(b_ids, a_ids)
    np.testing.assert_allclose(b_w, a_w, rtol=1e-3)
    np.testing.assert_allclose(b_h, a_h, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert b.attrs["world_size"] == 2


def test_cli_trace_of_the_embedded_model_in_bf16_equals_one_process(tmp_path):
    """The embedded model in its checkpoint's dtype (bf16, the CLI's default), chunked, with per-expert outputs
    recorded: the store of a 2-rank trace is the single-process store, bit for bit."""
    args = ["trace", str(EMBEDDED_MODEL), "--random-tokens", "300", "--seed", "5", "--chunk-tokens", "128",
            "--names", "layers.3.experts.out", "layers.5.resid_post"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-m", "workbench", *args, "--out", str(tmp_path / "one.zarr")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert one.returncode == 0, one.stderr
    two = torchrun(2, "-m", "workbench", *args, "--out", str(tmp_path / "two.zarr"))
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = wb.open_store(tmp_path / "one.zarr"), wb.open_store(tmp_path / "two.zarr")
    assert a.attrs["world_size"] == 1 and b.attrs["world_size"] == 2
    assert a.attrs["dtype"] == b.attrs["dtype"] == "bfloat16"
    assert_same_store(a, b)


@pytest.mark.parametrize("reference", named(FP32), indirect=True)
def test_expert_parallel_needs_a_process_group(reference):
    with pytest.raises(ValueError, match="torchrun"):
        wb.load(reference[0], expert_parallel=True)
