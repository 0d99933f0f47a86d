"""Hashing checkpoints: digests remembered across processes by file identity (the hash cache), parallel hashing,
and `workbench hash`, which writes the SHA256SUMS that `load` then checks."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import workbench as wb
from workbench import checkpoint, cli

WEIGHTS = "model.safetensors"
EMBEDDED = Path(__file__).resolve().parent.parent / "data" / "models" / "wb-v4-mini"
# Loads a checkpoint in a fresh process and reports how many bytes went through hashlib.sha256 there.
CHILD = """
import hashlib, json, sys

hashed = 0
plain = hashlib.sha256


class Counting:
    def __init__(self, *args, **kwargs):
        self._h = plain(*args, **kwargs)

    def update(self, data):
        global hashed
        hashed += memoryview(data).nbytes
        self._h.update(data)

    def __getattr__(self, name):
        return getattr(self._h, name)


hashlib.sha256 = Counting
import workbench as wb

try:
    wb.load(sys.argv[1])
    error = None
except wb.CheckpointError as e:
    error = str(e)
print(json.dumps({"hashed": hashed, "error": error}))
"""


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_in_child(folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def identity(path: Path) -> tuple[str, list[int]]:
    """The real path and (device, inode, size, mtime_ns, ctime_ns) a cache entry is keyed by."""
    st = os.stat(os.path.realpath(path))
    return os.path.realpath(path), [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def flip_last_byte(path: Path, keep_mtime: bool) -> None:
    """Change one byte in place: same inode and size; the mtime is new unless kept (then only the ctime says)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 1]))
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size


@pytest.fixture
def ckpt(mixtral_ckpt, tmp_path, monkeypatch):
    """A copy of the tiny Mixtral with a matching SHA256SUMS and its own empty hash cache; its files count as
    settled at once (they are only just written)."""
    folder = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], folder)
    (folder / "SHA256SUMS").write_text("".join(f"{sha(folder / n)}  {n}\n" for n in ("config.json", WEIGHTS)))
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "SETTLED_NS", 0)
    return folder


def cached(cache_dir: Path) -> dict:
    """The entries of a cache file (which must be a plain file: reading a FIFO left there would block)."""
    assert (cache_dir / "sha256.json").is_file()
    return json.loads((cache_dir / "sha256.json").read_text())["files"]


def test_a_second_process_does_not_hash_the_weights_again(ckpt):
    wb.load(ckpt)  # verifies SHA256SUMS; the digests go to the hash cache
    # not a blind count: in the next test the same count covers the weights once they change
    assert load_in_child(ckpt) == {"hashed": 0, "error": None}


@pytest.mark.parametrize("keep_mtime", [False, True], ids=["new mtime", "same mtime"])
def test_a_changed_file_is_hashed_again_and_refused(ckpt, tmp_path, keep_mtime):
    weights = ckpt / WEIGHTS
    want = sha(weights)
    wb.load(ckpt)
    assert cached(tmp_path / "cache")[os.path.realpath(weights)][5] == want
    flip_last_byte(weights, keep_mtime)
    child = load_in_child(ckpt)
    assert child["hashed"] >= weights.stat().st_size
    assert f"content hashes to {sha(weights)}, but {ckpt / 'SHA256SUMS'} records {want}" in child["error"]
    with pytest.raises(wb.CheckpointError, match="sha256 mismatch"):
        wb.load(ckpt)


def _cache_text(files) -> str:
    return json.dumps({"format": checkpoint.CACHE_FORMAT, "files": files})


def _lying(real, ident, digest):
    """A well-formed entry claiming the file (already altered) still has its recorded digest."""
    return _cache_text({real: [*ident, digest]})


