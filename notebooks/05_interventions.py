# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Interventions: ablating, forcing and re-weighting experts
#
# Routing statistics say which experts a token goes to; interventions say whether it matters. This notebook edits
# the routing of the embedded model (`data/models/wb-v4-mini`: 32 routed experts, top-4, plus a shared expert; layers
# 0 and 1 hash-routed) on one prompt and measures what happens to the next-token prediction:
#
# 1. **Ablation**: drop experts' outputs (their weight set to 0) or make the router choose others instead (rerouting),
#    one layer at a time. Which layer's experts matter most for this prediction?
# 2. **Forced routing**: send tokens to a chosen set of experts. The router then weighs the forced experts by its
#    own rule, so forcing is a well-defined counterfactual ("what if the router had picked these?").
# 3. **Router temperature**: scale the router logits, from uniform (0) to sharper than trained (> 1).
# 4. **Patching**: copy the residual stream of one prompt into the run of another, layer by layer.
#
# Ablation is how expert pruning and skipping are evaluated (Lu et al., 2024, "Not All Experts are Equal", on
# Mixtral) and how "super experts", the few whose removal breaks a model, were found (Su et al., 2025). All
# interventions here are hook lists from `workbench.interventions`, composable by addition, and run on every backend.
#
# Effects are reported as the KL divergence KL(p_before || p_after) of the next-token distribution (nats) and
# whether the most likely next token (the argmax) changes.

# %% tags=["parameters"]
PROMPT = '{"name": "Alice", "age": 31, "city": "Paris"}, {"name": "Bob", "age": 27, "ci'
OTHER_PROMPT = '{"name": "Alice", "age": 31, "city": "Paris"}, {"name": "Bob", "age": 27, "na'  # for patching
FORCE_LAYER = 3  # layer whose routing is forced
FORCE_EXPERTS = [0, 1, 2, 3]  # the k experts every token is sent to there
SCALE_LAYER = 3  # layer whose router logits are scaled
SCALES = [0.0, 0.25, 0.5, 1.0, 2.0, 4.0]  # factors applied to that layer's router logits

# %%
import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from IPython.display import HTML, display
from plotly.subplots import make_subplots

import workbench as wb
from workbench import analysis
from workbench.demo import EMBEDDED_MODEL
from workbench.interventions import ablate, force, patch, scale_router_logits
from workbench.widgets import InterventionPanel

model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
tok = model.tokenizer
ids = torch.tensor([tok.encode(PROMPT)])
T = ids.shape[1]
logits, cache = model.run_with_cache(ids, names=["layers.*.router.*", "layers.*.hc.ffn.post"])
base = logits[0, -1]
layers = sorted(int(name.split(".")[1]) for name in cache if name.endswith("router.topk_ids"))
k = cache[f"layers.{layers[0]}.router.topk_ids"].shape[-1]
last_token = {layer: cache[f"layers.{layer}.router.topk_ids"][0, -1].tolist() for layer in layers}
routing = analysis.from_cache({n: t for n, t in cache.items() if ".router." in n}, ids)
hashed = [int(x) for x in routing.layer.values[analysis.hash_routed(routing).values]]


def kl(before: torch.Tensor, after: torch.Tensor) -> float:
    """KL(p_before || p_after) of two next-token logit vectors, in nats."""
    p, q = before.log_softmax(-1), after.log_softmax(-1)
    return float((p.exp() * (p - q)).sum())


def next_token(hooks=()) -> torch.Tensor:
    """The prompt's next-token logits under `hooks`."""
    with torch.no_grad(), model.hooks(list(hooks)):
        return model(ids)[0, -1]


def show(row: torch.Tensor, n: int = 5) -> str:
    p = row.softmax(-1)
    values, indices = p.topk(n)
    return "  ".join(f"{tok.decode([int(i)])!r} {float(v):.3f}" for v, i in zip(values, indices))


print(f"{T} tokens; hash-routed layers: {hashed}\nnext token: {show(base)}")
pd.DataFrame(last_token, index=[f"rank {r}" for r in range(k)]).rename(columns=lambda x: f"layer {x}")

# %% [markdown]
# The table shows the experts the prompt's last token is routed to at each layer (ranked). Where the two most likely
# next tokens are close, the argmax flips under small changes; the KL says how much the distribution moved.
#
# ## The intervention panel
#
# `InterventionPanel` is the interactive version: pick a layer, experts and a mode, press run, and it compares the
# next-token predictions. Its `run(layer, experts, mode)` does the same from code and returns the comparison. Below:
# ablating, at layer 0, the four experts the last token uses there (for every token of the prompt).

