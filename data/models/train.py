"""Train the embedded DeepSeek-V4-architecture MoE on data/corpus, through workbench's own model code.

Byte-level (256 ids), fixed seeds, resumable: the batch of step s depends only on (seed, s), and the state
(weights, optimiser moments, router biases, log) is saved atomically every `--save-every` steps, so a
resumed run equals an uninterrupted one. Learned routers are balanced without an auxiliary loss: after
each step every correction bias moves by `--bias-rate` towards equal expert load (DeepSeek-V3's rule).

Writes an HF-layout checkpoint into `--out`: config.json, model.safetensors (the names transformers writes
for `deepseek_v4`), tokenizer.json (bytes), a model card README.md with the training data, held-out bits
per byte per domain next to a unigram byte model, loss curves (loss.svg) and the weights' sha256.

    OMP_NUM_THREADS=1 .venv/bin/python data/models/train.py --out data/models/wb-v4-mini [--resume]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import workbench as wb
from workbench.config import Config
from workbench.loading import KEEP_FP32
from workbench.models import deepseek_v4

CORPUS = Path(__file__).resolve().parent.parent / "corpus"
DOMAINS = ("code", "prose", "french", "spanish", "german", "numbers", "structured")
S, CSA, HCA = deepseek_v4.SLIDING, deepseek_v4.CSA, deepseek_v4.HCA
CONFIG = {
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "dtype": "bfloat16",
    "vocab_size": 256, "hidden_size": 192, "moe_intermediate_size": 96, "num_hidden_layers": 6,
    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 64, "partial_rotary_factor": 0.25,
    "qk_rope_head_dim": 16, "q_lora_rank": 96, "o_groups": 2, "o_lora_rank": 64,
    "layer_types": [S, CSA, HCA, S, CSA, HCA], "compress_rates": {CSA: 4, HCA: 128}, "sliding_window": 128,
    "index_n_heads": 2, "index_head_dim": 32, "index_topk": 32,
    "mlp_layer_types": ["hash_moe", "hash_moe", "moe", "moe", "moe", "moe"],
    "n_routed_experts": 32, "num_experts_per_tok": 4, "n_shared_experts": 1, "scoring_func": "sqrtsoftplus",
    "norm_topk_prob": True, "routed_scaling_factor": 1.5, "swiglu_limit": 10.0, "hidden_act": "silu",
    "hc_mult": 4, "hc_sinkhorn_iters": 20, "hc_eps": 1e-6, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "compress_rope_theta": 160000.0, "max_position_embeddings": 1048576,
    "rope_parameters": {"main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
                        "compress": {"rope_type": "default", "rope_theta": 160000.0, "partial_rotary_factor": 0.25}},
    "tie_word_embeddings": False, "bos_token_id": None, "eos_token_id": None, "num_nextn_predict_layers": 0,
}


def read_corpus(split: str) -> dict[str, torch.Tensor]:
    """Each domain's split as one byte tensor (documents joined as stored)."""
    return {d: torch.frombuffer(bytearray((CORPUS / f"{d}.{split}.txt").read_bytes()), dtype=torch.uint8)
            for d in DOMAINS}


