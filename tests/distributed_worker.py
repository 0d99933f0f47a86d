"""What tests/test_distributed.py runs on every rank under torchrun (and alone, for the reference): load a
checkpoint, run hooked, plain, chunked and hook-edited forwards and a trace, and save what this rank saw.

usage: torchrun --nproc-per-node N tests/distributed_worker.py CHECKPOINT OUT_DIR LENGTH [--mismatch-hooks]
                                                           [--tensor-parallel T] [--backend B] [--dtype D]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

import workbench as wb
from workbench import distributed
from workbench.models.base import State

NAMES = ["layers.*.router.*", "layers.*.experts.*", "layers.*.shared.out", "layers.*.moe.out", "logits"]


def forced(x: torch.Tensor, ctx) -> torch.Tensor:
    """Send every token's first slot to the last expert (a hook edit every rank must apply alike)."""
    x = x.clone()
    x[..., 0] = torch.where(x[..., 1] == 5, 4, 5)
    return x


def run(model, out: Path, length: int, rank: int) -> dict[str, torch.Tensor]:
    """Every forward the parity test compares, plus a trace written to out/store.zarr."""
    ids = torch.randint(0, model.vocab_size, (2, length), generator=torch.Generator().manual_seed(1))
    logits, cache = model.run_with_cache(ids, names=NAMES)
    got = {f"cache.{name}": t for name, t in cache.items()}
    got["logits"] = logits
    with torch.no_grad():
        got["plain"] = model(ids)
        state = State()
        got["chunked"] = torch.cat([model(ids[:, a:a + 5], cache=state) for a in range(0, length, 5)], dim=1)
        moe_layer = next(n.split(".")[1] for n in model.hook_names if n.endswith("router.topk_ids"))
        with model.hooks({f"layers.{moe_layer}.router.topk_ids": forced}):
            got["forced"] = model(ids)
    model.trace(ids[0], out / "store.zarr", names=["layers.*.experts.out", "layers.*.resid_post"], chunk_tokens=6,
                progress=False)
    return {k: v.contiguous() for k, v in got.items()}


def count_backends() -> dict[str, int]:
    """Count calls of each routed-experts backend (MoE.loop, .grouped, .fused: "torch", "grouped", "triton") and of
    the Triton gate/up kernel, from now on in this process."""
    from workbench import kernels
    from workbench.models.moe import MoE

    calls = {"torch": 0, "grouped": 0, "triton": 0, "triton kernel": 0}

    def count(owner, name: str, key: str) -> None:
        fn = getattr(owner, name)

        def counted(*args, **kwargs):
            calls[key] += 1
            return fn(*args, **kwargs)

        setattr(owner, name, counted)

    for key, name in (("torch", "loop"), ("grouped", "grouped"), ("triton", "fused")):
        count(MoE, name, key)
    count(kernels.fused_moe, "triton_expert_hidden", "triton kernel")
    return calls


def main() -> None:
    folder, out, length = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    rank, world = distributed.init()
    tp = int(sys.argv[sys.argv.index("--tensor-parallel") + 1]) if "--tensor-parallel" in sys.argv else 1
    backend = sys.argv[sys.argv.index("--backend") + 1] if "--backend" in sys.argv else "auto"
    dtype = getattr(torch, sys.argv[sys.argv.index("--dtype") + 1]) if "--dtype" in sys.argv else torch.float32
    calls = count_backends()
    model = wb.load(folder, dtype=dtype, tensor_parallel=tp, backend=backend)
    if "--mismatch-hooks" in sys.argv:
        with model.hooks({"logits": lambda x, ctx: None} if rank == 1 else {}):
            model(torch.zeros(1, 3, dtype=torch.long))
    got = run(model, out, length, rank)
    save_file(got, str(out / f"rank{rank}.safetensors"))
    held = {name: p.shape[0] for name, p in model.named_parameters() if name.endswith("experts.down_proj")}
    heads = {name: p.shape[0] for name, p in model.named_parameters() if name.endswith("attn_sink")}
    report = {**model.load_report, "experts_held": held, "heads": heads, "backend": model.backend,
              "backend_calls": calls}
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    distributed.shutdown()


if __name__ == "__main__":
    main()
    distributed.leave(0)  # no interpreter finalization after a complete run, as `python -m workbench` under torchrun
