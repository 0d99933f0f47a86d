"""The trace loop: `trace` runs one long sequence chunk by chunk through a model and writes what its hooks see
to a store laid out by `layout`, committing each chunk as `disk` describes.

Resume restores the attention state from the snapshot committed with the last chunk (`snapshot`) where the
family's state is bounded (`CausalLM.bounded_state`: DeepSeek-V4). Elsewhere (full attention, whose snapshot
would cost bytes proportional to the whole prefix at every chunk), in generation traces, or where the snapshot
cannot be read, it replays the committed prefix with the same hooks registered chunk by chunk (some hooks select
different kernels) and their values dropped. Either way the continued forward is exactly the uninterrupted one.

A generation trace (`generate=N`) lays the store out for the prompt + N tokens, prefills the prompt chunk by chunk,
then decodes one step per token on the same state, as `CausalLM.generate` does, and commits every
`chunk_tokens` new tokens. A stop id ends it early: the completion marker then names the tokens traced
(`committed_tokens`, `tokens_total`) and the unwritten tail, trimmed by every reader as always, takes no disk.
Resume replays the decoding steps too, drawing the same tokens (greedy, or seeded sampling) and checking them
against the stored ones.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import operator
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm

from .. import distributed, hooks, provenance
from ..checkpoint import sha256_many
from ..errors import StoreError
from ..models.base import CausalLM, State, next_token
from ..sae import IDS, SAE, VALUES, latents, sparse
from ..schema import DTYPES, GENERATED, INPUT_IDS, ROUTING_HOOKS, TOPK_IDS, TOPK_WEIGHTS, hook_kind, layer_of
from ..version import __version__
from .disk import (FORMAT, check_format, crash_here, crash_point, disk_bytes, existing_attrs, io_errors, open_store,
                   prepare, write_lock)
from .layout import Layout, StoredVariable, lay_out
from .snapshot import REPLAY_ENV, Snapshots


def trace(
    model: CausalLM,
    tokens: Sequence[int] | np.ndarray | torch.Tensor,
    out: str | Path,
    *,
    names: Iterable[str] | str | None = None,
    chunk_tokens: int = 8192,
    layers: Iterable[int] | None = None,
    windows: Iterable[tuple[int, int]] | None = None,
    resume: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    seed: int | None = None,
    generate: int | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: int | Iterable[int] | None = None,
    saes: Mapping[str, SAE] | None = None,
    sae_k: int = 32,
) -> Path:
    """Run `tokens` (one sequence) through `model` chunk by chunk and stream routing, plus the hooks named
    by glob in `names` (restricted to `layers` and token `windows`), to the zarr store `out`.

    An incomplete store at `out` from the same model, tokens and arguments is resumed (resume=True) once its
    committed chunks read whole; a complete one is refused unless overwrite=True. `seed` is recorded as the
    seed that made `tokens`. The run's summary lands in the store's attrs (`open_store(out).attrs["summary"]`).

    `generate=N` continues `tokens` (the prompt) by up to N tokens as `model.generate` would (`do_sample`,
    `temperature`, `top_p`, `stop`; `seed` then seeds the sampling) and records them too: the store then holds
    prompt and continuation, `generated(token)` marks the new tokens, and attrs["generation"] the settings.
    `saes` {hook name: SAE} also stores each SAE's latents at its hook, as the `sae_k` largest per token (and
    stream): variables `<kind>_sae_ids` / `<kind>_sae_values` (`workbench.store.layout`), within `windows`.
    """
    t0 = time.perf_counter()
    parallel = model.parallel is not None
    writer = not parallel or model.parallel.rank == 0  # expert-parallel ranks run the forward, rank 0 writes
    with contextlib.ExitStack() as stack:
        with distributed.agreed(parallel):
            ids = _check_tokens(tokens, model.vocab_size)
            chunk_tokens = _positive_int(chunk_tokens, "chunk_tokens")
            gen = None if generate is None else _Decoding.of(model, ids, generate, do_sample, temperature, top_p,
                                                            seed, stop)
            total = len(ids) + (gen.new if gen else 0)
            windows = _check_windows(windows, total)
            patterns = [names] if isinstance(names, str) else list(names or [])
            layers = None if layers is None else sorted({_integer(x, "a layer number") for x in layers})
            saes, sae_k = _check_saes(model, saes), _positive_int(sae_k, "sae_k")
            layout = lay_out(model, ids, _select(model, patterns, layers), windows, chunk_tokens, total, saes,
                             sae_k)
            out = Path(out).expanduser()
            root, start = None, 0
            if writer:
                existing_attrs(out, overwrite)  # refuse a path that holds something else before creating anything
                stack.enter_context(write_lock(out))
                attrs = existing_attrs(out, overwrite)
                if attrs is not None and not overwrite:
                    check_format(out, attrs, "pass overwrite=True (CLI: --overwrite) to replace it, or write "
                                 "elsewhere")
                if attrs is not None and attrs.get("complete") and not overwrite:
                    raise StoreError(f"{out} already holds a complete trace; pass overwrite=True (CLI: "
                                     "--overwrite) to replace it")
                prov = _provenance(model, ids, seed, patterns, layers, windows, chunk_tokens, layout, progress, gen)
                prov["saes"] = {h: {"cfg": sae.cfg, "weights_sha256": _sae_digest(sae), "k": sae_k}
                                for h, sae in saes.items()} or None
                prov = json.loads(json.dumps(prov))
                root, start = prepare(out, attrs, prov, layout, resume, overwrite, progress)
        if parallel:
            start = distributed.broadcast_int(start)
        _run(model, ids, out, root, layout, start, progress and writer, t0, gen)
    if writer:
        if provenance.active():  # only under `workbench publish` / `verify`: the routing hash
            provenance.record_dataset(open_store(out), seed=seed, path=out)
    return out


# ---------------------------------------------------------------- arguments


def _integer(x: Any, what: str) -> int:
    try:
        return operator.index(x)
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {x!r}") from None


def _positive_int(x: Any, what: str) -> int:
    n = _integer(x, what)
    if n < 1:
        raise ValueError(f"{what} must be at least 1, got {n}")
    return n


def _check_tokens(tokens: Any, vocab: int) -> np.ndarray:
    """One sequence of token ids as int64, every id inside the vocabulary."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    ids = np.asarray(tokens)
    if ids.ndim == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.ndim != 1:
        raise ValueError(f"tokens must be one sequence, shape [T] or [1, T]; got shape {list(ids.shape)}")
    if ids.size == 0:
        raise ValueError("tokens is empty: nothing to trace")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"tokens must be integer ids, got dtype {ids.dtype}")
    bad = np.flatnonzero((ids < 0) | (ids >= vocab))
    if bad.size:
        raise ValueError(f"token id {ids[bad[0]]} at position {bad[0]} is outside the vocabulary [0, {vocab})")
    return ids.astype(np.int64)