def batch(corpus: dict[str, torch.Tensor], step: int, seed: int, rows: int, seq: int) -> torch.Tensor:
    """Step `step`'s batch [rows, seq + 1]: each row a random window of a uniformly drawn domain."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    out = []
    for _ in range(rows):
        data = corpus[DOMAINS[int(torch.randint(len(DOMAINS), (1,), generator=g))]]
        start = int(torch.randint(len(data) - seq - 1, (1,), generator=g))
        out.append(data[start:start + seq + 1])
    return torch.stack(out).long()


def build(seed: int) -> deepseek_v4.DeepseekV4:
    """The model with initial weights: N(0, 0.02) matrices, unit norms and hc scales, zero biases and sinks,
    and hash tables sending each byte to distinct random experts."""
    torch.manual_seed(seed)
    model = deepseek_v4.build(Config(CONFIG))
    E, k = CONFIG["n_routed_experts"], CONFIG["num_experts_per_tok"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("tid2eid"):
                p.copy_(torch.rand(len(p), E).argsort(-1)[:, :k])
            elif "norm" in name or name.endswith(".scale"):
                p.fill_(1.0)
            elif name.endswith((".base", ".ape", "attn_sink", "correction_bias")):
                p.zero_()
            else:
                p.normal_(0.0, 0.02)
    return model


def bits_per_byte(model, data: torch.Tensor, seq: int, windows: int | None = None) -> float:
    """Mean next-byte cross-entropy in bits over consecutive windows of `data` (all of them by default)."""
    n = (len(data) - 1) // seq if windows is None else min(windows, (len(data) - 1) // seq)
    rows = torch.stack([data[i * seq: i * seq + seq + 1] for i in range(n)]).long()
    total = 0.0
    with torch.no_grad():
        for chunk in rows.split(8):
            logits = model(chunk[:, :-1])
            total += F.cross_entropy(logits.flatten(0, 1).float(), chunk[:, 1:].flatten(), reduction="sum").item()
    return total / (n * seq) / math.log(2)


def unigram_bits_per_byte(train: torch.Tensor, heldout: torch.Tensor) -> float:
    """Held-out cross-entropy of the train split's byte frequencies (add-one smoothed)."""
    p = (torch.bincount(train.long(), minlength=256) + 1).double()
    p = p / p.sum()
    return float(-torch.log2(p[heldout.long()]).mean())


# ---------------------------------------------------------------- state and export


def save_state(folder: Path, model, opt, step: int, log: dict) -> None:
    """Weights, optimiser moments and log at `step`, written to temporary files then renamed (atomic)."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{n}": p.detach().contiguous() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"opt.{names[id(p)]}.{key}"] = st[key].contiguous()
        tensors[f"opt.{names[id(p)]}.step"] = st["step"].reshape(1)
    save_file(tensors, folder / "state.safetensors.tmp")
    (folder / "state.json.tmp").write_text(json.dumps({"step": step, "log": log}))
    os.replace(folder / "state.safetensors.tmp", folder / "state.safetensors")
    os.replace(folder / "state.json.tmp", folder / "state.json")


def load_state(folder: Path, model, opt) -> tuple[int, dict]:
    tensors = load_file(folder / "state.safetensors")
    meta = json.loads((folder / "state.json").read_text())
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(tensors[f"model.{n}"])
    for group in opt.param_groups:
        for p in group["params"]:
            n = names[id(p)]
            if f"opt.{n}.exp_avg" in tensors:
                opt.state[p] = {"exp_avg": tensors[f"opt.{n}.exp_avg"], "exp_avg_sq": tensors[f"opt.{n}.exp_avg_sq"],
                                "step": tensors[f"opt.{n}.step"].reshape(())}
    return meta["step"], meta["log"]


HF_EXPERTS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


def hf_tensors(model, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Our parameters under the names transformers writes for `deepseek_v4` (what `wb.load` reads back)."""
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        t = t.to(dtype) if t.dtype.is_floating_point and not KEEP_FP32.fullmatch(name) else t
        parts = name.split(".")
        if name == "embed.weight":
            out["model.embed_tokens.weight"] = t
        elif name == "lm_head.weight":
            out["head.weight"] = t
        elif name == "norm.weight":
            out["model.norm.weight"] = t
        elif parts[0] == "hc_head":
            out[f"model.hc_head.hc_{parts[1]}"] = t
        elif parts[2] in ("hc_attn", "hc_ffn"):
            out[f"model.layers.{parts[1]}.{parts[2]}_{parts[3]}"] = t
        elif parts[2:4] == ["ffn", "router"]:
            leaf = {"weight": "weight", "correction_bias": "bias", "tid2eid": "tid2eid"}[parts[4]]
            out[f"model.layers.{parts[1]}.ffn.gate.{leaf}"] = t
        elif parts[2:4] == ["ffn", "experts"]:
            for e in range(len(t)):
                out[f"model.layers.{parts[1]}.ffn.experts.{e}.{HF_EXPERTS[parts[4]]}.weight"] = t[e].contiguous()
        elif parts[2:4] == ["ffn", "shared"]:
            out[f"model.layers.{parts[1]}.ffn.shared_experts.{HF_EXPERTS[parts[4]]}.weight"] = t
        else:
            out["model." + name] = t
    return out


