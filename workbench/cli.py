"""Command line: `workbench demo` (more commands arrive with the store and publishing)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parent.parent / "data"
DEFAULT_MODEL = DATA / "models" / "tiny-random-deepseek-v3"

# A few lines per domain, so the demo shows routing per domain before the corpus ships.
SAMPLES = {
    "code": "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i * 2))\n",
    "prose": "The river ran quietly past the old mill, where the miller's daughter sat reading in the sun.",
    "numbers": "3.14159 2.71828 1.41421 42 1024 65536 7 * 8 = 56; 144 / 12 = 12; 2^10 = 1024",
    "json": '{"id": 17, "name": "widget", "tags": ["a", "b"], "price": 9.99, "in_stock": true}',
}


def demo(args: argparse.Namespace) -> int:
    """Load the embedded model, route every sample, summarise expert use and one ablation."""
    import workbench as wb
    from workbench.interventions import ablate

    t0 = time.perf_counter()
    model = wb.load(args.model)
    tok = model.tokenizer
    if tok is None:
        print(f"{args.model}: the model has no tokenizer", file=sys.stderr)
        return 2
    routers = [n for n in model.hook_names if n.endswith("router.topk_ids")]
    print(f"model  {args.model}")
    print(f"       {model.config.get('model_type')}, {len(model.layers)} layers, {len(routers)} routed, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, loaded in "
          f"{time.perf_counter() - t0:.2f} s")
    if "random" in Path(args.model).name:
        print("       (random weights: routing shows the machinery, not learned structure)")
    print()
    usage: dict[str, dict[str, torch.Tensor]] = {}
    n_tokens = 0
    for domain, text in SAMPLES.items():
        ids = torch.tensor(tok.encode(text))[None]
        n_tokens += ids.shape[1]
        _, cache = model.run_with_cache(ids, names=routers)
        usage[domain] = {n: cache[n] for n in routers}
    print(f"routing of {n_tokens} tokens over {len(SAMPLES)} domains: top-1 expert share per domain")
    header = "layer  " + "".join(f"{d:>16}" for d in SAMPLES) + "   load MaxVio"
    print(header)
    print("-" * len(header))
    for name in routers:
        layer = name.split(".")[1]
        experts = model.layers[layer].ffn.router.spec.experts
        cells, load = [], torch.zeros(experts)
        for domain in SAMPLES:
            ids = usage[domain][name].flatten(0, 1)
            load += torch.bincount(ids.flatten(), minlength=experts)
            top1 = torch.bincount(ids[:, 0], minlength=experts)
            e = int(top1.argmax())
            cells.append(f"e{e:<3d}{top1[e] / ids.shape[0]:>6.0%}".rjust(16))
        maxvio = float((load.max() - load.mean()) / load.mean())
        print(f"{layer:>5}  " + "".join(cells) + f"   {maxvio:11.2f}")
    # one intervention: drop the busiest expert of the last routed layer
    name = routers[-1]
    layer = int(name.split(".")[1])
    ids = torch.tensor(tok.encode(SAMPLES["prose"]))[None]
    _, cache = model.run_with_cache(ids, names=[name, "logits"])
    busiest = int(torch.bincount(cache[name].flatten()).argmax())
    with model.hooks(ablate(layer, [busiest])):
        ablated = model(ids)
    before, after = cache["logits"].argmax(-1), ablated.argmax(-1)
    print(f"\nablating expert {busiest} at layer {layer} on the prose sample changes the next-token prediction at "
          f"{int((before != after).sum())}/{ids.shape[1]} positions "
          f"(mean |delta logit| {float((ablated - cache['logits']).abs().mean()):.4f})")
    print(f"done in {time.perf_counter() - t0:.2f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="workbench", description="MoE research and interpretability workbench")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="route sample text through the embedded model and summarise expert use")
    p.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or hub repo id")
    p.set_defaults(func=demo)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
