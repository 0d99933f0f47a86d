# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A tour of the routing: one store, seven domains
#
# Does the router of the embedded model (`data/models/wb-v4-mini`, 32 experts, top-4) treat Python code, English,
# French, Spanish, German, numbers and JSON/CSV differently, and how evenly does it spread the load over its
# experts? The notebook traces held-out text of every domain of the training corpus into one zarr store with
# `workbench.trace` (the path every long run takes: chunked forward, routing streamed to disk), then looks at it three
# ways:
#
# 1. the interactive **routing dashboard** (expert load per layer, co-activation, each expert's share of each domain),
# 2. a **token view** of a stretch of text coloured by each token's first-choice expert,
# 3. the **load-balance statistics**: MaxVio, as DeepSeek's auxiliary-loss-free balancing paper defines it (Wang et
#    al., 2024), and the normalised entropy of the load; then the most specialised expert of each domain, OLMoE-style
#    (Muennighoff et al., 2024, section 5; `specialisation.ipynb` goes further).
#
# The widgets need a live kernel; their data paths are plain methods, so every number below is also printed.

# %% tags=["parameters"]
MAX_BYTES = 4096  # held-out bytes per domain (the model reads bytes: one token each)
CHUNK_TOKENS = 4096  # tokens per forward chunk of the trace
WINDOW = 240  # tokens the token view shows
OUT = "runs"  # folder for the store this notebook writes

# %%
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

import workbench as wb
from workbench import analysis, colours
from workbench.demo import EMBEDDED_MODEL, heldout_texts
from workbench.widgets import RoutingDashboard, TokenView

model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)

# %% [markdown]
# ## Tracing
#
# The domains are concatenated into one sequence (each domain's text after the previous one's), with one label per
# token saying which domain it came from. The attention of the first tokens of a domain still sees the end of the
# previous one; with a 128-token sliding window and compressed long-range entries that touches a small fraction of
# each domain's tokens.

# %%
texts = heldout_texts(MAX_BYTES)
parts = [np.asarray(model.tokenizer.encode(text.decode()), dtype=np.int64) for text in texts.values()]
tokens = np.concatenate(parts)
domains = np.repeat(list(texts), [len(p) for p in parts])
starts = dict(zip(texts, np.cumsum([0] + [len(p) for p in parts[:-1]]).tolist()))
Path(OUT).mkdir(parents=True, exist_ok=True)
path = wb.trace(model, tokens, Path(OUT) / "routing_tour.zarr", chunk_tokens=CHUNK_TOKENS, overwrite=True,
                progress=False)
store = wb.open_store(path)
run = store.attrs["summary"]
print(f"{len(tokens):,} tokens of {len(texts)} domains ({', '.join(f'{d} {len(p):,}' for d, p in zip(texts, parts))})")
print(f"traced in {run['wall_s']:.1f} s ({run['tokens_per_s']:,.0f} tokens/s), {run['bytes_on_disk'] / 1e3:.0f} kB "
      f"on disk, {run['bytes_per_routing_entry']:.2f} bytes per routing entry")

# %% [markdown]
# The store opened with `wb.open_store` is a lazy xarray Dataset; in a notebook it shows itself as a routing summary
# (model and revision, tokens, layers, experts, and a layer x expert load heatmap).

# %%
store

# %% [markdown]
# ## The routing dashboard
#
# Top: each expert's share of its layer's routing slots (click a cell to select that layer and expert). Bottom left:
# the selected layer's co-activation matrix, N(i, j) / N(i). Bottom right: the selected expert's share of each
# domain's tokens against the uniform k/E. Here the last layer is selected, with the expert that takes the largest
# share of the code tokens.

# %%
last = int(store.layer.values[-1])
spec = analysis.domain_specialisation(store, domains)
code_expert = int(spec.specialisation.sel(layer=last, domain=list(texts)[0]).argmax("expert"))
dashboard = RoutingDashboard(store, labels=domains)
dashboard.select(last, code_expert)
dashboard

# %% [markdown]
# ## The token view
#
# A window of `WINDOW` tokens around the boundary between the first two domains, each token coloured by its first
# choice at the last layer; hovering a token shows its top-k experts and weights. The legend counts the first
# choices in the window. The widget reads only the window from the store.