def byte_tokenizer_json() -> dict:
    """A `tokenizers` file whose ids are the raw byte values (byte-level alphabet, no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    table = {}  # GPT-2's byte -> printable character map, rebuilt from the alphabet's construction rule
    printable = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]
    extra = 0
    for b in range(256):
        table[b] = chr(b) if b in printable else chr(256 + extra)
        extra += b not in printable
    assert set(table.values()) == set(alphabet)
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return json.loads(tok.to_str())


def plot_losses(log: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps, losses = zip(*log["train"])
    ax.plot(steps, [x / math.log(2) for x in losses], lw=0.8, color="0.6", label="train (batch)")
    for d in DOMAINS:
        pts = [(s, v[d]) for s, v in log["heldout"]]
        ax.plot(*zip(*pts), marker="o", ms=3, label=f"held-out {d}")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=700)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--bias-rate", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true", help="continue from --out/.train if present")
    parser.add_argument("--stop-at", type=int, default=None,
                        help="save and stop after this step (continue later with --resume)")
    parser.add_argument("--final-windows", type=int, default=None, help="held-out windows per domain (all)")
    args = parser.parse_args()
    train, heldout = read_corpus("train"), read_corpus("heldout")
    model = build(args.seed).train()
    decay = [p for n, p in model.named_parameters() if p.dtype.is_floating_point and p.dim() >= 2]
    other = [p for n, p in model.named_parameters()
             if p.dtype.is_floating_point and p.dim() < 2 and not n.endswith("correction_bias")]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    state_dir = args.out / ".train"
    step, log = 0, {"train": [], "heldout": [], "args": vars(args) | {"out": str(args.out)}}
    if args.resume and (state_dir / "state.json").exists():
        step, log = load_state(state_dir, model, opt)
        print(f"resuming at step {step}")
    routers = {n.split(".")[1]: m for n, m in model.named_modules() if n.endswith("ffn.router")
               and m.correction_bias is not None}
    loads: dict[str, torch.Tensor] = {}

    def count(ids: torch.Tensor, ctx) -> None:
        if str(ctx.layer) in routers:
            loads[str(ctx.layer)] = torch.bincount(ids.flatten(), minlength=CONFIG["n_routed_experts"]).float()

    warmup = 50
    bar = tqdm(total=args.steps, initial=step, desc="training", unit="step")
    t0 = time.perf_counter()
    with model.hooks({"layers.*.router.topk_ids": count}):
        while step < args.steps:
            lr = args.lr * min(1.0, (step + 1) / warmup) * (0.55 + 0.45 * math.cos(math.pi * step / args.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            x = batch(train, step, args.seed, args.batch, args.seq)
            loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1).float(), x[:, 1:].flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            with torch.no_grad():  # auxiliary-loss-free balancing: raise under-loaded experts' bias
                for layer, router in routers.items():
                    load = loads[layer]
                    router.correction_bias += args.bias_rate * torch.sign(load.mean() - load)
            step += 1
            log["train"].append((step, loss.item()))
            bar.update(1)
            rate = args.batch * args.seq * (bar.n - bar.initial) / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{loss.item():.3f}", bytes_s=f"{rate:.0f}")
            if step % args.eval_every == 0 or step == args.steps:
                model.eval()
                log["heldout"].append((step, {d: bits_per_byte(model, heldout[d], args.seq, windows=4)
                                              for d in DOMAINS}))
                model.train()
            if step % args.save_every == 0 or step in (args.steps, args.stop_at):
                save_state(state_dir, model, opt, step, log)
            if step == args.stop_at:
                print(f"\nstopped at step {step}; continue with --resume")
                return
    bar.close()
    export(model.eval(), args, train, heldout, log)


def export(model, args, train, heldout, log) -> None:
    """The HF-layout checkpoint, evaluated as shipped (bf16 weights, computed in fp32)."""
    out = args.out
    tensors = hf_tensors(model, torch.bfloat16)
    save_file(tensors, out / "model.safetensors.tmp", metadata={"format": "pt"})
    os.replace(out / "model.safetensors.tmp", out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "tokenizer.json").write_text(json.dumps(byte_tokenizer_json()) + "\n")
    shipped = wb.load(out, dtype=torch.float32)
    results = {d: (bits_per_byte(shipped, heldout[d], args.seq, args.final_windows),
                   unigram_bits_per_byte(train[d], heldout[d]))
               for d in tqdm(DOMAINS, desc="held-out evaluation")}
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n")
    plot_losses(log, out / "loss.svg")
    (out / "eval.json").write_text(json.dumps({"heldout_bits_per_byte": {d: r[0] for d, r in results.items()},
                                               "unigram_bits_per_byte": {d: r[1] for d, r in results.items()},
                                               "steps": args.steps, "seed": args.seed}, indent=2) + "\n")
    params = sum(p.numel() for p in shipped.parameters() if p.dtype.is_floating_point)
    rows = "\n".join(f"| {d} | {r[0]:.3f} | {r[1]:.3f} |" for d, r in results.items())
    manifest = json.loads((CORPUS / "MANIFEST.json").read_text())
    data_rows = "\n".join(f"| {d} | {m['train']['bytes']:,} | {m['heldout']['bytes']:,} |"
                          for d, m in manifest["domains"].items())
    (out / "README.md").write_text(CARD.format(
        name=out.name, params=params / 1e6, steps=args.steps, batch=args.batch, seq=args.seq,
        tokens=args.steps * args.batch * args.seq, lr=args.lr, seed=args.seed, rows=rows, data_rows=data_rows,
        sha=digest, config=json.dumps({k: CONFIG[k] for k in ("layer_types", "mlp_layer_types")})))
    print(rows)


CARD = """# {name}

