"""The example notebooks in notebooks/: each is executed with papermill at a small size (its `parameters` cell's
knobs), must run without error, and the facts its `summary` cell prints are checked, several against numbers
recomputed here from the stores the notebook wrote. Notebook 06 runs offline and must skip cleanly, and on a local
tiny checkpoint. The specialisation notebook is executed by tests/test_analysis.py, not here.

Static checks: every `.py` / `.ipynb` pair holds the same cells (so the `.py` diff can be trusted), the committed
notebooks hold no outputs, and papermill sees every parameter of each notebook's first code cell.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import nbformat
import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
PARAMETERISED = ["01_quickstart", "02_routing_tour", "04_long_context", "05_interventions", "06_hub_checkpoint",
                 "07_attribution", "08_engines_and_causality"]
PAIRED = sorted({p.stem for p in NOTEBOOKS.glob("*.py")} | {p.stem for p in NOTEBOOKS.glob("*.ipynb")})


def execute(name: str, out: Path, **parameters) -> tuple[dict, nbformat.NotebookNode]:
    """Run notebooks/NAME.ipynb (cwd notebooks/) into `out` with `parameters`; the summary facts and the executed
    notebook. Any failing cell raises papermill's PapermillExecutionError, naming the cell."""
    papermill = pytest.importorskip("papermill")
    out.mkdir(parents=True, exist_ok=True)
    executed = out / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(executed), parameters=parameters,
                               cwd=str(NOTEBOOKS), kernel_name="python3", progress_bar=False, log_output=False,
                               execution_timeout=600)
    nb = nbformat.read(executed, as_version=4)
    cells = [c for c in nb.cells if "summary" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: expected one cell tagged summary"
    return json.loads(stdout(cells[0])), nb


def stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("name") == "stdout")


def outputs(nb: nbformat.NotebookNode, mime: str) -> int:
    """How many outputs of the executed notebook carry `mime`."""
    return sum(mime in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs)


# ---------------------------------------------------------------- static checks


@pytest.mark.parametrize("name", PAIRED)
def test_pair_in_sync(name):
    jupytext = pytest.importorskip("jupytext")
    py, ipynb = NOTEBOOKS / f"{name}.py", NOTEBOOKS / f"{name}.ipynb"
    assert py.is_file() and ipynb.is_file(), f"{name}: both {py.name} and {ipynb.name} must exist"

    def cells(path: Path) -> list[tuple]:
        nb = jupytext.read(path)
        return [(c.cell_type, c.source.strip(), tuple(c.metadata.get("tags", ()))) for c in nb.cells]

    a, b = cells(py), cells(ipynb)
    assert len(a) == len(b), f"{name}: {len(a)} cells in the .py, {len(b)} in the .ipynb (run jupytext --sync)"
    for i, (x, y) in enumerate(zip(a, b)):
        assert x == y, f"{name}: cell {i} differs between the .py and the .ipynb (run jupytext --sync)"


@pytest.mark.parametrize("name", PAIRED)
def test_committed_without_outputs(name):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and not any(c.outputs or c.execution_count for c in code), f"{name}.ipynb holds outputs"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"


@pytest.mark.parametrize("name", PARAMETERISED)
def test_parameters_cell(name):
    papermill = pytest.importorskip("papermill")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    first = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first.metadata.get("tags", []), f"{name}: the first code cell must be tagged parameters"
    assigned = [t.id for node in ast.parse(first.source).body for t in node.targets]
    seen = papermill.inspect_notebook(str(NOTEBOOKS / f"{name}.ipynb"))
    assert list(seen) == assigned  # papermill (and so `workbench publish`'s manifest) sees every parameter
    for other in nb.cells[nb.cells.index(first) + 1:]:
        assert "parameters" not in other.metadata.get("tags", [])


# ---------------------------------------------------------------- 01 quickstart