@dataclass
class _Decoding:
    """How a generation trace picks its new tokens: at most `new` of them, as `CausalLM.generate` does."""

    new: int
    do_sample: bool
    temperature: float
    top_p: float
    stop: torch.Tensor  # [S] ids that end the generation once emitted
    generator: torch.Generator | None  # seeded, or None: torch's global one
    attrs: dict[str, Any]  # the settings, as the store's attrs["generation"]

    @staticmethod
    def of(model: CausalLM, ids: np.ndarray, new: Any, do_sample: bool, temperature: float, top_p: float,
           seed: int | None, stop: Any) -> _Decoding:
        new = _integer(new, "generate")
        if new < 0:
            raise ValueError(f"generate must be at least 0 new tokens, got {new}")
        _, stop_ids, generator = model.generation_args(ids[:1], do_sample, temperature, top_p, seed, stop)
        attrs = {"prompt_tokens": len(ids), "max_new_tokens": new, "do_sample": bool(do_sample),
                 "temperature": float(temperature), "top_p": float(top_p), "stop": stop_ids.tolist(), "seed": seed}
        return _Decoding(new, bool(do_sample), temperature, top_p, stop_ids, generator, attrs)


def _check_windows(windows: Iterable[tuple[int, int]] | None, n: int) -> list[tuple[int, int]] | None:
    if windows is None:
        return None
    out = []
    for w in windows:
        try:
            a, b = (operator.index(x) for x in w)
        except (TypeError, ValueError):
            raise ValueError(f"window {w!r} must be a (start, stop) pair of token positions") from None
        if not 0 <= a < b <= n:
            raise ValueError(f"window ({a}, {b}) must satisfy 0 <= start < stop <= {n} (the number of tokens)")
        out.append((a, b))
    if not out:
        raise ValueError("windows is empty; pass None to record the named hooks at every token")
    return sorted(out)


