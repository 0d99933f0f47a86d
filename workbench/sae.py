"""Sparse autoencoders (SAEs): SAELens' on-disk format, splicing into a model's hook points, latent edits, and
reading stored latents back (docs/references.md, "Sparse autoencoders").

- Format: a folder with `cfg.json` (d_in, d_sae, architecture, hook_name, apply_b_dec_to_input,
  normalize_activations, dtype, k for topk...) and `sae_weights.safetensors` (W_enc [d_in, d_sae], b_enc [d_sae],
  W_dec [d_sae, d_in], b_dec [d_in], threshold [d_sae] for jumprelu). Pickled weights are refused, never opened.
- Splice: `splice(model, sae)` runs the SAE at its hook point and declares the point `<hook>.sae.latents`, which
  hooks read (`run_with_cache`) or edit (`set_latents`, `scale_latents`). The error term is kept: the hook
  returns x + decode(edited) - decode(latents), which is decode(edited) + (x - decode(latents)) and exactly x
  (bit for bit) while no latent is edited.
- Hyper-connections (DeepSeek-V4's residual [B, T, hc_mult, H]): an SAE of d_in = H reads every stream on its
  own with one dictionary (latents [B, T, hc_mult, d_sae]), and its edits and error term apply stream by stream;
  one of d_in = hc_mult * H reads the streams concatenated (latents [B, T, d_sae]). No collapse is assumed:
  the streams are what the next block mixes, so both splices are exact.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import xarray as xr
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import check_trusted
from .errors import CheckpointError, HookError
from .hooks import HookContext
from .interventions import Hooks, Tokens, _token_mask, _tokens
from .models.base import CausalLM
from .schema import layer_of, variable_name

CFG_FILE, WEIGHTS_FILE = "cfg.json", "sae_weights.safetensors"
ARCHITECTURES = ("standard", "topk", "jumprelu")
PICKLED = (".pt", ".pth", ".bin", ".pkl", ".ckpt")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
LATENTS = "sae.latents"  # `<hook>.sae.latents`: the point splice declares after its hook
IDS, VALUES = "sae_ids", "sae_values"  # stored variables `<hook kind>_sae_ids` / `_sae_values` (workbench.store)
# the SAEs shipped in data/saes/ (installed as workbench/_data/saes), which load_sae finds by folder name alone
SHIPPED = next((p for p in (Path(__file__).resolve().parent / "_data" / "saes",
                            Path(__file__).resolve().parent.parent / "data" / "saes") if p.is_dir()), None)


class SAE(nn.Module):
    """A sparse autoencoder: latents = act(((x - b_dec) or x) @ W_enc + b_enc), reconstruction = latents @ W_dec +
    b_dec, act being ReLU ("standard"), the top k pre-activations after ReLU ("topk") or ReLU gated at a learned
    per-latent threshold ("jumprelu")."""

    def __init__(self, cfg: Mapping[str, Any]):
        super().__init__()
        self.cfg = _check_cfg(dict(cfg))
        d_in, d_sae, dtype = self.cfg["d_in"], self.cfg["d_sae"], DTYPES[self.cfg["dtype"]]
        self.W_enc = nn.Parameter(torch.zeros(d_in, d_sae, dtype=dtype))
        self.b_enc = nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.W_dec = nn.Parameter(torch.zeros(d_sae, d_in, dtype=dtype))
        self.b_dec = nn.Parameter(torch.zeros(d_in, dtype=dtype))
        if self.architecture == "jumprelu":
            self.threshold = nn.Parameter(torch.zeros(d_sae, dtype=dtype))

    @property
    def d_in(self) -> int:
        return self.cfg["d_in"]

    @property
    def d_sae(self) -> int:
        return self.cfg["d_sae"]

    @property
    def architecture(self) -> str:
        return self.cfg["architecture"]

    @property
    def hook_name(self) -> str | None:
        """The hook point the SAE was trained on (top-level `hook_name`, else SAELens 6's `metadata`)."""
        return self.cfg.get("hook_name") or (self.cfg.get("metadata") or {}).get("hook_name")

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents [..., d_sae] of activations [..., d_in], in the SAE's dtype."""
        x = x.to(self.W_enc.dtype)
        if self.cfg["apply_b_dec_to_input"]:
            x = x - self.b_dec
        pre = x @ self.W_enc + self.b_enc
        if self.architecture == "topk":
            top = pre.topk(self.cfg["k"], dim=-1)
            return torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
        if self.architecture == "jumprelu":
            return pre.relu() * (pre > self.threshold)
        return pre.relu()

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction [..., d_in] of latents [..., d_sae]."""
        return z.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def save(self, folder: str | Path) -> Path:
        """Write the SAE in SAELens' format (cfg.json + sae_weights.safetensors) into `folder`."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous().cpu() for n, p in self.named_parameters()}, folder / WEIGHTS_FILE)
        (folder / CFG_FILE).write_text(json.dumps(self.cfg, indent=2) + "\n")
        return folder


def _check_cfg(cfg: dict[str, Any], file: str | None = None) -> dict[str, Any]:
    """cfg with SAELens' defaults filled in; a field this code cannot honour raises CheckpointError naming it."""
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{field}={cfg.get(field)!r}: {why}", file=file)

    for field in ("d_in", "d_sae"):
        if isinstance(cfg.get(field), bool) or not isinstance(cfg.get(field), int) or cfg[field] < 1:
            raise bad(field, "must be a positive integer")
    cfg.setdefault("architecture", "standard")
    cfg.setdefault("apply_b_dec_to_input", True)
    cfg.setdefault("normalize_activations", "none")
    cfg.setdefault("dtype", "float32")
    cfg["dtype"] = str(cfg["dtype"]).removeprefix("torch.")
    if cfg["architecture"] not in ARCHITECTURES:
        raise bad("architecture", f"supported: {', '.join(ARCHITECTURES)}")
    if cfg["architecture"] == "topk":
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= cfg["d_sae"]:
            raise bad("k", f"a topk SAE needs an integer k in [1, d_sae={cfg['d_sae']}]")
    if cfg["normalize_activations"] != "none":
        raise bad("normalize_activations", "only 'none' is supported (fold a scaling factor into the weights)")
    if cfg["dtype"] not in DTYPES:
        raise bad("dtype", f"supported: {', '.join(DTYPES)}")
    return cfg


# ---------------------------------------------------------------- loading


def load_sae(source: str | Path, *, revision: str | None = None, device: str | torch.device | None = None,
             trusted_repos: Iterable[str] | None = None) -> SAE:
    """An SAE from a local folder (cfg.json + sae_weights.safetensors), a shipped one by name
    ("wb-v4-mini-layers.3.resid_post") or a hub repo, `org/name` or `org/name/sub/folder` (resolved through
    huggingface_hub: its cache, HF_HUB_OFFLINE, `revision`). A hub repo off the allow-list (`trusted_repos`, else
    $WORKBENCH_TRUSTED_REPOS, as for checkpoints) is refused before any download."""
    path = Path(source).expanduser()
    if not path.exists() and SHIPPED is not None and str(source) in {p.name for p in SHIPPED.iterdir()}:
        path = SHIPPED / str(source)
    if path.is_dir():
        if revision is not None:
            raise ValueError(f"revision={revision!r} applies to hub repos, not the local folder {path}")
        return _read(path, device)
    text = str(source)
    parts = text.split("/")
    if path.exists() or text.startswith(("/", ".", "~")) or len(parts) < 2 or not all(parts):
        raise CheckpointError("no such SAE folder (and not a hub repo id org/name[/subfolder])", file=text)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, sub = "/".join(parts[:2]), "/".join(parts[2:])
    check_trusted(repo, trusted_repos)
    prefix = f"{sub}/" if sub else ""
    try:
        root = Path(snapshot_download(repo_id=repo, revision=revision,
                                      allow_patterns=[prefix + CFG_FILE, prefix + "*.safetensors"]))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as e:
        raise CheckpointError(f"could not fetch from the hub: {e}", file=f"{text}@{revision}" if revision else text) from None
    return _read(root / sub, device)


def _read(folder: Path, device: str | torch.device | None) -> SAE:
    cfg_file, weights = folder / CFG_FILE, folder / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLED)
        if pickled:
            raise CheckpointError(f"pickled weights are never loaded (arbitrary code on unpickling); convert "
                                  f"them to {WEIGHTS_FILE}", file=str(folder / pickled[0]))
        raise CheckpointError(f"no {WEIGHTS_FILE} here", file=str(folder))
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable SAE config ({e})", file=str(cfg_file)) from None
    if not isinstance(cfg, dict):
        raise CheckpointError("the SAE config is not a JSON object", file=str(cfg_file))
    sae = SAE(_check_cfg(cfg, str(cfg_file)))
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"unreadable safetensors file ({e})", file=str(weights)) from None
    want = dict(sae.named_parameters())
    extra = sorted(set(tensors) - set(want))
    if extra:
        raise CheckpointError(f"unexpected tensor for a {sae.architecture} SAE (it has {', '.join(want)})",
                              file=str(weights), tensor=extra[0])
    for name, p in want.items():
        if name not in tensors:
            raise CheckpointError("missing tensor", file=str(weights), tensor=name)
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise CheckpointError(f"shape {list(tensors[name].shape)}, expected {list(p.shape)} (d_in={sae.d_in}, "
                                  f"d_sae={sae.d_sae})", file=str(weights), tensor=name)
        if not tensors[name].is_floating_point():
            raise CheckpointError(f"dtype {tensors[name].dtype} is not floating point", file=str(weights), tensor=name)
        p.data.copy_(tensors[name])
    sae.source = str(folder)
    return sae.to(device or "cpu").eval().requires_grad_(False)


