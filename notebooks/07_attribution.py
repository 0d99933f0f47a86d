# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Attribution: which experts a prediction rests on, where a logit comes from, steering, routing while generating
#
# On the embedded model (`data/models/wb-v4-mini`: DeepSeek-V4 architecture, 6 MoE layers of 32 routed experts,
# top-4, plus a shared expert; layers 0 and 1 hash-routed):
#
# 1. **Expert attribution against true ablations.** `expert_attribution` estimates, from one forward and one
#    backward, how much a metric would change if each (layer, expert) were ablated everywhere; `ablation_sweep`
#    measures it, one forward per ablation. How well does the estimate rank the experts?
# 2. **Direct logit attribution** of one prediction: the logit split into the embedding, each attention block,
#    shared expert and routed expert slot; the parts sum to the logit.
# 3. **Steering**: a vector from a store (the mean difference of `resid_post` between French and English tokens),
#    added during generation, with the intervention panel's continuations side by side.
# 4. **Routing of generated tokens**: `trace(..., generate=N)` records the prompt and the continuation.
# 5. **SAE latents next to routing**: the shipped sparse autoencoder on layer 3's residual stream, spliced with
#    its error term (the forward unchanged), its latents streamed to a store beside the routing they feed.

# %% tags=["parameters"]
PROMPT = "def add(a, b):\n    return"  # prompt of the attribution and the DLA
SWEEP_LAYERS = None  # MoE layers the exact ablation sweep covers (None: all six; one forward per routed expert)
STEER_LAYER = 3  # residual stream (resid_post) the steering vector is taken from and added to
STEER_BYTES = 384  # bytes of held-out French and English text labelled for the steering vector
STEER_SCALE = 2.0  # multiple of the vector added during generation
GEN_PROMPT = "The package "  # prompt of the continuations and the generation trace
NEW_TOKENS = 12  # generated tokens
OUT = "runs"  # folder of the stores this notebook writes (replaced on every run)
SAE_BYTES = 256  # bytes of held-out text per domain traced with the SAE's latents
THREADS = 2  # torch threads

# %%
import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import xarray as xr
from IPython.display import HTML, display

import workbench as wb
from workbench.attribution import ablation_sweep, expert_attribution
from workbench.demo import EMBEDDED_MODEL
from workbench.interventions import steer
from workbench.lens import direct_logit_attribution
from workbench.widgets import InterventionPanel

