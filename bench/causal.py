"""The causal sweep on the embedded model: wall time of `workbench.causal.sweep` (every (layer, expert) ablated
over three domains) and, per layer, the Spearman rank correlation of causal importance against load and against
domain specialisation measured on the same tokens.

    .venv/bin/python bench/causal.py [--tokens 256] [--domains code prose french] [--threads 2]

Each domain is the first --tokens tokens of its held-out text (data/corpus), read with the model's tokenizer, in
fp32; the three run as one batch [3, tokens], so each ablation is one forward.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import xarray as xr

import workbench as wb
from workbench import analysis
from workbench.causal import observational_vs_causal, open_sweep, sweep
from workbench.demo import EMBEDDED_MODEL, heldout_texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--domains", nargs="+", default=["code", "prose", "french"])
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    texts = heldout_texts(8 * args.tokens)
    ids = {d: torch.tensor(model.tokenizer.encode(texts[d].decode())[:args.tokens]) for d in args.domains}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        sweep(model, ids, f"{tmp}/sweep.zarr", chunk_tokens=args.tokens)
        wall = time.perf_counter() - t0
        ds = open_sweep(f"{tmp}/sweep.zarr").load()
    routing = xr.concat([analysis.from_cache(model.run_with_cache(x[None], ["layers.*.router.topk_*"])[1], x,
                                             n_experts=ds.sizes["expert"])
                         for x in ids.values()], dim="token")
    labels = np.repeat(args.domains, [len(x) for x in ids.values()])
    rho = observational_vs_causal(ds, routing, labels)
    pairs = ds.sizes["layer"] * ds.sizes["expert"]
    print(f"sweep: {pairs} ablations x [{len(ids)}, {args.tokens}] tokens fp32, {args.threads} threads: "
          f"{wall:.1f} s ({wall / pairs:.2f} s per ablation)")
    print("clean loss (nats): " + ", ".join(f"{d} {v:.3f}" for d, v in zip(args.domains, ds.clean_loss.values)))
    print("layer  spearman(causal, load)  spearman(causal, specialisation)  max delta (nats)")
    for i in ds.layer.values:
        print(f"{i:5d}  {float(rho.vs_load.sel(layer=i)):22.3f}  {float(rho.vs_specialisation.sel(layer=i)):32.3f}"
              f"  {float(ds.delta_loss.sel(layer=i).max()):16.4f}")


if __name__ == "__main__":
    main()
