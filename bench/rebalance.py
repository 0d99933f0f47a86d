"""Load-rebalancing what-if on the embedded model: per routed layer, the per-GPU max/mean load of the contiguous
placement (no replicas) and of EPLB's placement with redundant slots, for routing measured on held-out text of
every domain and on as many uniform random tokens.

    .venv/bin/python bench/rebalance.py [--bytes 2048] [--nodes 2] [--gpus 8] [--redundant 8]

Text is what a served model sees; random tokens spread routing unlike text, which is why `rebalance` flags them.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import torch

import workbench as wb
from workbench.analysis import from_cache
from workbench.demo import EMBEDDED_MODEL, heldout_texts
from workbench.rebalance import rebalance


def routing(model, ids: np.ndarray):
    _, cache = model.run_with_cache(torch.as_tensor(ids)[None], names=["layers.*.router.topk_ids", "layers.*.router.scores"])
    return from_cache(cache, ids)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bytes", type=int, default=2048, help="held-out bytes per domain")
    p.add_argument("--nodes", type=int, default=2)
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--redundant", type=int, default=8, help="slots beyond the experts, in all")
    args = p.parse_args()
    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    text = np.frombuffer(b"".join(heldout_texts(args.bytes).values()), np.uint8).astype(np.int64)
    uniform = np.random.default_rng(0).integers(0, model.vocab_size, len(text))
    plans = {}
    for name, ids in (("text", text), ("random", uniform)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = routing(model, ids)
            E = ds.sizes["expert"]
            plans[name] = rebalance(ds, gpus=args.gpus, nodes=args.nodes, slots=E + args.redundant)
    plan = plans["text"]
    print(f"{EMBEDDED_MODEL.name}: {len(text)} tokens of held-out text and {len(uniform)} random; {args.nodes} "
          f"nodes x {args.gpus // args.nodes} GPUs, {plan.attrs['slots']} slots ({plan.attrs['policy']} policy)")
    print(f"{'layer':>5} {'text: contiguous':>17} {'text: EPLB':>11} {'random: contiguous':>19} {'random: EPLB':>13}")
    for i, layer in enumerate(plan.layer.values):
        r = plans["random"]
        print(f"{layer:>5} {plan.identity_imbalance.values[i]:>17.3f} {plan.imbalance.values[i]:>11.3f} "
              f"{r.identity_imbalance.values[i]:>19.3f} {r.imbalance.values[i]:>13.3f}")
    print("per-GPU max / mean load (1 = even)")


if __name__ == "__main__":
    main()
