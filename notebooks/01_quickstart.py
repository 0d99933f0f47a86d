# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Quick start: routing of one prompt, read and edited through hooks
#
# This notebook asks two questions of one prompt and the embedded model `data/models/wb-v4-mini` (a 12M-parameter
# DeepSeek-V4-architecture MoE over bytes: 6 layers, 32 routed experts of which each token uses 4, plus a shared
# expert; layers 0 and 1 route by the token id alone, through a fixed hash table):
#
# 1. **Where does each token go?** For every layer, the *k* experts the router picks and the weights that multiply
#    their outputs, read from the hook points `layers.{i}.router.*` with `model.run_with_cache`.
# 2. **What happens when an expert is removed?** A hook that zeroes one expert's weight (an ablation) changes what
#    the layer computes; we measure the effect on the next-token prediction.
#
# It ends with the map of every hook point the model exposes. Everything runs on a CPU in a few seconds.

# %% tags=["parameters"]
PROMPT = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a"
LAYER = 2  # the layer whose routing we look at and edit (0 and 1 are hash-routed, 2 is the first learned router)
SHOW_TOKENS = 6  # how many of the prompt's last tokens to tabulate

# %%
import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

import workbench as wb
from workbench import analysis
from workbench.demo import EMBEDDED_MODEL
from workbench.interventions import ablate

model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
n_params = sum(p.numel() for p in model.parameters())
print(f"{model.source}\n{model.config.get('model_type')}, {len(model.layers)} layers, {n_params / 1e6:.2f}M "
      f"parameters, backend {model.backend!r}")

# %% [markdown]
# ## Encoding and caching the routing
#
# The tokenizer is byte-level (token id = byte value). `run_with_cache` runs one forward and keeps every hook
# point whose name matches one of the glob patterns; here the four router points of every layer: raw `logits`, the
# `scores` after the score function (DeepSeek-V4: sqrt(softplus)), the selected `topk_ids` (ranked) and the
# `topk_weights` that multiply the experts' outputs.

# %%
ids = torch.tensor([model.tokenizer.encode(PROMPT)])
logits, cache = model.run_with_cache(ids, names=["layers.*.router.*"])
print(f"{ids.shape[1]} tokens -> logits {list(logits.shape)}")
for name in [n for n in cache if n.startswith(f"layers.{LAYER}.")]:
    print(f"  {name:28s} {str(list(cache[name].shape)):>12s} {cache[name].dtype}")

# %% [markdown]
# The last few tokens at layer `LAYER`: which experts, with which weights. The weights of a token sum to the
# model's `routed_scaling_factor` (1.5 here): DeepSeek-V4 renormalises the selected scores and scales them.

# %%
topk_ids = cache[f"layers.{LAYER}.router.topk_ids"][0]
topk_weights = cache[f"layers.{LAYER}.router.topk_weights"][0]
k = topk_ids.shape[-1]
T = ids.shape[1]
rows = []
for t in range(T - SHOW_TOKENS, T):
    rows.append({"position": t, "token": repr(model.tokenizer.decode([int(ids[0, t])])),
                 **{f"expert {r}": int(topk_ids[t, r]) for r in range(k)},
                 **{f"weight {r}": round(float(topk_weights[t, r]), 3) for r in range(k)},
                 "sum of weights": round(float(topk_weights[t].sum()), 4)})
pd.DataFrame(rows).set_index("position")

# %% [markdown]
# The same for the whole prompt as a picture: each column is a token, each row an expert, the colour the weight the
# router gave it at layer `LAYER` (blank: not selected).

# %%
E = cache[f"layers.{LAYER}.router.scores"].shape[-1]
grid = np.full((E, T), np.nan)
grid[topk_ids.numpy().T, np.arange(T)[None, :].repeat(k, 0)] = topk_weights.numpy().T
labels = [f"{t}:{model.tokenizer.decode([int(i)])!r}" for t, i in enumerate(ids[0])]
fig = go.Figure(go.Heatmap(z=grid, x=labels, y=list(range(E)), colorscale="Viridis", colorbar=dict(title="weight"),
                           hovertemplate="%{x}<br>expert %{y}: weight %{z:.3f}<extra></extra>"))
fig.update_layout(title=f"Layer {LAYER}: top-{k} experts and their weights for every token of the prompt",
                  xaxis=dict(title="token", tickangle=-60), yaxis_title="expert", height=480)
fig

# %% [markdown]
# ## The routing as a Dataset
#
# `analysis.from_cache` lays the cached routing out exactly as a store written by `workbench trace` is laid out
# (`topk_ids(layer, token, k)`, `topk_weights`, `input_ids(token)`, the router tensors as variables), so the same
# analyses run on a prompt and on a million-token store. In a notebook such a Dataset shows itself as a routing
# summary: the model, its layers and experts and a layer x expert load heatmap.