def test_quickstart(tmp_path):
    import workbench as wb
    from workbench.demo import EMBEDDED_MODEL

    facts, nb = execute("01_quickstart", tmp_path)
    model = wb.load(EMBEDDED_MODEL)
    assert facts["k"] == 4 and facts["n_experts"] == 32 and facts["layers"] == 6
    assert facts["hook_points"] == len(model.hook_names)
    assert facts["routed_layers"] == [0, 1, 2, 3, 4, 5] and facts["hash_routed"] == [0, 1]
    assert facts["weight_sum"] == pytest.approx(model.config.get("routed_scaling_factor"), abs=1e-5)
    assert facts["hand_written_equals_ablate"] is True
    assert facts["ablation_max_logit_change"] > 1e-3  # the ablation changed the logits
    assert facts["ablation_kl_last_token"] > 0
    assert outputs(nb, "application/vnd.moe-workbench.routing+json") == 1  # the Dataset showed as a routing summary
    assert outputs(nb, "application/vnd.plotly.v1+json") == 2


# ---------------------------------------------------------------- 02 routing tour


def test_routing_tour(tmp_path):
    import workbench as wb

    facts, nb = execute("02_routing_tour", tmp_path, MAX_BYTES=512, OUT=str(tmp_path))
    store = wb.open_store(tmp_path / "routing_tour.zarr")
    sizes = facts["tokens_per_domain"]
    assert facts["domains"] == sorted(sizes) and len(sizes) == 7
    assert facts["tokens"] == store.sizes["token"] == sum(sizes.values())
    assert all(400 < n <= 512 for n in sizes.values())
    E, k = store.attrs["n_experts"], store.sizes["k"]
    assert facts["baseline"] == pytest.approx(k / E)
    ids = store.topk_ids.values  # [layer, token, k]
    labels = np.repeat(facts["domains"], [sizes[d] for d in facts["domains"]])
    for j, layer in enumerate(store.layer.values):  # MaxVio recomputed from the store
        counts = np.bincount(ids[j].ravel(), minlength=E)
        assert facts["maxvio"][str(layer)] == pytest.approx(counts.max() / counts.mean() - 1)
        assert 0.5 < facts["entropy"][str(layer)] <= 1
    last = facts["last_layer"]
    assert last == int(store.layer.values[-1])
    for domain in facts["domains"]:  # each domain's top expert at the last layer, and its share x uniform
        mine = ids[-1][labels == domain]
        share = np.array([(mine == e).any(-1).mean() for e in range(E)])
        assert facts["top_expert"][domain] == int(share.argmax())
        assert facts["top_relative"][domain] == pytest.approx(share.max() / (k / E), abs=0.006)
        assert facts["top_relative"][domain] > 2  # every domain has an expert taking over twice its uniform share
    assert facts["token_view_tokens"] == 240
    assert outputs(nb, "application/vnd.jupyter.widget-view+json") == 2  # dashboard and token view


# ---------------------------------------------------------------- 04 long context


def test_long_context(tmp_path):
    import workbench as wb

    tokens = 22_000  # three copies of a 7,168-token period
    facts, nb = execute("04_long_context", tmp_path, TOKENS=tokens, DOMAIN_BYTES=1024, OUT=str(tmp_path))
    path = tmp_path / "long_context.zarr"
    store = wb.open_store(path)
    run = store.attrs["summary"]
    assert facts["tokens"] == run["tokens"] == store.sizes["token"] == tokens
    entries = tokens * 6 * 4
    on_disk = sum(f.stat().st_size for v in ("topk_ids", "topk_weights") for f in (path / v).rglob("*") if f.is_file())
    assert facts["bytes_per_routing_entry"] == pytest.approx(on_disk / entries)
    assert 0.5 < facts["bytes_per_routing_entry"] < 4  # compressed below the raw int16 id + float16 weight
    assert facts["tokens_per_s"] == pytest.approx(tokens / facts["wall_s"], rel=0.01)
    assert 0 < facts["peak_rss_gib"] < 2
    P, copies = facts["period"], facts["copies"]
    assert copies == tokens // P == 3
    # the same text at its first and last full copy: hash-routed layers route identically, learned ones mostly so,
    # and the second and last copies (both after a full period of other text) agree more than the first and last
    ids = store.topk_ids.values
    assert facts["hash_routed"] == [0, 1]
    for j, layer in enumerate(store.layer.values):
        a, b, c = ids[j, :P], ids[j, P:2 * P], ids[j, 2 * P:3 * P]
        overlap = np.mean([len(set(x) & set(y)) / 4 for x, y in zip(a, c)])
        assert facts["saturation"][str(layer)] == pytest.approx(overlap)
        assert facts["top1_agreement"][str(layer)] == pytest.approx((a[:, 0] == c[:, 0]).mean())
        assert facts["top1_agreement_second_last"][str(layer)] == pytest.approx((b[:, 0] == c[:, 0]).mean())
        if layer in facts["hash_routed"]:
            assert facts["saturation"][str(layer)] == 1 and facts["top1_changed_vs_first_period"][str(layer)] == 0
        else:
            assert facts["saturation_baseline"] * 4 < facts["saturation"][str(layer)] < 1
            assert facts["top1_agreement_second_last"][str(layer)] > facts["top1_agreement"][str(layer)]
    assert all(v > facts["repetition_baseline"] for v in facts["repetition_first"].values())
    assert facts["navigator_bins"] == 400 and facts["navigator_range"][1] - facts["navigator_range"][0] == 2048
    assert outputs(nb, "application/vnd.jupyter.widget-view+json") == 1


