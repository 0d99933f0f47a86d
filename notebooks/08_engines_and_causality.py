# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Engine traces, routing fragility, causal importance, rebalancing and position
#
# On the embedded model (`data/models/wb-v4-mini`: DeepSeek-V4 architecture, 6 MoE layers of 32 routed experts,
# top-4; layers 0 and 1 hash-routed):
#
# 1. **An engine's trace.** A dump in vLLM's `routed_experts` layout (int16 ids `[tokens, moe_layers, k]`), written
#    here from our own routing with a known share of rows perturbed, read with `engines.read_vllm`, compared with
#    our run (`analysis.compare`) and replayed (`interventions.replay`).
# 2. **Fragility**: the margin between the k-th and (k+1)-th selection score per layer (`analysis.margins`), and
#    the selections that change between fp32 and bf16 (`analysis.flips`).
# 3. **Causal importance**: every (layer, expert) ablated over three domains (`causal.sweep`), against load and
#    domain specialisation (`causal.observational_vs_causal`).
# 4. **Rebalancing what-if**: DeepSeek's EPLB placement of the measured load (`rebalance`).
# 5. **Position-resolved routing** over a long store (`analysis.by_position`).

# %% tags=["parameters"]
DOMAINS = ["code", "prose", "french"]  # held-out text of these corpus domains
TOKENS = 128  # tokens per domain traced for sections 1, 2 and 4
PERTURB = 0.1  # share of the dump's rows (tokens) given other experts at one routed layer
SWEEP_TOKENS = 64  # tokens per domain of the causal sweep (one forward [3, SWEEP_TOKENS] per ablation)
SWEEP_LAYERS = None  # MoE layers swept (None: all six, 192 ablations)
GPUS = 4  # GPUs of the rebalancing what-if
SLOTS = 40  # physical expert slots over them (32 experts + 8 replicas)
LONG_STORE = None  # a long routing store (e.g. notebook 04's 1M-token trace); None: trace LONG_TOKENS random tokens
LONG_TOKENS = 16384  # random tokens traced when LONG_STORE is None
BINS = 16  # position bins
OUT = "runs"  # folder of the stores this notebook writes (replaced on every run)
SEED = 0
THREADS = 2  # torch threads

# %%
import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import torch
import xarray as xr

import workbench as wb
from workbench import analysis, engines
from workbench.causal import observational_vs_causal, open_sweep, sweep
from workbench.demo import EMBEDDED_MODEL, heldout_texts
from workbench.interventions import replay
from workbench.rebalance import rebalance

torch.set_num_threads(THREADS)
model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
E = 32
out_dir = Path(OUT)
out_dir.mkdir(parents=True, exist_ok=True)
raw = heldout_texts(16 * max(TOKENS, SWEEP_TOKENS))
by_domain = {d: model.tokenizer.encode(raw[d].decode()) for d in DOMAINS}
ids = torch.tensor(sum((by_domain[d][:TOKENS] for d in DOMAINS), []))
labels = np.repeat(DOMAINS, TOKENS)
NAMES = ["layers.*.router.topk_ids", "layers.*.router.topk_weights", "layers.*.router.margin"]
logits, cache = model.run_with_cache(ids[None], NAMES)
ours = analysis.from_cache(cache, ids, n_experts=E)
facts = {"tokens": len(ids)}
print(f"{len(ids)} tokens: {TOKENS} of held-out {', '.join(DOMAINS)}")

# %% [markdown]
# ## 1. An engine's trace, compared and replayed
#
# vLLM returns, with `--enable-return-routed-experts`, each token's expert ids at every MoE layer. We write such a
# dump from our own routing, give a share `PERTURB` of its tokens other experts (each id + 1, mod 32) from one
# routed layer on, and read it back. `compare` says per layer how many tokens got the same expert set, their mean
# Jaccard, and per token the first layer where it diverged; numpy says the same from the perturbation we made.

# %%
rng = np.random.default_rng(SEED)
dump = ours.topk_ids.transpose("token", "layer", "k").values.astype(np.int16)  # vLLM: [tokens, moe_layers, k]
routed = [int(i) for i in ours.layer.values[~analysis.hash_routed(ours).values]]  # score-routed layers
perturbed = dump.copy()
rows = np.sort(rng.choice(len(ids), int(round(PERTURB * len(ids))), replace=False))
start = rng.choice(routed, len(rows))  # the first perturbed layer of each row
for t, s in zip(rows, start):
    perturbed[t, s:] = (perturbed[t, s:] + 1) % E
