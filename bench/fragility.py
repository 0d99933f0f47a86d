"""Routing fragility on the embedded model: how many expert selections change between an fp32 and a bf16 run of
the same tokens, and how well the fp32 routing margin predicts which.

Traces the first `--bytes` of each domain's held-out text (`data/corpus/*.heldout.txt`, 7 domains, byte tokens,
concatenated: 14,336 tokens by default) twice into temporary stores, in fp32 and in bf16 (margins recorded),
then prints per layer: flips (tokens whose expert set changed) and their share, the ROC AUC of -margin for a
flip, the median fp32 margin of flipped and of kept tokens, margin quantiles and the log-binned margin
histogram.

    .venv/bin/python bench/fragility.py [--bytes 2048] [--chunk 4096] [--backend grouped]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import workbench as wb
from workbench import analysis as A
from workbench.demo import EMBEDDED_MODEL, heldout_texts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bytes", type=int, default=2048, help="bytes of each domain's held-out text")
    parser.add_argument("--chunk", type=int, default=4096, help="chunk_tokens of the traces")
    parser.add_argument("--backend", default="auto")
    args = parser.parse_args()
    texts = heldout_texts(args.bytes)
    ids = np.frombuffer(b"".join(texts.values()), np.uint8).astype(np.int64)
    print(f"{EMBEDDED_MODEL}: {len(ids):,} tokens of {len(texts)} held-out texts, backend {args.backend}, "
          f"torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for dtype in (torch.float32, torch.bfloat16):
            model = wb.load(EMBEDDED_MODEL, dtype=dtype, backend=args.backend)
            t0 = time.perf_counter()
            path = model.trace(ids, out=Path(tmp) / f"{dtype}.zarr", names=["layers.*.router.margin"],
                               chunk_tokens=args.chunk, progress=False)
            print(f"trace {str(dtype).removeprefix('torch.')}: {time.perf_counter() - t0:.1f} s")
            runs[dtype] = wb.open_store(path)
        fp32, bf16 = runs[torch.float32], runs[torch.bfloat16]
        t0 = time.perf_counter()
        out = A.flips(fp32, bf16)
        margin = A.margins(fp32, nearest=5)
        print(f"flips + margins over the stores: {time.perf_counter() - t0:.2f} s\n")
    hashed = out.hash_routed.values
    print("layer  routing  flips  share    AUC    median margin flipped / kept   p1       p10      p50")
    for j, layer in enumerate(out.layer.values):
        q = margin.margin_quantile.sel(layer=layer)
        kind = "hash" if hashed[j] else "learned"
        if hashed[j]:
            print(f"{layer:>5}  {kind:7}  {int(out.flips[j]):5}  {float(out.flip_share[j]):.4f}   -      -")
            continue
        print(f"{layer:>5}  {kind:7}  {int(out.flips[j]):5}  {float(out.flip_share[j]):.4f}  "
              f"{float(out.auc[j]):.3f}  {float(out.median_margin_flipped[j]):.2e} / "
              f"{float(out.median_margin_kept[j]):.2e}      {float(q.sel(q=0.01)):.1e}  {float(q.sel(q=0.1)):.1e}  "
              f"{float(q.sel(q=0.5)):.1e}")
    learned = ~hashed
    total = int(out.flips.values[learned].sum())
    print(f"\nlearned layers: {total} flips of {int(learned.sum()) * out.attrs['tokens']:,} (token, layer) rows; "
          f"tokens with any flip: {int((out.flipped_layers > 0).sum()):,} of {out.attrs['tokens']:,}")
    edges = margin.bin_edges.values
    hist = margin.hist.values[~hashed]
    used = np.flatnonzero(hist.sum(0))
    lo, hi = used.min(), used.max() + 1
    print("\nmargin histogram (fp32, tokens per bin of margins from the bin's edge to the next; bins 4 per decade):")
    print("from     " + " ".join(f"{e:>7.1e}" for e in edges[lo:hi]))
    for layer, h in zip(margin.layer.values[~hashed], hist):
        print(f"layer {layer}  " + " ".join(f"{v:>7}" for v in h[lo:hi]))

if __name__ == "__main__":
    main()
