"""What a store holds and how it lies on disk (docs/architecture.md, "Store schema"); its variables, dims, dtypes
and fill values are `workbench.schema`'s.

- Each variable's `hook` attr names its source. Tokens outside `windows` read as the fill value and, like the
  layers a variable does not cover, take no space on disk.
- Root attrs: provenance (source, revision, commit, sha256 of every weight file, config hash, versions, seed,
  chunking, names), the progress marker `committed_tokens`, `complete`, and the last run's `summary`.
- SAE latents (`trace(..., saes={hook: sae}, sae_k=k)`): the SAE at `layers.{i}.x.y` becomes the pseudo hooks
  `layers.{i}.x.y.sae_ids` / `.sae_values`, so variables `x_y_sae_ids` (int32, -1 for an inactive slot) and
  `x_y_sae_values` (float32) [layer, token, (hc,) sae_k]: each token's k largest latents (`workbench.sae.sparse`);
  root attr `saes` holds each SAE's cfg, weights digest and k.
- Chunks: one layer by up to `chunk_tokens` tokens (fewer where a row is wide, about 1 MiB uncompressed),
  compressed with blosc zstd over byte-shuffled values, then checksummed (crc32c, `integrity.CODECS`): one write
  per trace chunk, cheap reads of a token range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import StoreError
from ..models.base import CausalLM
from ..sae import IDS, SAE, VALUES, latents
from ..schema import (DTYPES, ROUTER_LOGITS, ROUTER_TOPK_IDS, ROUTER_TOPK_WEIGHTS, ROUTING_HOOKS, TOPK_IDS, Variable,
                      hook_kind, layer_of, layers_of, variables)

CHUNK_BYTES = 1 << 20  # target uncompressed bytes of one stored chunk


@dataclass
class StoredVariable(Variable):
    """A variable as stored: its chunk shape and the token ranges it records."""

    chunks: tuple[int, ...]
    windows: list[tuple[int, int]] | None  # token ranges recorded; None: every token

    def spans(self, start: int, stop: int) -> list[tuple[int, int]]:
        """The token ranges of [start, stop) this variable records."""
        if self.windows is None:
            return [(start, stop)]
        return [(max(a, start), min(b, stop)) for a, b in self.windows if a < stop and b > start]


@dataclass
class Layout:
    """What a trace records: the layer coordinate and the variables, routing first."""

    layers: list[int]
    routed: list[int]
    k: int
    experts: int | None
    chunk_tokens: int  # tokens per forward chunk (and per commit)
    token_chunk: int  # stored chunk length of `input_ids` and `token`
    variables: list[StoredVariable]
    saes: dict[str, SAE] = field(default_factory=dict)  # hook name -> SAE whose latents are stored
    sae_k: int = 32


def _rows(row_bytes: int, chunk_tokens: int) -> int:
    """Tokens per stored chunk: a power of two near CHUNK_BYTES uncompressed, at most one trace chunk."""
    return min(chunk_tokens, 1 << max(0, (CHUNK_BYTES // max(row_bytes, 1)).bit_length() - 1))


def lay_out(model: CausalLM, ids: np.ndarray, chosen: list[str], windows: list[tuple[int, int]] | None,
            chunk_tokens: int, tokens: int | None = None, saes: dict[str, SAE] | None = None,
            sae_k: int = 32) -> Layout:
    """Lay out the store for `tokens` tokens (default: `ids`; a generation trace's prompt + new tokens); one
    forward over the first token tells every hook's trailing shape and dtype."""
    saes = saes or {}
    hook_names = model.hook_names
    routing = {kind: [n for n in hook_names if hook_kind(n) == kind] for kind in ROUTING_HOOKS}
    routed = [layer_of(n) for n in routing[ROUTER_TOPK_IDS]]
    logits = [f"layers.{i}.{ROUTER_LOGITS}" for i in routed if f"layers.{i}.{ROUTER_LOGITS}" in hook_names]
    recorded = [*routing[ROUTER_TOPK_IDS], *routing[ROUTER_TOPK_WEIGHTS], *chosen]
    probe = [*routing[ROUTER_TOPK_IDS], *routing[ROUTER_TOPK_WEIGHTS], *logits, *chosen, *saes]
    seen = model.run_with_cache(torch.as_tensor(ids[:1])[None], names=probe)[1] if probe else {}
    silent = [n for n in probe if n not in seen]
    if silent:
        raise StoreError(f"hook points {silent} did not fire in a forward pass; they cannot be traced")
    ks = {seen[name].shape[-1] for name in routing[ROUTER_TOPK_IDS]}
    if len(ks) > 1:
        raise StoreError(f"routed layers select different numbers of experts ({sorted(ks)}); not supported")
    k = ks.pop() if ks else 0
    experts = seen[logits[0]].shape[-1] if logits else None
    if experts is not None and experts > np.iinfo(DTYPES[TOPK_IDS]).max:
        raise StoreError(f"{experts} experts do not fit the {DTYPES[TOPK_IDS]} {TOPK_IDS}")
    shapes = {h: (tuple(seen[h].shape[2:]), seen[h].dtype) for h in recorded}
    for hook, sae in saes.items():  # [B, T, (hc,) d_sae] latents stored as [.., (hc,) sae_k]
        lead = tuple(latents(sae, seen[hook].float(), hook).shape[2:-1])
        shapes[f"{hook}.{IDS}"] = ((*lead, sae_k), torch.int32)
        shapes[f"{hook}.{VALUES}"] = ((*lead, sae_k), torch.float32)
    recorded += [f"{hook}.{part}" for hook in saes for part in (IDS, VALUES)]
    laid = variables(shapes, len(ids) if tokens is None else tokens)
    out = []
    for v in laid:
        row_bytes = int(np.prod(v.trailing, dtype=np.int64)) * v.dtype.itemsize
        if v.kind in ROUTING_HOOKS:
            # a routing chunk holds every layer: analyses read all layers of a token block at once (one chunk
            # instead of L), and a single layer's slice still decodes only a few kB per 1,000 tokens
            L = v.shape[0]
            out.append(StoredVariable(**vars(v), chunks=(L, _rows(L * row_bytes, chunk_tokens), *v.trailing),
                                      windows=None))
            continue
        kinds = {shapes[h] for h in v.hooks}
        if len(kinds) > 1:
            raise StoreError(f"hook points {list(v.hooks)} differ in shape or dtype; name them in separate traces")
        lead = (1,) if v.layered else ()
        out.append(StoredVariable(**vars(v), chunks=(*lead, _rows(row_bytes, chunk_tokens), *v.trailing),
                                  windows=windows))
    return Layout(layers_of(recorded), routed, k, experts, chunk_tokens, _rows(8, chunk_tokens), out, saes, sae_k)
