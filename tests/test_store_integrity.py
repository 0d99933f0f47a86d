"""Store integrity: checksummed chunks, a damaged chunk named (store, variable, chunk, tokens) wherever a store is
read, `workbench info --check`, damaged metadata, and stores written before checksums."""

import json
import shutil
from pathlib import Path

import numcodecs
import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec

import workbench as wb
from workbench import analysis, cli
from workbench.demo import EMBEDDED_MODEL
from workbench.store import StoreError, check, disk, open_store, trace

N, CHUNK = 384, 128  # three stored chunks per array
DAMAGED = "topk_ids/c/0/1/0"  # every layer of tokens 128..256
NAMED = r"topk_ids chunk \(0, 1, 0\) \(topk_ids/c/0/1/0\), tokens 128..256"


@pytest.fixture(scope="module")
def model():
    return wb.load(EMBEDDED_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokens():
    return np.random.default_rng(7).integers(0, 256, N)


@pytest.fixture(scope="module")
def clean(model, tokens, tmp_path_factory) -> Path:
    return trace(model, tokens, tmp_path_factory.mktemp("clean") / "run.zarr", chunk_tokens=CHUNK, progress=False)


@pytest.fixture
def store(clean, tmp_path) -> Path:
    """A copy of the clean store to damage."""
    return Path(shutil.copytree(clean, tmp_path / "run.zarr"))


def garble(store: Path, key: str = DAMAGED) -> None:
    (store / key).write_bytes(b"not the chunk that was written here")


def uncommit(store: Path, committed: int) -> None:
    """Leave the store as a trace killed after its first `committed` tokens leaves it."""
    zarr.open_group(store, mode="r+").attrs.update(committed_tokens=committed, complete=False)


def codecs(store: Path, name: str) -> list[str]:
    return [c["name"] for c in json.loads((store / name / "zarr.json").read_text())["codecs"]]


def test_every_array_a_trace_writes_carries_checksums(clean):
    names = sorted(p.parent.name for p in clean.glob("*/zarr.json"))
    assert names == ["input_ids", "layer", "token", "topk_ids", "topk_weights"]
    for name in names:
        assert codecs(clean, name)[-2:] == ["blosc", "crc32c"], name  # the checksum of the compressed bytes
    assert check(clean) == []


def test_a_damaged_chunk_is_named_by_analyses_open_store_and_widgets(store):
    ds = open_store(store)
    assert analysis.scan.locate(ds.topk_ids, str(store)) is not None  # read straight from zarr, not through dask
    read = analysis.token_reader(ds.topk_ids, str(store))
    garble(store)
    with pytest.raises(StoreError, match=f"{store}: cannot read {NAMED}"):
        read(100, 300)
    with pytest.raises(StoreError, match=f"{store}: cannot read {NAMED}: ValueError: .*checksum.*info --check"):
        analysis.expert_load(open_store(store))
    with pytest.raises(StoreError, match=f"{store}: cannot read {NAMED}"):
        open_store(store).topk_ids.values
    with pytest.raises(StoreError, match=NAMED):
        open_store(store).topk_ids.sel(layer=2).isel(token=slice(200, 210)).compute()
    assert open_store(store).topk_ids.isel(token=slice(0, 128)).values.shape == (6, 128, 4)  # the rest reads
    widgets = pytest.importorskip("workbench.widgets")
    with pytest.raises(StoreError, match=NAMED):
        widgets.TokenView(store, start=130, length=20)


def test_info_check_reports_the_damaged_tokens(store, clean, capsys):
    assert cli.main(["info", "--check", str(clean)]) == 0
    assert f"check      every chunk of the {N} committed tokens reads whole" in capsys.readouterr().out
    garble(store)
    assert cli.main(["info", "--check", str(store)]) == 1
    out = capsys.readouterr().out
    assert "check      1 damaged chunk(s): restore the store from a copy, or trace it again with --overwrite" in out
    (line,) = [line for line in out.splitlines() if " chunk (" in line]
    assert line.startswith("  topk_ids chunk (0, 1, 0) (topk_ids/c/0/1/0), tokens 128..256: ValueError: Stored and "
                           "computed checksum do not match")
    (damage,) = check(store)
    assert (damage.variable, damage.chunk, damage.tokens) == ("topk_ids", (0, 1, 0), (128, 256))


def test_changed_values_that_still_decode_are_caught_by_the_checksum(store, clean):
    """A chunk replaced by a validly compressed chunk of other values (its checksum kept) decodes without error
    in blosc; only the checksum tells."""
    data = (store / DAMAGED).read_bytes()
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)
    values = np.frombuffer(blosc.decode(data[:-4]), np.int16).copy()
    values[0] = (values[0] + 1) % 32  # another expert for one slot
    payload = blosc.encode(values)
    assert np.array_equal(np.frombuffer(blosc.decode(payload), np.int16), values)  # blosc decodes it
    (store / DAMAGED).write_bytes(payload + data[-4:])
    with pytest.raises(StoreError, match=f"{NAMED}: ValueError: Stored and computed checksum do not match"):
        open_store(store).topk_ids.values
    assert [(d.variable, d.tokens) for d in check(store)] == [("topk_ids", (128, 256))]