# ---------------------------------------------------------------- streams


def fits(sae: SAE, x: torch.Tensor, where: str) -> bool:
    """True where `sae` reads x's last axis (one stream at a time); False where it reads the last two flattened
    (hyper-connection streams concatenated). Anything else raises HookError naming `where`."""
    if x.shape[-1] == sae.d_in:
        return True
    if x.dim() >= 4 and x.shape[-2] * x.shape[-1] == sae.d_in:
        return False
    raise HookError(f"an SAE of d_in={sae.d_in} does not fit {where!r}, whose per-token shape is "
                    f"{tuple(x.shape[2:])} (d_in must be its hidden size, or streams x hidden)")


def latents(sae: SAE, x: torch.Tensor, where: str = "the activations") -> torch.Tensor:
    """`sae.encode` of activations [B, T, ...] shaped as the module docstring says: [B, T, (hc,) d_sae]."""
    return sae.encode(x if fits(sae, x, where) else x.flatten(-2))


def sparse(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents [..., d_sae] as their k largest: ids int32 (-1 for an inactive slot) and values float32 (0 there),
    both [..., k], by decreasing value; exact where at most k latents are active."""
    top = z.float().topk(min(k, z.shape[-1]), dim=-1)
    values, ids = top.values, top.indices.int()
    if values.shape[-1] < k:
        pad = (*values.shape[:-1], k - values.shape[-1])
        values, ids = torch.cat([values, values.new_zeros(pad)], -1), torch.cat([ids, ids.new_full(pad, -1)], -1)
    active = values > 0
    return torch.where(active, ids, -1), torch.where(active, values, 0.0)


def dense(ids: np.ndarray | torch.Tensor, values: np.ndarray | torch.Tensor, d_sae: int) -> torch.Tensor:
    """The latents [..., d_sae] that sparse (stored) ids and values [..., k] stand for."""
    ids, values = torch.as_tensor(np.asarray(ids)).long(), torch.as_tensor(np.asarray(values)).float()
    out = torch.zeros(*ids.shape[:-1], d_sae + 1)
    return out.scatter_(-1, torch.where(ids >= 0, ids, d_sae), torch.nan_to_num(values))[..., :d_sae]


# ---------------------------------------------------------------- splicing and edits


def splice(model: CausalLM, sae: SAE, name: str | None = None, *, error: bool = True) -> Hooks:
    """Hooks running `sae` at hook point `name` (default: its cfg's hook_name). With `error` the error term is
    kept, so the forward changes only where hooks on `<name>.sae.latents` edit latents; without it the point's
    tensor is replaced by the reconstruction (the SAE's own loss of fidelity)."""
    name = name or sae.hook_name
    if not name or name not in model.hook_names:
        raise HookError(f"splice: {name!r} is not a hook point of this model; pass name= (see model.hook_names)")
    registry = model._hooks  # the SAE declares its latents point where they are made, as a module would
    point_name = f"{name}.{LATENTS}"
    point = registry.points.get(point_name) or registry.point(point_name)
    registry.sort()

    def fn(x: torch.Tensor, ctx: HookContext) -> torch.Tensor | None:
        per_stream = fits(sae, x, ctx.name)
        z = sae.encode(x if per_stream else x.flatten(-2))
        edited = point(z.clone()) if point.active else z
        if error and edited is z:
            return None
        delta = sae.decode(edited) - (sae.decode(z) if error else 0)
        delta = delta if per_stream else delta.unflatten(-1, x.shape[-2:])
        return (x.to(delta.dtype) + delta if error else delta).to(x.dtype)

    return [(name, fn)]


def _edit(what: str, hook: str | SAE, ids: Iterable[int], tokens: Tokens, op) -> Hooks:
    name = hook.hook_name if isinstance(hook, SAE) else hook
    latent_ids = [int(i) for i in ids]
    if not name or any(i < 0 for i in latent_ids):
        raise ValueError(f"{what}: needs a hook name (or an SAE with a hook_name) and latent ids >= 0, got "
                         f"{name!r} and {latent_ids}")
    tokens = _tokens(tokens, what)

    def fn(z: torch.Tensor, ctx: HookContext) -> torch.Tensor:
        if max(latent_ids, default=-1) >= z.shape[-1]:
            raise HookError(f"{what} on {ctx.name!r}: latent {max(latent_ids)} does not exist (d_sae={z.shape[-1]})")
        cols = torch.zeros(z.shape[-1], dtype=torch.bool, device=z.device)
        cols[latent_ids] = True
        sel = _token_mask(tokens, ctx).view(1, -1, *[1] * (z.dim() - 2)) & cols
        return torch.where(sel, op(z), z)

    return [(f"{name}.{LATENTS}", fn)]


def set_latents(hook: str | SAE, ids: Iterable[int], value: float, tokens: Tokens = None) -> Hooks:
    """Set latents `ids` of the SAE spliced at `hook` to `value` at the selected tokens (every stream)."""
    if not math.isfinite(value):
        raise ValueError(f"set_latents: value must be finite, got {value}")
    return _edit("set_latents", hook, ids, tokens, lambda z: torch.full_like(z, value))


def scale_latents(hook: str | SAE, ids: Iterable[int], factor: float, tokens: Tokens = None) -> Hooks:
    """Multiply latents `ids` of the SAE spliced at `hook` by `factor` at the selected tokens (every stream)."""
    if not math.isfinite(factor):
        raise ValueError(f"scale_latents: factor must be finite, got {factor}")
    return _edit("scale_latents", hook, ids, tokens, lambda z: z * factor)


# ---------------------------------------------------------------- stored latents


def stored(ds: xr.Dataset, hook: str) -> tuple[xr.DataArray, xr.DataArray]:
    """The (ids, values) a trace with `saes=` stored for the SAE at `hook`: [token, (hc,) sae_k]."""
    var = variable_name(hook)
    names = (f"{var}_{IDS}", f"{var}_{VALUES}")
    if names[0] not in ds:
        have = sorted(ds.attrs.get("saes") or {})
        raise KeyError(f"no SAE latents stored for {hook!r} (variable {names[0]}); SAEs stored: {have or 'none'}")
    layer = layer_of(hook)
    return tuple(ds[n] if layer is None else ds[n].sel(layer=layer) for n in names)


def top_latents(ds: xr.Dataset, hook: str, token: int) -> xr.Dataset:
    """The latents active at absolute position `token`, by decreasing value: dims (rank,) or (hc, rank) (latent
    -1 and value 0 past a stream's last active one)."""
    ids, values = (a.sel(token=token).load().rename(sae_k="rank") for a in stored(ds, hook))
    active = (ids >= 0).any([d for d in ids.dims if d != "rank"]) if ids.ndim > 1 else ids >= 0
    return xr.Dataset({"latent": ids, "value": values}).isel(rank=active.values)


def top_contexts(ds: xr.Dataset, hook: str, latent: int, n: int = 10, *, width: int = 16) -> xr.Dataset:
    """The `n` tokens of a store (`wb.open_store`) where `latent` of the SAE at `hook` is largest (the largest
    stream's value under hyper-connections): dims (rank,) with `token`, `value`, `stream` (or -1), and
    `context(rank, offset)`, the token ids at positions token-width+1 .. token (-1 before the start)."""
    ids, values = stored(ds, hook)
    act = values.where(ids == latent, 0.0).max("sae_k").values  # [token, (hc)]
    act = act.reshape(len(act), -1)
    best, stream = act.max(1), act.argmax(1) if act.shape[1] > 1 else np.full(len(act), -1)
    order = np.argsort(-best, kind="stable")[:n]
    order = order[best[order] > 0]
    positions = ds.token.values[order]
    input_ids = ds.input_ids.values
    offsets = np.arange(-width + 1, 1)
    at = order[:, None] + offsets
    context = np.where(at >= 0, input_ids[np.clip(at, 0, None)], -1)
    return xr.Dataset({"token": ("rank", positions), "value": ("rank", best[order]),
                       "stream": ("rank", stream[order]), "context": (("rank", "offset"), context)},
                      coords={"offset": offsets}, attrs={"hook": hook, "latent": int(latent)})
