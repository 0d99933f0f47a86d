"""`workbench plan`: parameters and bytes per rank under expert (and tensor) parallelism, checked against hand
computations of DeepSeek-V4-Flash and V4-Pro, against real tiny checkpoints (attention state, memory as loaded,
bytes on disk, the loader's own ranks under tensor parallelism), and through the CLI."""

import contextlib
import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import workbench as wb
from oracle import input_ids, make_checkpoint
from test_deepseek import v3
from test_deepseek_v32 import v32
from test_deepseek_v4 import CONFIGS as V4_CONFIGS, VOCAB as V4_VOCAB, make_v4
from test_fp8 import v4_quantised  # noqa: F401  (fixture: tiny V4 stored FP8 + FP4 in the official layout)
from test_gpt_oss import config as gpt_oss
from workbench import checkpoint, distributed
from workbench.cli import main
from workbench.config import Config
from workbench.models.deepseek_v4 import CSA, HCA, layer_types
from workbench.errors import CheckpointError
from workbench.plan import GiB, census, plan

CONFIGS = Path(__file__).parent.parent / "data" / "configs"
FLASH, PRO = CONFIGS / "deepseek-v4-flash.json", CONFIGS / "deepseek-v4-pro.json"
WORLD_SIZES = [1, 7, 8, 16, 64, 100]  # 7 and 100 divide neither 256 nor 384 experts
BF16, F32, I64, FP8, FP4 = "bf16", "f32", "i64", "fp8", "fp4"