# ---------------------------------------------------------------- 05 interventions


def test_interventions(tmp_path):
    facts, nb = execute("05_interventions", tmp_path)
    layers = facts["layers"]
    assert layers == [0, 1, 2, 3, 4, 5] and facts["hash_routed"] == [0, 1]
    # dropping every routed expert of the last token matters somewhere, and most where the notebook says
    assert facts["max_kl"] > 0.1
    kl = facts["kl_topk_ablated_last_token"]
    assert facts["max_kl"] == pytest.approx(max(kl.values())) == pytest.approx(kl[str(facts["most_important_layer"])])
    assert all(v > -1e-6 for v in kl.values())
    assert set(facts["kl_topk_rerouted_last_token"]) == {"2", "3", "4", "5"}  # no rerouting of hash-routed layers
    assert all(facts["mean_kl_all_dropped"][x] >= facts["mean_kl_first_dropped"][x] - 1e-6 for x in map(str, layers))
    # forcing through force() is what a hand-written hook on topk_ids does, and the router weighs what it is given
    assert facts["force_equals_manual"] is True and facts["forced_ids_seen"] is True
    assert facts["forced_weight_rule_error"] < 1e-6
    assert facts["kl_forced"] > 0.05
    assert facts["panel_matches_hooks"] is True
    # router temperature: factor 1 is the identity, 0 makes the scores uniform, larger factors sharpen them
    assert facts["scale_one_identical"] is True and facts["scale_kl"]["1.0"] == 0
    entropy = facts["scale_entropy"]
    assert entropy["0.0"] == pytest.approx(1.0) and entropy["4.0"] < entropy["1.0"] < entropy["0.0"]
    # patching the last layer's residual at the last position restores the prompt's prediction exactly
    assert facts["patch_last_layer_exact"] is True and facts["patch_restored"]["5"] == pytest.approx(1.0, abs=1e-4)
    assert outputs(nb, "application/vnd.jupyter.widget-view+json") == 1


# ---------------------------------------------------------------- 06 hub checkpoint


def test_hub_checkpoint_skips_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to load, nothing downloaded
    facts, nb = execute("06_hub_checkpoint", tmp_path / "out")
    printed = "".join(stdout(c) for c in nb.cells if c.cell_type == "code")
    assert "SKIPPED: offline mode is enabled (HF_HUB_OFFLINE=1)" in printed
    assert facts == {"skipped": True, "repo": "allenai/OLMoE-1B-7B-0924", "reason": facts["reason"]}
    assert "not in the local cache" in facts["reason"]
    assert not any((tmp_path / "hf").rglob("*.safetensors"))


def test_hub_checkpoint_on_a_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = ROOT / "data" / "models" / "tiny-random-deepseek-v3"
    config = json.loads((folder / "config.json").read_text())
    facts, nb = execute("06_hub_checkpoint", tmp_path, REPO=str(folder), PROMPT="hello world")
    assert facts["skipped"] is False and facts["loaded_from"] == "local"
    assert facts["model_type"] == "deepseek_v3" and facts["tokens"] == len("hello world")
    assert facts["n_experts"] == config["n_routed_experts"] and facts["k"] == config["num_experts_per_tok"]
    assert facts["routed_layers"] == list(range(config["first_k_dense_replace"], config["num_hidden_layers"]))
    assert facts["weight_sum_mean"] == pytest.approx(config["routed_scaling_factor"], rel=2e-3)  # float16 weights
    assert 0 < facts["mean_router_entropy_bits"] <= math.log2(config["n_routed_experts"])
    assert outputs(nb, "application/vnd.moe-workbench.routing+json") == 1