# cache file contents, from the weights' real path and identity and the digest SHA256SUMS records for them
CORRUPT = {
    "not JSON": lambda real, ident, digest: '{"format": ',
    "not UTF-8": lambda real, ident, digest: b"\xff\xfe{}",
    "deeply nested": lambda real, ident, digest: "[" * 100_000 + "]" * 100_000,
    "another format": lambda real, ident, digest: json.dumps({"format": "other 9", "files": {real: [*ident, digest]}}),
    "files not an object": lambda real, ident, digest: json.dumps({"format": checkpoint.CACHE_FORMAT, "files": []}),
    "entry too short": lambda real, ident, digest: _cache_text({real: [*ident[:4], digest]}),
    "entry too long": lambda real, ident, digest: _cache_text({real: [*ident, digest, 0]}),
    "identity as text": lambda real, ident, digest: _cache_text({real: [*map(str, ident), digest]}),
    "identity as floats": lambda real, ident, digest: _cache_text({real: [*map(float, ident), digest]}),
    "digest not hex": lambda real, ident, digest: _cache_text({real: [*ident, "z" * 64]}),
    "digest in capitals": lambda real, ident, digest: _cache_text({real: [*ident, digest.upper()]}),
    "oversized": lambda real, ident, digest: _lying(real, ident, digest) + " " * (checkpoint.MAX_CACHE_BYTES + 1),
}


@pytest.mark.parametrize("write", list(CORRUPT.values()), ids=list(CORRUPT))
def test_a_corrupt_cache_file_is_ignored_and_replaced(ckpt, tmp_path, write):
    """An unusable cache file never breaks loading and never vouches for an altered file; the next digest
    replaces it with a good one. The lying entries claim the altered file still has its recorded digest."""
    weights = ckpt / WEIGHTS
    want = sha(weights)
    flip_last_byte(weights, keep_mtime=True)
    real, ident = identity(weights)
    cache = tmp_path / "cache" / "sha256.json"
    cache.parent.mkdir()
    text = write(real, ident, want)
    cache.write_bytes(text if isinstance(text, bytes) else text.encode())
    cache.chmod(0o600)
    with pytest.raises(wb.CheckpointError, match="sha256 mismatch"):
        wb.load(ckpt)
    assert cached(tmp_path / "cache")[real] == [*ident, sha(weights)]
    assert cache.stat().st_mode & 0o777 == 0o600


def test_a_cache_file_others_could_write_is_not_trusted(ckpt, tmp_path):
    weights = ckpt / WEIGHTS
    want = sha(weights)
    flip_last_byte(weights, keep_mtime=True)
    real, ident = identity(weights)
    cache = tmp_path / "cache" / "sha256.json"
    cache.parent.mkdir()
    cache.write_text(_lying(real, ident, want))
    cache.chmod(0o666)
    with pytest.raises(wb.CheckpointError, match="sha256 mismatch"):
        wb.load(ckpt)
    assert cached(tmp_path / "cache")[real] == [*ident, sha(weights)]
    assert cache.stat().st_mode & 0o777 == 0o600


def test_unusable_cache_paths_do_not_break_loading(ckpt, tmp_path, monkeypatch):
    """A folder or a FIFO where the cache file should be, or a cache folder that cannot be made: load works."""
    cache = tmp_path / "cache" / "sha256.json"
    cache.mkdir(parents=True)
    wb.load(ckpt)
    shutil.rmtree(tmp_path / "cache")
    cache.parent.mkdir()
    os.mkfifo(cache)
    (ckpt / "config.json").touch()  # a new identity: hashed again, so the FIFO is read and written over
    wb.load(ckpt)
    assert os.path.realpath(ckpt / "config.json") in cached(tmp_path / "cache")
    (tmp_path / "blocker").write_text("")
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "blocker" / "cache"))
    (ckpt / "config.json").touch()
    wb.load(ckpt)


def test_the_cache_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(checkpoint, "SETTLED_NS", 0)
    monkeypatch.setattr(checkpoint, "CACHE_ENTRIES", 3)
    files = [tmp_path / f"f{i}" for i in range(5)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]))
        checkpoint.sha256(f)
    assert list(cached(tmp_path / "cache")) == [os.path.realpath(f) for f in files[2:]]


