"""Loader: sharded checkpoints, the hub code path (offline cache), metadata, and refusal of bad checkpoints."""

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

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
    """A folder laid out like the hub cache (weights linked to blobs named by their sha256, which the load
    verifies) loads through huggingface_hub with HF_HUB_OFFLINE=1."""
    repo = tmp_path / "hub" / "models--tiny--mixtral"
    snap = repo / "snapshots" / COMMIT
    shard(mixtral_ckpt[0], snap)
    (repo / "blobs").mkdir()
    for f in snap.glob("*.safetensors"):
        blob = repo / "blobs" / hashlib.sha256(f.read_bytes()).hexdigest()
        f.rename(blob)
        f.symlink_to(os.path.relpath(blob, snap))
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


def _header(folder, fn):
    """Edit the JSON header of model.safetensors, keeping its data section byte for byte."""
    path = folder / "model.safetensors"
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    text = fn(header) or json.dumps(header)
    path.write_bytes(len(text.encode()).to_bytes(8, "little") + text.encode() + raw[8 + n:])


def _entry(name, **fields):
    return lambda f: _header(f, lambda h: h[name].update(fields))


def _marker(folder):
    """The file a hostile payload of the table would create if it ever ran."""
    return folder.parent / "pwned"


def _pickle_only(folder):
    class Payload:
        def __reduce__(self):
            return (open, (str(_marker(folder)), "w"))

    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))


def _custom_code(folder):
    (folder / "modeling_evil.py").write_text(f"open({str(_marker(folder))!r}, 'w')\n")
    _config(folder, lambda c: c.update(model_type="evil_moe", auto_map={"AutoModelForCausalLM": "modeling_evil.Evil"}))


def _duplicate_key(header):
    text = json.dumps(header)
    norm = json.dumps({"model.norm.weight": header["model.norm.weight"]})[1:-1]
    return text[:-1] + ", " + norm + "}"


def _altered_hub_blob(folder):
    """Lay the weights out as a hub-cache snapshot (a link to blobs/<sha256>), then change one byte of the blob."""
    weights = folder / "model.safetensors"
    blob = folder.parent / "blobs" / hashlib.sha256(weights.read_bytes()).hexdigest()
    blob.parent.mkdir()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    weights.unlink()
    weights.symlink_to(blob)


def _write(name, text):
    return lambda f: (f / name).write_text(text)


def _index(weight_map):
    return _write("model.safetensors.index.json", json.dumps({"metadata": {}, "weight_map": weight_map}))