# %%
panel = InterventionPanel(model, PROMPT)
panel_result = panel.run(layers[0], last_token[layers[0]], mode="ablate")
display(panel)
HTML(panel.table_html(panel_result))

# %% [markdown]
# ## Which layer's experts matter? An ablation sweep
#
# For every layer, three interventions on the routing of the prompt:
#
# - **top-1 ablated**: the last token's first-choice expert is removed (weight 0) for every token of the prompt;
# - **top-k ablated at the last token**: all *k* experts of the last token are dropped, at the last position only,
#   so that position gets only the shared expert's output from this layer;
# - **top-k rerouted at the last token**: the same experts are masked out of the router's scores, so it picks the
#   next-best *k* instead (`ablate(..., mode="reroute")`). Not for the hash-routed layers, whose choice is a fixed
#   table lookup, not a ranking of scores.

# %%
rows = []
for layer in layers:
    chosen = last_token[layer]
    runs = {
        "top-1 ablated": next_token(ablate(layer, chosen[:1])),
        "top-k ablated at the last token": next_token(ablate(layer, chosen, tokens=[T - 1])),
    }
    if layer not in hashed:
        runs["top-k rerouted at the last token"] = next_token(ablate(layer, chosen, tokens=[T - 1], mode="reroute"))
    for what, after in runs.items():
        rows.append({"layer": layer, "intervention": what, "KL": kl(base, after),
                     "argmax changed": int(after.argmax()) != int(base.argmax()),
                     "prediction": tok.decode([int(after.argmax())])})
sweep = pd.DataFrame(rows)
table = sweep.pivot(index="layer", columns="intervention", values="KL")
fig = go.Figure([go.Bar(name=what, x=[f"layer {x}" for x in table.index], y=table[what].clip(lower=1e-6))
                 for what in table.columns])
fig.update_layout(title="Effect on the next-token distribution of ablating the last token's experts, per layer",
                  yaxis=dict(title="KL(before || after), nats (log scale)", type="log"), barmode="group", height=420)
fig

# %%
ablated_k = sweep[sweep.intervention == "top-k ablated at the last token"].set_index("layer")
most = int(ablated_k.KL.idxmax())
print(f"dropping the last token's experts matters most at layer {most}: KL {ablated_k.KL[most]:.3f}, next token "
      f"{tok.decode([int(base.argmax())])!r} -> {ablated_k.prediction[most]!r}")
sweep.pivot(index="layer", columns="intervention", values=["KL", "argmax changed"]).round(4)

# %% [markdown]
# One token is one sample. The same question over every position of the prompt: each token loses its own first
# choice (the weight of rank 0 set to 0), or all of its routed experts (every weight 0: only the shared expert
# remains), one layer at a time, with hand-written hooks on `router.topk_weights`; averaged over the positions.

# %%
def drop_first(weights, ctx):
    weights = weights.clone()
    weights[..., 0] = 0
    return weights


def drop_all(weights, ctx):
    return torch.zeros_like(weights)


p_base = logits[0].log_softmax(-1)
rows = []
for layer in layers:
    for what, fn in (("first choice dropped", drop_first), ("all routed experts dropped", drop_all)):
        with torch.no_grad(), model.hooks({f"layers.{layer}.router.topk_weights": fn}):
            p_after = model(ids)[0].log_softmax(-1)
        changed = (p_after.argmax(-1) != p_base.argmax(-1)).float()
        rows.append({"layer": layer, "intervention": what,
                     "mean KL": float((p_base.exp() * (p_base - p_after)).sum(-1).mean()),
                     "argmax changed (share of positions)": float(changed.mean())})
everywhere = pd.DataFrame(rows).pivot(index="layer", columns="intervention")
mean_all = everywhere[("mean KL", "all routed experts dropped")]
print(f"averaged over the {T} positions, dropping the routed experts matters most at layer {int(mean_all.idxmax())} "
      f"(mean KL {mean_all.max():.3f}) and least at layer {int(mean_all.idxmin())} ({mean_all.min():.4f})")
everywhere.round(4)

# %% [markdown]
# Why do some layers matter so little? DeepSeek-V4 keeps four residual streams (manifold-constrained hyper-connections,
# mHC), and each block's output is written into them scaled by the learned, input-dependent gates `hc.ffn.post`
# (between 0 and 2). Where a layer's gates are near 0 for a token, its MoE output barely reaches the residual, whatever
# the experts compute. The gates of the last token per layer, next to the effect of dropping its experts:

