# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Expert specialisation of the embedded model, OLMoE-style
#
# The OLMoE paper (Muennighoff et al., 2024, section 5) asks three questions of a trained MoE's router, and this
# notebook asks them of `data/models/wb-v4-mini` (32 routed experts, top-4, six layers of which the first two are
# hash-routed by token id) on the held-out split of its training corpus:
#
# 1. **Domain specialisation**: of a domain's tokens, what share has expert *e* among its top-k? A router blind
#    to the domain gives every expert *k/E*.
# 2. **Vocabulary specialisation**: of the occurrences of a token id (the input token, the next token, or the
#    token the model predicts), what share goes to its most frequent expert?
# 3. **Co-activation**: of the tokens routed to expert *i*, what share is also routed to *j*?
#
# Every number comes from `workbench.analysis`, which runs the same code over in-memory traces (here) and over
# million-token stores written by `workbench trace`.

# %%
import json

import numpy as np
import plotly.graph_objects as go
import torch
import xarray as xr
from plotly.subplots import make_subplots

import workbench as wb
from workbench import analysis, colours
from workbench.demo import EMBEDDED_MODEL, heldout_texts

MAX_BYTES = 4096  # held-out bytes (= tokens: the model reads bytes) per domain
model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)

# %% [markdown]
# ## Tracing the held-out text of each domain
#
# One forward per domain caches the routing of every layer; `analysis.from_cache` lays it out exactly as a store
# would be (`topk_ids(layer, token, k)`), and the domains are concatenated along the token axis with one label per
# token. The model's own predictions (argmax of the logits) are kept for the vocabulary analysis.

# %%
parts, labels = [], []
with torch.no_grad():
    for domain, text in heldout_texts(MAX_BYTES).items():
        ids = torch.tensor([model.tokenizer.encode(text.decode())])
        logits, cache = model.run_with_cache(ids, names=["layers.*.router.topk_ids"])
        parts.append(analysis.from_cache(cache, ids, n_experts=32, logits=logits))
        labels += [domain] * ids.shape[1]
ds = xr.concat(parts, "token", combine_attrs="override").assign_coords(token=np.arange(len(labels)))
domains = np.asarray(labels)
E, k = ds.attrs["n_experts"], ds.attrs["k"]
baseline = k / E
print(f"{ds.sizes['token']:,} tokens, {len(parts)} domains, layers {ds.layer.values.tolist()}, "
      f"E={E}, k={k}, uniform share k/E={baseline:.3f}")
print("hash-routed layers:", ds.layer.values[analysis.hash_routed(ds).values].tolist())

# %% [markdown]
# ## 1. Domain specialisation
#
# `domain_specialisation` returns N(e, domain) / N(domain) and, as `relative`, the same over *k/E* (DeepSeek's
# "relative load": 1 = uniform). Each heatmap is one layer; a bright cell is an expert that a domain uses far more
# than chance. The hash-routed layers route by byte value, so their specialisation follows each domain's byte
# statistics rather than anything learned about context.

# %% tags=["figures"]
spec = analysis.domain_specialisation(ds, domains)
layers = spec.layer.values.tolist()
fig = make_subplots(rows=2, cols=3, subplot_titles=[
    f"layer {l}" + (" (hash-routed)" if h else "") for l, h in zip(layers, spec.hash_routed.values)],
    vertical_spacing=0.14, horizontal_spacing=0.04)