WEIGHTS, CONFIG, INDEX, FOLDER = "model.safetensors", "config.json", "model.safetensors.index.json", ""
NORM = "model.norm.weight"
ANY_TENSOR = object()
# case -> (breaker, file named (relative to the checkpoint folder), tensor named, message pattern)
BAD = {
    "truncated file": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes()[:-100]), WEIGHTS, NORM,
                       r"data offsets \[396288, 396416\] outside the 396316-byte data section"),
    "header larger than file": (lambda f: (f / WEIGHTS).write_bytes((10**6).to_bytes(8, "little") + b"{}"),
                                WEIGHTS, None, "header length 1000000 exceeds the file"),
    "lying offsets": (_entry(NORM, data_offsets=[396288, 400384]), WEIGHTS, NORM, "outside the 396416-byte data"),
    "overlapping tensors": (_entry("model.embed_tokens.weight", data_offsets=[0, 12288]), WEIGHTS,
                            "model.embed_tokens.weight", "data overlaps tensor 'lm_head.weight'"),
    "bytes owned by no tensor": (lambda f: (f / WEIGHTS).write_bytes((f / WEIGHTS).read_bytes() + b"PK\x03\x04"),
                                 WEIGHTS, None, r"bytes 396416..396420 of the data section belong to no tensor"),
    "wrong dtype string": (_entry(NORM, dtype="F33"), WEIGHTS, NORM, "unknown dtype 'F33'"),
    "header shape/size mismatch": (_entry(NORM, shape=[33]), WEIGHTS, NORM, r"128 bytes do not hold shape \[33\]"),
    "tensor named twice in a header": (lambda f: _header(f, _duplicate_key), WEIGHTS, None,
                                       "key 'model.norm.weight' appears twice"),
    "weights not a regular file": (lambda f: ((f / WEIGHTS).unlink(), os.mkfifo(f / WEIGHTS)), WEIGHTS, None,
                                   "not a regular file"),
    "missing tensor": (lambda f: _mutate(f, lambda t: t.pop("model.layers.1.self_attn.q_proj.weight")), FOLDER,
                       None, "missing weights for parameter layers.1.attn.q_proj.weight"),
    "missing expert": (lambda f: _mutate(f, lambda t: t.pop("model.layers.2.block_sparse_moe.experts.4.w2.weight")),
                       FOLDER, None, r"layers.2.ffn.experts.down_proj \(slots: \[4\]\)"),
    "unexpected tensor": (lambda f: _mutate(f, lambda t: t.update({"model.layers.0.extra.weight": torch.ones(2)})),
                          WEIGHTS, "model.layers.0.extra.weight", "unexpected tensor"),
    "expert out of range": (lambda f: _mutate(f, lambda t: t.update(
        {"model.layers.0.block_sparse_moe.experts.9.w1.weight": torch.ones(48, 32)})), WEIGHTS,
        "model.layers.0.block_sparse_moe.experts.9.w1.weight", "expert 9 is out of range"),
    "shape mismatch with the config": (lambda f: _mutate(f, lambda t: t.update({NORM: torch.ones(31)})), WEIGHTS,
                                       NORM, r"shape \[31\] does not match the config \(expects \[32\]"),
    "integer weights": (lambda f: _mutate(f, lambda t: t.update({NORM: torch.ones(32, dtype=torch.int32)})),
                        WEIGHTS, NORM, "dtype I32"),
    "nan weights": (lambda f: _mutate(f, lambda t: t["lm_head.weight"].__setitem__((0, 0), float("nan"))),
                    WEIGHTS, "lm_head.weight", "weights contain NaN"),
    "fp8 weights": (lambda f: _mutate(f, lambda t: t.update({NORM: torch.ones(32).to(torch.float8_e4m3fn)})),
                    WEIGHTS, NORM, "quantised weights"),
    "mxfp4 scales": (lambda f: _mutate(f, lambda t: t.update(
        {"model.layers.0.block_sparse_moe.experts.down_proj_scales": torch.ones(6, 32, 2, dtype=torch.uint8)})),
                     WEIGHTS, "model.layers.0.block_sparse_moe.experts.down_proj_scales", "quantised weights"),
    "unknown model_type": (lambda f: _config(f, lambda c: c.update(model_type="mystery")), CONFIG, None,
                           "model_type 'mystery' is not supported"),
    "model_type not a string": (lambda f: _config(f, lambda c: c.update(model_type=["mixtral"])), CONFIG, None,
                                "model_type must be a string"),
    "config missing field": (lambda f: _config(f, lambda c: c.pop("num_local_experts")), CONFIG, None,
                             "missing required field 'num_local_experts'"),
    "config nested too deeply": (_write(CONFIG, "[" * 100_000), CONFIG, None, "not a readable config"),
    "pickle-only folder": (_pickle_only, FOLDER, None, r"only pickle weights found \(pytorch_model.bin\); workbench "
                           r"never unpickles. Convert them .*safetensors.torch.save_file"),
    "auto_map pointing at code": (_custom_code, CONFIG, None, r"model_type 'evil_moe' is not supported.*auto_map "
                                  r"points at the checkpoint's own code .*modeling_evil.Evil.*never runs"),
    "index names a missing shard": (_index({NORM: "model-2.safetensors"}), INDEX, NORM,
                                    "index names missing shard 'model-2.safetensors'"),
    "index shard outside the folder": (_index({NORM: "../model.safetensors"}), INDEX, NORM, "not a file inside"),
    "index shard is a pickle": (_index({NORM: "pytorch_model.bin"}), INDEX, NORM, "not a .safetensors file"),
    "index nested too deeply": (_write(INDEX, "{\"weight_map\": " + "[" * 100_000), INDEX, None, "nests too deeply"),
    "sha256 differs from SHA256SUMS": (_write("SHA256SUMS", f"{'0' * 64}  {WEIGHTS}\n"), WEIGHTS, None,
                                       f"sha256 mismatch: content hashes to [0-9a-f]{{64}}, but .*SHA256SUMS records "
                                       f"{'0' * 64}"),
    "weights missing from SHA256SUMS": (_write("SHA256SUMS", f"{'0' * 64}  other.safetensors\n"), WEIGHTS, None,
                                        "not listed in SHA256SUMS"),
    "SHA256SUMS not in sha256sum's format": (_write("SHA256SUMS", f"{WEIGHTS}: {'0' * 64}\n"), "SHA256SUMS", None,
                                             "line 1 is not '<sha256>  <file name>'"),
    "hub blob altered": (_altered_hub_blob, WEIGHTS, None, "sha256 mismatch: .* but the hub's record"),
}


