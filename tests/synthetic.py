"""A synthetic routing store at DeepSeek-V4 scale (1M tokens, 61 layers, 384 experts, top-6), written with the
store's own layout and codecs so that `wb.open_store` and every widget read it as a traced store.

Structure, so that sorting means something: at each layer the experts form teams of k - 2 (scattered over the
ids by a per-layer permutation); a run of `RUN` tokens takes one team (team popularity falls as a power law,
so load is skewed) plus two random experts from the rest. Co-activation is then high within a team and low
elsewhere. The first `HASH_LAYERS` layers route by token id, as V4's hash layers do. Input ids are printable
bytes, so the default decode is `byte_text`. Runs of equal routing keep the compressed store small."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from workbench.schema import DTYPES, INPUT_IDS, ROUTER_TOPK_IDS, variables
from workbench.store.disk import FORMAT, _create
from workbench.store.layout import Layout, StoredVariable, _rows

RUN = 16  # tokens per run of equal routing
HASH_LAYERS = 3
BLOCK = 1 << 16  # tokens generated and written at once


def _teams(rng: np.random.Generator, T: int, E: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(expert permutation [E], team of each run [runs]): teams of k - 2 consecutive permuted slots, drawn
    with probability falling as (rank + 1) ** -1.2."""
    n_teams = E // (k - 2)
    p = (np.arange(n_teams) + 1.0) ** -1.2
    table = np.repeat(rng.permutation(n_teams), np.round(p / p.sum() * 65536).astype(int))
    runs = -(-T // RUN) + 1
    return rng.permutation(E).astype(np.int16), table[rng.integers(0, len(table), runs)]


def _layer_ids(perm: np.ndarray, team: np.ndarray, extra: np.ndarray, s: int, e: int, shift: int, k: int) -> np.ndarray:
    """[e - s, k] distinct ranked expert ids of tokens [s, e) at one layer: the run's team then its two extras."""
    run = (np.arange(s, e) + shift) // RUN
    E = len(perm)
    base = team[run] * (k - 2)
    slots = base[:, None] + np.arange(k - 2)
    # the extras lie outside the team's slots: offsets k-2.. E-1 past its first slot, two different ones
    lo = k - 2 + extra[run, 0] % ((E - k + 2) // 2)
    hi = k - 2 + (E - k + 2) // 2 + extra[run, 1] % ((E - k + 2) // 2)
    slots = np.concatenate([slots, (base + lo)[:, None], (base + hi)[:, None]], 1) % E
    return perm[slots]


def synthetic_store(path: str | Path, tokens: int = 1_000_000, layers: int = 61, experts: int = 384, k: int = 6,
                    seed: int = 0) -> Path:
    """Write the synthetic store (see the module docstring) of `tokens` tokens at `path`; returns the path."""
    if k < 3 or experts < 2 * k:
        raise ValueError(f"need k >= 3 and experts >= 2k; got k={k}, experts={experts}")
    path = Path(path)
    T, L, E = tokens, layers, experts
    rng = np.random.default_rng(seed)
    names = [f"layers.{i}.{ROUTER_TOPK_IDS}" for i in range(L)]
    (var,) = variables({n: ((k,), DTYPES["topk_ids"]) for n in names}, T)
    chunk_tokens = 8192
    stored = StoredVariable(**vars(var), chunks=(L, _rows(L * k * var.dtype.itemsize, chunk_tokens), k),
                            windows=None)
    layout = Layout(list(range(L)), list(range(L)), k, E, chunk_tokens, _rows(8, chunk_tokens), [stored])
    prov = {"workbench_store": FORMAT, "source": "synthetic", "model_type": "synthetic", "seed": seed,
            "tokens_total": T, "names": names, "layers": None, "windows": None, "chunk_tokens": chunk_tokens,
            "chunks": {stored.name: stored.chunks}, "routed_layers": list(range(L)), "k": k, "n_experts": E,
            "committed_tokens": 0, "complete": False}
    root = _create(path, json.loads(json.dumps(prov)), layout)
    inputs = rng.integers(32, 127, T).astype(DTYPES[INPUT_IDS])
    hashed = np.argsort(rng.random((HASH_LAYERS, 256, E)), -1)[..., :k].astype(np.int16)  # token id -> experts
    plans = [(*_teams(rng, T, E, k), rng.integers(0, 1 << 30, (-(-T // RUN) + 1, 2)), int(rng.integers(RUN)))
             for _ in range(L)]
    for s in range(0, T, BLOCK):
        e = min(s + BLOCK, T)
        block = np.empty((L, e - s, k), np.int16)
        for i in range(L):
            block[i] = hashed[i][inputs[s:e]] if i < HASH_LAYERS else _layer_ids(*plans[i][:3], s, e, plans[i][3], k)
        root[stored.name][:, s:e] = block
    root[INPUT_IDS][:] = inputs
    root["token"][:] = np.arange(T)
    root.attrs.update({"committed_tokens": T, "complete": True})
    return path
