# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A million tokens: tracing a long context and navigating its routing
#
# DeepSeek-V4 is built for million-token contexts: sliding-window attention in every layer plus compressed
# long-range entries (CSA: one pooled entry per 4 tokens, picked by a lightning indexer; HCA: one per 128 tokens,
# all attended). This notebook runs one long sequence through the embedded model (`data/models/wb-v4-mini`, which
# has that layout) with `workbench.trace`, which feeds it chunk by chunk, keeps only the bounded attention state
# between chunks and streams every layer's routing to a zarr store on disk. It asks:
#
# 1. **What does a long trace cost?** Tokens per second, bytes on disk per routing entry and peak memory, as the
#    trace records them in the store (`open_store(path).attrs["summary"]`).
# 2. **How do you look at a million tokens of routing?** With the `LongContextNavigator`, which re-aggregates the
#    visible range into a few hundred bins whenever you zoom.
# 3. **Does routing drift along the sequence?** The sequence is the held-out text of every corpus domain, repeated:
#    the same text comes back at several positions, so we can compare how the same tokens are routed at their first
#    and at their last occurrence (OLMoE's router saturation measure, section 5, applied across positions instead
#    of checkpoints), and measure Mixtral's consecutive-token repetition (Jiang et al., 2024, section 5) per domain.
#    The model was trained on 512-byte windows only, so everything past that is extrapolation.
#
# **Run time.** On the 2-core CPU machine this repository is tested on, the default of 1,000,000 tokens (float32,
# 4,096-token chunks, as below) traced in 402 s with both cores (2,492 tokens/s, peak RSS 1.1 GiB) and in 693 s with
# one thread (`OMP_NUM_THREADS=1`, 1,443 tokens/s); the rest of the notebook takes about 20 s. The checkpoint's own
# bf16 is faster on CPUs with bf16 units (`workbench trace`, 1M random tokens: 265-321 s; README, "Tracing one
# million tokens"). The time per token grows along the sequence because the CSA indexers score every earlier
# pooled entry. Set `TOKENS` lower for a quick look (20,000 tokens take about 10 s).

# %% tags=["parameters"]
TOKENS = 1_000_000  # length of the traced sequence
CHUNK_TOKENS = 4096  # tokens per forward chunk and per commit to the store
DOMAIN_BYTES = 100_000  # held-out bytes of each domain in one period of the sequence (100,000 takes all of each)
LAYER = 5  # the layer the navigator and the drift figure show
OUT = "runs"  # folder for the store this notebook writes

# %%
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

import workbench as wb
from workbench import analysis
from workbench.demo import EMBEDDED_MODEL, heldout_texts
from workbench.widgets import LongContextNavigator

model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)

# %% [markdown]
# ## The sequence
#
# One period is the held-out text of the seven domains, one after the other; the period repeats until `TOKENS`
# tokens. Every token keeps the label of its domain.

# %%
texts = heldout_texts(DOMAIN_BYTES)
parts = [np.asarray(model.tokenizer.encode(text.decode()), dtype=np.int64) for text in texts.values()]
period = np.concatenate(parts)
P = len(period)
tokens = np.resize(period, TOKENS)
domains = np.resize(np.repeat(list(texts), [len(p) for p in parts]), TOKENS)
copies = TOKENS // P
assert copies >= 2, f"TOKENS must hold at least two periods ({2 * P:,} tokens) for the comparisons below"
print(f"{TOKENS:,} tokens: a period of {P:,} tokens ({', '.join(f'{d} {len(p):,}' for d, p in zip(texts, parts))}) "
      f"repeated {TOKENS / P:.2f} times")

# %% [markdown]
# ## Tracing
#
# `wb.trace` runs the forward in chunks of `CHUNK_TOKENS`, commits each chunk's routing (`topk_ids` int16,
# `topk_weights` float16, zstd-compressed) atomically, and records what the run cost in the store's attrs. An
# interrupted run resumes where it stopped when the same call is made again.

# %%
Path(OUT).mkdir(parents=True, exist_ok=True)
path = wb.trace(model, tokens, Path(OUT) / "long_context.zarr", chunk_tokens=CHUNK_TOKENS, overwrite=True,
                progress=False)