A small DeepSeek-V4-architecture Mixture-of-Experts language model over bytes, trained by moe-workbench so
that its routing has real structure to discover (the workbench cannot download published weights here).
{params:.2f}M parameters: 6 layers (sliding, CSA, HCA, sliding, CSA, HCA attention; the first two MoE
layers hash-routed), 32 routed experts top-4 plus a shared expert per layer, 4 hyper-connection streams,
hidden size 192. Layer schedule: `{config}`.

Trained with `data/models/train.py` (plain PyTorch through `workbench.models.deepseek_v4`): {steps} steps of
{batch} x {seq} bytes ({tokens:,} bytes), AdamW lr {lr} (warm-up, cosine), seed {seed}, one thread
(`OMP_NUM_THREADS=1`), router correction biases balanced without an auxiliary loss. Weights stored in
bfloat16 (router tables and stream mixings in their own dtypes).

## Training data

`data/corpus` (see `data/README.md` for sources and licenses); each step draws its windows from a
uniformly chosen domain.

| domain | train bytes | held-out bytes |
|---|---|---|
{data_rows}

## Held-out bits per byte

Over every {seq}-byte window of each held-out split, with the shipped weights computed in fp32; the
unigram column is the held-out cross-entropy of the train split's byte frequencies.

| domain | this model | unigram bytes |
|---|---|---|
{rows}

![loss curves](loss.svg)

## Files

`config.json` (transformers' `deepseek_v4` layout), `model.safetensors` (sha256 `{sha}`), `tokenizer.json`
(byte-level: id = byte value), `eval.json` (the table above), `loss.svg`.

License: MIT (weights); the training data keeps its own licenses.
"""


if __name__ == "__main__":
    main()