def test_hash_caches_of_hub_files_live_in_their_repo(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("WORKBENCH_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    user = tmp_path / "xdg" / "moe-workbench" / "sha256.json"
    snapshot = tmp_path / "hub" / "models--org--name" / "snapshots" / "abc" / WEIGHTS
    assert checkpoint.hash_caches(snapshot) == [tmp_path / "hub" / "models--org--name" / ".workbench" / "sha256.json",
                                                user]
    assert checkpoint.hash_caches(tmp_path / "elsewhere" / WEIGHTS) == [user]
    monkeypatch.setenv("WORKBENCH_CACHE_DIR", str(tmp_path / "mine"))
    assert checkpoint.hash_caches(snapshot) == [tmp_path / "mine" / "sha256.json"]


def test_parallel_hashing_matches_hashlib(tmp_path, monkeypatch):
    """Every file's digest equals hashlib's over its bytes (empty, block edges, several blocks), hashed by
    several threads at once: each call waits at a barrier that only two concurrent hashes pass."""
    sizes = [0, 1, (1 << 22) - 1, 1 << 22, (2 << 22) + 3, 5_000_000]
    files = []
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"f{i}.safetensors")
        files[-1].write_bytes(os.urandom(n))
    barrier, plain = threading.Barrier(2, timeout=30), checkpoint.sha256

    def together(path, **kwargs):
        barrier.wait()
        return plain(path, **kwargs)

    monkeypatch.setattr(checkpoint, "sha256", together)
    got = checkpoint.sha256_many(files, progress=True)
    assert list(got) == files
    assert got == {f: sha(f) for f in files}


def test_hash_command_writes_the_manifest_load_checks(tmp_path, capsys):
    folder = tmp_path / "mini"
    shutil.copytree(EMBEDDED, folder)
    (folder / "SHA256SUMS").unlink()
    read = ["config.json", WEIGHTS, "tokenizer.json"]  # not README.md, eval.json, loss.svg: load never reads them
    expected = "".join(f"{sha(folder / n)}  {n}\n" for n in sorted(read))
    manifest = folder / "SHA256SUMS"
    assert cli.main(["hash", str(folder)]) == 0
    assert manifest.read_text() == expected
    assert f"records the sha256 of {len(read)} files" in capsys.readouterr().out
    inode = manifest.stat().st_ino
    assert cli.main(["hash", str(folder)]) == 0 and manifest.stat().st_ino == inode  # the same: left as it is

    other = expected.replace(sha(folder / WEIGHTS), "0" * 64)
    manifest.write_text(other)
    assert cli.main(["hash", str(folder)]) == 2
    assert "different SHA256SUMS" in capsys.readouterr().err and manifest.read_text() == other
    assert cli.main(["hash", str(folder), "--overwrite"]) == 0 and manifest.read_text() == expected
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temp file left behind

    wb.load(folder)
    flip_last_byte(folder / WEIGHTS, keep_mtime=False)
    with pytest.raises(wb.CheckpointError, match="sha256 mismatch"):
        wb.load(folder)


def test_hash_command_covers_shards_and_their_index(mixtral_ckpt, tmp_path):
    from test_loading import shard

    folder = shard(mixtral_ckpt[0], tmp_path / "sharded")
    assert cli.main(["hash", str(folder)]) == 0
    names = sorted(p.name for p in folder.glob("*.safetensors")) + ["config.json", checkpoint.INDEX_FILE]
    assert (folder / "SHA256SUMS").read_text() == "".join(f"{sha(folder / n)}  {n}\n" for n in sorted(names))
    wb.load(folder)


def test_hash_command_refuses_a_folder_without_weights(tmp_path, capsys):
    assert cli.main(["hash", str(tmp_path)]) == 2
    assert "no *.safetensors weights" in capsys.readouterr().err
    assert not (tmp_path / "SHA256SUMS").exists()