store = wb.open_store(path)
run = store.attrs["summary"]
entries = run["tokens"] * run["routed_layers"] * run["k"]
pd.Series({
    "tokens": f"{run['tokens']:,}",
    "wall time": f"{run['wall_s']:.1f} s",
    "tokens / s": f"{run['tokens_per_s']:,.0f}",
    "ms / token": f"{1e3 * run['wall_s'] / run['tokens']:.3f}",
    "torch threads": store.attrs["torch_threads"],
    "routing entries (token x layer x k)": f"{entries:,}",
    "routing on disk": f"{run['routing_bytes'] / 1e6:.2f} MB",
    "bytes per routing entry": f"{run['bytes_per_routing_entry']:.3f}",
    "store on disk": f"{run['bytes_on_disk'] / 1e6:.2f} MB",
    "peak memory (RSS of this kernel)": f"{run['peak_rss_bytes'] / 2**30:.2f} GiB",
}, name="trace")

# %% [markdown]
# The raw routing of one (token, layer, rank) entry is 4 bytes (an int16 expert id and a float16 weight); the
# compressed store needs less. The peak RSS is that of the whole kernel process, model and Python included: the
# chunked forward keeps only the attention state (constant for sliding layers, one pooled entry per 4 or 128
# tokens for CSA and HCA layers), so it grows slowly with the length.
#
# The store itself is a lazy xarray Dataset and shows itself as a routing summary:

# %%
store

# %% [markdown]
# ## Navigating
#
# The navigator shows each expert's share of layer `LAYER`'s routing slots along the sequence (heatmap) and the most
# loaded experts as lines. Zooming the x axis re-aggregates the visible range from the store, in Python, into at most
# 400 bins: the browser never holds more. The domain boundaries of the repeated text show as vertical stripes.

# %%
navigator = LongContextNavigator(store, layer=LAYER)
navigator

# %% [markdown]
# `view(start, stop)` is what a zoom does. Here: 1,024 tokens either side of the boundary between the first two
# domains in the last period, with the expert that leads each side.

# %%
names = list(texts)
boundary = max(range(len(parts[0]), TOKENS, P))  # the last boundary within the sequence
start, stop = max(0, boundary - 1024), min(TOKENS, boundary + 1024)
navigator.view(start, stop)
zoom = navigator.aggregate(start, stop)
before = zoom.where(zoom.bin_stop <= boundary, drop=True).mean("bin")
after = zoom.where(zoom.bin_start >= boundary, drop=True).mean("bin")
print(f"zoomed to tokens {navigator.range[0]:,}..{navigator.range[1]:,} in {zoom.sizes['bin']} bins; boundary "
      f"{names[0]} -> {names[1]} at {boundary:,}")
lead_before, lead_after = int(before.argmax("expert")), int(after.argmax("expert"))
print(f"  before: expert {lead_before} leads with {float(before.max()):.1%} of the slots; after: expert {lead_after} "
      f"with {float(after.max()):.1%} (uniform 1/E {1 / zoom.sizes['expert']:.1%})")

# %% [markdown]
# ## Does routing drift along the sequence?
#
# Expert load over the first and the last 10% of the sequence would differ already because those stretches hold
# different text. Comparing the **same text** at different positions removes that. Token t and token t + cP (c
# periods later) are the same byte; a few hundred tokens into a period their local context matches too (the sliding
# window and the most recent pooled entries see the same text), and they differ only in how much earlier text the
# compressed long-range attention sees. Near the start of a period they also differ locally: the first copy starts
# the sequence, later ones follow the end of the previous copy. OLMoE's saturation measure, mean
# |E_a(x) ∩ E_b(x)| / k, compares the top-k sets of the first and of the last complete copy of the period; top-1
# agreement compares first choices. Hash-routed layers must agree exactly: they route by token id.

# %%
def copy(c: int):
    """The c-th complete copy of the period (1-based) in the store."""
    return store.isel(token=slice((c - 1) * P, c * P))


sat = analysis.saturation(copy(1), copy(copies))
drift = pd.DataFrame({"hash-routed": sat.hash_routed.values, "saturation (top-k overlap)": sat.saturation.values,
                      "top-1 agreement": sat.top1.values, "Jaccard": sat.jaccard.values},
                     index=pd.Index(sat.layer.values, name="layer"))
print(f"first copy (tokens 0..{P:,}) against copy {copies} (tokens {(copies - 1) * P:,}..{copies * P:,}); uniform "
      f"random routing: saturation {sat.saturation.attrs['baseline']:.3f}, top-1 {sat.top1.attrs['baseline']:.3f}")
