"""The demo behind `workbench demo` / `make demo`: trace the embedded model's routing over held-out text of
every corpus domain, measure expert load and per-domain specialisation, and write a self-contained HTML
report (plotly, no network needed to view it) plus a terminal summary.

Specialisation of expert e for domain d in a layer: the share of d's tokens that have e among their top-k
experts. A router that ignored the domain would give every expert k / E; the report shows each share as a
multiple of that baseline. Load: each expert's share of all routing slots; MaxVio = max / mean - 1.
"""

from __future__ import annotations

import html
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import colours, provenance

# the embedded model and held-out corpus: a wheel's package data (pyproject maps data/ to workbench/_data), else
# data/ of the source checkout (editable install, PYTHONPATH)
DATA = Path(__file__).resolve().parent / "_data"
if not DATA.is_dir():
    DATA = DATA.parent.parent / "data"
EMBEDDED_MODEL = DATA / "models" / "wb-v4-mini"
CORPUS = DATA / "corpus"


@dataclass
class Routing:
    """Routing statistics of one model over several domains (layers in the checkpoint's numbering)."""

    layers: list[int]
    domains: list[str]
    experts: int
    k: int
    share: np.ndarray  # [layer, domain, expert]: fraction of the domain's tokens routed to the expert
    load: np.ndarray  # [layer, expert]: fraction of all routing slots
    tokens: dict[str, int]

    @property
    def baseline(self) -> float:
        return self.k / self.experts

    def top(self, layer: int, domain: str) -> tuple[int, float]:
        """The expert most specialised to `domain` in `layer`, and its share as a multiple of k / E."""
        row = self.share[self.layers.index(layer), self.domains.index(domain)]
        e = int(row.argmax())
        return e, float(row[e] / self.baseline)

    def max_violation(self) -> np.ndarray:
        return self.load.max(-1) / self.load.mean(-1) - 1


def heldout_texts(max_bytes: int) -> dict[str, bytes]:
    """The first `max_bytes` of each domain's held-out split (cut at a UTF-8 character boundary)."""
    texts = {}
    for path in sorted(CORPUS.glob("*.heldout.txt")):
        data = provenance.record_input(path).read_bytes()[:max_bytes]  # a published analysis's input
        texts[path.name.split(".")[0]] = data.decode("utf-8", errors="ignore").encode()
    return texts


def route(model, texts: dict[str, bytes], chunk_tokens: int = 512) -> Routing:
    """Trace every text through `model` into a temporary store and count expert use per domain."""
    import workbench as wb

    per_domain = {}
    with tempfile.TemporaryDirectory() as tmp:
        for domain, text in texts.items():
            ids = np.asarray(model.tokenizer.encode(text.decode()), dtype=np.int64)
            store = model.trace(ids, out=Path(tmp) / f"{domain}.zarr", chunk_tokens=chunk_tokens, progress=False)
            ds = wb.open_store(store)
            per_domain[domain] = ds.topk_ids.load()
    first = next(iter(per_domain.values()))
    layers = [int(x) for x in first.layer.values if (first.sel(layer=x) >= 0).all()]
    experts = next(m for n, m in model.named_modules() if n.endswith("ffn.router")).spec.experts
    k = first.sizes["k"]
    share = np.zeros((len(layers), len(texts), experts))
    load = np.zeros((len(layers), experts))
    for j, ids in enumerate(per_domain.values()):
        for i, layer in enumerate(layers):
            sel = ids.sel(layer=layer).values  # [token, k]
            counts = np.bincount(sel.ravel(), minlength=experts)
            share[i, j] = counts / sel.shape[0]
            load[i] += counts
    load /= load.sum(-1, keepdims=True)
    return Routing(layers, list(texts), experts, k, share, load, {d: int(v.sizes["token"]) for d, v in per_domain.items()})


def _table(head: list[str], rows: list[list[str]], left: int = 1) -> str:
    """An HTML table; the first `left` columns are labels (left-aligned), the rest numbers (right-aligned)."""
    def cells(tag: str, row: list[str]) -> str:
        return "".join(f"<{tag}{' class=label' if i < left else ''}>{html.escape(c)}</{tag}>" for i, c in enumerate(row))
    return "<table><tr>" + cells("th", head) + "</tr>" + "".join(f"<tr>{cells('td', r)}</tr>" for r in rows) \
        + "</table>"