def test_damaged_metadata_is_a_damaged_store_not_a_foreign_folder(model, tokens, store, clean, tmp_path, capsys):
    text = (store / "zarr.json").read_text()
    (store / "zarr.json").write_text(text[: len(text) // 2])
    damaged = f"{store} is a damaged store: {store / 'zarr.json'} is not valid JSON: .*overwrite=True"
    with pytest.raises(StoreError, match=damaged):
        open_store(store)
    assert cli.main(["info", str(store)]) == 2
    assert "is a damaged store" in capsys.readouterr().err
    with pytest.raises(StoreError, match=damaged):
        trace(model, tokens, store, chunk_tokens=CHUNK, progress=False)
    trace(model, tokens, store, chunk_tokens=CHUNK, progress=False, overwrite=True)  # the remedy
    assert np.array_equal(open_store(store).topk_ids.values, open_store(clean).topk_ids.values)

    array = tmp_path / "array.zarr"
    shutil.copytree(clean, array)
    (array / "topk_weights" / "zarr.json").write_text("{")
    with pytest.raises(StoreError, match=f"damaged store: {array / 'topk_weights' / 'zarr.json'} is not valid JSON"):
        open_store(array)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("never a store")
    with pytest.raises(StoreError, match="is not empty and is not a workbench store"):
        open_store(tmp_path / "other")


def test_a_store_written_without_checksums_still_reads_and_resumes(model, tokens, clean, tmp_path, monkeypatch):
    legacy = tmp_path / "legacy.zarr"
    with monkeypatch.context() as m:  # the codecs stores had before checksums
        m.setattr(disk, "CODECS", (BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),))
        trace(model, tokens, legacy, chunk_tokens=CHUNK, progress=False)
    assert codecs(legacy, "topk_ids") == ["bytes", "blosc"]
    want = open_store(clean)
    for name in ("input_ids", "topk_ids", "topk_weights"):
        assert np.array_equal(open_store(legacy)[name].values, want[name].values), name
    assert check(legacy) == []
    uncommit(legacy, 256)
    with pytest.warns(UserWarning, match="no snapshot at token 256"):  # a complete store keeps none: replayed
        trace(model, tokens, legacy, chunk_tokens=CHUNK, progress=False)  # resumed in the store's own codecs
    assert codecs(legacy, "topk_ids") == ["bytes", "blosc"] and open_store(legacy).attrs["summary"]["resumed_at"] == 256
    assert np.array_equal(open_store(legacy).topk_ids.values, want.topk_ids.values)
    garble(legacy)  # without a checksum, found where it no longer decodes
    with pytest.raises(StoreError, match=f"{NAMED}: RuntimeError: error during blosc decompression"):
        analysis.expert_load(open_store(legacy))
    assert [(d.variable, d.tokens) for d in check(legacy)] == [("topk_ids", (128, 256))]


def test_resume_onto_a_damaged_chunk_is_refused_with_the_remedy(model, tokens, store, clean):
    uncommit(store, 256)
    garble(store, "topk_weights/c/0/0/0")
    with pytest.raises(StoreError, match=rf"{store} cannot be resumed: 1 chunk\(s\) of its committed tokens cannot be "
                                         r"read \(topk_weights chunk \(0, 0, 0\) \(topk_weights/c/0/0/0\), tokens "
                                         r"0..128: .*\)\. .*trace it again with overwrite=True"):
        trace(model, tokens, store, chunk_tokens=CHUNK, progress=False)
    trace(model, tokens, store, chunk_tokens=CHUNK, progress=False, overwrite=True)
    assert check(store) == [] and open_store(store).attrs["complete"]
    assert np.array_equal(open_store(store).topk_weights.values, open_store(clean).topk_weights.values)
