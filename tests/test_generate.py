"""`CausalLM.generate`: greedy decoding through the incremental state equals an argmax loop over whole-sequence
forwards on every family; seeded sampling, stop ids, continuing a State; hooks and interventions at every step."""

import pytest
import torch
import transformers as tf

import workbench as wb
from oracle import input_ids, make_checkpoint
from test_deepseek import v2, v3
from test_deepseek_v32 import v32
from test_deepseek_v4 import CONFIGS as V4_CONFIGS, make_v4
from test_dense_and_mixtral import COMMON
from test_gpt_oss import config as gpt_oss
from test_qwen_olmoe import olmoe, qwen2, qwen3
from workbench import HookError, InputError
from workbench.demo import EMBEDDED_MODEL
from workbench.interventions import ablate, force, patch

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT, NEW = 7, 6  # V4's compressors pool every 4 and 8 tokens, V3.2 keeps 4 keys: both bite within 13 tokens
FAMILIES = {  # each family's tiny config (sliding windows that slide within PROMPT + NEW where the family has one)
    "llama": lambda: tf.LlamaConfig(**COMMON),
    "qwen2-sliding": lambda: tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=4, max_window_layers=1),
    "mixtral-sliding": lambda: tf.MixtralConfig(**COMMON, num_local_experts=6, num_experts_per_tok=2, sliding_window=5),
    "qwen2-moe": lambda: qwen2(),
    "qwen3-moe-sliding": lambda: qwen3(use_sliding_window=True, sliding_window=4),
    "olmoe": lambda: olmoe(),
    "gpt-oss": lambda: gpt_oss(),
    "deepseek-v2": lambda: v2(),
    "deepseek-v3": lambda: v3(n_group=4, topk_group=2),
    "deepseek-v32": lambda: v32(),
    "deepseek-v4": lambda: V4_CONFIGS["hc2-every-kind-rates-not-dividing-yarn"][0](),
}


def argmax_loop(model, ids: torch.Tensor, n: int) -> torch.Tensor:
    """The reference: rerun the whole sequence for each new token and append its last position's argmax."""
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_greedy_equals_the_argmax_loop_on_every_family(tmp_path, name):
    config = FAMILIES[name]()
    (make_v4 if name == "deepseek-v4" else make_checkpoint)(config, tmp_path)
    model = wb.load(tmp_path, dtype=torch.float32)
    ids = input_ids(config.vocab_size, length=PROMPT)
    out = model.generate(ids, NEW, chunk_tokens=3)  # the prompt prefilled in chunks of 3, 3 and 1
    assert out.dtype == torch.long and out.shape == (2, PROMPT + NEW)
    assert torch.equal(out, argmax_loop(model, ids, NEW))


# ---------------------------------------------------------------- the embedded DeepSeek-V4 mini

IDS = torch.tensor([list(b"def add(a, b):\n    return"), list(b"Le chat est sur la table.")])
T = IDS.shape[1]


@pytest.fixture(scope="module")
def v4():
    return wb.load(EMBEDDED_MODEL, dtype=torch.float32)


@pytest.fixture(scope="module")
def greedy(v4):
    return v4.generate(IDS, 8)


def test_embedded_greedy_equals_the_argmax_loop(v4, greedy):
    assert torch.equal(greedy, argmax_loop(v4, IDS, 8))
    assert torch.equal(v4.generate(IDS[0], 8), greedy[:1])  # one sequence [T] is a batch of one


def test_sampling_is_reproducible_by_seed(v4, greedy):
    sample = dict(do_sample=True, temperature=1.5)
    a, b = v4.generate(IDS, 8, seed=0, **sample), v4.generate(IDS, 8, seed=0, **sample)
    assert torch.equal(a, b) and torch.equal(a[:, :T], IDS)
    assert not torch.equal(a, v4.generate(IDS, 8, seed=1, **sample))
    # a nucleus this small holds only the likeliest token: sampling from it is greedy decoding
    assert torch.equal(v4.generate(IDS, 8, do_sample=True, top_p=1e-6, seed=2), greedy)


def test_stop_ids_end_each_row(v4, greedy):
    stops = torch.tensor([int(greedy[0, T + 2]), 255])
    out = v4.generate(IDS, 8, stop=stops.tolist())
    ends = []
    for row, want in zip(out, greedy):
        hits = torch.isin(want[T:], stops).nonzero()
        ends.append(T + int(hits[0]) + 1 if len(hits) else len(want))
        assert torch.equal(row[:ends[-1]], want[:ends[-1]]) and (row[ends[-1]:] == want[ends[-1] - 1]).all()
    # generation ends once every row has stopped
    assert v4.generate(IDS[:1], 8, stop=stops).shape == (1, ends[0])