def published_tensors(c: dict) -> list[tuple[int, tuple[int, int], str]]:
    """(count, shape, stored as) of every main-model tensor of a DeepSeek-V4 checkpoint, routed experts last,
    written out from the published V4-Pro safetensors headers (MTP skipped). FP8: e4m3 with a ue8m0 scale per
    128x128 block; FP4: e2m1 two per byte with a ue8m0 scale per 32 inputs."""
    H, V, L, E = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["n_routed_experts"]
    I, heads, hd, q = c["moe_intermediate_size"], c["num_attention_heads"], c["head_dim"], c["q_lora_rank"]
    g, o, ih, idim, hc = c["o_groups"], c["o_lora_rank"], c["index_n_heads"], c["index_head_dim"], c["hc_mult"]
    ratios = c["compress_ratios"][:L]
    csa, hca, hashed = ratios.count(4), ratios.count(128), c["num_hash_layers"]
    mix = (2 + hc) * hc
    return [
        (2, (V, H), BF16), (1, (H,), BF16),  # embed, head, norm
        (1, (hc, hc * H), F32), (1, (hc,), F32), (1, (1,), F32),  # hc_head_{fn,base,scale}
        (2 * L, (H,), BF16),  # attn_norm, ffn_norm
        (2 * L, (mix, hc * H), F32), (2 * L, (mix,), F32), (2 * L, (3,), F32),  # hc_{attn,ffn}_{fn,base,scale}
        (L, (q, H), FP8), (L, (q,), BF16), (L, (heads * hd, q), FP8),  # wq_a, q_norm, wq_b
        (L, (hd, H), FP8), (L, (hd,), BF16), (L, (heads,), F32),  # wkv, kv_norm, attn_sink
        (L, (g * o, heads * hd // g), FP8), (L, (H, g * o), FP8),  # wo_a, wo_b
        (hca, (128, hd), F32), (2 * hca, (hd, H), BF16), (hca, (hd,), BF16),  # HCA compressor ape, wkv/wgate, norm
        (csa, (4, 2 * hd), F32), (2 * csa, (2 * hd, H), BF16), (csa, (hd,), BF16),  # CSA compressor
        (csa, (ih * idim, q), FP8), (csa, (ih, H), BF16),  # indexer wq_b, weights_proj
        (csa, (4, 2 * idim), F32), (2 * csa, (2 * idim, H), BF16), (csa, (idim,), BF16),  # indexer compressor
        (L, (E, H), BF16), (L - hashed, (E,), F32), (hashed, (V, c["num_experts_per_tok"]), I64),  # gate
        (2 * L, (I, H), FP8), (L, (H, I), FP8),  # shared expert w1, w3; w2
        (2 * L * E, (I, H), FP4), (L * E, (H, I), FP4),  # routed experts w1, w3; w2
    ]


MEMORY = {BF16: 2, F32: 4, I64: 8, FP8: 2, FP4: 2}  # bytes per value once loaded in bf16, dequantised


def disk_bytes(shape: tuple[int, ...], stored: str) -> int:
    n = math.prod(shape)
    if stored == FP8:
        return n + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128)
    if stored == FP4:
        return n // 2 + shape[0] * shape[1] // 32
    return n * {BF16: 2, F32: 4, I64: 8}[stored]


def held_bytes(shape: tuple[int, ...], stored: str, kept: bool) -> int:
    """Bytes in memory: kept quantised, FP8 codes with an fp32 scale per 128x128 block and FP4 as on disk (two
    values per byte, a one-byte exponent per 32 inputs); dequantised, MEMORY per value."""
    if kept and stored == FP8:
        return math.prod(shape) + math.ceil(shape[0] / 128) * math.ceil(shape[1] / 128) * 4
    if kept and stored == FP4:
        return disk_bytes(shape, FP4)
    return math.prod(shape) * MEMORY[stored]


def hand(c: dict, world_size: int, kept: bool = False) -> dict[str, int]:
    """Every figure of a plan, by hand from the tensor list: experts are the last two rows."""
    tensors = published_tensors(c)
    rest, experts = tensors[:-2], tensors[-2:]
    H, I, L, E, k = (c["hidden_size"], c["moe_intermediate_size"], c["num_hidden_layers"], c["n_routed_experts"],
                     c["num_experts_per_tok"])
    per_expert = 3 * H * I
    assert sum(n * math.prod(s) for n, s, _ in experts) == per_expert * E * L
    most = math.ceil(E / world_size)
    replicated = sum(n * math.prod(s) for n, s, _ in rest)
    return dict(
        params=replicated + per_expert * E * L, replicated_params=replicated, active=replicated + k * per_expert * L,
        experts_per_rank=most,
        memory_replicated=sum(n * held_bytes(s, t, kept) for n, s, t in rest),
        memory_experts=most * L * (2 * held_bytes((I, H), FP4, kept) + held_bytes((H, I), FP4, kept)),
        disk_replicated=sum(n * disk_bytes(s, t) for n, s, t in rest),
        disk_experts=most * L * (2 * disk_bytes((I, H), FP4) + disk_bytes((H, I), FP4)),
    )


def split_tensors(c: dict) -> list[tuple[int, tuple[int, ...], str, int]]:
    """(count, shape, stored as, cut dim) of the tensors tensor parallelism splits by heads: wq_b, attn_sink and
    wo_a rows, wo_b columns (the indexer's wq_b stays whole)."""
    H, L, heads, hd = c["hidden_size"], c["num_hidden_layers"], c["num_attention_heads"], c["head_dim"]
    g, o = c["o_groups"], c["o_lora_rank"]
    return [(L, (heads * hd, c["q_lora_rank"]), FP8, 0), (L, (heads,), F32, 0), (L, (g * o, heads * hd // g), FP8, 0),
            (L, (H, g * o), FP8, 1)]


def hand_tp(c: dict, world_size: int, group: int, kept: bool = False) -> dict[str, int]:
    """`hand` at `world_size` ranks with the heads split over groups of `group` ranks: each rank holds 1/T of the
    split tensors in memory (kept, the cuts fall on block edges); it reads the FP8 ones whole (with their scales)
    and 1/T of the sinks."""
    want = hand(c, world_size, kept)
    rows = published_tensors(c)
    split = split_tensors(c)
    assert all((n, s, t) in rows for n, s, t, _ in split)
    cut = [(n, (*s[:d], s[d] // group, *s[d + 1:]), s, t) for n, s, t, d in split]
    assert all(s[d] // group % 128 == 0 for _, s, t, d in split if t == FP8)  # each rank's part: whole blocks
    params = sum(n * math.prod(s) for n, s, _, _ in split)
    memory = sum(n * held_bytes(s, t, kept) for n, s, t, _ in split)
    disk = sum(n * disk_bytes(s, t) for n, s, t, _ in split)
    return {**want, "replicated_params": want["replicated_params"] - params,
            "memory_replicated": want["memory_replicated"] - memory, "disk_replicated": want["disk_replicated"] - disk,
            "memory_heads": sum(n * held_bytes(part, t, kept) for n, part, _, t in cut),
            "disk_heads": sum(n * disk_bytes(whole if t == FP8 else part, t) for n, part, whole, t in cut),
            "split_params": params, "split_params_per_rank": params // group}


@pytest.fixture(scope="module")
def censuses():
    """census(path) with memory dequantised to bf16, as `hand` counts it."""
    return {path: census(path, dequantize=True) for path in (FLASH, PRO)}


@pytest.fixture(scope="module")
def tp_census():
    """census(path, tensor_parallel=T, dequantize=...), built once per model, group size and way of holding."""
    return functools.cache(lambda path, group, dequantize=True: census(path, tensor_parallel=group,
                                                                        dequantize=dequantize))


def flash_with_experts(folder: Path, experts: int) -> Path:
    """V4-Flash's config with `experts` routed experts per layer (top-2), written into `folder`."""
    c = {**json.loads(FLASH.read_text()), "n_routed_experts": experts, "num_experts_per_tok": 2}
    (folder / "config.json").write_text(json.dumps(c))
    return folder


def test_published_pro_layout():
    """The tensor list reproduces the published V4-Pro headers (a few rows, as listed there) and its schedule:
    layers 0-1 HCA, then CSA on even and HCA on odd layers (30 CSA, 31 HCA)."""
    c = json.loads(PRO.read_text())
    rows = published_tensors(c)
    assert (61, (16384, 4096), FP8) in rows and (61, (65536, 1536), FP8) in rows  # wo_a, wq_b
    assert (31, (128, 512), F32) in rows and (30, (4, 1024), F32) in rows  # HCA / CSA ape
    assert (30, (8192, 1536), FP8) in rows and (58, (384,), F32) in rows  # indexer wq_b, gate bias
    assert disk_bytes((3072, 7168), FP4) == 3072 * 3584 + 3072 * 224  # w1: I8 [3072, 3584] + scale [3072, 224]
    assert disk_bytes((16384, 4096), FP8) == 16384 * 4096 + 128 * 32  # wo_a + scale [128, 32]
    types = layer_types(Config(c))
    assert types[:4] == [HCA, HCA, CSA, HCA] and types.count(CSA) == 30 and types.count(HCA) == 31


@pytest.mark.parametrize("path", [FLASH, PRO], ids=["flash", "pro"])
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_figures_equal_hand_computation(censuses, path, world_size):
    c = json.loads(path.read_text())
    want = hand(c, world_size)
    p = censuses[path].at(world_size)
    got = dict(params=p.params, replicated_params=p.replicated_params, active=p.active,
               experts_per_rank=p.experts_per_rank, memory_replicated=p.memory.replicated,
               memory_experts=p.memory.experts, disk_replicated=p.disk.replicated, disk_experts=p.disk.experts)
    assert got == want
    assert p.dtype == torch.bfloat16 and p.state == 0 and p.per_rank == p.memory.total
    assert (p.experts, p.moe_layers) == (c["n_routed_experts"], c["num_hidden_layers"])


@pytest.mark.parametrize("path, world_size, group", [(FLASH, 2, 2), (FLASH, 16, 8), (PRO, 16, 16), (PRO, 32, 8),
                                                     (PRO, 64, 16)],
                         ids=["flash-2-2", "flash-16-8", "pro-16-16", "pro-32-8", "pro-64-16"])
def test_tensor_parallel_figures_equal_hand_computation(tp_census, censuses, path, world_size, group):
    """Heads split over groups of T ranks, routed experts over all N."""
    c = json.loads(path.read_text())
    want = hand_tp(c, world_size, group)
    p = tp_census(path, group).at(world_size)
    got = dict(params=p.params, replicated_params=p.replicated_params, active=p.active,
               experts_per_rank=p.experts_per_rank, memory_replicated=p.memory.replicated,
               memory_experts=p.memory.experts, disk_replicated=p.disk.replicated, disk_experts=p.disk.experts,
               memory_heads=p.memory.heads, disk_heads=p.disk.heads, split_params=p.split_params,
               split_params_per_rank=p.split_params_per_rank)
    assert got == want
    assert p.tensor_parallel == group and p.head_params == ("attn_sink", "wo_a.weight", "wo_b.weight", "wq_b.weight")
    ep = censuses[path].at(world_size)  # less memory; reads shrink by the sinks only (FP8 cut tensors: read whole)
    assert p.params == ep.params and p.memory.total < ep.memory.total and ep.head_params == ()
    sinks = c["num_hidden_layers"] * c["num_attention_heads"] * 4  # fp32
    assert ep.disk.total - p.disk.total == sinks - sinks // group


@pytest.mark.parametrize("path, world_size, group", [(FLASH, 1, 1), (FLASH, 7, 1), (FLASH, 16, 8), (PRO, 64, 1),
                                                     (PRO, 32, 8), (PRO, 64, 16)],
                         ids=["flash-1", "flash-7", "flash-16-8", "pro-64", "pro-32-8", "pro-64-16"])
def test_kept_figures_equal_hand_computation(tp_census, path, world_size, group):
    """Quantised weights kept as stored (the loader's default): FP8 codes with fp32 block scales, FP4 as on disk.
    Memory is then about the bytes read: the FP8 scales take four bytes instead of one."""
    c = json.loads(path.read_text())
    want = hand_tp(c, world_size, group, kept=True) if group > 1 else hand(c, world_size, kept=True)
    p = tp_census(path, group, False).at(world_size)
    assert not p.dequantized and tp_census(path, group).at(world_size).dequantized
    got = dict(params=p.params, replicated_params=p.replicated_params, active=p.active,
               experts_per_rank=p.experts_per_rank, memory_replicated=p.memory.replicated,
               memory_experts=p.memory.experts, disk_replicated=p.disk.replicated, disk_experts=p.disk.experts)
    if group > 1:
        got.update(memory_heads=p.memory.heads, disk_heads=p.disk.heads, split_params=p.split_params,
                   split_params_per_rank=p.split_params_per_rank)
    assert got == want
    assert p.memory.experts == p.disk.experts
    if group == 1:
        assert p.disk.total < p.memory.total < 1.001 * p.disk.total


def test_tensor_parallel_group_sizes(tp_census, censuses, tmp_path):
    """Heads (64, 128) and o_groups (8, 16) must be divisible by T: Flash splits over groups of at most 8 ranks,
    Pro 16. T must divide N, and the search for the smallest world size that fits tries multiples of T."""
    flash, pro = tp_census(FLASH, 8), tp_census(PRO, 16)
    assert flash.world_sizes == list(range(8, 257, 8)) and pro.world_sizes == list(range(16, 385, 16))
    assert tp_census(PRO, 1).world_sizes == censuses[PRO].world_sizes == list(range(1, 385))
    assert tp_census(PRO, 1).at(32) == censuses[PRO].at(32)
    with pytest.raises(ValueError, match=r"^tensor parallelism over 16 ranks needs heads \(64\) and o_groups \(8\) "
                                         r"divisible by 16; this model's heads split over groups of 1, 2, 4, 8 ranks$"):
        census(FLASH, tensor_parallel=16)
    with pytest.raises(ValueError, match=r"over 3 ranks needs heads \(128\) and o_groups \(16\) divisible by 3; this "
                                         r"model's heads split over groups of 1, 2, 4, 8, 16 ranks$"):
        census(PRO, tensor_parallel=3)
    for bad in (0, -8, True, 8.0):
        with pytest.raises(ValueError, match="tensor parallel size must be a positive integer"):
            census(PRO, tensor_parallel=bad)
    with pytest.raises(ValueError, match="over groups of 16 ranks needs a world size divisible by 16, got 24"):
        pro.at(24)
    with pytest.raises(ValueError, match="world size 400 exceeds the 384 routed experts"):
        pro.at(400)
    with pytest.raises(ValueError, match="tensor parallel size 8 exceeds the 4 routed experts per layer"):
        census(flash_with_experts(tmp_path, 4), tensor_parallel=8)
    assert pro.at(16).memory.heads == pro.at(64).memory.heads  # a rank's share depends on T alone
    assert pro.at(16).per_rank > 190 * GiB > pro.at(32).per_rank  # 197.62 and 107.55 GiB
    assert pro.smallest_world_size(200 * GiB) == 16 and pro.smallest_world_size(190 * GiB) == 32
    assert censuses[PRO].smallest_world_size(190 * GiB) == 22
    assert censuses[FLASH].smallest_world_size(100 * GiB) == 7 and flash.smallest_world_size(100 * GiB) == 8


README_FIGURES = {  # (model, N, T) -> GiB per rank in memory kept as stored, dequantised (bf16) and read from disk,
    # as the README lists them
    (FLASH, 8, 1): (25.37, 78.19, 25.37), (FLASH, 8, 8): (21.84, 71.14, 25.37),
    (FLASH, 16, 1): (16.81, 45.94, 16.80), (FLASH, 16, 8): (13.28, 38.89, 16.80),
    (PRO, 16, 1): (74.58, 228.00, 74.57), (PRO, 16, 16): (59.38, 197.62, 74.57),
    (PRO, 32, 1): (50.65, 137.93, 50.65), (PRO, 32, 8): (36.47, 109.58, 50.65), (PRO, 32, 16): (35.46, 107.55, 50.65),
    (PRO, 64, 1): (38.69, 92.90, 38.69), (PRO, 64, 16): (23.50, 62.52, 38.69),
}
README_FITS = {  # (model, T) -> smallest world size within 80 and 141 GiB per rank, dequantised, parameters only
    (FLASH, 1): (8, 5), (FLASH, 8): (8, 8), (PRO, 1): (96, 32), (PRO, 8): (48, 24), (PRO, 16): (48, 32),
}
README_FITS_1M = {  # (model, T) -> smallest world size within 80 and 141 GiB per rank, kept, with a 1M-token context
    (FLASH, 1): (3, 2), (FLASH, 8): (8, 8), (PRO, 1): (18, 8), (PRO, 8): (16, 8),
}


def test_readme_figures(tp_census):
    for (path, world_size, group), want in README_FIGURES.items():
        kept, deq = tp_census(path, group, False).at(world_size), tp_census(path, group).at(world_size)
        assert (round(kept.memory.total / GiB, 2), round(deq.memory.total / GiB, 2), round(deq.disk.total / GiB, 2)) \
            == want
        assert kept.disk == deq.disk
    for (path, group), want in README_FITS.items():
        assert tuple(tp_census(path, group).smallest_world_size(b * GiB) for b in (80, 141)) == want
    for (path, group), want in README_FITS_1M.items():
        assert tuple(tp_census(path, group, False).smallest_world_size(b * GiB, 10**6) for b in (80, 141)) == want


# bytes of the published V4-Pro checkpoint's `mtp.0.*` tensors (summed from its headers), which we skip
PRO_MTP_BYTES = 13_956_587_692


def test_totals_near_the_published_sizes(censuses):
    """284B total / 13B active (Flash), 1.6T / 49B (Pro): the published totals include the MTP layer. On disk,
    the V4-Pro checkpoint's tensors hold 805.32 GiB, MTP included."""
    flash, pro = censuses[FLASH].at(1), censuses[PRO].at(1)
    assert abs(flash.params / 284e9 - 1) < 0.01 and abs(pro.params / 1.6e12 - 1) < 0.03
    assert abs(flash.active / 13e9 - 1) < 0.1 and abs(pro.active / 49e9 - 1) < 0.05
    assert round((pro.disk.total + PRO_MTP_BYTES) / GiB, 2) == 805.32


def test_plan_function_and_dtypes(tmp_path):
    p = plan(FLASH, 16, dtype="fp32", dequantize=True)
    want = hand(json.loads(FLASH.read_text()), 16)
    assert p.memory.experts == 2 * want["memory_experts"] and p.disk == plan(FLASH, 16).disk
    assert plan(FLASH, 16, dtype=torch.bfloat16, dequantize=True).memory.experts == want["memory_experts"]
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        plan(FLASH, 16, dtype="int8")
    c = json.loads(FLASH.read_text())
    c.pop("torch_dtype")  # the loader's default when a config names no dtype: float32
    (tmp_path / "config.json").write_text(json.dumps(c))
    assert plan(tmp_path, 16).dtype == torch.float32


def test_flash_state_at_one_million_tokens(censuses):
    """By hand: every layer keeps 127 window keys (512-d, bf16, plus an int64 position); CSA 250,000 pooled
    entries (512-d) plus the indexer's (128-d), each with the last window's first series (4 tokens, kv bf16 and
    gate fp32); HCA 7,812 entries and 64 pending tokens (kv and gate, 512-d)."""
    T = 1_000_000
    window = 43 * 127 * (8 + 512 * 2)
    csa = 21 * (T // 4 * 512 * 2 + 4 * 512 * (2 + 4) + T // 4 * 128 * 2 + 4 * 128 * (2 + 4))
    hca = 20 * (T // 128 * 512 * 2 + 2 * (T % 128) * 512 * 2)
    assert censuses[FLASH].state(T) == window + csa + hca
    p = censuses[FLASH].at(8, T)
    assert p.per_rank == p.memory.total + window + csa + hca


STATE_CASES = {  # name -> (make the checkpoint into a folder, vocab)
    "v4": (lambda d: make_v4(V4_CONFIGS["hc2-every-kind-rates-not-dividing-yarn"][0](), d), V4_VOCAB),
    "v3-mla": (lambda d: make_checkpoint(v3(), d), 96),
    "v3.2-mla-indexer": (lambda d: make_checkpoint(v32(), d), 96),
    "gpt-oss-sliding-and-full": (lambda d: make_checkpoint(gpt_oss(), d), 96),
}


@pytest.mark.parametrize("name", sorted(STATE_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_state_equals_measured(tmp_path, name, dtype):
    """The planned attention state after T tokens is exactly `State.nbytes` of a real model fed chunk by chunk
    (chunks of uneven sizes, T crossing the sliding windows and the compress rates)."""
    make, vocab = STATE_CASES[name]
    make(tmp_path)
    model, c = wb.load(tmp_path, dtype=dtype), census(tmp_path, dtype=dtype)
    state = wb.State()
    for step, n in enumerate([1, 2, 5, 9, 3, 17]):
        model(input_ids(vocab, seed=step, length=n)[:1], cache=state)
        assert state.nbytes == c.state(state.offset) > 0


def test_quantised_checkpoint_bytes_on_disk_and_in_memory(v4_quantised):  # noqa: F811
    """A tiny V4 stored as published (FP8 linears, FP4 experts, ue8m0 scales): each rank's planned disk bytes
    are its tensors' bytes in the safetensors files; planned memory is the loaded model's parameter bytes."""
    folder = v4_quantised[0]
    tensors = checkpoint.weight_files(folder)
    size = {n: i.offsets[1] - i.offsets[0] for n, i in tensors.items()}
    expert = {n: int(m[1]) for n in size if (m := re.fullmatch(r"layers\.\d+\.ffn\.experts\.(\d+)\.w\d\.\w+", n))}
    c = census(folder)
    for world_size in (1, 2, 4, 5, 6):
        held = [range(r * 6 // world_size, (r + 1) * 6 // world_size) for r in range(world_size)]
        per_rank = [sum(b for n, b in size.items() if n not in expert or expert[n] in mine) for mine in held]
        assert c.at(world_size).disk.total == max(per_rank)
    assert c.at(1).disk.experts == sum(size[n] for n in expert)
    for dtype in (torch.bfloat16, torch.float32):
        model = wb.load(folder, dtype=dtype)
        loaded = sum(p.numel() * p.element_size() for p in model.parameters())
        assert census(folder, dtype=dtype).at(1).memory.total == loaded


@contextlib.contextmanager
def as_rank(rank: int, world_size: int):
    """The loader sees itself as `rank` of `world_size` with no other rank to agree with: it shards experts and
    splits heads (rank r is r % T of its group) as that rank would, reading and holding only its part (no process
    group needed)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(distributed, "rank_and_world", lambda: (rank, world_size))
        mp.setattr(distributed, "head_group", lambda size: (rank % size, None))
        mp.setattr(distributed, "agreed", lambda active=True: contextlib.nullcontext())
        yield


@pytest.mark.parametrize("which", [0, 1], ids=["fp8-fp4", "fp32"])
def test_tensor_parallel_equals_the_loaders_ranks(v4_quantised, which):  # noqa: F811
    """A tiny V4 (4 heads, 2 output groups, 6 experts), stored quantised as published or as plain floats: at
    N ranks with heads split over groups of T, the fullest rank's planned memory is what the loader's fullest
    rank holds, and its planned disk bytes what that rank reads (the FP8 cut tensors whole with their scales,
    plain ones in part)."""
    folder = v4_quantised[which]
    for dtype in (torch.bfloat16, torch.float32):
        for world_size, group in ((2, 1), (2, 2), (4, 2), (6, 2)):
            c = census(folder, dtype=dtype, tensor_parallel=group, dequantize=True)
            assert c.world_sizes == list(range(group, 7, group))
            p = c.at(world_size)
            memory, read = [], []
            for rank in range(world_size):
                with as_rank(rank, world_size):
                    model = wb.load(folder, dtype=dtype, tensor_parallel=group, dequantize=True)
                assert model.layers["0"].attn.heads == 4 // group
                memory.append(sum(t.numel() * t.element_size() for t in model.parameters()))
                read.append(model.load_report["bytes_read"])
            assert max(memory) == p.memory.total and max(read) == p.disk.total
            assert p.memory.heads * group == c.split.memory
            whole, sinks = c.split.disk, 4 * 4 * 4  # 4 layers of 4 fp32 sinks
            assert whole - p.disk.heads == (whole - whole // group if which else sinks - sinks // group)
            if group > 1:
                assert p.memory.total < census(folder, dtype=dtype, dequantize=True).at(world_size).memory.total
    with pytest.raises(ValueError, match=r"over 4 ranks needs heads \(4\) and o_groups \(2\) divisible by 4; this "
                                         r"model's heads split over groups of 1, 2 ranks$"):
        census(folder, tensor_parallel=4)


def run_cli(*args: str, capsys, dequantize: bool = True) -> tuple[int, str, str]:
    """`workbench plan ARGS`, by default with --dequantize (memory as the hand computations count it)."""
    rc = main(["plan", *map(str, args), *(["--dequantize"] if dequantize else [])])
    out, err = capsys.readouterr()
    return rc, out, err


def gib(n: int) -> str:
    return f"{n / GiB:,.2f}"


def test_cli_table_shows_the_figures(capsys):
    c = json.loads(PRO.read_text())
    want = hand(c, 32)
    rc, out, _ = run_cli(PRO, "--world-size", 32, capsys=capsys)
    assert rc == 0
    memory = re.search(r"^in memory, as loaded \(bfloat16\)\s+(\S+)\s+(\S+)\s+-\s+(\S+)$", out, re.M)
    disk = re.search(r"^read from disk, as stored\s+(\S+)\s+(\S+)\s+-\s+(\S+)$", out, re.M)
    assert memory.groups() == (gib(want["memory_replicated"]), gib(want["memory_experts"]),
                               gib(want["memory_replicated"] + want["memory_experts"]))
    assert disk.groups() == (gib(want["disk_replicated"]), gib(want["disk_experts"]),
                             gib(want["disk_replicated"] + want["disk_experts"]))
    assert f"{want['params'] / 1e9:,.2f} B parameters, {want['active'] / 1e9:,.2f} B active" in out
    assert "rank r holds experts [r*384//32, (r+1)*384//32) of every MoE layer, at most 12" in out
    assert "FP8 e4m3 linears with ue8m0 scales per 128x128 block" in out and "FP4 e2m1" in out


def test_cli_kept_figures(capsys):
    """Without --dequantize, memory counts quantised weights as the loader keeps them."""
    c = json.loads(PRO.read_text())
    want = hand(c, 32, kept=True)
    rc, out, _ = run_cli(PRO, "--world-size", 32, capsys=capsys, dequantize=False)
    assert rc == 0
    memory = re.search(r"^in memory, as loaded \(bfloat16, quantised kept\)\s+(\S+)\s+(\S+)\s+-\s+(\S+)$", out, re.M)
    assert memory.groups() == (gib(want["memory_replicated"]), gib(want["memory_experts"]),
                               gib(want["memory_replicated"] + want["memory_experts"]))
    assert "--dequantize counts them dequantised to bfloat16" in out
    rc, out, _ = run_cli(PRO, "--context", 10**6, "--gpu-memory", 141, capsys=capsys, dequantize=False)
    assert rc == 0 and "from world size 8 (131.61 GiB per rank)" in out


def test_cli_context_and_gpu_memory(censuses, capsys):
    c = json.loads(FLASH.read_text())
    T, state = 65536, censuses[FLASH].state(65536)

    def per_rank(n: int) -> int:
        return hand(c, n)["memory_replicated"] + hand(c, n)["memory_experts"] + state

    smallest = next(n for n in range(1, 257) if per_rank(n) <= 40 * GiB)
    assert per_rank(smallest - 1) > 40 * GiB
    rc, out, _ = run_cli(FLASH, "--context", T, "--gpu-memory", 40, capsys=capsys)
    assert rc == 0 and f"world size {smallest}:" in out and f"from world size {smallest} (" in out
    assert re.search(rf"^in memory.*\s{re.escape(gib(state))}\s+\S+$", out, re.M)
    rc, out, _ = run_cli(FLASH, "--world-size", 8, "--gpu-memory", 12, capsys=capsys)
    assert rc == 0 and "world size 8:" in out
    assert f"the replicated parameters alone take {gib(hand(c, 1)['memory_replicated'])} GiB" in out
    rc, out, _ = run_cli(FLASH, "--world-size", 8, "--gpu-memory", 14, "--context", 10**6, capsys=capsys)
    assert "the replicated parameters and the attention state alone take" in out
    rc, out, _ = run_cli(FLASH, "--gpu-memory", 14, capsys=capsys)  # replicated fits, one expert per rank does not
    assert rc == 0 and "even one expert per MoE layer per rank (world size 256) takes" in out


def test_cli_tensor_parallel(capsys, tmp_path):
    c = json.loads(PRO.read_text())
    want = hand_tp(c, 32, 8)
    rc, out, _ = run_cli(PRO, "--world-size", 32, "--tensor-parallel", 8, capsys=capsys)
    assert rc == 0
    assert re.search(r"^per rank, GiB\s+replicated\s+heads\s+experts\s+state\s+total$", out, re.M)
    memory = re.search(r"^in memory, as loaded \(bfloat16\)\s+(\S+)\s+(\S+)\s+(\S+)\s+-\s+(\S+)$", out, re.M)
    disk = re.search(r"^read from disk, as stored\s+(\S+)\s+(\S+)\s+(\S+)\s+-\s+(\S+)$", out, re.M)
    parts = ("replicated", "heads", "experts")
    assert memory.groups() == (*(gib(want[f"memory_{k}"]) for k in parts), gib(sum(want[f"memory_{k}"] for k in parts)))
    assert disk.groups() == (*(gib(want[f"disk_{k}"]) for k in parts), gib(sum(want[f"disk_{k}"] for k in parts)))
    assert "rank r holds experts [r*384//32, (r+1)*384//32) of every MoE layer, at most 12" in out
    assert "tensor parallel over groups of 8 consecutive ranks: rank r keeps heads [(r%8)*H/8, (r%8+1)*H/8) and " \
           "their output groups, its part of attn_sink, wo_a.weight, wo_b.weight, wq_b.weight in every attention " \
           "layer" in out
    assert f"split by heads: {want['split_params'] / 1e9:,.2f} B" in out
    rc, out, _ = run_cli(PRO, "--world-size", 32, "--tensor-parallel", 1, capsys=capsys)
    assert rc == 0 and out == run_cli(PRO, "--world-size", 32, capsys=capsys)[1] and "heads" not in out
    rc, out, _ = run_cli(FLASH, "--gpu-memory", 100, "--tensor-parallel", 8, capsys=capsys)  # 7 ranks without
    assert rc == 0 and "world size 8:" in out and "from world size 8 (71.14 GiB per rank)" in out
    rc, out, _ = run_cli(PRO, "--gpu-memory", 141, "--tensor-parallel", 16, capsys=capsys)  # 197.62 GiB at 16
    assert rc == 0 and "world size 32:" in out and "from world size 32 (107.55 GiB per rank)" in out
    rc, out, _ = run_cli(FLASH, "--gpu-memory", 6, "--context", 10**6, "--tensor-parallel", 8, capsys=capsys)
    assert rc == 0 and "world size 256:" in out
    assert "the replicated parameters, a rank's share of the heads (groups of 8) and the attention state alone " \
           "take" in out and "expert and tensor parallelism split only" in out
    rc, out, _ = run_cli(flash_with_experts(tmp_path, 12), "--gpu-memory", 10, "--tensor-parallel", 8, capsys=capsys)
    assert rc == 0 and "even the largest world size divisible by 8 (8, at most 2 experts per MoE layer per rank) " \
                       "takes" in out


@pytest.mark.parametrize("args, message", [
    ([FLASH, "--world-size", 0], "world size must be a positive integer, got 0"),
    ([FLASH, "--world-size", 257], "world size 257 exceeds the 256 routed experts per layer"),
    ([FLASH, "--world-size", 8, "--context", 0], "context must be a positive number of tokens, got 0"),
    ([FLASH, "--gpu-memory", -1], "--gpu-memory must be a positive number of GiB"),
    ([FLASH, "--world-size", 8, "--dtype", "int8"], "dtype 'int8' is not one of bf16, bfloat16"),
    ([FLASH], "give --world-size N, or --gpu-memory GiB"),
    (["./no/such/folder", "--world-size", 2], "no such checkpoint folder or config file"),
    ([FLASH, "--world-size", 16, "--tensor-parallel", 16], "tensor parallelism over 16 ranks needs heads (64) and "
                                                           "o_groups (8) divisible by 16; this model's heads split "
                                                           "over groups of 1, 2, 4, 8 ranks"),
    ([PRO, "--world-size", 24, "--tensor-parallel", 16], "tensor parallelism over groups of 16 ranks needs a world "
                                                         "size divisible by 16, got 24"),
    ([FLASH, "--world-size", 8, "--tensor-parallel", 0], "tensor parallel size must be a positive integer, got 0"),
])
def test_cli_errors(capsys, args, message):
    rc, out, err = run_cli(*args, capsys=capsys)
    assert rc == 2 and out == "" and err.count("\n") == 1 and message in err


def test_folder_without_config_and_dense_model(tmp_path, capsys):
    rc, _, err = run_cli(tmp_path, "--world-size", 2, capsys=capsys)
    assert rc == 2 and "config.json: missing config.json" in err
    llama = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                 num_attention_heads=4, torch_dtype="bfloat16")
    (tmp_path / "config.json").write_text(json.dumps(llama))
    p = plan(tmp_path, 1)
    assert p.params == p.replicated_params and p.moe_layers == 0 and p.memory.experts == 0
    with pytest.raises(ValueError, match="has no routed experts"):
        plan(tmp_path, 2)
    assert plan(tmp_path, 1, tensor_parallel=1) == p
    with pytest.raises(CheckpointError, match="tensor parallelism is not available for 'llama'"):
        plan(tmp_path, 2, tensor_parallel=2)
    rc, _, err = run_cli(tmp_path, "--world-size", 2, "--tensor-parallel", 2, capsys=capsys)
    assert rc == 2 and "tensor parallelism is not available for 'llama' (DeepSeek-V4 attention only)" in err


def test_hub_config_offline(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path), "WORKBENCH_TRUSTED_REPOS": ""}
    out = subprocess.run([sys.executable, "-m", "workbench", "plan", "nobody/no-such-model", "--world-size", "8"],
                         capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 2 and "could not fetch config.json from the hub" in out.stderr
    assert out.stderr.count("\n") == 1
