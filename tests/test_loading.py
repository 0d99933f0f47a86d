"""Loader: sharded checkpoints, the hub code path (offline cache), metadata, and refusal of bad checkpoints."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import workbench as wb
from oracle import assert_close_scaled, input_ids

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def read_all(folder):
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def shard(src, dst, n=3):
    """Rewrite a single-file checkpoint as n shards plus model.safetensors.index.json."""
    shutil.copytree(src, dst)
    (dst / "model.safetensors").unlink()
    tensors = read_all(src)
    names = sorted(tensors)
    weight_map = {}
    for i in range(n):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        part = names[i::n]
        save_file({k: tensors[k] for k in part}, str(dst / fname))
        weight_map.update({k: fname for k in part})
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def test_sharded_matches_single_file(mixtral_ckpt, mixtral, tmp_path):
    folder, hf = mixtral_ckpt
    sharded = shard(folder, tmp_path / "sharded")
    assert len(list(sharded.glob("*.safetensors"))) == 3
    ids = input_ids(96)
    with torch.no_grad():
        ref = hf(ids).logits
    model = wb.load(sharded)
    assert_close_scaled(model(ids), ref, 1e-4, "sharded logits")
    assert torch.equal(model(ids), mixtral(ids))


def test_hub_cache_offline(mixtral_ckpt, tmp_path):
    """A folder laid out like the hub cache loads through huggingface_hub with HF_HUB_OFFLINE=1."""
    repo = tmp_path / "hub" / "models--tiny--mixtral"
    snap = repo / "snapshots" / COMMIT
    shard(mixtral_ckpt[0], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    code = (
        "import workbench as wb, torch\n"
        "m = wb.load('tiny/mixtral')\n"
        "print(m.commit, m.revision, m.source)\n"
        "m2 = wb.load('tiny/mixtral', revision='" + COMMIT + "')\n"
        "assert torch.equal(m(torch.arange(9)), m2(torch.arange(9)))\n"
        "try:\n    wb.load('tiny/mixtral', revision='no-such-branch')\n"
        "except wb.CheckpointError as e:\n    print('refused', e.file)\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[0] == f"{COMMIT} None tiny/mixtral"
    assert lines[1] == "refused tiny/mixtral@no-such-branch"


def test_metadata_and_dtype(mixtral_ckpt):
    folder = mixtral_ckpt[0]
    model = wb.load(folder, dtype=torch.bfloat16)
    assert model.embed.weight.dtype == torch.bfloat16
    assert model.source == str(folder) and model.commit is None
    assert model.tokenizer is None  # vocab 96 < 256 and no tokenizer.json
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="backend"):
        wb.load(folder, backend="cuda-magic")


def _mutate(folder, fn):
    t = read_all(folder)
    fn(t)
    save_file(t, str(folder / "model.safetensors"))


def _config(folder, fn):
    cfg = json.loads((folder / "config.json").read_text())
    fn(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


BAD = {
    "missing tensor": (lambda f: _mutate(f, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight")),
                       "missing weights for parameter layers.1.attn.q_proj.weight"),
    "missing expert": (lambda f: _mutate(f, lambda t: t.pop("model.layers.2.block_sparse_moe.experts.4.w2.weight")),
                       r"layers.2.ffn.experts.down_proj \(slots: \[4\]\)"),
    "unexpected tensor": (lambda f: _mutate(f, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)})),
                          "model.layers.0.extra.weight: unexpected tensor"),
    "expert out of range": (lambda f: _mutate(f, lambda t: t.update(
        {"model.layers.0.block_sparse_moe.experts.9.w1.weight": torch.ones(48, 32)})), "expert 9 is out of range"),
    "shape mismatch": (lambda f: _mutate(f, lambda t: t.update({"model.norm.weight": torch.ones(31)})),
                       r"model.norm.weight: shape \[31\] does not match"),
    "integer weights": (lambda f: _mutate(f, lambda t: t.update({"model.norm.weight": torch.ones(32, dtype=torch.int32)})),
                        "model.norm.weight: dtype I32"),
    "nan weights": (lambda f: _mutate(f, lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan"))),
                    "lm_head.weight: weights contain NaN"),
    "fp8 weights": (lambda f: _mutate(f, lambda t: t.update(
        {"model.norm.weight": torch.ones(32).to(torch.float8_e4m3fn)})), "model.norm.weight: quantised weights"),
    "mxfp4 scales": (lambda f: _mutate(f, lambda t: t.update(
        {"model.layers.0.block_sparse_moe.experts.down_proj_scales": torch.ones(6, 32, 2, dtype=torch.uint8)})),
                     "down_proj_scales: quantised weights"),
    "unknown model_type": (lambda f: _config(f, lambda c: c.update(model_type="mystery")),
                           "model_type 'mystery' is not supported"),
    "config missing field": (lambda f: _config(f, lambda c: c.pop("num_local_experts")),
                             "missing required field 'num_local_experts'"),
    "header larger than file": (lambda f: (f / "model.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}"),
                                "header length 1000000 exceeds the file"),
    "truncated file": (lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:-100]), "outside the"),
    "index shard outside folder": (lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "../model.safetensors"}})), "not a file inside"),
    "index names missing shard": (lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "model-2.safetensors"}})), "missing shard 'model-2.safetensors'"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_refused(mixtral_ckpt, tmp_path, case):
    folder = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], folder)
    breaker, message = BAD[case]
    breaker(folder)
    with pytest.raises(wb.CheckpointError, match=message) as err:
        wb.load(folder)
    assert str(folder) in str(err.value) or err.value.file is not None


def test_pickle_only_folder_is_never_unpickled(tmp_path):
    """A folder with only a pickle refuses to load; the payload (which would create a file) never runs."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "mixtral"}))
    with pytest.raises(wb.CheckpointError, match="never unpickles"):
        wb.load(tmp_path)
    assert not marker.exists()