def test_a_state_continues_where_generate_stopped(v4, greedy):
    state = wb.State()
    first = v4.generate(IDS, 3, cache=state)
    assert state.offset == T + 2  # every returned id but the last
    rest = v4.generate(first[:, -1:], 5, cache=state)
    assert torch.equal(torch.cat([first, rest[:, 1:]], 1), greedy)


def test_hooks_see_absolute_positions_at_every_step(v4, greedy):
    seen, heads = [], []
    with v4.hooks({"layers.0.resid_pre": lambda x, ctx: seen.append((ctx.positions, ctx.input_ids))}):
        out = v4.generate(IDS, 8, chunk_tokens=10)
    assert torch.equal(out, greedy)
    assert [len(p) for p, _ in seen] == [10, 10, T - 20] + [1] * 7
    assert torch.equal(torch.cat([p for p, _ in seen]), torch.arange(T + 7))
    assert torch.equal(torch.cat([i for _, i in seen], 1), greedy[:, :-1])  # the last token is never fed
    # the output head skips the prompt's first chunks unless a hook would see them
    with v4.hooks({"logits": lambda x, ctx: heads.append(ctx.positions)}):
        v4.generate(IDS, 8, chunk_tokens=10)
    assert torch.equal(torch.cat(heads), torch.arange(T + 7))


@pytest.mark.parametrize("tokens", [[5], [T + 2], [3, T, T + 5]])
def test_an_ablation_during_generation_equals_the_ablated_argmax_loop(v4, greedy, tokens):
    """Positions are absolute: an ablation at a prompt position or a generated one applies there, and only there."""
    hooks = ablate(0, range(32), tokens=tokens) + ablate(2, range(32), tokens=tokens)  # layer 0 is hash-routed
    zeroed = []

    def record(w, ctx):
        zeroed.extend(ctx.positions[(w == 0).all(-1).all(0)].tolist())

    with v4.hooks(hooks + [("layers.2.router.topk_weights", record)]):
        out = v4.generate(IDS, 8)
    assert zeroed == tokens  # once per position: the prefill's, then each step's
    with v4.hooks(hooks):
        assert torch.equal(out, argmax_loop(v4, IDS, 8)) and not torch.equal(out, greedy)


def test_force_by_position_during_generation(v4):
    forced = torch.tensor([[1, 7, 12, 30]]).expand(T + 8, 4)  # [positions, k]
    with v4.hooks(force(3, forced, tokens=range(T - 1, T + 8))):
        assert torch.equal(v4.generate(IDS, 8), argmax_loop(v4, IDS, 8))
    with v4.hooks(force(3, forced[:T])), pytest.raises(HookError, match="do not cover this forward"):
        v4.generate(IDS, 8)


def test_patch_takes_the_rows_of_absolute_positions(v4):
    """A source of the prompt's length patches the prompt; a step past it is refused, not misapplied."""
    name = "layers.1.resid_post"
    other = torch.tensor([list(b"def mul(x, y):\n    return"), list(b"Le chien dort sur le lit.")])
    _, src = v4.run_with_cache(other, names=[name])
    with v4.hooks(patch(name, src[name], tokens=range(T))):
        assert torch.equal(v4.generate(IDS, 8), argmax_loop(v4, IDS, 8))
    with v4.hooks(patch(name, src[name])), pytest.raises(HookError, match=f"covers positions 0 to {T - 1}.*{T}"):
        v4.generate(IDS, 8)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(max_new_tokens=2.0), "max_new_tokens must be an integer"),
    (dict(do_sample=True, temperature=0.0), "temperature must be a finite number > 0"),
    (dict(do_sample=True, temperature=float("inf")), "temperature"),
    (dict(top_p=0.0), r"top_p must lie in \(0, 1\]"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=-1), "seed must be an integer >= 0"),
    (dict(stop=256), r"stop ids \[256\] must lie in the vocabulary \[0, 256\)"),
    (dict(stop=[1.5]), "stop must be a token id"),
    (dict(chunk_tokens=0), "chunk_tokens must be an integer >= 1"),
])
def test_bad_arguments_are_refused(v4, kwargs, message):
    kwargs = {"max_new_tokens": 4, **kwargs}
    with pytest.raises(InputError, match=message):
        v4.generate(IDS, **kwargs)


def test_no_new_tokens_returns_the_prompt(v4):
    assert torch.equal(v4.generate(IDS.tolist(), 0), IDS)