# %%
gates = pd.DataFrame({
    "hc.ffn.post of the last token": [np.round(cache[f"layers.{x}.hc.ffn.post"][0, -1].numpy(), 3) for x in layers],
    "largest gate": [float(cache[f"layers.{x}.hc.ffn.post"][0, -1].max()) for x in layers],
    "KL, top-k ablated at the last token": ablated_k.KL.values,
}, index=pd.Index(layers, name="layer"))
gates

# %% [markdown]
# ## Forced routing
#
# `force(FORCE_LAYER, FORCE_EXPERTS)` replaces the router's choice at that layer with the given experts for every
# token. The router computes the weights *after* the `topk_ids` hook, so the forced experts get the weights the
# router's own rule gives them (DeepSeek-V4: their sqrt-softplus scores, renormalised, times 1.5). Three checks:
# a hand-written hook that returns the forced ids gives the same logits bit for bit; the cached `topk_ids` are the
# forced ones; and the cached weights equal the rule applied to the cached scores.

# %%
forced = torch.tensor(FORCE_EXPERTS)


def force_by_hand(topk_ids, ctx):
    return forced.expand_as(topk_ids).clone()


names = [f"layers.{FORCE_LAYER}.router.scores", f"layers.{FORCE_LAYER}.router.topk_ids",
         f"layers.{FORCE_LAYER}.router.topk_weights"]
with model.hooks(force(FORCE_LAYER, FORCE_EXPERTS)):
    forced_logits, forced_cache = model.run_with_cache(ids, names=names)
with model.hooks({f"layers.{FORCE_LAYER}.router.topk_ids": force_by_hand}):
    manual_logits = next_token()
scores, got_ids, got_weights = (forced_cache[n][0] for n in names)
scaling = model.config.get("routed_scaling_factor", 1.0)
expected = scores.gather(-1, got_ids)
expected = expected / expected.sum(-1, keepdim=True) * scaling
force_equals_manual = torch.equal(forced_logits[0, -1], manual_logits)
ids_are_forced = bool((got_ids == forced).all())
weight_rule_error = float((got_weights - expected).abs().max())
print(f"force() == hand-written hook: {force_equals_manual}; cached ids all {FORCE_EXPERTS}: {ids_are_forced}; "
      f"weights vs the router's rule: max |difference| {weight_rule_error:.2e}")
print(f"before: {show(base)}\nforced: {show(forced_logits[0, -1])}")
print(f"KL {kl(base, forced_logits[0, -1]):.3f}")

# %% [markdown]
# The panel runs the same intervention (its `force` mode takes exactly *k* experts):

# %%
panel_forced = panel.run(FORCE_LAYER, FORCE_EXPERTS, mode="force")
HTML(panel.table_html(panel_forced))

# %% [markdown]
# ## Router temperature
#
# `scale_router_logits(SCALE_LAYER, factor)` multiplies the layer's router logits before the score function: 0 makes
# every expert score the same (the selection then falls to the correction bias, and the weights become uniform), 1
# is the trained router, larger factors make the top scores stand out. For each factor: the normalised entropy of the
# last token's scores (1 = uniform), how many of its *k* experts stay the same, and the effect on the prediction.

# %%
E = cache[f"layers.{SCALE_LAYER}.router.scores"].shape[-1]
baseline_set = set(last_token[SCALE_LAYER])
scale_rows = []
for factor in SCALES:
    with model.hooks(scale_router_logits(SCALE_LAYER, factor)):
        out, c = model.run_with_cache(ids, names=[f"layers.{SCALE_LAYER}.router.*"])
    s = c[f"layers.{SCALE_LAYER}.router.scores"][0, -1]
    p = s / s.sum()
    entropy = float(-(p * p.clamp_min(1e-30).log()).sum() / np.log(E))
    kept = len(baseline_set & set(c[f"layers.{SCALE_LAYER}.router.topk_ids"][0, -1].tolist()))
    scale_rows.append({"factor": factor, "score entropy": entropy, "experts kept": kept,
                       "KL": kl(base, out[0, -1]), "identical to no hook": torch.equal(out[0, -1], base)})
scales = pd.DataFrame(scale_rows).set_index("factor")
fig = make_subplots(specs=[[{"secondary_y": True}]])
fig.add_trace(go.Scatter(x=scales.index, y=scales.KL, mode="lines+markers", name="KL (nats)"))
fig.add_trace(go.Scatter(x=scales.index, y=scales["score entropy"], mode="lines+markers",
                         name="normalised score entropy"), secondary_y=True)
