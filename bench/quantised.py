"""CPU forward with FP8 weights kept as stored against the same checkpoint dequantised on load, in one run.

Builds bench/forward.py's ~150M-parameter DeepSeek-V3-style model (48 routed experts, top-4), writes it in the
published FP8 layout (e4m3 codes with one fp32 `weight_scale_inv` per 128 x 128 block for every linear but the
embedding, head and routers), loads it twice with the `grouped` backend in fp32 (`dequantize=False`, the default,
and `dequantize=True`) and times one --tokens forward of each, best of --repeat, in alternating rounds. Prints
tokens/s of both and their ratio, and the bytes each model holds (parameters, buffers and, kept, the per-module
buffers an expert is dequantised into) and their ratio. Goal: kept at most 1.5x slower, at most 55% of the memory.

    .venv/bin/python bench/quantised.py [--tokens 2048] [--repeat 5]

Needs the dev extras (transformers, to build the random model).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import workbench as wb
from forward import CONFIGS, best_times
from workbench import quant
from workbench.models.moe import Experts

BLOCK = (128, 128)
NOT_FP8 = ("embed_tokens", "lm_head", "mlp.gate.weight")  # published V3 keeps these (and every 1-D tensor) in bf16


def write_fp8(folder: Path) -> None:
    """The random V3-style checkpoint bench/forward.py times, in FP8 layout."""
    torch.manual_seed(0)
    with torch.no_grad():
        hf = tf.AutoModelForCausalLM.from_config(CONFIGS["deepseek_v3"](), dtype=torch.float32).eval()
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # spread routing over the experts
        hf.save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2 and not any(s in name for s in NOT_FP8):
            out[name], out[name + "_scale_inv"] = quant.quantise_fp8(t, BLOCK)
        else:
            out[name] = t
    save_file(out, str(folder / "model.safetensors"))
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": list(BLOCK),
                                  "activation_scheme": "dynamic"}
    (folder / "config.json").write_text(json.dumps(cfg))


def held_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's parameters and buffers, plus the buffers its quantised experts dequantise into."""
    tensors = [*model.parameters(), *model.buffers()]
    tensors += [m._buffer for m in model.modules() if isinstance(m, Experts) and m._buffer is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        write_fp8(Path(tmp))
        models = {"kept (FP8 codes)": wb.load(tmp, dtype=torch.float32, backend="grouped"),
                  "dequantised on load": wb.load(tmp, dtype=torch.float32, backend="grouped", dequantize=True)}
    ids = torch.randint(0, 8192, (1, args.tokens), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = {k: m(ids) for k, m in models.items()}
        times = best_times({k: lambda m=m: m(ids) for k, m in models.items()}, args.repeat)
    kept, deq = models
    assert torch.equal(logits[kept], logits[deq]), "kept and dequantised forwards differ"
    size = {k: held_bytes(m) for k, m in models.items()}
    params = sum(p.numel() for p in models[deq].parameters())
    print(f"DeepSeek-V3-style, {params / 1e6:.1f}M params, FP8 {BLOCK[0]}x{BLOCK[1]} blocks, {args.tokens} tokens, "
          f"fp32, grouped backend, {torch.get_num_threads()} threads, best of {args.repeat} (logits identical)")
    print(f"{'model':24s} {'tokens/s':>9s} {'MiB held':>9s}")
    for k in models:
        print(f"{k:24s} {args.tokens / times[k]:9.0f} {size[k] / 2**20:9.1f}")
    print(f"kept / dequantised: time {times[kept] / times[deq]:.2f}x (goal <= 1.5x), memory "
          f"{size[kept] / size[deq]:.1%} (goal <= 55%)")


if __name__ == "__main__":
    main()