def _listing(folder):
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.rglob("*")
            if not p.is_fifo()}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_checkpoint_refused(mixtral_ckpt, tmp_path, case):
    """Each hostile or broken checkpoint raises CheckpointError naming the file (and tensor), no payload runs,
    and loading writes nothing."""
    folder = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], folder)
    breaker, file, tensor, message = BAD[case]
    breaker(folder)
    before = _listing(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning about shipped code has its own test
        with pytest.raises(wb.CheckpointError, match=message) as err:
            wb.load(folder)
    want = str(folder / file) if file else str(folder)
    assert err.value.file == want and str(err.value).startswith(f"{want}: ")
    assert err.value.tensor == tensor and (tensor is None or f"{want}: {tensor}: " in str(err.value))
    assert not _marker(folder).exists()
    assert _listing(tmp_path) == before


def test_table_covers_the_issue():
    """Every kind of bad checkpoint the acceptance list names has its case."""
    named = ["truncated file", "header larger than file", "lying offsets", "overlapping tensors", "wrong dtype string",
             "header shape/size mismatch", "missing tensor", "unexpected tensor", "config missing field",
             "unknown model_type", "pickle-only folder", "auto_map pointing at code", "index names a missing shard",
             "index shard outside the folder", "nan weights"]
    assert set(named) <= set(BAD) and len(BAD) >= 15


def test_pickles_beside_safetensors_are_never_opened(mixtral_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], folder)
    _pickle_only(folder)
    shutil.copy(mixtral_ckpt[0] / WEIGHTS, folder / WEIGHTS)
    assert wb.load(folder)(torch.arange(5)).shape == (1, 5, 96)
    assert not _marker(folder).exists()


def test_recorded_hashes_that_match_load(mixtral_ckpt, tmp_path):
    """A matching SHA256SUMS (sha256sum's text and binary forms) and a hub blob named by its sha256 both load;
    verify_hashes=False skips the check of an altered file."""
    folder = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], folder)
    sha = hashlib.sha256((folder / WEIGHTS).read_bytes()).hexdigest()
    config_sha = hashlib.sha256((folder / CONFIG).read_bytes()).hexdigest()
    (folder / "SHA256SUMS").write_text(f"# made by sha256sum\n{sha}  {WEIGHTS}\n{config_sha} *{CONFIG}\n")
    ref = wb.load(mixtral_ckpt[0])(torch.arange(7))
    assert torch.equal(wb.load(folder)(torch.arange(7)), ref)
    (folder / "SHA256SUMS").unlink()
    blob = tmp_path / "blobs" / sha
    blob.parent.mkdir()
    (folder / WEIGHTS).rename(blob)
    (folder / WEIGHTS).symlink_to(blob)
    assert torch.equal(wb.load(folder)(torch.arange(7)), ref)
    (folder / "SHA256SUMS").write_text(f"{config_sha}  {CONFIG}\n")  # weights not covered: refused, unless
    with pytest.raises(wb.CheckpointError, match="not listed in SHA256SUMS"):
        wb.load(folder)
    assert torch.equal(wb.load(folder, verify_hashes=False)(torch.arange(7)), ref)


def test_embedded_model_verifies_its_manifest():
    """The embedded model ships SHA256SUMS; loading checks it (a second load reuses the remembered digest)."""
    from workbench import checkpoint

    folder = Path(__file__).resolve().parent.parent / "data" / "models" / "wb-v4-mini"
    manifest = checkpoint._read_manifest(folder / "SHA256SUMS")
    assert list(manifest) == [WEIGHTS]
    expected = checkpoint.recorded_sha256(folder, [folder / WEIGHTS], [folder / WEIGHTS])
    assert expected == {folder / WEIGHTS: [(manifest[WEIGHTS], str(folder / "SHA256SUMS"))]}
    wb.load(folder)
    assert checkpoint.sha256(folder / WEIGHTS) == manifest[WEIGHTS]


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


def test_trusted_repos_allow_list(monkeypatch, mixtral_ckpt):
    """With an allow-list (argument, else environment) a repo off the list is refused before any download."""
    import huggingface_hub

    fetched = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda **kw: fetched.append(kw["repo_id"]) or str(mixtral_ckpt[0]))
    with pytest.raises(wb.CheckpointError, match=r"not on the allow-list trusted_repos \(org/\*\); nothing was "
                                                 "downloaded") as err:
        wb.load("evil/model", trusted_repos=["org/*"])
    assert err.value.file == "evil/model" and fetched == []
    monkeypatch.setenv("WORKBENCH_TRUSTED_REPOS", "org/*, other/exact")
    with pytest.raises(wb.CheckpointError, match=r"allow-list \$WORKBENCH_TRUSTED_REPOS \(org/\*, other/exact\)"):
        wb.load("evil/model")
    with pytest.raises(wb.CheckpointError, match="allow-list"):
        wb.load("other/exact-not")
    assert fetched == []
    wb.load("org/model")
    wb.load("other/exact")
    wb.load("evil/model", trusted_repos="evil/*")  # the argument replaces the environment's list
    wb.load(mixtral_ckpt[0], trusted_repos=[])  # a local folder is not a hub repo
    assert fetched == ["org/model", "other/exact", "evil/model"]


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