# ---------------------------------------------------------------- 07 attribution


def test_attribution(tmp_path):
    facts, nb = execute("07_attribution", tmp_path, SWEEP_LAYERS=[5], OUT=str(tmp_path))
    # the first-order estimate ranks the experts of the swept layer as the true ablations do
    assert facts["sweep_layers"] == [5] and facts["pairs"] == 32 and 4 <= facts["routed_pairs"] <= 32
    assert facts["spearman"] > 0.7 and facts["spearman_abs"] > 0.7 and facts["top10_in_top20"] >= 7
    # DLA: the parts sum to the logit, the routed experts carry most of it
    assert facts["dla_sum"] == pytest.approx(facts["dla_logit"], abs=1e-4)
    assert sum(facts["dla_by_kind"].values()) == pytest.approx(facts["dla_logit"], abs=1e-4)
    assert facts["dla_components"] == 1 + 6 * (1 + 1 + 4)  # embed; per layer attention, shared, 4 slots
    # steering towards French raises French over English, away from it lowers it
    gap = facts["steer_gap"]
    assert facts["steer_vector_shape"] == [4, 192] and gap["-2.0"] < gap["0.0"] < gap["2.0"]
    assert facts["steer_diverged_at"] is not None and facts["steered_text"] != facts["baseline_text"]
    # the generation trace: the panel's unchanged continuation, routed as one forward over the final sequence
    assert facts["generated"] == 12 and facts["tokens"] == facts["generation"]["prompt_tokens"] + 12
    assert facts["generated_equals_generate"] is True and facts["generated_routing_equals_forward"] is True
    assert facts["generation"]["max_new_tokens"] == facts["generation"]["new_tokens"] == 12
    # SAE: spliced with its error term the logits are unchanged; each domain's most tied latents, with the
    # layer-4 expert that takes their tokens
    assert facts["sae_splice_identical"] is True and facts["sae_mean_l0"] >= 16
    table = facts["sae_table"]
    assert [row["domain"] for row in table] == ["code", "code", "french", "french", "numbers", "numbers"]
    assert all(row["tokens active"] >= 8 and 0 <= row["layer-4 expert"] < 32 and row["lift"] > 0 for row in table)
    assert outputs(nb, "application/vnd.jupyter.widget-view+json") == 1
    assert outputs(nb, "application/vnd.plotly.v1+json") == 3


# ---------------------------------------------------------------- 08 engines and causality


def test_engines_and_causality(tmp_path):
    facts, nb = execute("08_engines_and_causality", tmp_path / "nb", TOKENS=64, SWEEP_TOKENS=32, SWEEP_LAYERS=[2, 5],
                        LONG_TOKENS=4096, OUT=str(tmp_path))
    # the engine dump: compare equals numpy, replay of the unperturbed dump reproduces the logits
    assert facts["tokens"] == 192 and facts["perturbed_rows"] == 19 and facts["compare_equals_numpy"] is True
    assert facts["self_agreement"] == [1.0] * 6 and facts["agreement"][:2] == [1.0, 1.0]
    assert min(facts["agreement"]) < 1.0
    assert facts["replay_max_abs"] < 1e-5 < facts["perturbed_replay_max_abs"]
    # fragility: margins of the routed layers, flips counted per layer
    assert set(facts["margin_median"]) == {"2", "3", "4", "5"} and all(v > 0 for v in facts["margin_median"].values())
    assert len(facts["flips"]) == 6 and all(v >= 0 for v in facts["flips"].values())
    # the causal sweep of two layers against load
    assert facts["sweep_layers"] == [2, 5] and facts["sweep_ablations"] == 64 and facts["max_delta"] > 0
    assert set(facts["spearman_load"]) == {"2", "5"} and all(-1 <= v <= 1 for v in facts["spearman_load"].values())
    # EPLB never worse than the contiguous placement; position bins over the random-token store
    assert all(a <= b + 1e-12 for a, b in zip(facts["imbalance_after"], facts["imbalance_before"]))
    assert facts["long_tokens"] == 4096 and facts["position_bins"] == 16 and 0 < facts["entropy_min"] <= 1
    assert outputs(nb, "application/vnd.plotly.v1+json") == 3
