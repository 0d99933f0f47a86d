# ---
# jupyter:
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # A real checkpoint from the Hugging Face hub
#
# The other notebooks use the embedded 12M-parameter model so that they run anywhere in seconds. Everything in them
# works the same on published MoE checkpoints: `wb.load` takes a hub repo id, fetches only the config, safetensors
# and tokenizer files (never code, never pickles), checks every header and shape against the config and loads the
# weights into the workbench's own model code with the same hook points. This notebook loads one, runs a prompt and
# shows its routing.
#
# The default is OLMoE-1B-7B (Muennighoff et al., 2024: 7B parameters, 1B active, 64 experts per layer, top-8;
# about 14 GB in bfloat16), small enough for a workstation's memory. `REPO = "deepseek-ai/DeepSeek-V2-Lite"` (16B,
# about 31 GB) or a Mixtral or Qwen-MoE repo works the same where there is memory for it. `REPO` may also name a
# local checkpoint folder.
#
# Before downloading anything the notebook asks the hub what the load would fetch and how large it is, and looks in
# the local cache. It **skips** (prints why and finishes without error) when the hub cannot be reached (offline,
# `HF_HUB_OFFLINE=1`, no network) and the weights are not cached, when the weights are larger than `MAX_WEIGHT_GB`
# or than 80% of this machine's memory, or when `ALLOW_DOWNLOAD` is False and they are not cached.

# %% tags=["parameters"]
REPO = "allenai/OLMoE-1B-7B-0924"  # hub repo id, or a local checkpoint folder
REVISION = None  # branch, tag or commit of the hub repo (None: main)
ALLOW_DOWNLOAD = True  # False: use the local cache only
MAX_WEIGHT_GB = 40.0  # skip checkpoints whose weights are larger than this
DEVICE = None  # None: the first CUDA GPU where there is one, else the CPU
PROMPT = "The capital of France is Paris. The capital of Germany is"
TIMEOUT_S = 10.0  # seconds to wait for the hub's answer

# %%
import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from huggingface_hub import constants, model_info, snapshot_download
from huggingface_hub import errors as hub_errors
from IPython.display import display

import workbench as wb
from workbench import analysis
from workbench.checkpoint import HUB_ALLOW_PATTERNS

# offline mode, an unreachable hub, a missing repo, revision or file: OSError subclasses (the HTTP errors of
# huggingface_hub >= 1.0 derive from its own HTTPError base)
HUB_ERRORS = (OSError, getattr(hub_errors, "HTTPError", OSError))

# %% [markdown]
# ## Is the checkpoint available?
#
# The hub's file listing (`model_info(..., files_metadata=True)`) gives the size of every file a load would fetch;
# `snapshot_download(..., local_files_only=True)` finds a cached copy without touching the network.

# %%
def wanted(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in HUB_ALLOW_PATTERNS)


def memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def cached_weights(repo: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of `repo` if it holds config and every weight file, else None (no network)."""
    try:
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=HUB_ALLOW_PATTERNS,
                                        local_files_only=True))
    except HUB_ERRORS:
        return None
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        needed = set(json.loads(index.read_text())["weight_map"].values())
    else:
        needed = {p.name for p in folder.glob("*.safetensors")} or {"model.safetensors"}
    complete = (folder / "config.json").is_file() and all((folder / name).is_file() for name in needed)
    return folder if complete else None


def availability() -> tuple[str | None, str, dict]:
    """(how to load: "local" / "cache" / "download", or None to skip; why; facts about the files)."""
    if Path(REPO).expanduser().is_dir():
        files = {p.name: p.stat().st_size for p in Path(REPO).expanduser().glob("*.safetensors")}
        return "local", f"local folder {REPO}", {"weight_bytes": sum(files.values()), "files": len(files)}
    facts, listing, unreachable = {}, None, None
    if constants.HF_HUB_OFFLINE:
        unreachable = "offline mode is enabled (HF_HUB_OFFLINE=1)"
    else:
        try:
            info = model_info(REPO, revision=REVISION, files_metadata=True, timeout=TIMEOUT_S)
            listing = {s.rfilename: s.size or 0 for s in info.siblings if wanted(s.rfilename)}
            facts.update(commit=info.sha, files=len(listing),
                         weight_bytes=sum(v for k, v in listing.items() if k.endswith(".safetensors")))
        except HUB_ERRORS as e:
            unreachable = f"the hub did not answer for {REPO} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    cached = cached_weights(REPO, REVISION)
    if cached is not None:
        facts.setdefault("weight_bytes", sum(p.stat().st_size for p in cached.glob("*.safetensors")))
    size = facts.get("weight_bytes")
    ram = memory_bytes()
    if size is not None and size > MAX_WEIGHT_GB * 1e9:
        return None, f"{REPO}'s weights take {size / 1e9:.1f} GB, more than MAX_WEIGHT_GB={MAX_WEIGHT_GB}", facts
    if size is not None and ram is not None and size > 0.8 * ram:
        return None, (f"{REPO}'s weights take {size / 1e9:.1f} GB, more than 80% of this machine's "
                      f"{ram / 1e9:.1f} GB of memory"), facts
    if cached is not None:
        return "cache", f"{REPO} is in the local cache ({cached})", facts
    if unreachable:
        return None, f"{unreachable}, and {REPO}'s weights are not in the local cache", facts
    if not any(k.endswith(".safetensors") for k in listing):
        return None, f"{REPO} has no safetensors weights on the hub (the workbench never opens pickles)", facts
    if not ALLOW_DOWNLOAD:
        return None, f"{REPO} is not in the local cache and ALLOW_DOWNLOAD is False", facts
    return "download", f"{REPO} will be downloaded ({size / 1e9:.1f} GB of weights)", facts


how, why, facts = availability()
if how is None:
    print(f"SKIPPED: {why}. Nothing was downloaded; the rest of the notebook does nothing.")
else:
    print(f"loading from {how}: {why}")

# %% [markdown]
# ## Loading and running the prompt
#
# The load checks every safetensors header and tensor shape against the config before reading any weight (see the
# README's "Safety"); the model records the source, revision and the resolved commit.

# %%
model = None
if how is not None:
    device = DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    model = wb.load(REPO, revision=REVISION, device=device)
    print(f"{model.source} @ {model.commit or 'local folder'}: {model.config.get('model_type')}, "
          f"{len(model.layers)} layers, {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters, "
          f"{model.embed.weight.dtype}, {device}, backend {model.backend!r}")
    ids = torch.tensor([model.tokenizer.encode(PROMPT)], device=device)
    logits, cache = model.run_with_cache(ids, names=["layers.*.router.*"])
    routing = analysis.from_cache({n: t.cpu() for n, t in cache.items()}, ids.cpu(), logits=logits.float().cpu())
    probs = logits[0, -1].float().softmax(-1)
    top = probs.topk(5)
    print(f"{ids.shape[1]} tokens; next token: " + ", ".join(
        f"{model.tokenizer.decode([int(i)])!r} {float(p):.3f}" for p, i in zip(top.values, top.indices)))
    display(routing)
else:
    print("skipped")

# %% [markdown]
# ## Routing of the prompt
#
# Each token's first-choice expert at every MoE layer, as a table (an expert id means something only within its
# layer, so no colour scale is shared by the layers; dense layers, such as DeepSeek's first ones, have no router
# and are left out), then how decided the routers are: the mean entropy of their score distributions and the mean
# gap between the first and second expert (`analysis.router_confidence`).

# %%
if model is not None:
    layers = [int(x) for x in routing.layer.values]
    first = routing.topk_ids.isel(k=0).values  # [layer, token]
    tokens = [f"{t}:{model.tokenizer.decode([int(i)])!r}" for t, i in enumerate(ids[0].tolist())]
    # expert ids are local to a layer, so they are shown as labels, not on a colour scale shared by the layers
    display(pd.DataFrame(first, index=pd.Index(layers, name="layer"), columns=tokens))
    confidence = analysis.router_confidence(routing)
    display(pd.DataFrame({"entropy (bits)": confidence.entropy.values, "top-1 minus top-2": confidence.margin.values},
                         index=pd.Index(layers, name="layer")).round(3))
else:
    print("skipped")

# %% [markdown]
# ## Summary
#
# What the run found, or why it was skipped (the test suite runs this notebook offline and checks the skip).

# %% tags=["summary"]
if model is None:
    summary = {"skipped": True, "reason": why, "repo": REPO}
else:
    summary = {
        "skipped": False,
        "repo": REPO,
        "loaded_from": how,
        "commit": model.commit,
        "model_type": model.config.get("model_type"),
        "routed_layers": layers,
        "n_experts": int(routing.attrs["n_experts"]),
        "k": int(routing.attrs["k"]),
        "tokens": int(ids.shape[1]),
        "prediction": model.tokenizer.decode([int(probs.argmax())]),
        "mean_router_entropy_bits": float(confidence.entropy.mean()),
        "weight_sum_mean": float(routing.topk_weights.astype(np.float32).sum("k").mean()),
    }
print(json.dumps(summary))