def _check_saes(model: CausalLM, saes: Mapping[str, SAE] | None) -> dict[str, SAE]:
    """{hook name: SAE}, each name one hook point of the model."""
    out = {}
    for hook, sae in (saes or {}).items():
        if not isinstance(sae, SAE):
            raise ValueError(f"saes[{hook!r}] must be a workbench.sae.SAE (load_sae), got {type(sae).__name__}")
        if hook not in model.hook_names:
            raise ValueError(f"saes: {hook!r} is not a hook point of this model (a name, not a glob)")
        out[hook] = sae
    return out


def _sae_digest(sae: SAE) -> str:
    """sha256 of an SAE's tensors (names, shapes, bytes), to tell a resumed trace it runs the same SAE."""
    h = hashlib.sha256()
    for name, p in sorted(sae.state_dict().items()):
        h.update(f"{name}{list(p.shape)}{p.dtype}".encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def _select(model: CausalLM, patterns: list[str], layers: list[int] | None) -> list[str]:
    """The hook points named by `patterns` (globs), within `layers`, routing left out (always recorded)."""
    hook_names = model.hook_names
    chosen: dict[str, None] = {}
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise ValueError(f"names must be hook names or globs (strings), got {pattern!r}")
        # an SAE's points (`.sae.`) fire only while it is spliced; its latents are stored through `saes=`
        chosen.update((n, None) for n in hooks.match(pattern, hook_names)
                      if hook_kind(n) not in ROUTING_HOOKS and ".sae." not in n)
    if layers is not None:
        have = sorted({i for i in map(layer_of, hook_names) if i is not None})
        missing = [i for i in layers if i not in have]
        if missing:
            raise ValueError(f"layers {missing} are not in this model (it has layers {have[0]} to {have[-1]})")
        kept = [n for n in chosen if layer_of(n) is None or layer_of(n) in layers]
        if chosen and not kept:
            raise ValueError(f"names {patterns} select no hook point in layers {layers}")
        return kept
    return list(chosen)


# ---------------------------------------------------------------- provenance


def _versions() -> dict[str, str]:
    return {"python": platform.python_version(), "torch": torch.__version__, "zarr": zarr.__version__,
            "xarray": metadata.version("xarray"), "dask": metadata.version("dask"), "numpy": np.__version__}


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _provenance(model: CausalLM, ids: np.ndarray, seed: int | None, names: list[str], layers: list[int] | None,
                windows: list[tuple[int, int]] | None, chunk_tokens: int, layout: Layout, progress: bool,
                gen: _Decoding | None) -> dict:
    """The root attrs of a new store, normalised to what JSON gives back."""
    folder = getattr(model, "checkpoint_dir", None)
    files = sorted(Path(folder).glob("*.safetensors")) if folder else []
    # in parallel, a bar past 1 GiB; digests are remembered by file identity: a verified checkpoint is not reread
    weights = {f.name: digest for f, digest in sha256_many(files, progress).items()}
    attrs = {
        "workbench_store": FORMAT,
        "source": model.source, "revision": model.revision, "commit": model.commit,
        "model_type": model.config.get("model_type"),
        "weights_sha256": weights,
        "config_sha256": model.config.sha256(),
        "dtype": str(model.embed.weight.dtype).removeprefix("torch."),
        "device": str(model.embed.weight.device),
        "torch_threads": torch.get_num_threads(),
        "world_size": 1 if model.parallel is None else model.parallel.world,
        "backend": model.backend,
        "workbench_version": __version__,
        "versions": _versions(),
        "seed": seed,
        "tokens_total": len(ids) + (gen.new if gen else 0),
        "tokens_sha256": hashlib.sha256(ids.astype("<i8").tobytes()).hexdigest(),
        "names": names, "layers": layers, "windows": windows,
        "chunk_tokens": chunk_tokens,
        "chunks": {v.name: v.chunks for v in layout.variables},
        "routed_layers": layout.routed, "k": layout.k, "n_experts": layout.experts,
        "created": _now(),
        "committed_tokens": 0, "complete": False,
        **({"generation": gen.attrs} if gen else {}),
    }
    return json.loads(json.dumps(attrs))


# ---------------------------------------------------------------- the run


def _capture(sink: dict | None, start: int, spans: list[tuple[int, int]]):
    """A hook keeping copies of the `spans` of its tensor (batch row 0) in `sink`; None: keep nothing."""
    def keep(x: torch.Tensor, ctx) -> None:
        if sink is not None:
            sink[ctx.name] = [x[0, a - start:b - start].detach().to("cpu", copy=True) for a, b in spans]
    return keep


def _encode(sink: dict | None, start: int, spans: list[tuple[int, int]], sae: SAE, k: int):
    """A hook keeping the `spans` of its tensor's SAE latents (batch row 0) as sparse ids and values in `sink`."""
    def keep(x: torch.Tensor, ctx) -> None:
        if sink is not None:
            parts = [sparse(latents(sae.to(x.device), x[:1, a - start:b - start], ctx.name)[0], k) for a, b in spans]
            sink[f"{ctx.name}.{IDS}"] = [ids.cpu() for ids, _ in parts]
            sink[f"{ctx.name}.{VALUES}"] = [values.cpu() for _, values in parts]
    return keep


def _hooks(layout: Layout, start: int, stop: int, sink: dict | None) -> list:
    pairs = []
    for v in layout.variables:
        spans = v.spans(start, stop)
        if spans and v.kind.endswith(f".{IDS}"):  # one hook fills both of an SAE's variables
            for hook in (h.removesuffix(f".{IDS}") for h in v.hooks):
                pairs.append((hook, _encode(sink, start, spans, layout.saes[hook], layout.sae_k)))
        elif spans and not v.kind.endswith(f".{VALUES}"):
            fn = _capture(sink, start, spans)
            pairs += [(hook, fn) for hook in v.hooks]
    return pairs


def _as_numpy(t: torch.Tensor, dtype: np.dtype) -> np.ndarray:
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy().astype(dtype, copy=False)


def _write(array: zarr.Array, v: StoredVariable, spans: list[tuple[int, int]], sink: dict) -> None:
    for j, (a, b) in enumerate(spans):
        if v.layered:
            block = np.full((v.shape[0], b - a, *v.trailing), v.fill, v.dtype)
            for hook, i in v.hooks.items():
                block[i] = _as_numpy(sink[hook][j], v.dtype)
            array[:, a:b] = block
        else:
            (hook,) = v.hooks
            array[a:b] = _as_numpy(sink[hook][j], v.dtype)


def _run(model: CausalLM, ids: np.ndarray, out: Path, root: zarr.Group | None, layout: Layout, start: int,
         progress: bool, t0: float, gen: _Decoding | None = None) -> None:
    """The chunked forward: restore the state at `start` from its snapshot or replay up to it, then record and
    commit chunk by chunk (no root: a rank that only computes); with `gen`, then the decoding steps."""
    n, size = len(ids), layout.chunk_tokens
    total = n + (gen.new if gen else 0)
    names = ("token", INPUT_IDS, *(v.name for v in layout.variables), *((GENERATED,) if gen else ()))
    arrays = {name: root[name] for name in names} if root is not None else {}
    crash = crash_point()
    state, resumed_from = State(), None
    # expert-parallel ranks keep the replay (only rank 0 could read the store's snapshots), as do generation traces
    snaps = Snapshots(out, model.appended_state) if root is not None and model.bounded_state \
        and model.parallel is None and gen is None else None
    if start:
        restored = None
        if snaps is not None:
            with io_errors(out, "restoring the state snapshot"):
                if os.environ.get(REPLAY_ENV):
                    snaps.clear()
                else:
                    restored = snaps.restore(start, model.embed.weight.device)
        state, resumed_from = (restored, "snapshot") if restored is not None else (state, "replay")
    elif snaps is not None:
        snaps.clear()
    replay = resumed_from == "replay"
    head = any(not v.layered for v in layout.variables)  # final.* or logits asked for
    with torch.no_grad(), \
            tqdm(total=start, unit="tok", unit_scale=True, desc="replay", disable=not progress or not replay) as rbar, \
            tqdm(total=total, initial=start, unit="tok", unit_scale=True, desc="trace", disable=not progress) as bar:

        def commit(i: int, s: int, e: int, sink: dict, chunk_ids: np.ndarray, last: bool) -> None:
            """Write trace chunk number `i`, tokens [s, e), then its marker (`last`: the completion marker)."""
            crash_here(crash, i, "forward")
            # under expert parallelism only rank 0 writes, and a failed write stops every rank
            with distributed.agreed(model.parallel is not None), io_errors(out, f"writing tokens {s:,}..{e:,}"):
                if root is not None:
                    for j, v in enumerate(layout.variables):
                        _write(arrays[v.name], v, v.spans(s, e), sink)
                        if j == 0:
                            crash_here(crash, i, "write")
                    arrays[INPUT_IDS][s:e] = chunk_ids.astype(DTYPES[INPUT_IDS])
                    arrays["token"][s:e] = np.arange(s, e)
                    if gen:
                        arrays[GENERATED][s:e] = np.arange(s, e) >= n
                    # the snapshot is committed by the marker together with the chunk; a complete store holds none
                    if snaps is not None and not last:
                        snaps.write(state, crash, i)
                    elif snaps is not None:
                        snaps.clear()
                    crash_here(crash, i, "marker")
                    marker: dict[str, Any] = {"committed_tokens": e}
                    if last:
                        marker.update(complete=True, completed=_now(),
                                      summary=_summary(out, layout, e, start, resumed_from, t0))
                        if gen:  # an early stop: the store holds the tokens traced, its tail never written
                            marker.update(tokens_total=e, generation={**gen.attrs, "new_tokens": e - n})
                    root.attrs.update(marker)
            crash_here(crash, i, "committed")
            bar.update(e - s)

        for i, s in enumerate(range(0, n, size)):
            e = min(s + size, n)
            if s < state.offset:  # committed, its state restored from the snapshot
                continue
            sink = {} if s >= start else None
            with model.hooks(_hooks(layout, s, e, sink)):
                logits = model(torch.from_numpy(ids[s:e])[None], cache=state, head=head or (gen is not None and e == n))
            if sink is None:
                rbar.update(e - s)
                continue
            commit(i, s, e, sink, ids[s:e], e == total)
        if gen and gen.new:
            stored = root[INPUT_IDS][n:start] if root is not None and start > n else None
            _decode(model, gen, logits, state, layout, n, start, head, stored, rbar, commit, -(-n // size))


def _decode(model: CausalLM, gen: _Decoding, logits: torch.Tensor, state: State, layout: Layout, n: int,
            start: int, head: bool, stored: np.ndarray | None, rbar: tqdm, commit: Callable, chunk: int) -> None:
    """The decoding steps after an `n`-token prompt whose last logits are `logits`: draw a token, feed it as one
    step (hooks as a trace chunk of that token registers them), commit every `chunk_tokens` new tokens and at
    the end. Steps before `start` replay, checking the tokens they draw against the `stored` ones."""
    size, pos, first = layout.chunk_tokens, n, max(start, n)
    new: list[int] = []
    pending: dict[str, list[torch.Tensor]] = {}
    while True:
        token = next_token(logits[:, -1], gen.do_sample, gen.temperature, gen.top_p, gen.generator)
        if stored is not None and pos < start and int(token) != stored[pos - n]:
            raise StoreError(f"resuming: the token drawn at position {pos:,} ({int(token)}) differs from the stored "
                             f"one ({int(stored[pos - n])}), so the generation does not replay (sampling without a "
                             "seed?); pass overwrite=True (CLI: --overwrite) to trace it afresh")
        last = pos + 1 == n + gen.new or bool(torch.isin(token, gen.stop).any())
        keep = pos >= start
        with model.hooks(_step_hooks(layout, pos, pending if keep else None)):
            logits = model(token[:, None], cache=state, head=head or not last)
        new.append(int(token))
        pos += 1
        if not keep:
            rbar.update(1)
        elif last or (pos - n) % size == 0:
            sink = {}
            for v in layout.variables:
                spans = v.spans(first, pos)
                for hook in v.hooks if spans else ():
                    sink[hook] = torch.cat(pending[hook]).split([b - a for a, b in spans])
            commit(chunk + (first - n) // size, first, pos, sink, np.asarray(new[first - n:]), last)
            first, pending = pos, {}
        if last:
            return


def _step_hooks(layout: Layout, pos: int, pending: dict | None) -> list:
    """Hooks of one decoding step at position `pos`, appending each recorded tensor (batch row 0) to
    `pending[hook]`; None: keep nothing."""
    def keep(x: torch.Tensor, ctx) -> None:
        if pending is not None:
            pending.setdefault(ctx.name, []).append(x[0].detach().to("cpu", copy=True))

    def encode(x: torch.Tensor, ctx) -> None:  # an SAE's latents, as sparse ids and values
        if pending is not None:
            ids, values = sparse(latents(layout.saes[ctx.name].to(x.device), x[:1], ctx.name)[0], layout.sae_k)
            pending.setdefault(f"{ctx.name}.{IDS}", []).append(ids.cpu())
            pending.setdefault(f"{ctx.name}.{VALUES}", []).append(values.cpu())

    pairs = []
    for v in layout.variables:
        if not v.spans(pos, pos + 1) or v.kind.endswith(f".{VALUES}"):
            continue
        if v.kind.endswith(f".{IDS}"):  # one hook fills both of an SAE's variables
            pairs += [(hook.removesuffix(f".{IDS}"), encode) for hook in v.hooks]
        else:
            pairs += [(hook, keep) for hook in v.hooks]
    return pairs


def _peak_rss() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def _summary(out: Path, layout: Layout, n: int, start: int, resumed_from: str | None, t0: float) -> dict[str, Any]:
    """What this run did and cost: tokens, where and how it resumed ("snapshot", "replay" or None), layers, bytes
    on disk (per routing entry), time, peak memory."""
    wall = time.perf_counter() - t0
    routing = sum(disk_bytes(out / v) for v in (TOPK_IDS, TOPK_WEIGHTS) if (out / v).exists())
    entries = n * len(layout.routed) * layout.k
    return {
        "tokens": n, "traced_tokens": n - start, "resumed_at": start, "resumed_from": resumed_from,
        "layers": len(layout.layers), "routed_layers": len(layout.routed), "k": layout.k,
        "bytes_on_disk": disk_bytes(out), "routing_bytes": routing,
        "bytes_per_routing_entry": routing / entries if entries else None,
        "wall_s": round(wall, 3), "tokens_per_s": round((n - start) / wall, 1),
        "peak_rss_bytes": _peak_rss(),
    }
