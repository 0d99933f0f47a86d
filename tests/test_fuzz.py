"""Fuzzing the safetensors header parser with random bytes and with mutated valid files.

The only allowed outcomes: CheckpointError naming the file, or a parse whose tensors tile the file's data
section exactly, with sizes matching shapes, which the safetensors library itself reads identically.
Bounded (examples and no deadline) so that the whole file runs in a few seconds.
"""

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from workbench.checkpoint import DTYPE_SIZES, read_header
from workbench.errors import CheckpointError

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module")
def folder():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def outcome(folder: Path, content: bytes) -> dict | None:
    """Parse `content` as a safetensors file; assert the outcome is allowed; the tensors, or None if refused."""
    path = folder / "model.safetensors"
    path.write_bytes(content)
    try:
        tensors = read_header(path)
    except CheckpointError as e:
        assert e.file == str(path) and str(e).startswith(f"{path}: ")
        return None
    n = int.from_bytes(content[:8], "little")
    end = 8 + n
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].offsets):
        start, stop = info.offsets
        assert start == end, (name, info)  # contiguous from the data section's start: no gap, no overlap
        assert stop - start == math.prod(info.shape) * DTYPE_SIZES[info.dtype]
        end = stop
    assert end == len(content)  # the last tensor ends where the file does
    with safe_open(str(path), framework="np") as f:
        assert set(f.keys()) == set(tensors)
        for name in f.keys():
            view = f.get_slice(name)
            assert (view.get_dtype(), tuple(view.get_shape())) == (tensors[name].dtype, tensors[name].shape)
    return tensors


def file_of(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    text = (header if isinstance(header, (bytes, str)) else json.dumps(header, ensure_ascii=False))
    raw = text.encode() if isinstance(text, str) else text
    return (len(raw) if length is None else length).to_bytes(8, "little") + raw + data


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
NUMPY_DTYPES = [d for d in DTYPE_SIZES if not d.startswith("F8")]  # what safetensors' numpy reader takes


@st.composite
def valid_files(draw) -> tuple[dict, bytes]:
    """A well-formed header (tensors in any order, optional metadata) and its data section."""
    names = draw(st.lists(st.text(min_size=1, max_size=10), max_size=6, unique=True))
    header: dict = {}
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3))
    offset, data = 0, b""
    for name in names:
        dtype = draw(st.sampled_from(NUMPY_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = math.prod(shape) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        data += draw(st.binary(min_size=size, max_size=size))
        offset += size
    order = draw(st.permutations(list(header)))
    return {k: header[k] for k in order}, data


@FUZZ
@given(content=st.binary(max_size=300))
def test_random_bytes(folder, content):
    outcome(folder, content)


@FUZZ
@given(header=st.binary(max_size=200), data=st.binary(max_size=64))
def test_random_header_bytes_with_a_consistent_length(folder, header, data):
    outcome(folder, file_of(header, data))


@FUZZ
@given(valid=valid_files())
def test_valid_files_parse(folder, valid):
    header, data = valid
    tensors = outcome(folder, file_of(header, data))
    assert tensors is not None and set(tensors) == set(header) - {"__metadata__"}


MUTATIONS = ["length", "offsets", "dtype", "shape", "entry", "metadata", "truncate", "append", "flip", "deep",
             "duplicate", "huge_int", "padding", "not_object"]


@FUZZ
@given(valid=valid_files(), mutation=st.sampled_from(MUTATIONS), data=st.data())
def test_mutated_files(folder, valid, mutation, data):
    """One mutation of a valid file: lengths, offsets, dtypes, shapes, huge numbers, bad UTF-8, deep JSON, ..."""
    header, body = valid
    names = [k for k in header if k != "__metadata__"]
    name = data.draw(st.sampled_from(names)) if names else None
    content = file_of(header, body)
    if mutation == "length":
        content = file_of(header, body, data.draw(st.integers(0, 2**64 - 1) | st.integers(0, len(content) + 8)))
    elif mutation in ("offsets", "dtype", "shape") and name:
        key = {"offsets": "data_offsets", "dtype": "dtype", "shape": "shape"}[mutation]
        special = {
            "data_offsets": st.lists(st.integers(-(2**66), 2**66) | st.integers(0, len(body) + 2), min_size=0,
                                     max_size=3),
            "dtype": st.sampled_from([*DTYPE_SIZES, "F33", "f32", "", "U16", "C64", "F4"]),
            "shape": st.lists(st.integers(-2, 2**64) | st.integers(0, 5), max_size=70),
        }[key]
        header[name][key] = data.draw(special | json_values)
        content = file_of(header, body)
    elif mutation == "entry" and name:
        header[name] = data.draw(json_values | st.fixed_dictionaries(
            {"dtype": st.just("F32"), "shape": st.just([]), "data_offsets": st.just([0, 4]),
             data.draw(st.text(max_size=4)): json_values}))
        content = file_of(header, body)
    elif mutation == "metadata":
        header["__metadata__"] = data.draw(json_values)
        content = file_of(header, body)
    elif mutation == "truncate":
        content = content[: data.draw(st.integers(0, len(content)))]
    elif mutation == "append":
        content += data.draw(st.binary(min_size=1, max_size=16))
    elif mutation == "flip":
        raw = bytearray(content)
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(8, max(8, len(raw) - 1)))
            if i < len(raw):
                raw[i] = data.draw(st.integers(0, 255))
        content = bytes(raw)
    elif mutation == "deep":
        depth = data.draw(st.integers(1, 200_000))
        content = file_of("{\"a\": " + "[" * depth + "]" * depth + "}", body)
    elif mutation == "duplicate" and name:
        text = json.dumps(header)
        content = file_of(text[:-1] + ", " + json.dumps({name: header[name]})[1:], body)
    elif mutation == "huge_int" and name:
        digits = data.draw(st.integers(1, 6000))
        content = file_of(json.dumps(header).replace("\"data_offsets\": [0", "\"data_offsets\": [" + "9" * digits, 1),
                          body)
    elif mutation == "padding":
        content = file_of(json.dumps(header) + " " * data.draw(st.integers(0, 16)), body)
    elif mutation == "not_object":
        content = file_of(json.dumps(data.draw(json_values)), body)
    outcome(folder, content)
