"""Causal importance of experts: for each (layer, expert), the mean change of the next-token loss over a labelled
corpus when it is ablated (`ablate(layer, [expert])`, mode "zero"), per domain; and how it ranks against the
observational statistics, load and domain specialisation (README, "Causal importance").

The sweep streams one ablation at a time into a zarr store with its provenance and resumes like a trace: each
MoE layer's row of results is written, then the layer is added to the root attrs' `committed_layers` (zarr
renames every file into place, so a kill leaves whole layers or nothing); a rerun with the same inputs skips the
committed layers, and a store started from other inputs is refused.

Test hook: `WORKBENCH_SWEEP_CRASH=LAYER` kills the process (SIGKILL) after that layer's results are written and
before its marker is.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import warnings
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import xarray as xr
import zarr
from tqdm.auto import tqdm

from .analysis import domain_specialisation, expert_load
from .attribution import ABLATION, moe_layers
from .checkpoint import sha256_many
from .errors import InputError, StoreError
from .interventions import ablate
from .models.base import CausalLM
from .store.disk import io_errors, write_lock
from .store.integrity import CODECS
from .version import __version__

FORMAT = 1
CRASH_ENV = "WORKBENCH_SWEEP_CRASH"
# root attrs that must match for a sweep to resume a store
IDENTITY = ("workbench_causal_sweep", "weights_sha256", "config_sha256", "dtype", "tokens_sha256", "domains",
            "layers", "n_experts", "chunk_tokens", "ablation")
Batch = tuple[torch.Tensor, np.ndarray]  # ids [B, t] and the domain code of each predicted token [B, t - 1]


def sweep(model: CausalLM, texts: Mapping[str, Any] | tuple[Any, Any], out: str | Path, *,
          layers: Iterable[int] | None = None, chunk_tokens: int = 256, progress: bool = True,
          overwrite: bool = False) -> Path:
    """Ablate each (layer, expert) in turn over `texts` and write the mean change of the next-token loss (nats)
    per domain to the zarr store `out`; returns `out` (read it with `open_sweep`).

    `texts`: {domain: token ids [T]}, or (ids [T], labels [T]) with one domain label per token (a prediction is
    labelled by the token it predicts). Sequences are cut into windows of `chunk_tokens` tokens (the context
    restarts at each); windows of one length run as one batch, so each ablation is one forward per length.
    `layers`: only those MoE layers. A rerun resumes `out`; `overwrite` replaces a store of other inputs."""
    if not isinstance(chunk_tokens, int) or chunk_tokens < 2:
        raise InputError(f"sweep: chunk_tokens must be an integer >= 2 (a window predicts its next tokens), "
                         f"got {chunk_tokens!r}")
    domains, batches = _batches(texts, chunk_tokens, model.config.get("vocab_size"))
    wanted = moe_layers(model)
    if layers is not None:
        chosen = [int(i) for i in layers]
        if not chosen or any(i not in wanted for i in chosen):
            raise InputError(f"sweep: layers {chosen} must be some of the MoE layers {list(wanted)}")
        wanted = {i: n for i, n in wanted.items() if i in chosen}
    out = Path(out).expanduser()
    prov = _provenance(model, domains, batches, list(wanted), max(wanted.values()), chunk_tokens)
    with write_lock(out):
        root, done = _prepare(out, prov, overwrite)
        with torch.no_grad():
            clean, counts = _loss(model, batches, len(domains))
        with io_errors(out, "writing the sweep"):
            if not done:
                root["clean_loss"][:] = clean
                root["tokens"][:] = counts
            elif not np.array_equal(root["clean_loss"][:], clean):
                warnings.warn(f"{out}: the clean loss differs from the one the sweep started with (by up to "
                              f"{np.abs(root['clean_loss'][:] - clean).max():.2e} nats); the layers swept now are "
                              "measured against today's", stacklevel=2)
            todo = [(j, i) for j, i in enumerate(wanted) if i not in done]
            bar = tqdm(total=len(todo) * prov["n_experts"], desc="causal sweep", unit="ablation",
                       disable=not progress)
            for j, i in todo:
                row = np.full((len(domains), prov["n_experts"]), np.nan)  # NaN: an expert the layer lacks
                for e in range(wanted[i]):
                    with torch.no_grad(), model.hooks(ablate(i, [e])):
                        row[:, e] = _loss(model, batches, len(domains))[0] - clean
                    bar.update()
                bar.update(prov["n_experts"] - wanted[i])
                root["delta_loss"][:, j, :] = row
                if os.environ.get(CRASH_ENV) == str(i):
                    os.kill(os.getpid(), signal.SIGKILL)
                done = done + [i]
                root.attrs.update({"committed_layers": done, "complete": len(done) == len(wanted)})
            bar.close()
    return out


def open_sweep(path: str | Path) -> xr.Dataset:
    """The sweep at `path`: `delta_loss(domain, layer, expert)` (NaN where a layer is not committed or lacks the
    expert), `clean_loss(domain)` and `tokens(domain)` (predicted tokens), its provenance in `attrs`."""
    path = Path(path).expanduser()
    with io_errors(path, "reading the sweep"):
        attrs = _attrs(path)
        if attrs is None:
            raise StoreError(f"{path}: no causal sweep here")
        root = zarr.open_group(path, mode="r")
        delta = root["delta_loss"][:]
        layers = root["layer"][:]
        committed = np.isin(layers, attrs["committed_layers"])
        delta[:, ~committed] = np.nan
        dims = ("domain", "layer", "expert")
        return xr.Dataset(
            {"delta_loss": (dims, delta, {"units": "nats", "definition": "mean next-token loss ablated - clean",
                                          "ablation": attrs["ablation"]}),
             "clean_loss": ("domain", root["clean_loss"][:], {"units": "nats"}),
             "tokens": ("domain", root["tokens"][:], {"definition": "next-token predictions averaged"})},
            coords={"domain": attrs["domains"], "layer": layers, "expert": root["expert"][:]}, attrs=attrs)


def observational_vs_causal(sweep_ds: xr.Dataset, routing: xr.Dataset, labels: Any) -> xr.Dataset:
    """Per layer, Spearman's rank correlation of causal importance against observation: `vs_load` (the token-weighted
    mean `delta_loss` over domains against `expert_load`'s share) and `vs_specialisation` (`delta_loss` against
    `domain_specialisation`, over every (domain, expert) pair of the layer); `vs_specialisation_by_domain` per
    (domain, layer) over the experts. `routing` is a store or `from_cache` trace, `labels` its per-token domains."""
    layers = [int(i) for i in sweep_ds.layer.values]
    share = expert_load(routing).share
    spec = domain_specialisation(routing, labels).specialisation
    missing = sorted(set(layers) - set(share.layer.values.tolist()))
    domains = [str(d) for d in sweep_ds.domain.values]
    absent = sorted(set(domains) - {str(d) for d in spec.domain.values})
    if missing or absent:
        raise InputError(f"observational_vs_causal: the routing lacks the sweep's layers {missing} / domains {absent}")
    spec = spec.assign_coords(domain=[str(d) for d in spec.domain.values]).sel(domain=domains, layer=layers)
    delta = sweep_ds.delta_loss
    weights = sweep_ds.tokens / sweep_ds.tokens.sum()
    overall = (delta * weights).sum("domain")
    by_layer = [(spearman(overall.sel(layer=i).values, share.sel(layer=i).values),
                 spearman(delta.sel(layer=i).values.ravel(), spec.sel(layer=i).values.ravel())) for i in layers]
    by_domain = [[spearman(delta.sel(domain=d, layer=i).values, spec.sel(domain=d, layer=i).values) for i in layers]
                 for d in domains]
    return xr.Dataset(
        {"vs_load": ("layer", [a for a, _ in by_layer], {"definition": "Spearman(delta_loss over domains, load share)"}),
         "vs_specialisation": ("layer", [b for _, b in by_layer],
                            {"definition": "Spearman(delta_loss, domain specialisation) over (domain, expert)"}),
         "vs_specialisation_by_domain": (("domain", "layer"), by_domain,
                                      {"definition": "Spearman(delta_loss, domain specialisation) over experts"})},
        coords={"layer": layers, "domain": domains})


def spearman(a: Any, b: Any) -> float:
    """Spearman's rank correlation (ties share their mean rank); NaN where either side is constant."""
    return float(pd.Series(np.asarray(a, float)).rank().corr(pd.Series(np.asarray(b, float)).rank()))