engine = engines.read_vllm(perturbed, ids, n_experts=E)
cmp = analysis.compare(ours, engine)

changed = np.zeros((len(ids), dump.shape[1]), bool)  # numpy: which (token, layer) sets differ
for t, s in zip(rows, start):
    changed[t, s:] = True
a, b = dump, perturbed
inter = (a[:, :, :, None] == b[:, :, None, :]).any(-1).sum(-1)
want_jaccard = (inter / (2 * a.shape[-1] - inter)).mean(0)
want_first = np.where(changed.any(1), changed.argmax(1), -1)
facts |= {"perturbed_rows": len(rows),
          "agreement": cmp.agreement.values.round(6).tolist(),
          "compare_equals_numpy": bool(np.allclose(cmp.agreement, 1 - changed.mean(0))
                                       and np.allclose(cmp.jaccard, want_jaccard)
                                       and np.array_equal(cmp.first_divergence, want_first)),
          "self_agreement": analysis.compare(ours, ours).agreement.values.tolist()}
print(f"{len(rows)} of {len(ids)} rows perturbed; agreement per layer {np.round(cmp.agreement.values, 3).tolist()}, "
      f"Jaccard {np.round(cmp.jaccard.values, 3).tolist()}; compare equals numpy: {facts['compare_equals_numpy']}")

# %% [markdown]
# **Replay**: the model run with each layer's experts forced from a trace, weighed by the router's own scores. The
# unperturbed dump read back reproduces the free run's logits; the perturbed one moves them.

# %%
with torch.no_grad(), model.hooks(replay(engines.read_vllm(dump, ids, n_experts=E))):
    replayed = model(ids[None])
with torch.no_grad(), model.hooks(replay(engine)):
    moved = model(ids[None])
facts |= {"replay_max_abs": float((replayed - logits).abs().max()),
          "perturbed_replay_max_abs": float((moved - logits).abs().max())}
print(f"replay of the engine's trace: logits differ by at most {facts['replay_max_abs']:.2e}; replay of the "
      f"perturbed trace: by up to {facts['perturbed_replay_max_abs']:.3f}")

# %% [markdown]
# ## 2. Fragility: margins, and what bf16 flips
#
# The margin is the k-th minus the (k+1)-th selection score (after the correction bias): a small margin means a
# small change of the input or of the arithmetic can swap an expert. The hash-routed layers have none.

# %%
m = analysis.margins(ours)
bf16 = wb.load(EMBEDDED_MODEL, dtype=torch.bfloat16)
_, cache16 = bf16.run_with_cache(ids[None], NAMES)
low = analysis.from_cache(cache16, ids, n_experts=E)
f = analysis.flips(ours, low)
median = m.median_margin
facts |= {"margin_median": {int(i): float(median.sel(layer=i)) for i in routed},
          "flips": {int(i): int(f.flips.sel(layer=i)) for i in f.layer.values},
          "flip_auc": {int(i): float(f.auc.sel(layer=i)) for i in routed}}
fig = go.Figure([go.Bar(x=[str(i) for i in f.layer.values], y=f.flip_share.values * 100)])
fig.update_layout(title=f"Tokens whose expert set changes between fp32 and bf16 ({len(ids)} tokens)",
                  xaxis_title="layer", yaxis_title="% of tokens", height=320)
print("median margin per routed layer: " + ", ".join(f"{i}: {v:.4f}" for i, v in facts["margin_median"].items()))
print("fp32 -> bf16 flips per layer: " + ", ".join(f"{i}: {v}" for i, v in facts["flips"].items())
      + "; margin AUC per routed layer: " + ", ".join(f"{i}: {v:.2f}" for i, v in facts["flip_auc"].items()))
fig

# %% [markdown]
# ## 3. Causal importance against load
#
# Each (layer, expert) is ablated in turn (its routing weight set to 0 wherever selected) over `SWEEP_TOKENS` tokens
# of each domain, and the mean next-token loss is compared with the clean run's, per domain. The sweep streams to
# a zarr store with its provenance and resumes like a trace. Does the load an expert carries say how much the
# model needs it?