later = None
if copies >= 3:
    later = analysis.saturation(copy(2), copy(copies))
    drift[f"copy 2 vs {copies}: saturation"] = later.saturation.values
    drift[f"copy 2 vs {copies}: top-1 agreement"] = later.top1.values
drift.round(4)

# %% [markdown]
# Where the sequence holds three copies or more, the last one is also compared with the second: both follow the end
# of a previous copy, so their contexts hold the same text and differ only in how much more of it came before. If the
# second and the last copy agree more than the first and the last, what the long-range attention has seen matters
# more than how far along the sequence a token is.
#
# Along the whole sequence: for every token from the second period on, whether its first choice differs from that of
# the same token in the first period, averaged in bins of position, per layer. Expect peaks where each period
# starts: the first copy of that text opened the sequence with nothing before it, later copies follow a whole
# period of other domains. Elsewhere, a level line means the routing does not depend on how long the context
# already is, a rising one that it drifts with position.

# %%
top1 = store.topk_ids.isel(k=0).values  # [layer, token]: one int16 per token and layer
bins = np.linspace(P, TOKENS, 41).astype(int)
fig = go.Figure()
changed_by_layer = {}
for j, layer in enumerate(store.layer.values):
    changed = top1[j, P:] != top1[j, np.arange(P, TOKENS) % P]  # token t against t % P: the same text
    changed_by_layer[int(layer)] = float(changed.mean()) if changed.size else 0.0
    share = [changed[a - P:b - P].mean() for a, b in zip(bins[:-1], bins[1:])]
    fig.add_trace(go.Scatter(x=bins[:-1], y=share, mode="lines+markers", name=f"layer {layer}"))
fig.update_layout(title="Share of tokens whose first-choice expert differs from the same text's in the first period",
                  xaxis_title="token position", yaxis_title="share changed", height=420)
fig

# %% [markdown]
# ## Consecutive tokens
#
# Mixtral's paper measured how often consecutive tokens get the same first-choice expert (and whether their top-2
# sets intersect), per domain, and found it well above chance, most of all in later layers. `analysis.repetition`
# with the domain labels counts only pairs within one domain.

# %%
rep = analysis.repetition(store, labels=domains)
fig = go.Figure([go.Bar(name=str(d), x=[f"layer {x}" for x in rep.layer.values], y=rep.first.sel(domain=d).values)
                 for d in rep.domain.values])
fig.add_hline(y=rep.first.attrs["baseline"], line_dash="dash", annotation_text="random 1/E")
fig.update_layout(title="Consecutive tokens with the same first-choice expert, per domain and layer",
                  yaxis_title="share of consecutive pairs", barmode="group", height=420)
fig

# %% [markdown]
# ## Summary
#
# The numbers the notebook's claims rest on (checked by the test suite when it runs this notebook).

# %% tags=["summary"]
summary = {
    "tokens": run["tokens"],
    "chunk_tokens": CHUNK_TOKENS,
    "period": P,
    "copies": copies,
    "wall_s": run["wall_s"],
    "tokens_per_s": run["tokens_per_s"],
    "bytes_per_routing_entry": run["bytes_per_routing_entry"],
    "peak_rss_gib": run["peak_rss_bytes"] / 2**30,
    "torch_threads": store.attrs["torch_threads"],
    "navigator_bins": int(zoom.sizes["bin"]),
    "navigator_range": list(navigator.range),
    "hash_routed": [int(x) for x in sat.layer.values[sat.hash_routed.values]],
    "saturation": {str(int(x)): float(v) for x, v in zip(sat.layer.values, sat.saturation.values)},
    "top1_agreement": {str(int(x)): float(v) for x, v in zip(sat.layer.values, sat.top1.values)},
    "saturation_baseline": float(sat.saturation.attrs["baseline"]),
    "saturation_second_last": None if later is None else {
        str(int(x)): float(v) for x, v in zip(later.layer.values, later.saturation.values)},
    "top1_agreement_second_last": None if later is None else {
        str(int(x)): float(v) for x, v in zip(later.layer.values, later.top1.values)},
    "top1_changed_vs_first_period": changed_by_layer,
    "repetition_first": {str(int(x)): float(rep.first.sel(layer=x).mean()) for x in rep.layer.values},
    "repetition_baseline": float(rep.first.attrs["baseline"]),
}
print(json.dumps(summary))