# ---------------------------------------------------------------- inputs


def _batches(texts: Mapping[str, Any] | tuple[Any, Any], chunk: int, vocab: int | None) -> tuple[list[str], list[Batch]]:
    """Domain names and the corpus as batches of equal-length windows, each with its predictions' domain codes."""
    if isinstance(texts, Mapping):
        domains = [str(d) for d in texts]
        seqs = [(_ids(v, f"texts[{d!r}]", vocab), None, c) for c, (d, v) in enumerate(texts.items())]
    elif isinstance(texts, tuple) and len(texts) == 2:
        ids = _ids(texts[0], "texts ids", vocab)
        labels = np.asarray(texts[1])
        if labels.shape != ids.shape:
            raise InputError(f"sweep: labels must give one domain per token ({len(ids)}); got shape "
                             f"{list(labels.shape)}")
        names, codes = np.unique(labels, return_inverse=True)
        domains, seqs = [str(d) for d in names], [(ids, codes.astype(np.int64), 0)]
    else:
        raise InputError("sweep: texts must be {domain: ids} or (ids, labels)")
    if not domains:
        raise InputError("sweep: texts holds no domain")
    windows: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for ids, codes, code in seqs:
        codes = np.full(len(ids), code) if codes is None else codes
        for s in range(0, len(ids) - 1, chunk):
            w = ids[s:s + chunk]
            if len(w) > 1:
                windows.setdefault(len(w), []).append((w, codes[s + 1:s + len(w)]))
    batches = [(torch.from_numpy(np.stack([w for w, _ in group])), np.stack([c for _, c in group]))
               for _, group in sorted(windows.items(), reverse=True)]
    counts = np.bincount(np.concatenate([c.ravel() for _, c in batches]), minlength=len(domains))
    if (counts == 0).any():
        raise InputError(f"sweep: domain(s) {[d for d, n in zip(domains, counts) if not n]} predict no token "
                         "(a domain needs at least 2 tokens)")
    return domains, batches


