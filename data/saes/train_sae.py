"""Train the shipped top-k SAE on the embedded model's residual stream after layer 3, and write its card.

The SAE reads each of the model's 4 hyper-connection streams on its own (d_in = hidden = 192, one dictionary;
see workbench/sae.py), so every token gives 4 training rows. Activations come from seeded random windows of
data/corpus/*.train.txt (the forward stops after layer 3); the card's figures from consecutive windows of
*.heldout.txt. Fixed seed; 17 minutes on 2 cores shared with other jobs (the shipped run).

    .venv/bin/python data/saes/train_sae.py [--out data/saes/wb-v4-mini-layers.3.resid_post]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import workbench as wb
from workbench.sae import SAE, load_sae, splice

DATA = Path(__file__).resolve().parent.parent
MODEL, CORPUS = DATA / "models" / "wb-v4-mini", DATA / "corpus"
DOMAINS = ("code", "prose", "french", "spanish", "german", "numbers", "structured")
HOOK = "layers.3.resid_post"


class Enough(Exception):
    """Raised by the hook that has what it needs, so the rest of the forward is skipped."""


def read(split: str) -> dict[str, torch.Tensor]:
    return {d: torch.frombuffer(bytearray((CORPUS / f"{d}.{split}.txt").read_bytes()), dtype=torch.uint8).long()
            for d in DOMAINS}


def activations(model, rows: torch.Tensor) -> torch.Tensor:
    """The hook's activations [rows * seq, hc, hidden] for byte windows [rows, seq], 8 windows a forward."""
    out = []

    def grab(x, ctx):
        out.append(x.detach().flatten(0, 1).clone())
        raise Enough

    with torch.no_grad(), model.hooks({HOOK: grab}):
        for chunk in rows.split(8):
            try:
                model(chunk, head=False)
            except Enough:
                pass
    return torch.cat(out)


def train_windows(corpus: dict[str, torch.Tensor], per_domain: int, seq: int, g: torch.Generator) -> torch.Tensor:
    rows = []
    for d in DOMAINS:
        starts = torch.randint(len(corpus[d]) - seq, (per_domain,), generator=g)
        rows += [corpus[d][s:s + seq] for s in starts.tolist()]
    return torch.stack(rows)