def report_html(r: Routing, title: str, facts: dict[str, str], bits_per_byte: dict[str, float] | None = None) -> str:
    """A self-contained page: a facts table, tokens and held-out bits per byte per domain, the most
    specialised expert per layer and domain, and one panel per layer (expert ids are local to a layer) for
    specialisation and load, coloured on the diverging scale around the uniform share (`workbench.colours`)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    cols = min(3, len(r.layers))
    rows = -(-len(r.layers) // cols)
    titles = [f"layer {layer}" for layer in r.layers]
    heat = make_subplots(rows=rows, cols=cols, subplot_titles=titles, vertical_spacing=0.12, horizontal_spacing=0.05)
    for i, layer in enumerate(r.layers):
        heat.add_trace(go.Heatmap(z=r.share[i] / r.baseline, x=list(range(r.experts)), y=r.domains,
                                  **colours.diverging(1.0), colorbar=dict(title="x k/E"), showscale=i == 0,
                                  hovertemplate="expert %{x}<br>%{y}: %{z:.2f} x uniform<extra></extra>"),
                       row=i // cols + 1, col=i % cols + 1)
    heat.update_layout(title="Per-domain specialisation: share of a domain's tokens routed to each expert, "
                             "as a multiple of the uniform k/E (white: uniform, red above, blue below)",
                       height=300 * rows + 80)
    load = make_subplots(rows=rows, cols=cols, subplot_titles=titles, shared_yaxes=True, vertical_spacing=0.15,
                         horizontal_spacing=0.04)
    for i, layer in enumerate(r.layers):
        relative = r.load[i] * r.experts
        rgb = colours.diverging_rgb(relative, 1.0)
        load.add_trace(go.Bar(x=list(range(r.experts)), y=relative, showlegend=False,
                              marker_color=[colours.css(tuple(c)) for c in rgb.tolist()],
                              hovertemplate=f"layer {layer}, expert %{{x}}: %{{y:.2f}} x uniform<extra></extra>"),
                       row=i // cols + 1, col=i % cols + 1)
        load.add_hline(y=1.0, line_dash="dash", line_color="gray", row=i // cols + 1, col=i % cols + 1)
    load.update_xaxes(title_text="expert")
    load.update_layout(title="Expert load per layer: share of the layer's routing slots x E (1 = balanced, dashed)",
                       height=240 * rows + 80)
    bpb = bits_per_byte or {}
    domains = _table(["domain", "held-out tokens", "bits per byte (model card)"],
                     [[d, f"{r.tokens[d]:,}", f"{bpb[d]:.2f}" if d in bpb else "n/a"] for d in r.domains]
                     + [["all", f"{sum(r.tokens.values()):,}", ""]])
    specialised = _table(["layer", "load MaxVio"] + r.domains,
                         [[str(layer), f"{r.max_violation()[i]:.2f}"]
                          + [f"e{r.top(layer, d)[0]} ({r.top(layer, d)[1]:.1f}x)" for d in r.domains]
                          for i, layer in enumerate(r.layers)])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}}table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}.label{{text-align:left}}</style></head><body>
<h1>{html.escape(title)}</h1>
{_table(["", ""], [[k, v] for k, v in facts.items()], left=2)}
<h2>Tokens and held-out bits per byte by domain</h2>
{domains}
<h2>Most specialised expert per layer and domain (share of the domain's tokens / uniform k/E)</h2>
{specialised}
{heat.to_html(full_html=False, include_plotlyjs=True)}
{load.to_html(full_html=False, include_plotlyjs=False)}
</body></html>"""


def run(model_path: Path = EMBEDDED_MODEL, out: Path = Path("workbench-demo.html"), max_bytes: int = 12288) -> Routing:
    """Load, trace, analyse, print the summary and write the report; returns the statistics."""
    import workbench as wb

    t0 = time.perf_counter()
    model = wb.load(model_path, dtype=torch.float32)
    loaded = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters() if p.dtype.is_floating_point)
    print(f"model   {model_path}\n        {model.config.get('model_type')}, {len(model.layers)} layers, "
          f"{params / 1e6:.2f}M parameters, loaded in {loaded:.2f} s")
    card = model_path / "eval.json"
    bpb = json.loads(card.read_text())["heldout_bits_per_byte"] if card.exists() else {}
    r = route(model, heldout_texts(max_bytes))
    print(f"routing {sum(r.tokens.values()):,} held-out tokens of {len(r.domains)} domains "
          f"({time.perf_counter() - t0 - loaded:.1f} s); uniform share k/E = {r.baseline:.3f}")
    width = max(len(d) for d in r.domains) + 2
    print("\nmost specialised expert (share of the domain's tokens / uniform):")
    print("layer  MaxVio  " + "".join(f"{d:>{max(width, 11)}}" for d in r.domains))
    for i, layer in enumerate(r.layers):
        cells = "".join(f"{f'e{r.top(layer, d)[0]} {r.top(layer, d)[1]:.1f}x':>{max(width, 11)}}" for d in r.domains)
        print(f"{layer:>5}  {r.max_violation()[i]:6.2f}  {cells}")
    if bpb:
        print("\nheld-out bits per byte (model card): " + ", ".join(f"{d} {v:.2f}" for d, v in bpb.items()))
    facts = {"model": str(model_path), "commit": model.commit or "local folder",
             "architecture": f"{model.config.get('model_type')}, {len(model.layers)} layers, "
                             f"{params / 1e6:.2f}M parameters",
             "experts": f"{r.experts} routed, top-{r.k}; uniform share k/E = {r.baseline:.3f}",
             "held-out tokens": f"{sum(r.tokens.values()):,} over {len(r.domains)} domains"}
    out.write_text(report_html(r, "moe-workbench demo: routing of the embedded model by domain", facts, bpb))
    print(f"\nreport  {out.resolve()}  ({out.stat().st_size / 1e6:.1f} MB, self-contained)")
    print(f"done in {time.perf_counter() - t0:.1f} s")
    return r