fig.update_layout(title=f"Scaling layer {SCALE_LAYER}'s router logits", xaxis_title="factor", height=380)
fig.update_yaxes(title_text="KL", secondary_y=False)
fig.update_yaxes(title_text="entropy", range=[0, 1.05], secondary_y=True)
display(fig)
scales.round(4)

# %% [markdown]
# ## Patching
#
# `patch(name, source, tokens)` replaces a hook point's tensor with another run's. `OTHER_PROMPT` has the same
# length as the prompt and asks for another key (its last two bytes differ); we run it and copy, at one layer at a
# time, the *prompt's* residual stream (`resid_post`) at the last position into it. The share of the gap between the
# two predictions that the patch closes, measured on the prompt's most likely next token, shows how much of what
# separates them the last position holds after each layer (the rest still reaches it through attention to the
# previous byte). Patching the last layer's residual restores the prompt's logits exactly.

# %%
other = torch.tensor([tok.encode(OTHER_PROMPT)])
assert other.shape == ids.shape, "OTHER_PROMPT must encode to as many tokens as PROMPT"
_, clean = model.run_with_cache(ids, names=["layers.*.resid_post"])
with torch.no_grad():
    corrupt = model(other)[0, -1]
target = int(base.argmax())
gap = float(base.log_softmax(-1)[target] - corrupt.log_softmax(-1)[target])
restored = {}
for layer in layers:
    name = f"layers.{layer}.resid_post"
    with torch.no_grad(), model.hooks(patch(name, clean[name], tokens=[T - 1])):
        patched = model(other)[0, -1]
    restored[layer] = float(patched.log_softmax(-1)[target] - corrupt.log_softmax(-1)[target]) / gap if gap else 0.0
    if layer == layers[-1]:
        last_layer_exact = torch.allclose(patched, base, atol=1e-5)
print(f"log p({tok.decode([target])!r}): prompt {float(base.log_softmax(-1)[target]):.3f}, other prompt "
      f"{float(corrupt.log_softmax(-1)[target]):.3f}")
fig = go.Figure(go.Bar(x=[f"layer {x}" for x in restored], y=list(restored.values())))
fig.update_layout(title="Share of the log-probability gap closed by patching the last position's resid_post",
                  yaxis_title="share restored", height=340)
fig

# %% [markdown]
# ## Summary
#
# The numbers the notebook's claims rest on (checked by the test suite when it runs this notebook).

# %% tags=["summary"]
by = {what: g.set_index("layer") for what, g in sweep.groupby("intervention")}
summary = {
    "tokens": int(T),
    "k": int(k),
    "layers": layers,
    "prediction": tok.decode([int(base.argmax())]),
    "kl_top1_ablated": {str(x): float(v) for x, v in by["top-1 ablated"].KL.items()},
    "kl_topk_ablated_last_token": {str(x): float(v) for x, v in by["top-k ablated at the last token"].KL.items()},
    "argmax_changed_topk_ablated_last_token": {str(x): bool(v) for x, v in
                                               by["top-k ablated at the last token"]["argmax changed"].items()},
    "kl_topk_rerouted_last_token": {str(x): float(v) for x, v in by["top-k rerouted at the last token"].KL.items()},
    "most_important_layer": most,
    "hash_routed": hashed,
    "mean_kl_all_dropped": {str(x): float(v) for x, v in everywhere[("mean KL", "all routed experts dropped")].items()},
    "mean_kl_first_dropped": {str(x): float(v) for x, v in everywhere[("mean KL", "first choice dropped")].items()},
    "max_kl": float(ablated_k.KL.max()),
    "panel_changed": bool(panel_result["changed"]),
    "panel_matches_hooks": torch.equal(next_token(ablate(layers[0], last_token[layers[0]])).argmax(),
                                       torch.tensor(panel_result["intervened"][0][1])),
    "force_equals_manual": bool(force_equals_manual),
    "forced_ids_seen": ids_are_forced,
    "forced_weight_rule_error": weight_rule_error,
    "kl_forced": kl(base, forced_logits[0, -1]),
    "panel_force_changed": bool(panel_forced["changed"]),
    "scale_kl": {str(f): float(v) for f, v in scales.KL.items()},
    "scale_entropy": {str(f): float(v) for f, v in scales["score entropy"].items()},
    "scale_one_identical": bool(scales.loc[1.0, "identical to no hook"]) if 1.0 in scales.index else None,
    "patch_restored": {str(x): v for x, v in restored.items()},
    "patch_last_layer_exact": bool(last_layer_exact),
}
print(json.dumps(summary))