torch.set_num_threads(THREADS)
model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
tok = model.tokenizer
ids = torch.tensor([tok.encode(PROMPT)])
out_dir = Path(OUT)
out_dir.mkdir(parents=True, exist_ok=True)
facts = {"prompt_tokens": ids.shape[1]}


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties share their mean rank)."""
    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


# %% [markdown]
# ## 1. Expert attribution against true ablations
#
# The metric is the mean log-probability the model gives each next token of the prompt. Ablating an expert sets its
# routing weight to 0 wherever it is selected (`ablate(layer, [expert])`). The estimate is, for each token and slot
# choosing the expert, `-w * dmetric/dw`, summed; the sweep runs each ablation. Experts no token selects are exactly
# 0 in both. Each point below is one (layer, expert).

# %%
def metric(logits: torch.Tensor) -> torch.Tensor:
    """Mean next-token log-probability over the prompt."""
    logp = logits[0, :-1].log_softmax(-1)
    return logp.gather(-1, ids[0, 1:, None]).mean()


estimate = expert_attribution(model, ids, metric)
exact = ablation_sweep(model, ids, metric, layers=SWEEP_LAYERS, progress=False)
estimate = estimate.sel(layer=exact.layer)
est, ex = estimate.values.ravel(), exact.values.ravel()
top10, top20 = set(np.argsort(-np.abs(ex))[:10]), set(np.argsort(-np.abs(est))[:20])
facts |= {"pairs": int(est.size), "routed_pairs": int((ex != 0).sum()), "metric": exact.attrs["metric"],
          "spearman": spearman(est, ex), "spearman_abs": spearman(np.abs(est), np.abs(ex)),
          "top10_in_top20": len(top10 & top20), "sweep_layers": [int(x) for x in exact.layer]}
layer_of = np.repeat(exact.layer.values, exact.sizes["expert"])
expert_of = np.tile(exact.expert.values, exact.sizes["layer"])
fig = go.Figure([go.Scatter(x=ex[layer_of == i], y=est[layer_of == i], mode="markers", name=f"layer {i}",
                            text=[f"layer {i}, expert {e}" for e in expert_of[layer_of == i]])
                 for i in exact.layer.values])
span = [min(ex.min(), est.min()), max(ex.max(), est.max())]
fig.add_trace(go.Scatter(x=span, y=span, mode="lines", name="estimate = true", line=dict(dash="dot", color="gray")))
fig.update_layout(title=f"Ablating one expert everywhere: estimate against the true change (Spearman "
                        f"{facts['spearman']:.2f})", xaxis_title="true change of the metric (ablation sweep)",
                  yaxis_title="first-order estimate", height=480)
print(f"{facts['pairs']} (layer, expert) pairs, {facts['routed_pairs']} routed to; Spearman {facts['spearman']:.3f} "
      f"(of magnitudes {facts['spearman_abs']:.3f}); the sweep's top 10 in the estimate's top 20: "
      f"{facts['top10_in_top20']}/10")
fig

# %% [markdown]
# The estimate ranks experts by the size of their effect well; it is first order, so for the very largest effects
# (where ablating changes the forward most) the sweep is the one to trust.
#
# ## 2. Direct logit attribution of one prediction
#
# The logit of the model's predicted next token, split into direct contributions with the final norm's scale
# frozen; under DeepSeek-V4's hyper-connections, through the forward's own stream mixings. The parts sum to the
# logit.

# %%
with torch.no_grad():
    logits = model(ids)[0, -1]
target = int(logits.argmax())
dla = direct_logit_attribution(model, ids, target)
facts |= {"dla_target": tok.decode([target]), "dla_logit": dla.attrs["logit"], "dla_sum": float(dla.sum()),
          "dla_components": int(dla.sizes["component"]),
          "dla_by_kind": {k: float(v) for k, v in dla.groupby("kind").sum().to_series().items()}}
largest = dla.sortby(abs(dla), ascending=False)[:12]
print(f"predicted next token {facts['dla_target']!r}: logit {facts['dla_logit']:.4f}, sum of the "
      f"{facts['dla_components']} parts {facts['dla_sum']:.4f}")
print("by kind: " + ", ".join(f"{k} {v:+.3f}" for k, v in facts["dla_by_kind"].items()))
go.Figure(go.Bar(x=largest.component.values, y=largest.values)).update_layout(
    title=f"The 12 largest direct contributions to the logit of {facts['dla_target']!r}", yaxis_title="logit",
    height=380)

# %% [markdown]
# ## 3. Steering with a vector from a store
#
# Held-out French and English text, traced into one store with `resid_post` of layer `STEER_LAYER` recorded; each
# token labelled by its language. The vector is the mean difference French − English (`[hc, hidden]`: one row per
# hyper-connection stream). Added to the residual at every position, it should shift the model's preference
# towards French: below, the mean next-token log-probability of other French text minus that of other English
# text, per scale.

# %%
corpus = Path(EMBEDDED_MODEL).parent.parent / "corpus"


def text(domain: str, start: int, size: int) -> str:
    return (corpus / f"{domain}.heldout.txt").read_bytes()[start:start + size].decode("utf-8", "ignore")


parts = {lang: np.asarray(tok.encode(text(domain, 0, STEER_BYTES)))
         for lang, domain in (("french", "french"), ("english", "prose"))}
labels = np.repeat(list(parts), [len(p) for p in parts.values()])
store = wb.trace(model, np.concatenate(list(parts.values())), out_dir / "steering.zarr",
                 names=[f"layers.{STEER_LAYER}.resid_post"], overwrite=True, progress=False)
resid = wb.open_store(store).resid_post.sel(layer=STEER_LAYER)
french = xr.DataArray(labels == "french", dims="token")
vector = (resid.where(french).mean("token") - resid.where(~french).mean("token")).values
hook = f"layers.{STEER_LAYER}.resid_post"
held = {lang: torch.tensor([tok.encode(text(domain, 2000, 160))]) for lang, domain in (("french", "french"),
                                                                                     ("english", "prose"))}


def logprob(x: torch.Tensor, hooks=()) -> float:
    with torch.no_grad(), model.hooks(list(hooks)):
        logp = model(x)[0, :-1].log_softmax(-1)
    return float(logp.gather(-1, x[0, 1:, None]).mean())


gap = {s: logprob(held["french"], steer(hook, vector, s)) - logprob(held["english"], steer(hook, vector, s))
       for s in (-STEER_SCALE, 0.0, STEER_SCALE)}
facts |= {"steer_vector_shape": list(vector.shape), "steer_gap": {str(s): g for s, g in gap.items()}}
print("French minus English mean log-probability, by scale: "
      + ", ".join(f"{s:+g}: {g:+.4f}" for s, g in gap.items()))

# %% [markdown]
# The intervention panel generates the continuations side by side: unchanged, and steered towards French. Its
# `generate(layer, experts, mode, max_new_tokens)` does the same from code (here: `mode="steer"`), each
# continuation being `model.generate` under the same hooks.

# %%
panel = InterventionPanel(model, GEN_PROMPT, layer=STEER_LAYER, vectors={"french - english": vector})
steered = panel.generate(STEER_LAYER, mode="steer", max_new_tokens=NEW_TOKENS, vector="french - english",
                         scale=STEER_SCALE)
gen_ids = panel.ids
facts |= {"steer_diverged_at": steered["diverged_at"], "baseline_text": steered["baseline"],
          "steered_text": steered["intervened"]}
display(panel)
HTML(panel.continuation_html(steered))

# %% [markdown]
# ## 4. Routing of generated tokens
#
# `wb.trace(model, prompt, out, generate=N)` prefills the prompt, then decodes one token per step on the same
# incremental state, and stores the routing of prompt and continuation; `generated(token)` marks the new tokens
# and `attrs["generation"]` holds the settings. The tokens are the panel's unchanged continuation above, and their
# routing is what a forward over the whole final sequence gives.

# %%
run = wb.trace(model, gen_ids, out_dir / "generation.zarr", generate=NEW_TOKENS, overwrite=True, progress=False)
ds = wb.open_store(run)
full = torch.as_tensor(ds.input_ids.values)[None]
_, cache = model.run_with_cache(full, names=["layers.*.router.topk_ids"])
forward_ids = np.stack([cache[f"layers.{i}.router.topk_ids"][0].numpy() for i in ds.layer.values])
new = ds.generated.values
facts |= {"generated": int(new.sum()), "tokens": int(ds.sizes["token"]), "generation": ds.attrs["generation"],
          "generated_equals_generate": ds.input_ids.values[new].tolist() == steered["baseline_ids"],
          "generated_routing_equals_forward": bool(np.array_equal(ds.topk_ids.values, forward_ids)),
          "generated_text": tok.decode(ds.input_ids.values[new].tolist())}
top1 = ds.topk_ids.values[:, :, 0]
labels = [f"{t}:{tok.decode([int(i)])!r}" for t, i in enumerate(ds.input_ids.values)]
fig = go.Figure(go.Heatmap(z=top1, x=labels, y=[f"layer {i}" for i in ds.layer.values], colorscale="Turbo",
                           colorbar=dict(title="top-1 expert")))
fig.add_vline(x=int(new.argmax()) - 0.5, line=dict(color="white", width=3))
fig.update_layout(title=f"Top-1 expert per layer, prompt then {facts['generated']} generated tokens (right of the "
                        "line)", height=360, xaxis=dict(tickangle=-60))
print(f"{facts['tokens']} tokens, {facts['generated']} generated: {facts['generated_text']!r}")
fig

# %% [markdown]
# ## 5. SAE latents next to routing
#
# `data/saes/wb-v4-mini-layers.3.resid_post` is a top-k sparse autoencoder (768 latents, 16 active per token and
# stream) trained on layer 3's residual stream by `data/saes/train_sae.py`; one dictionary serves all four
# hyper-connection streams. Spliced with its error term the forward is unchanged; `trace(..., saes=...)` stores each
# token's active latents (ids and values) beside the routing. Layer 4's router reads this residual stream: for the
# latents most tied to one domain, which layer-4 expert takes the tokens where they fire, and how much more often
# than on all tokens (lift)?

# %%
from workbench.sae import load_sae, splice, stored, top_contexts

sae_hook = "layers.3.resid_post"
sae = load_sae("wb-v4-mini-layers.3.resid_post")
with torch.no_grad():
    plain = model(ids)
    with model.hooks(splice(model, sae)):
        spliced = model(ids)
facts["sae_splice_identical"] = bool(torch.equal(plain, spliced))
domains = ("code", "french", "numbers")
sae_ids = {d: np.asarray(tok.encode(text(d, 0, SAE_BYTES))) for d in domains}
domain_of = np.repeat(domains, [len(v) for v in sae_ids.values()])
sae_run = wb.trace(model, np.concatenate(list(sae_ids.values())), out_dir / "sae.zarr", saes={sae_hook: sae},
                   sae_k=16, overwrite=True, progress=False)
sds = wb.open_store(sae_run)
lat, _ = stored(sds, sae_hook)  # [token, hc, 16]: the active latents of each token and stream
d_sae = sae.cfg["d_sae"]
active = np.zeros((sds.sizes["token"], d_sae), bool)  # latent active in any stream
rows = np.repeat(np.arange(sds.sizes["token"]), lat.values[0].size)
ok = lat.values.reshape(len(active), -1) >= 0
active[rows[ok.ravel()], lat.values.reshape(len(active), -1)[ok]] = True
routed4 = sds.topk_ids.sel(layer=4).values  # [token, k]
base = np.bincount(routed4.ravel(), minlength=32) / routed4.size
table = []
for d in domains:
    share = active[domain_of == d].mean(0) / np.maximum(active.mean(0), 1e-9) * (domain_of == d).mean()
    for j in np.argsort(-(share * (active.sum(0) >= 8)))[:2]:  # the two latents most tied to the domain
        on = routed4[active[:, j]]
        e = int(np.bincount(on.ravel(), minlength=32).argmax())
        best = top_contexts(sds, sae_hook, int(j), n=1, width=10)
        table.append({"domain": d, "latent": int(j), "tokens active": int(active[:, j].sum()),
                      "share in domain": float(share[j]), "layer-4 expert": e,
                      "lift": float((on == e).mean() / base[e] * 1), "top context": tok.decode(
                          [int(t) for t in best.context.values[0] if t >= 0])})
latents_table = pd.DataFrame(table)
facts |= {"sae_tokens": int(sds.sizes["token"]), "sae_latents_active": int(active.any(0).sum()),
          "sae_mean_l0": float(active.sum(1).mean()), "sae_table": table}
print(f"splice with the error term leaves the logits identical: {facts['sae_splice_identical']}; "
      f"{facts['sae_latents_active']} of {d_sae} latents fire on these {facts['sae_tokens']} tokens")
latents_table.round(2)

# %% tags=["summary"]
print(json.dumps(facts, indent=1))
