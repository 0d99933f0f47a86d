"""Triton kernels for the MoE hot path, each beside the plain-PyTorch reference it must reproduce.

Installed as `workbench.kernels`. Importing it never imports triton: every public function runs its Triton
kernel when triton is installed and the tensor is on a CUDA device (or TRITON_INTERPRET=1, the numpy
interpreter, for tests on CPU), and its `reference_*` twin otherwise. `triton_*` forces the kernel. A kernel
that cannot run where it is asked to (no triton, a CPU tensor outside the interpreter, a GPU below compute
capability 8.0) raises `workbench.errors.KernelError` naming the kernel, the device and the backend="torch"
remedy. The kernels compile for sm_80 (A100: FP8 decoded from its bytes), sm_90 (H100/H200) and sm_100;
tests/test_aot.py compiles every launch the dispatchers can make for each, without a GPU.

Routing (semantics of `workbench.routing.select_experts` + `weigh_experts`, as `workbench.models.moe.Router`)::

    ids, weights = route(logits, spec, correction_bias=None, ids_dtype=torch.int64)
    # logits [N, E] -> topk_ids [N, k] (int32 or int64), topk_weights [N, k] fp32

Routed experts (semantics of `workbench.models.moe.Experts` / `MoE.routed` with the SiLU gate; GELU-gated
experts stay on torch)::

    y, hidden, out = fused_experts(x, ids, weights, gate, up, down, *, limit=None, alpha=None,
                                   biases=None, scales=None, block=(128, 128),
                                   want_hidden=False, want_out=False, config=None)
    # x [N, H]; ids / weights [N, k]; gate, up [E, I, H] (or gate [E, 2I, H] fused, gate rows first, up=None);
    # down [E, H, I]; biases = (gate [E, I], up [E, I], down [E, H]). The weight dtype says the format:
    # float8_e4m3fn with scales = fp32 or ue8m0 multipliers (gate, up, down), one per `block` (workbench.quant
    # layout); or FP4: uint8 [E, out, in / 2] (two e2m1 codes a byte, low nibble = even input) with uint8 e8m0
    # exponents [E, out, in / 32] (2^(s - 127) for each 32 inputs of a row; DeepSeek-V4, GPT-OSS MXFP4).
    # y [N, H]; hidden [N, k, I] and out [N, k, H] (unweighted, what `experts.out` shows) only when asked.

The stages, for hooks that replace `experts.hidden` (before the down projection) or `experts.out`::

    alignment = align(ids, experts, block_m)                  # pairs sorted by expert, padded per expert
    hidden = expert_hidden(x, ids, gate, up, limit=..., alpha=..., bias=(gb, ub), scale=(gs, us))  # [N, k, I]
    out = expert_out(hidden, ids, None, down, bias=db, scale=ds)  # [N, k, H] unweighted (weights: weighted)
    y = moe_sum(out, weights)                                 # [N, H]: fp32 sum in slot order, weights applied

Dense projections of FP8 checkpoints::

    y = block_fp8_linear(x, weight, scale, block=(128, 128))  # x [..., in] @ dequant(weight [out, in]).T

Pass `alignment=` and `config=` to the stages to align once. Ids must lie in [0, E). Tensors are token-major
throughout (pair p = token * k + slot), so nothing is permuted back for the hooks.

Launch configs come from a fixed table by pairs per expert (`launch_config`); there is no autotuning.
"""

from .align import Alignment, align, reference_align, triton_align
from .fused_moe import (
    CONFIGS,
    LaunchConfig,
    expert_hidden,
    expert_out,
    fused_experts,
    launch_config,
    moe_sum,
    reference_expert_hidden,
    reference_expert_out,
    reference_moe_sum,
    triton_expert_hidden,
    triton_expert_out,
    triton_moe_sum,
)
from .linear import block_fp8_linear, reference_block_fp8_linear, triton_block_fp8_linear
from .router import reference_route, route, triton_route

__all__ = [
    "CONFIGS", "Alignment", "LaunchConfig", "align", "block_fp8_linear", "expert_hidden", "expert_out",
    "fused_experts", "launch_config", "moe_sum", "reference_align", "reference_block_fp8_linear",
    "reference_expert_hidden", "reference_expert_out", "reference_moe_sum", "reference_route", "route",
    "triton_align", "triton_block_fp8_linear", "triton_expert_hidden", "triton_expert_out", "triton_moe_sum",
    "triton_route",
]