def heldout_windows(data: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """`n` consecutive windows of seq + 1 bytes (inputs and next-byte targets)."""
    n = min(n, (len(data) - 1) // seq)
    return torch.stack([data[i * seq: i * seq + seq + 1] for i in range(n)])


def init_sae(d_in: int, d_sae: int, k: int, x: torch.Tensor) -> SAE:
    sae = SAE({"d_in": d_in, "d_sae": d_sae, "architecture": "topk", "k": k, "hook_name": HOOK,
               "apply_b_dec_to_input": True, "normalize_activations": "none", "dtype": "float32"})
    with torch.no_grad():
        w = torch.randn(d_sae, d_in)
        sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
        sae.W_enc.copy_(sae.W_dec.T)
        sae.b_dec.copy_(x.mean(0))
    return sae


def train(sae: SAE, x: torch.Tensor, steps: int, batch: int, lr: float, g: torch.Generator) -> list[float]:
    """Adam on the reconstruction MSE plus AuxK (dead latents reconstruct the residual error), decoder rows kept
    at unit norm; the learning rate decays linearly over the last fifth."""
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since = torch.zeros(sae.d_sae, dtype=torch.long)  # rows since each latent last fired
    scale = x.var(0).sum()
    log = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, 5 * (1 - step / steps))
        xb = x[torch.randint(len(x), (batch,), generator=g)]
        pre = (xb - sae.b_dec) @ sae.W_enc + sae.b_enc
        top = pre.topk(sae.cfg["k"], dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        recon = z @ sae.W_dec + sae.b_dec
        loss = (recon - xb).pow(2).sum(-1).mean() / scale
        fired = torch.zeros(sae.d_sae, dtype=torch.bool)
        fired[top.indices[top.values > 0].unique()] = True
        since = torch.where(fired, 0, since + batch)
        dead = since > 50 * batch
        if dead.any():  # AuxK: the top dead latents reconstruct what the live ones missed
            k_aux = min(int(dead.sum()), 2 * sae.cfg["k"])
            aux = pre.masked_fill(~dead, -math.inf).topk(k_aux, dim=-1)
            za = torch.zeros_like(pre).scatter(-1, aux.indices, aux.values.relu())
            loss = loss + (za @ sae.W_dec - (xb - recon).detach()).pow(2).sum(-1).mean() / scale / 32
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            sae.W_dec /= sae.W_dec.norm(dim=-1, keepdim=True)
        log.append(loss.item())
        if step % 250 == 0 or step == steps - 1:
            print(f"step {step:5d} loss {loss.item():.4f} dead {int(dead.sum())}", flush=True)
    return log


def bits_per_byte(model, rows: torch.Tensor) -> float:
    total = 0.0
    with torch.no_grad():
        for chunk in rows.split(8):
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
    return total / rows[:, 1:].numel() / math.log(2)


def evaluate(model, sae: SAE, heldout: dict[str, torch.Tensor]) -> dict:
    """Explained variance, MSE, L0 and dead latents over the held-out activations; bits per byte with the SAE's
    reconstruction in place of the residual (no error term) next to the model's own."""
    x = torch.cat([activations(model, rows[:, :-1]) for rows in heldout.values()]).flatten(0, 1)
    with torch.no_grad():
        z = sae.encode(x)
        err = (sae.decode(z) - x).pow(2)
    ev = 1 - err.sum().item() / (x - x.mean(0)).pow(2).sum().item()
    bpb = {}
    for d, rows in heldout.items():
        base = bits_per_byte(model, rows)
        with model.hooks(splice(model, sae, error=False)):
            spliced = bits_per_byte(model, rows)
        bpb[d] = {"model": round(base, 4), "spliced": round(spliced, 4), "delta": round(spliced - base, 4)}
    n = sum(len(r) for r in heldout.values())
    mean = {key: round(sum(bpb[d][key] * len(heldout[d]) for d in bpb) / n, 4) for key in ("model", "spliced")}
    mean["delta"] = round(mean["spliced"] - mean["model"], 4)
    return {"rows": len(x), "explained_variance": round(ev, 4), "mse": round(err.mean().item(), 4),
            "l0": round((z > 0).sum(-1).float().mean().item(), 3),
            "dead_latents": int(((z > 0).sum(0) == 0).sum()), "bits_per_byte": {**bpb, "all": mean}}


def card(out: Path, args: argparse.Namespace, ev: dict, rows: int, seconds: float) -> str:
    table = "\n".join(f"| {d} | {v['model']:.3f} | {v['spliced']:.3f} | {v['delta']:+.3f} |"
                      for d, v in ev["bits_per_byte"].items())
    return f"""# wb-v4-mini-layers.3.resid_post

A top-k sparse autoencoder (SAELens format: `cfg.json` + `sae_weights.safetensors`, fp32) on the residual stream
after layer 3 (`{HOOK}`) of the embedded model `data/models/wb-v4-mini`. d_in = 192 (hidden), d_sae = {args.d_sae},
k = {args.k}. The model's residual is 4 hyper-connection streams; the SAE reads each stream on its own with one
dictionary (latents [batch, tokens, 4, {args.d_sae}]), as `workbench.sae` splices it.

```python
from workbench.sae import load_sae
sae = load_sae("data/saes/wb-v4-mini-layers.3.resid_post")
```

Training: `data/saes/train_sae.py` (seed {args.seed}), {rows:,} rows ({rows // 4:,} tokens x 4 streams) from
{args.windows} random windows of {args.seq} bytes per domain of `data/corpus/*.train.txt`; Adam, lr {args.lr},
{args.steps} steps of {args.batch} rows, MSE plus an AuxK term for dead latents, unit-norm decoder rows;
{seconds / 60:.1f} minutes on 2 CPU cores (shared: 1-minute load average {ev['load_average']:.1f} when training
ended).

## Held-out figures

{ev['rows']:,} rows: {args.eval_windows} consecutive windows of {args.seq} bytes per domain of
`data/corpus/*.heldout.txt`.

| | |
|---|---|
| explained variance | {ev['explained_variance']:.4f} |
| MSE (per element) | {ev['mse']:.4f} |
| L0 (active latents per row) | {ev['l0']:.2f} |
| dead latents (never active on these rows) | {ev['dead_latents']} of {args.d_sae} |

Bits per byte, the model as it is and with every stream at `{HOOK}` replaced by its reconstruction (the splice
without the error term):

| domain | model | spliced | change |
|---|---|---|---|
{table}

Figures in `eval.json`. License: MIT (this project).
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "wb-v4-mini-layers.3.resid_post")
    p.add_argument("--d-sae", type=int, default=768)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--windows", type=int, default=16, help="training windows per domain")
    p.add_argument("--eval-windows", type=int, default=3, help="held-out windows per domain")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    model = wb.load(MODEL, dtype=torch.float32)
    x = activations(model, train_windows(read("train"), args.windows, args.seq, g)).flatten(0, 1)
    print(f"{len(x):,} training rows in {time.perf_counter() - t0:.0f} s", flush=True)
    sae = init_sae(x.shape[-1], args.d_sae, args.k, x)
    train(sae, x, args.steps, args.batch, args.lr, g)
    seconds, load = time.perf_counter() - t0, os.getloadavg()[0]
    sae.cfg["metadata"] = {"model_name": "wb-v4-mini", "hook_name": HOOK, "context_size": args.seq,
                           "dataset_path": "data/corpus/*.train.txt"}
    sae.save(args.out)
    sae = load_sae(args.out)  # the figures are those of the shipped file
    heldout = {d: heldout_windows(data, args.eval_windows, args.seq) for d, data in read("heldout").items()}
    ev = evaluate(model, sae, heldout)
    ev.update(seed=args.seed, steps=args.steps, train_rows=len(x), train_seconds=round(seconds, 1),
              load_average=round(load, 1))
    (args.out / "eval.json").write_text(json.dumps(ev, indent=2) + "\n")
    (args.out / "README.md").write_text(card(args.out, args, ev, len(x), seconds))
    print(json.dumps(ev, indent=2))


if __name__ == "__main__":
    main()
