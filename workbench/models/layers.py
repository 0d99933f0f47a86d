"""Layers shared by the model families: RMSNorm, activations, rotary embeddings, causal attention over a
chunk's state, grouped-query attention, the gated MLP, and the linear layers (streamed at a few rows, or held as
FP8 codes)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module

from .. import quant
from ..config import Config
from ..errors import CheckpointError
from ..hooks import HookRegistry
from . import stream


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, scaled by a learned weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:  # one op; the same sums as below
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


ACTIVATIONS = {"silu": F.silu, "swish": F.silu, "gelu": F.gelu}


def activation(cfg: Config, key: str = "hidden_act") -> Any:
    """The activation function a config names."""
    return ACTIVATIONS[cfg.choice(key, tuple(ACTIVATIONS), "silu")]


def recording(*tensors: torch.Tensor) -> bool:
    """Whether autograd records an op on `tensors`: the Triton kernels have no backward, so their callers take
    the torch path then (the `grouped` backend's ops, the dequantised weight)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def few_rows(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a linear layer's input x streams (`stream.linear`): at most `stream.ROWS` rows of a kind the kernel
    takes, and autograd recording neither x nor the weight (the kernel has no backward)."""
    return x.numel() <= stream.ROWS * x.shape[-1] and stream.streams(x, weight) and not recording(x, weight)


class Linear(nn.Linear):
    """nn.Linear that runs a few fp32 rows on the CPU through `stream.linear` (each weight row read once at memory
    speed; a BLAS matmul of so few rows reads small weights at a fraction of it), and everything else as usual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if few_rows(x, weight):
            return stream.linear(x, weight, self.bias)
        return F.linear(x, weight, self.bias)


def project(x: torch.Tensor, *linears: nn.Module) -> tuple[torch.Tensor, ...]:
    """Each of `linears` applied to x (projections of one input: gate and up, q, k and v). A few fp32 rows through
    plain `Linear`s go in one streaming pass (`stream.linears`: each output as its own call gives it, one call's
    fixed cost); any other module, or one with torch module hooks or a replaced forward, is called as usual."""
    if len(linears) > 1 and all(_plain(m, x) for m in linears):
        outs = stream.linears(x, tuple(m.weight for m in linears))
        return tuple(o if m.bias is None else o + m.bias for o, m in zip(outs, linears))
    return tuple(m(x) for m in linears)


def _plain(m: nn.Module, x: torch.Tensor) -> bool:
    """Whether calling `Linear` m on x would stream, with nothing (a torch hook, a patched forward) to see it."""
    return (type(m) is Linear and few_rows(x, m.weight) and not m._forward_hooks and not m._forward_pre_hooks
            and "forward" not in m.__dict__ and not _global_hooks())


def _global_hooks() -> bool:
    """Whether torch module hooks registered for every module are present."""
    return bool(torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)


class BlockFP8Linear(nn.Module):
    """A linear layer held as published: FP8 e4m3 codes `weight` [out, in] with one fp32 multiplier per `block`
    in `weight_scale` (docs/references.md, "Quantised formats"). `workbench.load` puts it where a checkpoint
    stores an nn.Linear's weight in FP8, under the same name. On CUDA the kernel multiplies the codes directly;
    elsewhere (and under autograd) the weight is dequantised to the activation dtype for each call."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int]):
        super().__init__()
        shape = linear.weight.shape
        self.in_features, self.out_features, self.block = shape[1], shape[0], block
        self.weight = nn.Parameter(torch.empty(shape, dtype=quant.FP8, device=linear.weight.device),
                                   requires_grad=False)
        scale = torch.empty(quant.fp8_scale_shape(shape, block), dtype=torch.float32, device=linear.weight.device)
        self.weight_scale = nn.Parameter(scale, requires_grad=False)
        self.bias = linear.bias

    def dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        """The weight [out, in] in `dtype` (a new tensor)."""
        out = torch.empty(self.weight.shape, dtype=dtype, device=self.weight.device)
        return quant.dequantize_into(out, self.weight, self.weight_scale, self.block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if few_rows(x, self.weight):
            return stream.linear(x, self.weight, self.bias, self.weight_scale, self.block)  # as `Linear` streams
        if x.is_cuda and not recording(x):
            from ..kernels import block_fp8_linear

            y = block_fp8_linear(x.reshape(-1, x.shape[-1]), self.weight, self.weight_scale, self.block)
            y = y.view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.dequantized(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


def dense_weight(linear: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A linear layer's weight as floats for code that uses it beyond `linear(x)`: an nn.Linear's own parameter,
    a BlockFP8Linear's dequantised to `dtype`."""
    return linear.dequantized(dtype) if isinstance(linear, BlockFP8Linear) else linear.weight


# ---------------------------------------------------------------- rotary


def rope_frequencies(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Inverse frequencies for `dim` rotary dims and the cos/sin scale ("attention factor") of the rope type."""
    base = float(params["rope_theta"])
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    kind = params["rope_type"]
    if kind == "default":
        return inv, 1.0
    if kind == "linear":
        return inv / float(params["factor"]), 1.0
    if kind == "llama3":
        factor, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old / wavelen - lo) / (hi - lo)
        mixed = (1 - smooth) * inv / factor + smooth * inv
        out = torch.where(wavelen > old / lo, inv / factor, inv)
        return torch.where((wavelen >= old / hi) & (wavelen <= old / lo), mixed, out), 1.0
    if kind == "yarn":
        return _yarn(inv, dim, base, params)
    raise CheckpointError(f"rope type {kind!r} is not supported (default, linear, llama3, yarn)")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction: 0.1 * mscale * ln(scale) + 1 for scale > 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(inv: torch.Tensor, dim: int, base: float, p: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv:2309.00071): interpolate low frequencies, keep high ones, blend with a linear ramp."""
    factor = float(p["factor"])
    orig = float(p["original_max_position_embeddings"])
    if p.get("attention_factor") is not None:
        attn = float(p["attention_factor"])
    elif p.get("mscale") and p.get("mscale_all_dim"):
        attn = yarn_mscale(factor, p["mscale"]) / yarn_mscale(factor, p["mscale_all_dim"])
    else:
        attn = yarn_mscale(factor)
    fast, slow = float(p.get("beta_fast") or 32), float(p.get("beta_slow") or 1)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(fast), correction_dim(slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low)).clamp(0, 1)
    return inv / factor * ramp + inv * (1 - ramp), attn


MEMO_TOKENS = 4096  # `Rotary.cos_sin` keeps its last tables up to this many positions (larger ones: not held)


class Rotary:
    """Rotary position embedding over the first `dim` channels of each head.

    `interleaved=True` rotates adjacent pairs (DeepSeek's MLA layout); otherwise the two halves are
    paired (the rotate-half layout of Llama and most HF checkpoints).
    """

    def __init__(self, dim: int, params: dict[str, Any], interleaved: bool = False):
        self.dim, self.interleaved = dim, interleaved
        self.inv_freq, self.scale = rope_frequencies(dim, params)
        self._last: tuple | None = None  # (positions, their version, dtype, tables) of the last call

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin tables [T, dim/2] for absolute positions. A rotary shared by the layers (MLA's) gets the
        same positions tensor from each layer of a forward: for up to MEMO_TOKENS positions (where making the tables
        costs as much as using them) they are made once, unless the positions were edited in place."""
        small = positions.numel() <= MEMO_TOKENS and not positions.is_inference()  # inference tensors: no version
        version = positions._version if small else None
        last = self._last
        if version is not None and last is not None and last[0] is positions and last[1:3] == (version, dtype):
            return last[3]
        angles = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        tables = (angles.cos() * self.scale).to(dtype), (angles.sin() * self.scale).to(dtype)
        self._last = None if version is None else (positions, version, dtype, tables)
        return tables

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [B, heads, T, D]; channels past `dim` pass through unchanged."""
        few = x.shape[-2] <= stream.ROWS and cos.shape == sin.shape == (x.shape[-2], self.dim // 2)
        if few and stream.streams(x, cos) and cos.dtype == sin.dtype == x.dtype and not recording(x):
            return stream.rope(x, cos, sin, self.dim, self.interleaved)  # a few fp32 tokens: one call, same bits
        rot, rest = x[..., : self.dim], x[..., self.dim :]
        if self.interleaved:
            a, b = rot[..., 0::2], rot[..., 1::2]
            rot = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
        else:
            a, b = rot.chunk(2, dim=-1)
            rot = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
        return torch.cat((rot, rest), dim=-1) if rest.shape[-1] else rot


# ---------------------------------------------------------------- attention


def remember(state: dict[str, torch.Tensor] | None, window: int | None, positions: torch.Tensor,
             **new: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Append this chunk's keys/values (tensors [B, heads, T, *]) to a layer's state and return all of them.

    The state then keeps only what later chunks can attend to: the last `window - 1` positions for a
    sliding layer, everything otherwise. With no state (a whole-sequence forward) the chunk is returned.
    """
    if state is None:
        return (positions, *new.values())
    full = {"pos": torch.cat((state["pos"], positions)) if state else positions}
    for name, t in new.items():
        full[name] = torch.cat((state[name], t), dim=2) if state else t
    keep = full["pos"] > positions[-1] + 1 - window if window is not None else slice(None)
    state.update(pos=full["pos"][keep], **{n: full[n][:, :, keep] for n in new})
    return tuple(full.values())


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention: q [B,Hq,T,D], k/v [B,Hkv,S,*]; GQA by head groups.

    `window` keeps keys with q_pos - k_pos < window; `sinks` [Hq] adds one learned logit per head to the
    softmax denominator (it absorbs probability mass but contributes no value).
    """
    if sinks is None and q.shape[-1] != v.shape[-1]:
        # MLA's value heads are narrower than its query/key heads; torch's fused CPU kernel needs one head size:
        # zero padding changes no dot product and no value, and avoids materialising the [T, S] scores
        d = max(q.shape[-1], v.shape[-1])
        pad = [t if t.shape[-1] == d else F.pad(t, (0, d - t.shape[-1])) for t in (q, k, v)]
        return attend(*pad, q_pos, k_pos, scale, window)[..., : v.shape[-1]]
    gqa = q.shape[1] != k.shape[1]
    if sinks is None and window is None and torch.equal(q_pos, k_pos):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    allowed = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        allowed &= k_pos[None, :] > q_pos[:, None] - window
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale, enable_gqa=gqa)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)).float() * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


class GroupedQueryAttention(nn.Module):
    """Grouped-query attention with optional QKV/O bias, q/k RMSNorm, sliding window and attention sinks.

    `qk_norm`: None, "head" (per-head RMSNorm over head_dim, Qwen3) or "full" (over the whole
    projection, OLMoE). `clip` clamps q, k (after a "full" norm) and v to [-clip, clip] (OLMoE's clip_qkv).
    """

    def __init__(
        self,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        rotary: Rotary,
        *,
        qkv_bias: bool = False,
        o_bias: bool = False,
        qk_norm: str | None = None,
        eps: float = 1e-6,
        window: int | None = None,
        sinks: bool = False,
        clip: float | None = None,
    ):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.rotary, self.window, self.qk_norm, self.clip = rotary, window, qk_norm, clip
        self.q_proj = Linear(hidden, heads * head_dim, bias=qkv_bias)
        self.k_proj = Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = Linear(hidden, kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = Linear(heads * head_dim, hidden, bias=o_bias)
        if qk_norm == "head":
            self.q_norm, self.k_norm = RMSNorm(head_dim, eps), RMSNorm(head_dim, eps)
        elif qk_norm == "full":
            self.q_norm, self.k_norm = RMSNorm(heads * head_dim, eps), RMSNorm(kv_heads * head_dim, eps)
        self.sinks = nn.Parameter(torch.empty(heads)) if sinks else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip is not None:
            q, k, v = (t.clamp(-self.clip, self.clip) for t in (q, k, v))
        q = q.view(B, T, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary.cos_sin(positions, q.dtype)
        q, k = self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin)
        k_pos, k, v = remember(state, self.window, positions, k=k, v=v)
        out = attend(q, k, v, positions, k_pos, self.head_dim**-0.5, self.window, self.sinks)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def gqa(cfg: Config, **options: Any) -> GroupedQueryAttention:
    """Attention sized by the standard HF fields (hidden_size, attention/KV heads, head_dim, rope)."""
    hidden, heads = cfg.int("hidden_size"), cfg.int("num_attention_heads")
    head_dim = cfg.int("head_dim", hidden // heads)
    kv_heads = cfg.int("num_key_value_heads", heads)
    return GroupedQueryAttention(hidden, heads, kv_heads, head_dim, Rotary(head_dim, cfg.rope()), **options)


# ---------------------------------------------------------------- feed-forward


class MLP(nn.Module):
    """Dense gated MLP: down(act(gate(x)) * up(x)); `limit` clamps gate above and up both sides (DeepSeek-V4)."""

    def __init__(self, hidden: int, inter: int, act: Any = F.silu, limit: float | None = None):
        super().__init__()
        self.act, self.limit = act, limit
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        if self.limit is not None:
            gate, up = gate.clamp(max=self.limit), up.clamp(-self.limit, self.limit)
        return self.down_proj(self.act(gate) * up)


class DenseFFN(MLP):
    """A dense MLP block at a layer position, with its `mlp.out` hook."""

    def __init__(self, hidden: int, inter: int, act: Any, hooks: HookRegistry, prefix: str):
        super().__init__(hidden, inter, act)
        self.hp_out = hooks.point(f"{prefix}.mlp.out")

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Same call as MoE; a dense block does not look at the token ids."""
        return self.hp_out(super().forward(x))