for i, layer in enumerate(layers):
    fig.add_trace(go.Heatmap(z=spec.relative.sel(layer=layer).values, x=spec.expert.values,
                             y=spec.domain.values, **colours.diverging(1.0), showscale=i == 0,
                             colorbar=dict(title="x k/E"),
                             hovertemplate="expert %{x}<br>%{y}: %{z:.2f} x uniform<extra></extra>"),
                  row=i // 3 + 1, col=i % 3 + 1)
fig.update_layout(title="Share of each domain's tokens routed to each expert, relative to uniform k/E",
                  height=620)
fig

# %% [markdown]
# OLMoE's Figure 22 plots, per domain, the share of the domain's tokens that each expert receives next to the
# uniform line. Here: for the last layer, each domain's five most used experts.

# %%
last = layers[-1]
top = spec.specialisation.sel(layer=last)
fig = go.Figure()
for domain in spec.domain.values:
    row = top.sel(domain=domain).values
    best = np.argsort(-row, kind="stable")[:5]
    fig.add_trace(go.Bar(name=str(domain), x=[f"{domain}: e{e}" for e in best], y=row[best]))
fig.add_hline(y=baseline, line_dash="dash", annotation_text="uniform k/E")
fig.update_layout(title=f"Layer {last}: each domain's five most used experts (share of the domain's tokens)",
                  yaxis_title="share of tokens", showlegend=False, height=420)
fig

# %% [markdown]
# ## 2. Vocabulary specialisation
#
# For every token id seen at least 10 times, the share of its occurrences sent to its most frequent expert,
# averaged over ids (OLMoE's measure; `top1=True` counts only the first choice, as its released analysis does).
# Against the *input* token it measures how much routing is a lookup of the current byte; against the *next* and
# *predicted* tokens, how much an expert is about what comes next. A router that ignored tokens would send each
# id to its top expert about 1/E of the time (plus sampling noise).

# %%
vocab = {against: analysis.vocabulary_specialisation(ds, against, min_count=10, top1=True)
         for against in ("input", "next", "predicted")}
fig = go.Figure([go.Scatter(x=layers, y=v.mean_top_share.values, mode="lines+markers", name=f"{a} token")
                 for a, v in vocab.items()])
fig.add_hline(y=1 / E, line_dash="dash", annotation_text="uniform 1/E")
fig.update_layout(title="Vocabulary specialisation: mean share of a token id's occurrences at its top expert",
                  xaxis_title="layer", yaxis_title="share (first choice)", yaxis_range=[0, 1.05], height=400)
fig

# %% [markdown]
# Which bytes does each expert own? For layer 3, the input bytes most specialised to a few experts (bytes outside printable ASCII, such as the parts of UTF-8 accented letters, in hex):

# %%
v = vocab["input"].sel(layer=3)
rows = []
for e in np.argsort(-v.specialisation.max("token_id").values)[:6]:
    shares = v.specialisation.sel(expert=e)
    best = shares.token_id.values[np.argsort(-shares.values)[:8]]
    shown = [(chr(t) if 32 < t < 127 else f"0x{t:02X}", shares.sel(token_id=t).item()) for t in best]
    rows.append(f"expert {e:2d}: " + "  ".join(f"{c} {s:.0%}" for c, s in shown))
print("\n".join(rows))

# %% [markdown]
# ## 3. Co-activation
#
# `coactivation` gives N(i, j) / N(i): of the tokens routed to expert *i* (rows), the share also routed to *j*
# (columns). With `mode="all_pairs"` every pair of a token's top-k counts; `mode="adjacent_ranks"` counts only
# neighbouring ranks of the ranked top-k, as OLMoE's released code does (k - 1 pairs per token). As in OLMoE's
# Figure 25, the heatmap shows the 16 experts with the strongest co-activations of one layer.

# %%
layer = 4
co = {mode: analysis.coactivation(ds, mode=mode) for mode in ("all_pairs", "adjacent_ranks")}
fig = make_subplots(rows=1, cols=2, subplot_titles=[
    f"{mode} (uniform {co[mode].coactivation.attrs['baseline']:.3f})" for mode in co])
for i, (mode, c) in enumerate(co.items()):
    m = c.coactivation.sel(layer=layer).fillna(0).values
    order = []
    for flat in np.argsort(-m, axis=None, kind="stable"):
        for e in np.unravel_index(flat, m.shape):
            if e not in order:
                order.append(int(e))
        if len(order) >= 16:
            break
    order = order[:16]
    fig.add_trace(go.Heatmap(z=m[np.ix_(order, order)], x=[f"e{e}" for e in order], y=[f"e{e}" for e in order],
                             zmin=0, zmax=0.6, colorscale="Reds", showscale=i == 1),
                  row=1, col=i + 1)
fig.update_yaxes(autorange="reversed")
fig.update_layout(title=f"Layer {layer}: co-activation N(i, j) / N(i), rows i, columns j", height=480)
fig

# %% [markdown]
# ## Summary
#
# The numbers the notebook's claims rest on (checked by the test suite when it runs this notebook).

# %% tags=["summary"]
learned = [l for l, h in zip(layers, spec.hash_routed.values) if not h]
summary = {
    "tokens": int(ds.sizes["token"]),
    "baseline": baseline,
    "max_domain_relative": float(spec.relative.sel(layer=learned).max()),
    "mean_top_share_input": float(vocab["input"].mean_top_share.sel(layer=learned).mean()),
    "mean_top_share_next": float(vocab["next"].mean_top_share.sel(layer=learned).mean()),
    "vocabulary_baseline": 1 / E,
    "coactivation_max": float(co["all_pairs"].coactivation.sel(layer=learned).max()),
    "coactivation_baseline": co["all_pairs"].coactivation.attrs["baseline"],
}
print(json.dumps(summary))
