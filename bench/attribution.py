"""How well `expert_attribution` predicts the exact ablation sweep (one forward per expert) on the embedded model,
for each method ("gradient": one forward and one backward; "local": 2 * k more passes per MoE layer): the Spearman
correlation over every (layer, expert) pair, and how many of the sweep's 10 largest effects (by magnitude) are
among the estimate's 20 largest, per prompt of three domains.

    .venv/bin/python bench/attribution.py [--tokens 96] [--domains code french numbers]

The metric is the prompt's mean log-probability of each next token; each prompt is the first --tokens tokens of
the domain's held-out text (data/corpus), read with the model's tokenizer.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import workbench as wb
from workbench.attribution import ablation_sweep, expert_attribution
from workbench.demo import EMBEDDED_MODEL, heldout_texts


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (ties share their mean rank)."""
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--domains", nargs="+", default=["code", "french", "numbers"])
    args = p.parse_args()
    model = wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    texts = heldout_texts(8 * args.tokens)
    print(f"model {EMBEDDED_MODEL.name}, float32, backend {model.backend}, {args.tokens} tokens per prompt")
    print(f"{'domain':>10} {'method':>9} {'spearman':>9} {'|spearman|':>10} {'top-10 in top-20':>17} "
          f"{'estimate s':>10} {'sweep s':>8}")
    for domain in args.domains:
        ids = torch.tensor(model.tokenizer.encode(texts[domain].decode())[: args.tokens])[None]

        def metric(logits: torch.Tensor) -> torch.Tensor:
            return logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).mean()

        t0 = time.perf_counter()
        exact = ablation_sweep(model, ids, metric, progress=False).values.ravel()
        swept = time.perf_counter() - t0
        top_exact = set(np.argsort(-np.abs(exact))[:10].tolist())
        for method in ("gradient", "local"):
            t0 = time.perf_counter()
            est = expert_attribution(model, ids, metric, method=method).values.ravel()
            took = time.perf_counter() - t0
            top_est = set(np.argsort(-np.abs(est))[:20].tolist())
            print(f"{domain:>10} {method:>9} {spearman(est, exact):9.3f} {spearman(np.abs(est), np.abs(exact)):10.3f} "
                  f"{len(top_exact & top_est):>14}/10 {took:10.1f} {swept:8.1f}", flush=True)


if __name__ == "__main__":
    main()