# %%
ds = analysis.from_cache(cache, ids, logits=logits)
ds

# %% [markdown]
# ## Editing with a hook: ablating an expert
#
# A hook is a function `fn(tensor, ctx)` registered on a hook point for the duration of a `with model.hooks(...)`
# block; returning a tensor replaces the value. Zeroing an expert's entry in `router.topk_weights` drops its output
# (the other experts keep their weights). `ctx.extra["topk_ids"]` tells which expert each weight belongs to.
#
# We remove, for every token, the expert that the last token ranks first at layer `LAYER`, once with a hand-written
# hook and once with `workbench.interventions.ablate`, which builds the same hook.

# %%
target = int(topk_ids[-1, 0])


def drop_target(weights, ctx):
    chosen = ctx.extra["topk_ids"]
    return weights.masked_fill(chosen == target, 0.0)


with torch.no_grad():
    with model.hooks({f"layers.{LAYER}.router.topk_weights": drop_target}):
        by_hand = model(ids)
    with model.hooks(ablate(LAYER, [target])):
        by_ablate = model(ids)


def top_tokens(row, n=5):
    p = row.softmax(-1)
    values, indices = p.topk(n)
    return [(model.tokenizer.decode([int(i)]), round(float(v), 4)) for v, i in zip(values, indices)]


before, after = logits[0, -1], by_ablate[0, -1]
kl = float((before.log_softmax(-1).exp() * (before.log_softmax(-1) - after.log_softmax(-1))).sum())
print(f"ablated expert {target} at layer {LAYER} (the last token's first choice)")
print(f"hand-written hook == ablate(): {torch.equal(by_hand, by_ablate)}")
print(f"next token before: {top_tokens(before)}")
print(f"next token after:  {top_tokens(after)}")
print(f"KL(before || after) = {kl:.4f} nats, largest logit change {float((after - before).abs().max()):.3f}")

# %% [markdown]
# How much one expert matters depends on the layer and the token: in this model the hyper-connection gates
# (`layers.{i}.hc.ffn.post`) scale the MoE output of some layers down to almost nothing at many positions.
# `05_interventions` sweeps the layers and finds where an ablation matters most.

# %% [markdown]
# Tokens whose next-token prediction moved most, along the prompt: the ablation acts at every position where the
# expert was selected, so its effect is spread over the sequence.

# %%
p_before, p_after = logits[0].log_softmax(-1), by_ablate[0].log_softmax(-1)
kl_per_token = (p_before.exp() * (p_before - p_after)).sum(-1)
used = (topk_ids == target).any(-1)
fig = go.Figure(go.Bar(x=labels, y=kl_per_token.numpy(), marker_color=np.where(used.numpy(), "crimson", "gray")))
fig.update_layout(title=f"KL of the next-token distribution after ablating expert {target} at layer {LAYER} "
                        "(red: the token had the expert in its top-k)",
                  xaxis=dict(title="token", tickangle=-60), yaxis_title="KL (nats)", height=380)
fig

# %% [markdown]
# ## Every hook point
#
# `model.hook_names` lists the hook points in forward order. Per layer: the residual stream (`resid_pre`,
# `resid_mid`, `resid_post`; with DeepSeek-V4's four hyper-connection streams each is `[B, T, 4, H]`), the stream
# mixings `hc.*`, attention output (CSA layers also expose the indexer's choice `attn.indexer_topk`), the router,
# each selected expert's hidden state and output, the shared expert and the MoE block output. The table counts them
# by kind and layer.

# %%
per_layer = {}
for name in model.hook_names:
    parts = name.split(".")
    layer, kind = (int(parts[1]), ".".join(parts[2:])) if parts[0] == "layers" else ("model", name)
    per_layer.setdefault(kind, {})[layer] = 1
overview = pd.DataFrame(per_layer).T.fillna(0).astype(int)
print(f"{len(model.hook_names)} hook points")
overview

# %% [markdown]
# ## Summary
#
# The numbers the notebook's claims rest on (checked by the test suite when it runs this notebook).

# %% tags=["summary"]
summary = {
    "tokens": int(T),
    "k": int(k),
    "n_experts": int(E),
    "layers": len(model.layers),
    "hook_points": len(model.hook_names),
    "routed_layers": [int(x) for x in ds.layer.values],
    "hash_routed": [int(x) for x in ds.layer.values[analysis.hash_routed(ds).values]],
    "weight_sum": float(topk_weights.sum(-1).mean()),
    "ablated_layer": LAYER,
    "ablated_expert": target,
    "hand_written_equals_ablate": bool(torch.equal(by_hand, by_ablate)),
    "ablation_kl_last_token": kl,
    "ablation_max_logit_change": float((after - before).abs().max()),
    "prediction_before": model.tokenizer.decode([int(before.argmax())]),
    "prediction_after": model.tokenizer.decode([int(after.argmax())]),
}
print(json.dumps(summary))
