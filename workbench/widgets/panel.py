"""The intervention panel: ablate, force or steer and compare predictions and continuations."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from typing import Any

import ipywidgets
import torch

from ..interventions import ablate, force, steer
from ..models.moe import Router
from ..schema import ROUTER_TOPK_IDS
from .common import check_layer, pick_layer, check_int, visible, Snapshot


class InterventionPanel(Snapshot, ipywidgets.VBox):
    """Ablate or force experts at one layer, or steer its residual stream, for a prompt and compare with the
    unchanged model: the next-token predictions (top tokens before and after, the largest logit changes, whether
    the argmax moved) and greedy continuations side by side. `vectors` names steering vectors ([hidden]) to
    pick from; steering adds `scale * vector` to `layers.{layer}.resid_post` at every token."""

    def __init__(self, model: Any, prompt: str | Sequence[int] | torch.Tensor, *, layer: int | None = None,
                 tokenizer: Any = None, top: int = 10, vectors: dict[str, Any] | None = None):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.top = check_int(top, "top", 1, 1 << 20)
        self.ids = self._encode(prompt)
        self.vectors = dict(vectors or {})
        self.baselines: dict[int, list[int]] = {}  # max_new_tokens -> the unchanged greedy continuation
        self.generation: dict[str, Any] | None = None
        self.routers = {int(i): m for i, block in model.layers.items() for m in block.modules()
                        if isinstance(m, Router)}
        if not self.routers:
            raise ValueError("model has no MoE layer to intervene on")
        layers = sorted(self.routers)
        layer = pick_layer(layer, layers, [])
        logits, cache = model.run_with_cache(self.ids, names=[f"layers.*.{ROUTER_TOPK_IDS}"])
        self.logits = logits[0, -1].float()
        self.routing = {x: cache[f"layers.{x}.{ROUTER_TOPK_IDS}"][0, -1].tolist() for x in layers}
        self.result: dict[str, Any] | None = None
        self.layer_picker = ipywidgets.Dropdown(options=layers, value=layer, description="layer")
        self.expert_picker = ipywidgets.SelectMultiple(description="experts", rows=8)
        modes = ["ablate", "force", *(["steer"] if self.vectors else [])]
        self.mode_picker = ipywidgets.ToggleButtons(options=modes, value="ablate")
        self.vector_picker = ipywidgets.Dropdown(options=list(self.vectors), description="vector")
        self.scale_box = ipywidgets.FloatText(value=1.0, description="scale")
        self.run_button = ipywidgets.Button(description="run", button_style="primary")
        self.run_button.on_click(lambda _: self._clicked(self._run_args))
        self.new_tokens = ipywidgets.BoundedIntText(value=20, min=1, max=4096, description="new tokens")
        self.generate_button = ipywidgets.Button(description="generate")
        self.generate_button.on_click(lambda _: self._clicked(self._generate_args))
        self.info = ipywidgets.HTML()
        self.output = ipywidgets.HTML()
        self.continuations = ipywidgets.HTML()
        self.layer_picker.observe(lambda _: self._layer_changed(), "value")
        self._layer_changed()
        steering = [self.vector_picker, self.scale_box] if self.vectors else []
        self.children = [ipywidgets.HBox([self.layer_picker, self.expert_picker,
                                          ipywidgets.VBox([self.mode_picker, *steering, self.run_button]),
                                          ipywidgets.VBox([self.new_tokens, self.generate_button])]),
                         self.info, self.output, self.continuations]

    def _encode(self, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """The prompt as ids [1, T]: text through the tokenizer, or token ids as given."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("prompt is text but the model has no tokenizer; pass tokenizer= or token ids")
            prompt = self.tokenizer.encode(prompt)
        ids = torch.as_tensor(prompt, dtype=torch.long)
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1 or len(ids) == 0:
            raise ValueError(f"prompt must be text or one non-empty sequence of token ids, got shape "
                             f"{list(ids.shape)}")
        return ids[None]

    def _text(self, token: int) -> str:
        text = self.tokenizer.decode([token]) if self.tokenizer is not None else ""
        return visible(text) if text and text != "\ufffd" else f"<{token}>"

    def _top(self, logits: torch.Tensor) -> list[tuple[str, int, float]]:
        p = logits.softmax(-1)
        values, ids = p.topk(min(self.top, len(p)))
        return [(self._text(int(i)), int(i), float(v)) for v, i in zip(values, ids)]

    def intervention(self, layer: int, experts: Sequence[int], mode: str, vector: Any = None,
                     scale: float = 1.0) -> tuple[int, list[int], list]:
        """(layer, experts, hooks) of an intervention, checked: `experts` ablated (their weights zeroed) or
        forced (one id per routing slot) at `layer` for every token, or `scale * vector` (a tensor, or a name
        in `vectors`) added to `layers.{layer}.resid_post` ("steer")."""
        layer = check_layer(layer, sorted(self.routers))
        spec = self.routers[layer].spec
        experts = [check_int(e, "experts", 0, spec.experts - 1) for e in experts]
        if mode == "ablate":
            if not experts:
                raise ValueError("experts is empty: pick at least one expert to ablate")
            return layer, experts, ablate(layer, experts)
        if mode == "force":
            if len(experts) != spec.top_k:
                raise ValueError(f"experts: forcing needs exactly k={spec.top_k} experts, got {len(experts)}")
            return layer, experts, force(layer, experts)
        if mode == "steer":
            if isinstance(vector, str):
                if vector not in self.vectors:
                    raise ValueError(f"vector {vector!r} is not one of the panel's vectors {list(self.vectors)}")
                vector = self.vectors[vector]
            if vector is None:
                raise ValueError("steering needs a vector: pass vector= (a tensor [hidden] or a name in vectors)")
            return layer, [], steer(f"layers.{layer}.resid_post", vector, scale)
        raise ValueError(f"mode must be 'ablate', 'force' or 'steer', got {mode!r}")

    def run(self, layer: int, experts: Sequence[int] = (), mode: str = "ablate", *, vector: Any = None,
            scale: float = 1.0) -> dict[str, Any]:
        """The prompt's next-token prediction under `intervention(layer, experts, mode, vector, scale)` against
        the unchanged forward: top tokens before and after as (text, id, probability), the largest logit
        changes as (text, id, before, after, delta)."""
        layer, experts, hooks = self.intervention(layer, experts, mode, vector, scale)
        with torch.no_grad(), self.model.hooks(hooks):
            after = self.model(self.ids)[0, -1].float()
        delta = after - self.logits
        moved = delta.abs().topk(min(self.top, len(delta))).indices
        self.result = {
            "layer": layer, "experts": experts, "mode": mode,
            "baseline": self._top(self.logits), "intervened": self._top(after),
            "logit_delta": [(self._text(int(i)), int(i), float(self.logits[i]), float(after[i]), float(delta[i]))
                            for i in moved],
            "changed": int(after.argmax()) != int(self.logits.argmax()),
        }
        self.output.value = self.table_html(self.result)
        return self.result

    def generate(self, layer: int, experts: Sequence[int] = (), mode: str = "ablate", max_new_tokens: int = 20, *,
                 vector: Any = None, scale: float = 1.0) -> dict[str, Any]:
        """Greedy continuations of the prompt by `max_new_tokens` tokens, unchanged and under
        `intervention(layer, experts, mode, vector, scale)` (at the prompt and every new token): their ids and
        texts, and the first new token where they part (None: they agree)."""
        layer, experts, hooks = self.intervention(layer, experts, mode, vector, scale)
        n = check_int(max_new_tokens, "max_new_tokens", 1, 1 << 20)
        if n not in self.baselines:
            self.baselines[n] = self.model.generate(self.ids, n, progress=False)[0, self.ids.shape[1]:].tolist()
        with self.model.hooks(hooks):
            after = self.model.generate(self.ids, n, progress=False)[0, self.ids.shape[1]:].tolist()
        base = self.baselines[n]
        self.generation = {
            "layer": layer, "experts": experts, "mode": mode, "max_new_tokens": n,
            "prompt": self._decode(self.ids[0].tolist()),
            "baseline_ids": base, "intervened_ids": after,
            "baseline": self._decode(base), "intervened": self._decode(after),
            "diverged_at": next((i for i, (a, b) in enumerate(zip(base, after)) if a != b), None),
        }
        if mode == "steer":
            self.generation["scale"] = float(scale)
        self.continuations.value = self.continuation_html(self.generation)
        return self.generation

    def _decode(self, ids: list[int]) -> str:
        """Token ids as text (each token's own text without a tokenizer)."""
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return "".join(self._text(i) for i in ids)

    def _layer_changed(self) -> None:
        layer = self.layer_picker.value
        self.expert_picker.options = list(range(self.routers[layer].spec.experts))
        routed = self.routing[layer]
        self.expert_picker.value = routed[:1]
        self.info.value = (f"the prompt's last token is routed to experts {', '.join(map(str, routed))} at layer "
                           f"{layer}; forcing takes k={len(routed)} experts")

    def _run_args(self) -> None:
        self.run(self.layer_picker.value, list(self.expert_picker.value), self.mode_picker.value,
                 vector=self.vector_picker.value, scale=self.scale_box.value)

    def _generate_args(self) -> None:
        self.generate(self.layer_picker.value, list(self.expert_picker.value), self.mode_picker.value,
                      self.new_tokens.value, vector=self.vector_picker.value, scale=self.scale_box.value)

    def _clicked(self, action: Callable[[], None]) -> None:
        try:
            action()
        except ValueError as e:
            self.output.value = f"<b>cannot run</b>: {html.escape(str(e))}"

    def static_html(self) -> str:
        return f"<p>{self.info.value}</p>{self.output.value}{self.continuations.value}"

    @staticmethod
    def continuation_html(result: dict[str, Any]) -> str:
        """A `generate` result as HTML: the prompt, then both continuations side by side, where they part marked."""
        what = (f"steer layer {result['layer']} (scale {result['scale']:g})" if result["mode"] == "steer" else
                f"{result['mode']} experts {', '.join(map(str, result['experts']))} at layer {result['layer']}")
        at = result["diverged_at"]
        verdict = "identical continuations" if at is None else f"continuations part at new token {at + 1}"

        def column(title: str, text: str) -> str:
            return (f"<div style='flex:1'><b>{html.escape(title)}</b><pre style='white-space:pre-wrap'>"
                    f"{html.escape(text)}</pre></div>")

        return (f"<p>{html.escape(what)}, {result['max_new_tokens']} new tokens: <b>{verdict}</b></p>"
                f"<p>prompt: <code>{html.escape(visible(result['prompt']))}</code></p>"
                "<div style='display:flex;gap:2em'>" + column("baseline", result["baseline"])
                + column(what, result["intervened"]) + "</div>")

    @staticmethod
    def table_html(result: dict[str, Any]) -> str:
        """A `run` result as HTML: top tokens before and after side by side, then the largest logit changes."""
        def cell(text: str) -> str:
            return f"<td><code>{html.escape(text)}</code></td>"

        rows = "".join(
            f"<tr><td>{i + 1}</td>{cell(b[0])}<td>{b[2]:.3f}</td>{cell(a[0])}<td>{a[2]:.3f}</td></tr>"
            for i, (b, a) in enumerate(zip(result["baseline"], result["intervened"])))
        changes = "".join(f"<tr>{cell(t)}<td>{before:.3f}</td><td>{after:.3f}</td><td>{d:+.3f}</td></tr>"
                          for t, _, before, after, d in result["logit_delta"])
        verdict = (f"argmax changed: {html.escape(result['baseline'][0][0])} -> "
                   f"{html.escape(result['intervened'][0][0])}" if result["changed"] else "argmax unchanged")
        experts = ", ".join(map(str, result["experts"]))
        what = "steer" if result["mode"] == "steer" else f"{result['mode']} experts {experts}"
        return (f"<p>{what} at layer {result['layer']}: "
                f"<b>{verdict}</b></p><div style='display:flex;gap:2em'>"
                "<table><tr><th>#</th><th>before</th><th>p</th><th>after</th><th>p</th></tr>" + rows + "</table>"
                "<table><tr><th>token</th><th>logit before</th><th>after</th><th>change</th></tr>"
                + changes + "</table></div>")

    def __repr__(self) -> str:
        source = getattr(self.model, "source", None) or type(self.model).__name__
        return (f"InterventionPanel(model={source!r}, prompt={self.ids.shape[1]} tokens, "
                f"layers={sorted(self.routers)}, top={self.top})")