# %%
second = list(texts)[1]
view = TokenView(store, layer=last, start=max(0, starts[second] - WINDOW // 2), length=WINDOW)
window = view.window()
print(f"tokens {int(window.token[0])}..{int(window.token[-1])}: {list(texts)[0]} until {starts[second] - 1}, "
      f"then {second}")
view

# %% [markdown]
# ## Expert load
#
# `analysis.expert_load` counts, per layer, the routing slots each expert receives. **MaxVio** = (max load - mean
# load) / mean load is 0 for perfect balance; **entropy** of the load shares over ln E is 1 for perfect balance.
# Hash-routed layers (0 and 1) send every occurrence of a byte to the same experts, so their load follows the byte
# frequencies of the text; the learned layers were trained with DeepSeek's auxiliary-loss-free bias balancing.

# %%
load = analysis.expert_load(store)
stats = pd.DataFrame({
    "hash-routed": load.hash_routed.values,
    "MaxVio": load.maxvio.values.round(3),
    "entropy": load.entropy.values.round(4),
    "CV": load.cv.values.round(3),
    "Gini": load.gini.values.round(3),
    "dead experts": load.n_dead.values,
}, index=pd.Index(load.layer.values, name="layer"))
stats

# %%
fig = go.Figure(go.Heatmap(z=load.relative_load.values, x=load.expert.values, y=load.layer.values,
                           **colours.diverging(1.0), colorbar=dict(title="x uniform"),
                           hovertemplate="layer %{y}, expert %{x}: %{z:.2f} x uniform<extra></extra>"))
fig.update_layout(title="Relative load (DeepSeek): slots received / uniform share, per layer and expert",
                  xaxis_title="expert", yaxis=dict(title="layer", autorange="reversed", dtick=1), height=360)
fig

# %% [markdown]
# ## The most specialised expert of each domain
#
# For every domain, the expert at the last layer that receives the largest share of its tokens, that share, and the
# same as a multiple of the uniform k/E (OLMoE's domain specialisation; `relative` in the result). The last column
# is that expert's mean relative share of the other domains: an expert specialised to one domain takes much more of
# it than of the rest, while an expert that several domains share as their top one is specialised to what they have
# in common (natural language in Latin script, say, or digits and punctuation).

# %%
rows = []
for domain in spec.domain.values:
    row = spec.specialisation.sel(layer=last, domain=domain)
    e = int(row.argmax("expert"))
    others = spec.relative.sel(layer=last, expert=e).drop_sel(domain=domain)
    rows.append({"domain": str(domain), "expert": e, "share": round(float(row[e]), 3),
                 "x uniform": round(float(spec.relative.sel(layer=last, domain=domain, expert=e)), 2),
                 "x uniform, other domains": round(float(others.mean()), 2)})
top = pd.DataFrame(rows).set_index("domain")
for e, group in top.groupby("expert"):
    print(f"expert {e} is the top expert of {', '.join(group.index)}")
top

# %%
bars = [f"{d}: e{e}" for d, e in top.expert.items()]
fig = go.Figure()
fig.add_trace(go.Bar(name="its domain", x=bars, y=top["x uniform"]))
fig.add_trace(go.Bar(name="other domains (mean)", x=bars, y=top["x uniform, other domains"]))
fig.add_hline(y=1, line_dash="dash", annotation_text="uniform k/E")
fig.update_layout(title=f"Layer {last}: each domain's top expert, share relative to uniform", barmode="group",
                  yaxis_title="x uniform", height=400)
fig

# %% [markdown]
# ## Summary
#
# The numbers the notebook's claims rest on (checked by the test suite when it runs this notebook).

# %% tags=["summary"]
summary = {
    "tokens": int(store.sizes["token"]),
    "domains": [str(d) for d in spec.domain.values],
    "tokens_per_domain": {d: len(p) for d, p in zip(texts, parts)},
    "baseline": spec.specialisation.attrs["baseline"],
    "layers": [int(x) for x in load.layer.values],
    "hash_routed": [int(x) for x in load.layer.values[load.hash_routed.values]],
    "maxvio": {str(int(x)): float(v) for x, v in zip(load.layer.values, load.maxvio.values)},
    "entropy": {str(int(x)): float(v) for x, v in zip(load.layer.values, load.entropy.values)},
    "last_layer": last,
    "top_expert": {d: int(r["expert"]) for d, r in top.iterrows()},
    "top_relative": {d: float(r["x uniform"]) for d, r in top.iterrows()},
    "top_relative_other_domains": {d: float(r["x uniform, other domains"]) for d, r in top.iterrows()},
    "token_view_tokens": int(window.sizes["token"]),
}
print(json.dumps(summary))