def _ids(x: Any, what: str, vocab: int | None) -> np.ndarray:
    ids = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise InputError(f"sweep: {what} must be one sequence of integer token ids [T]; got {ids.dtype} of shape "
                         f"{list(ids.shape)}")
    if ids.size and (ids.min() < 0 or (vocab is not None and ids.max() >= vocab)):
        raise InputError(f"sweep: {what} holds ids outside the vocabulary [0, {vocab})")
    return ids.astype(np.int64)


def _loss(model: CausalLM, batches: list[Batch], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean next-token cross-entropy (nats) per domain code, and the predictions averaged, over all batches."""
    total, counts = np.zeros(n), np.zeros(n, dtype=np.int64)
    for ids, codes in batches:
        logits = model(ids)[:, :-1].float()
        ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
        total += np.bincount(codes.ravel(), weights=ce.double().numpy(), minlength=n)
        counts += np.bincount(codes.ravel(), minlength=n)
    return total / counts, counts


# ---------------------------------------------------------------- the store


def _provenance(model: CausalLM, domains: list[str], batches: list[Batch], layers: list[int], experts: int,
                chunk: int) -> dict:
    """Root attrs of a new sweep, normalised to what JSON gives back."""
    folder = getattr(model, "checkpoint_dir", None)
    files = sorted(Path(folder).glob("*.safetensors")) if folder else []
    digest = hashlib.sha256()
    for ids, codes in batches:
        digest.update(np.int64(ids.shape[1]).tobytes() + ids.numpy().astype("<i8").tobytes()
                      + codes.astype("<i8").tobytes())
    attrs = {
        "workbench_causal_sweep": FORMAT,
        "source": model.source, "revision": model.revision, "commit": model.commit,
        "model_type": model.config.get("model_type"),
        "weights_sha256": {f.name: h for f, h in sha256_many(files).items()},
        "config_sha256": model.config.sha256(),
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "tokens_sha256": digest.hexdigest(),
        "domains": domains, "layers": layers, "n_experts": experts, "chunk_tokens": chunk,
        "ablation": ABLATION, "metric": "mean next-token cross-entropy (nats) per domain",
        "torch_threads": torch.get_num_threads(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
                     "xarray": metadata.version("xarray"), "numpy": np.__version__,
                     "workbench": __version__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "committed_layers": [], "complete": False,
    }
    return json.loads(json.dumps(attrs))


def _attrs(path: Path) -> dict | None:
    """Root attrs of the sweep at `path`; None where nothing is there. Refuses anything else."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return None
    if not path.is_dir():
        raise StoreError(f"{path} exists and is not a directory")
    try:
        attrs = zarr.open_group(path, mode="r").attrs.asdict()
    except (FileNotFoundError, ValueError):
        attrs = {}
    if "workbench_causal_sweep" not in attrs:
        raise StoreError(f"{path} is not empty and is not a causal sweep; refusing to touch it")
    if attrs["workbench_causal_sweep"] != FORMAT:
        raise StoreError(f"{path} is a causal sweep of format {attrs['workbench_causal_sweep']!r}; this workbench "
                         f"reads and writes format {FORMAT}")
    return attrs


def _prepare(out: Path, prov: dict, overwrite: bool) -> tuple[zarr.Group, list[int]]:
    """The sweep at `out` to resume (with its committed layers) or a new one."""
    with io_errors(out, "preparing the sweep"):
        attrs = _attrs(out)
        if attrs is not None and not overwrite:
            differ = [key for key in IDENTITY if attrs.get(key) != prov.get(key)]
            if differ:
                raise StoreError(f"{out} holds a causal sweep of other inputs (its {', '.join(differ)} differ); "
                                 "pass overwrite=True to replace it, or write elsewhere")
            changed = [key for key in ("versions", "torch_threads") if attrs.get(key) != prov[key]]
            if changed and not attrs["complete"]:
                warnings.warn(f"{out}: resuming with different {' and '.join(changed)} than the sweep started with; "
                              "the result may differ from an uninterrupted run", stacklevel=3)
            for p in out.rglob("*.partial"):  # temporaries of a write the last writer did not finish
                p.unlink()
            return zarr.open_group(out, mode="r+"), list(attrs["committed_layers"])
        for p in out.iterdir():
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
        root = zarr.create_group(out, zarr_format=3, attributes=prov)
        D, L, E = len(prov["domains"]), len(prov["layers"]), prov["n_experts"]
        for name, data in (("layer", np.asarray(prov["layers"], np.int64)), ("expert", np.arange(E, dtype=np.int64))):
            root.create_array(name, data=data, compressors=CODECS, dimension_names=(name,))
        root.create_array("delta_loss", shape=(D, L, E), chunks=(D, 1, E), dtype=np.float64, fill_value=np.nan,
                          compressors=CODECS, dimension_names=("domain", "layer", "expert"))
        root.create_array("clean_loss", shape=(D,), dtype=np.float64, fill_value=np.nan, compressors=CODECS,
                          dimension_names=("domain",))
        root.create_array("tokens", shape=(D,), dtype=np.int64, fill_value=0, compressors=CODECS,
                          dimension_names=("domain",))
        return root, []