def test_shipped_code_is_ignored_with_a_warning(mixtral_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], folder)
    marker = tmp_path / "ran"
    (folder / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w')\n")
    _config(folder, lambda c: c.update(auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}))
    with pytest.warns(UserWarning, match="ignoring checkpoint code"):
        model = wb.load(folder)
    assert not marker.exists()
    assert model(torch.arange(5)).shape == (1, 5, 96)


def test_not_a_folder_nor_repo(tmp_path):
    with pytest.raises(wb.CheckpointError, match="no such checkpoint folder"):
        wb.load(tmp_path / "absent")


def test_hub_fetches_only_config_weights_and_tokenizer(monkeypatch, mixtral_ckpt):
    """The hub path asks snapshot_download for safe files only, at the given revision."""
    import fnmatch

    import huggingface_hub

    from workbench.checkpoint import HUB_ALLOW_PATTERNS

    calls = {}

    def fake_snapshot_download(**kwargs):
        calls.update(kwargs)
        return str(mixtral_ckpt[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    wb.load("org/model", revision="v1")
    assert calls["repo_id"] == "org/model" and calls["revision"] == "v1"
    assert calls["allow_patterns"] == HUB_ALLOW_PATTERNS
    fetched = lambda f: any(fnmatch.fnmatch(f, p) for p in HUB_ALLOW_PATTERNS)  # noqa: E731
    assert all(fetched(f) for f in ["config.json", "model-00001-of-00003.safetensors", "tokenizer.json",
                                    "model.safetensors.index.json"])
    assert not any(fetched(f) for f in ["pytorch_model.bin", "modeling_deepseek.py", "model.pt", "train.ckpt"])
    with pytest.raises(ValueError, match="applies to hub repo ids"):
        wb.load(mixtral_ckpt[0], revision="main")


def test_bf16_forward_tracks_fp32(mixtral_ckpt, mixtral):
    """bf16 runs end to end; tokens routed as in fp32 at every layer keep close logits (flips at near-ties are
    the only large deviations, as expected of top-k routing in low precision)."""
    ids = input_ids(96)
    lo = wb.load(mixtral_ckpt[0], dtype=torch.bfloat16)
    names = ["layers.*.router.topk_ids"]
    ref, ref_cache = mixtral.run_with_cache(ids, names=names)
    got, got_cache = lo.run_with_cache(ids, names=names)
    assert got.dtype == torch.bfloat16
    same = torch.stack([(got_cache[n].sort(-1)[0] == ref_cache[n].sort(-1)[0]).all(-1) for n in ref_cache]).all(0)
    assert same.float().mean() > 0.7
    err = (got.float() - ref).abs().amax(-1) / ref.abs().amax()
    # positions before the first flip in each sequence see identical routing upstream too
    for b in range(ids.shape[0]):
        flips = (~same[b]).nonzero()
        stop = int(flips[0]) if len(flips) else ids.shape[1]
        assert stop == 0 or err[b, :stop].max() < 0.05