# %%
texts = {d: torch.tensor(by_domain[d][:SWEEP_TOKENS]) for d in DOMAINS}
path = sweep(model, texts, out_dir / "causal.zarr", layers=SWEEP_LAYERS, chunk_tokens=SWEEP_TOKENS, progress=False,
             overwrite=True)
causal = open_sweep(path)
swept = xr.concat([analysis.from_cache(model.run_with_cache(x[None], NAMES[:2])[1], x, n_experts=E)
                   for x in texts.values()], dim="token")
rho = observational_vs_causal(causal, swept, np.repeat(DOMAINS, SWEEP_TOKENS))
share = analysis.expert_load(swept).share
overall = (causal.delta_loss * causal.tokens / causal.tokens.sum()).sum("domain")
facts |= {"sweep_layers": causal.layer.values.tolist(), "sweep_ablations": int(overall.size),
          "clean_loss": dict(zip(DOMAINS, causal.clean_loss.values.round(4).tolist())),
          "spearman_load": {int(i): float(rho.vs_load.sel(layer=i)) for i in rho.layer.values},
          "spearman_specialisation": {int(i): float(rho.vs_specialisation.sel(layer=i)) for i in rho.layer.values},
          "max_delta": float(causal.delta_loss.max())}
fig = go.Figure([go.Scatter(x=share.sel(layer=i).values, y=overall.sel(layer=i).values, mode="markers",
                            name=f"layer {i} (ρ {float(rho.vs_load.sel(layer=i)):.2f})",
                            text=[f"layer {i}, expert {e}" for e in range(E)]) for i in causal.layer.values])
fig.update_layout(title="Observational against causal: load share and loss increase when ablated",
                  xaxis_title="load share (expert_load)", yaxis_title="Δ next-token loss (nats), ablated − clean",
                  height=480)
print("layer  Spearman(causal, load)  Spearman(causal, specialisation)")
for i in rho.layer.values:
    print(f"{i:5d}  {float(rho.vs_load.sel(layer=i)):22.2f}  {float(rho.vs_specialisation.sel(layer=i)):32.2f}")
fig

# %% [markdown]
# ## 4. Rebalancing what-if
#
# Where EPLB's hierarchical policy would put each expert (with `SLOTS - 32` replicas for the heaviest) on `GPUS`
# GPUs, and how even their loads would be, from the load measured on the held-out text above; the contiguous
# placement without replicas is the baseline.

# %%
plan = rebalance(ours, gpus=GPUS, slots=SLOTS)
facts |= {"imbalance_before": plan.identity_imbalance.values.round(4).tolist(),
          "imbalance_after": plan.imbalance.values.round(4).tolist()}
print("per-GPU max/mean load, contiguous -> EPLB: " + ", ".join(
    f"layer {i}: {a:.2f} -> {b:.2f}" for i, a, b in
    zip(plan.layer.values, plan.identity_imbalance.values, plan.imbalance.values)))

# %% [markdown]
# ## 5. Position-resolved routing
#
# Load entropy per layer as a function of position, in `BINS` bins, over a long store: notebook 04's million-token
# trace when `LONG_STORE` names it, else `LONG_TOKENS` random tokens traced here.

# %%
if LONG_STORE is None:
    tokens = np.random.default_rng(SEED).integers(0, 256, LONG_TOKENS)
    long_path = wb.trace(model, tokens, out_dir / "long.zarr", chunk_tokens=4096, overwrite=True, progress=False)
    print(f"LONG_STORE is None: traced {LONG_TOKENS:,} random tokens to {long_path} instead of the 1M-token store")
else:
    long_path = Path(LONG_STORE)
long = wb.open_store(long_path)
pos = analysis.by_position(long, bins=BINS)
centre = (pos.bin_start + pos.bin_stop).values / 2
fig = go.Figure([go.Scatter(x=centre, y=pos.entropy.sel(layer=i).values, mode="lines+markers",
                            name=f"layer {i}") for i in pos.layer.values])
fig.update_layout(title=f"Load entropy by position ({long.sizes['token']:,} tokens)", xaxis_title="position",
                  yaxis_title="normalised entropy (1 = balanced)", height=360)
facts |= {"long_tokens": int(long.sizes["token"]), "position_bins": int(pos.sizes["bin"]),
          "entropy_min": float(pos.entropy.min())}
fig

# %% tags=["summary"]
print(json.dumps(facts))
