"""Tokenizers: the checkpoint's tokenizer.json with its tokenizer_config.json (special tokens, BOS/EOS, chat
template), checked against transformers' own tokenizers built from the same files; bytes as the fallback only for
a byte vocabulary; chat templates rendered in the sandbox."""

import fnmatch
import hashlib
import json
import shutil

import pytest
import torch
import transformers as tf
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import workbench as wb
from conftest import MIXTRAL
from oracle import make_checkpoint
from workbench import widgets as W
from workbench.checkpoint import HUB_ALLOW_PATTERNS
from workbench.demo import EMBEDDED_MODEL
from workbench.tokenizer import ByteTokenizer, load_tokenizer

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
PAD = "<｜pad｜>"  # named in tokenizer_config.json only: added to the vocabulary as transformers adds it
TEXTS = ["Routing sends each token to a few experts.", f"{USER}héllo wörld{ASSISTANT} def add(a, b):\n  return a",
         f"{BOS} literal {EOS}{PAD}", " 12345 ", ""]
# A chat template in the DeepSeek-V3 manner: the system prompt after BOS, then user and assistant turns marked by
# their tokens, an assistant turn closed by EOS. Block tags stand on their own lines, so trim_blocks and
# lstrip_blocks decide the whitespace around them.
CHAT_TEMPLATE = """\
{% set ns = namespace(system='', last=none) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = ns.system + message['content'] %}
    {% endif %}
{% endfor %}
{{ bos_token + ns.system -}}
{% for message in messages %}
    {% if message['role'] == 'user' %}
        {{- '<｜User｜>' + message['content'] -}}
    {% elif message['role'] == 'assistant' %}
        {% if message['content'] is none or message['content'] is not defined %}
            {{- raise_exception('an assistant turn needs content') }}
        {% endif %}
        {{- '<｜Assistant｜>' + message['content'] + eos_token -}}
    {% elif message['role'] != 'system' %}
        {{- raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% set ns.last = message['role'] %}
{% endfor %}
{% if add_generation_prompt and ns.last != 'assistant' %}
    {{- '<｜Assistant｜>' -}}
{% endif %}
"""
CHAT = [{"role": "system", "content": "You route tokens."},
        {"role": "user", "content": "Which expert takes digits?"},
        {"role": "assistant", "content": "Expert 3, mostly."},
        {"role": "user", "content": "And French text?"}]


def added(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    """A byte-level BPE tokenizer trained on a few lines, with the DeepSeek special tokens added."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[BOS, EOS], show_progress=False)
    tok.train_from_iterator(["Routing sends each token to a few experts.", "def add(a, b):\n    return a + b",
                             "héllo wörld 12345, Expert 3 takes digits"] * 20, trainer)
    tok.add_special_tokens([USER, ASSISTANT])
    return tok


def write(folder, bpe: Tokenizer, config: dict | None, bos_post_processor: bool = False):
    """tokenizer.json (with a post-processor adding BOS, or none) and tokenizer_config.json (unless None)."""
    folder.mkdir(exist_ok=True)
    tok = Tokenizer.from_str(bpe.to_str())
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                           special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(folder / "tokenizer.json"))
    if config is not None:
        (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


def oracle(folder, **overrides) -> tf.PreTrainedTokenizerFast:
    """transformers' fast tokenizer built from tokenizer.json and the config's settings (AddedToken objects as
    from_pretrained turns them)."""
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    kwargs = {k: AddedToken(**{f: x for f, x in v.items() if f != "__type"}) if isinstance(v, dict) else v
              for k, v in config.items() if k not in ("tokenizer_class", "chat_template")}
    return tf.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), **{**kwargs, **overrides})


CONFIGS = {  # name -> (tokenizer_config.json or None, tokenizer.json has a post-processor adding BOS)
    "add_bos_token, AddedToken objects": (dict(add_bos_token=True, add_eos_token=False, bos_token=added(BOS),
                                               eos_token=added(EOS), pad_token=added(PAD)), False),
    "add_bos_token and add_eos_token, strings": (dict(add_bos_token=True, add_eos_token=True, bos_token=BOS,
                                                      eos_token=EOS), False),
    "add_bos_token false over a BOS post-processor": (dict(add_bos_token=False, bos_token=BOS, eos_token=EOS), True),
    "no flags: the post-processor decides": (dict(bos_token=added(BOS), eos_token=added(EOS), pad_token=PAD), True),
    "no flags, no post-processor": (dict(bos_token=BOS, eos_token=EOS), False),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_encode_and_decode_match_transformers(bpe, tmp_path, name):
    config, post = CONFIGS[name]
    folder = write(tmp_path / "tok", bpe, config, post)
    ours, theirs = load_tokenizer(folder, 320), oracle(folder)
    forced = oracle(folder, add_bos_token=True)  # add_special_tokens=True: BOS even where the checkpoint adds none
    for text in TEXTS:
        assert ours.encode(text) == theirs.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == forced.encode(text), text
        ids = theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    assert ours.encode("experts")[0] == (theirs.bos_token_id if config.get("add_bos_token", post) else
                                         theirs.encode("experts", add_special_tokens=False)[0])
    assert ours.decode([theirs.bos_token_id]) == BOS  # special tokens are shown by default
    if "add_bos_token" not in config:  # files that agree: AutoTokenizer (which trusts tokenizer.json) agrees too
        auto = tf.AutoTokenizer.from_pretrained(folder)
        assert [ours.encode(t) for t in TEXTS] == [auto.encode(t) for t in TEXTS]


def test_without_tokenizer_config_the_post_processor_decides(bpe, tmp_path):
    for post in (False, True):
        folder = write(tmp_path / f"tok{post}", bpe, None, post)
        ours, theirs = load_tokenizer(folder, 320), Tokenizer.from_file(str(folder / "tokenizer.json"))
        for text in TEXTS:
            assert ours.encode(text) == theirs.encode(text).ids
            assert ours.encode(text, add_special_tokens=False) == theirs.encode(text, add_special_tokens=False).ids
            assert ours.decode(theirs.encode(text).ids) == theirs.decode(theirs.encode(text).ids,
                                                                        skip_special_tokens=False)
        with pytest.raises(ValueError, match="names no bos_token"):
            ours.encode("x", add_special_tokens=True)
        with pytest.raises(wb.CheckpointError, match="no chat template"):
            ours.apply_chat_template(CHAT)


@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_chat_template_matches_transformers(bpe, tmp_path, where):
    config = dict(add_bos_token=True, bos_token=added(BOS), eos_token=added(EOS), tokenizer_class="LlamaTokenizerFast")
    folder = write(tmp_path / "tok", bpe, config, bos_post_processor=True)
    if where == "chat_template.jinja":  # newer checkpoints: the file wins over a template in the config
        (folder / where).write_text(CHAT_TEMPLATE, encoding="utf-8")
        config["chat_template"] = "{{ raise_exception('the config template must not be used') }}"
    else:
        config["chat_template"] = CHAT_TEMPLATE
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    ours, theirs = load_tokenizer(folder, 320), tf.AutoTokenizer.from_pretrained(folder)
    for chat in (CHAT, CHAT[:3], CHAT[1:2]):
        for prompt in (True, False):
            text = ours.apply_chat_template(chat, add_generation_prompt=prompt)
            assert text == theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True) == \
                theirs.apply_chat_template(chat, add_generation_prompt=prompt, tokenize=True, return_dict=False)
    assert ours.apply_chat_template(CHAT) == \
        f"{BOS}You route tokens.{USER}Which expert takes digits?{ASSISTANT}Expert 3, mostly.{EOS}" \
        f"{USER}And French text?{ASSISTANT}"
    assert ours.apply_chat_template(CHAT, tokenize=True).count(ours.bos_token_id) == 1  # BOS not added twice


@pytest.mark.parametrize("template, message", [
    ("{% for m in messages %}{{ m['content'] }", "chat template syntax error on line 1"),
    ("{{ ''.__class__.__mro__ }}", "SecurityError: access to attribute '__class__'"),
    ("{{ ''.__class__ }}", "SecurityError: access to attribute '__class__'"),  # not quietly rendered as ''
    ("{{ messages.append(messages[0]) }}", "SecurityError: access to attribute 'append'"),  # inputs are immutable
    ("{{ cycler.__init__.__globals__ }}", "SecurityError"),
    ("{{ messages[0]|attr('__class__') }}", "SecurityError"),
    ("{{ raise_exception('roles must alternate') }}", "TemplateError: roles must alternate"),
])
@pytest.mark.parametrize("where", ["tokenizer_config.json", "chat_template.jinja"])
def test_bad_chat_templates_raise_checkpoint_errors_naming_the_file(bpe, tmp_path, template, message, where):
    config = dict(bos_token=BOS, eos_token=EOS)
    if where == "chat_template.jinja":
        (tmp_path / "tok").mkdir()
        (tmp_path / "tok" / where).write_text(template, encoding="utf-8")
    else:
        config["chat_template"] = template
    folder = write(tmp_path / "tok", bpe, config)
    tok = load_tokenizer(folder, 320)  # a bad template does not stop the tokenizer (or the model) from loading
    assert tok.encode("experts")
    with pytest.raises(wb.CheckpointError, match=f"{where}: ") as e:
        tok.apply_chat_template(CHAT)
    assert message in str(e.value)


def test_tokenizer_files_are_read_as_the_checkpoint_says(bpe, tmp_path):
    folder = write(tmp_path / "tok", bpe, dict(bos_token={"__type": "AddedToken", "content": 42}))
    with pytest.raises(wb.CheckpointError, match="tokenizer_config.json: bos_token must be a string or an AddedToken"):
        load_tokenizer(folder, 320)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(wb.CheckpointError, match="tokenizer_config.json: not valid JSON"):
        load_tokenizer(folder, 320)
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(chat_template=[{"name": "tool_use",
                                                                                 "template": "x"}])))
    with pytest.raises(wb.CheckpointError, match="names no 'default' template"):
        load_tokenizer(folder, 320)
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(chat_template=[{"name": "default",
                                                                                 "template": "{{ 6 * 7 }}"}])))
    assert load_tokenizer(folder, 320).apply_chat_template(CHAT) == "42"


@pytest.fixture(scope="module")
def wide_ckpt(tmp_path_factory):
    """A tiny Mixtral with a vocabulary of 320 (more than bytes) and no tokenizer files."""
    folder = tmp_path_factory.mktemp("wide")
    make_checkpoint(tf.MixtralConfig(**{**MIXTRAL, "vocab_size": 320}), folder)
    return folder


def test_a_vocabulary_over_bytes_without_tokenizer_files_raises_on_use(wide_ckpt):
    model = wb.load(wide_ckpt)  # loads: token ids work
    assert model(torch.tensor([[1, 300, 5]])).shape == (1, 3, 320)
    for use in (lambda t: t.encode("experts"), lambda t: t.decode([1, 2]), lambda t: t.apply_chat_template(CHAT)):
        with pytest.raises(wb.CheckpointError, match="lacks tokenizer.json, tokenizer_config.json and its "
                                                     "vocabulary of 320 tokens is not bytes"):
            use(model.tokenizer)
    assert isinstance(load_tokenizer(wide_ckpt, 256), ByteTokenizer)  # exactly the byte values: bytes
    assert load_tokenizer(wide_ckpt, 96) is None  # tiny models fed ids


def test_loaded_model_encodes_with_bos_and_panels_show_special_tokens(bpe, wide_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(wide_ckpt, folder)
    config = dict(add_bos_token=True, bos_token=added(BOS), eos_token=added(EOS), chat_template=CHAT_TEMPLATE)
    write(folder, bpe, config)
    model = wb.load(folder)
    ids = model.tokenizer.encode("Routing sends each token")
    assert ids == oracle(folder).encode("Routing sends each token") and ids[0] == model.tokenizer.bos_token_id
    panel = W.InterventionPanel(model, model.tokenizer.apply_chat_template(CHAT[1:2], tokenize=True), layer=1)
    assert panel.ids[0, 0] == model.tokenizer.bos_token_id != panel.ids[0, 1]  # one BOS: the template's
    assert panel._text(model.tokenizer.bos_token_id) == BOS and panel._text(model.tokenizer.eos_token_id) == EOS
    assert model.tokenizer.decode(panel.ids[0]).startswith(f"{BOS}{USER}")


def test_recorded_hashes_cover_the_tokenizer_config_and_template(bpe, wide_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(wide_ckpt, folder)
    write(folder, bpe, dict(bos_token=BOS, chat_template=CHAT_TEMPLATE))
    (folder / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    files = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".json", ".jinja")]
    (folder / "SHA256SUMS").write_text("".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n"
                                               for p in files))
    wb.load(folder)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        original = (folder / name).read_text(encoding="utf-8")
        (folder / name).write_text(original + " ", encoding="utf-8")
        with pytest.raises(wb.CheckpointError, match=f"{name}: sha256 mismatch"):
            wb.load(folder)
        (folder / name).write_text(original, encoding="utf-8")


def test_hub_fetches_the_tokenizer_config_and_chat_template():
    fetched = lambda f: any(fnmatch.fnmatch(f, p) for p in HUB_ALLOW_PATTERNS)  # noqa: E731
    assert all(fetched(f) for f in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                                    "chat_template.jinja", "generation_config.json"])
    assert not any(fetched(f) for f in ["tokenization_deepseek.py", "tokenizer.model.py", "chat_template.py"])


def test_embedded_model_keeps_its_byte_tokenizer():
    tok = wb.load(EMBEDDED_MODEL).tokenizer
    text = "héllo {1}\n"
    assert tok.encode(text) == tok.encode(text, add_special_tokens=False) == list(text.encode())
    assert tok.decode(list(text.encode()), skip_special_tokens=False) == text
    with pytest.raises(ValueError, match="names no bos_token"):
        tok.encode(text, add_special_tokens=True)
    with pytest.raises(wb.CheckpointError, match="no chat template"):
        tok.apply_chat_template(CHAT)


def test_tokenizer_json_is_used(mixtral_ckpt, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(mixtral_ckpt[0], folder)
    vocab = {w: i for i, w in enumerate(["[UNK]", "experts", "route", "tokens", "to"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(folder / "tokenizer.json"))
    model = wb.load(folder)
    assert model.tokenizer.encode("route tokens to experts") == [2, 3, 4, 1]
    assert model.tokenizer.decode([2, 3]) == "route tokens"
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(wb.CheckpointError, match="tokenizer.json: unreadable tokenizer"):
        wb.load(folder)


def test_byte_fallback_roundtrip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo {1}")
    assert ids[:2] == [104, 195] and max(ids) < 256
    assert tok.decode(ids) == "héllo {1}"


@pytest.mark.parametrize("name", ["add_bos_token and add_eos_token, strings", "no flags: the post-processor decides"])
def test_text_files_are_framed_once_not_per_block(bpe, tmp_path, monkeypatch, name):
    """`workbench trace --text` reads a file in blocks; BOS/EOS frame the whole text as one encode call would."""
    from workbench import cli

    config, post = CONFIGS[name]
    tok = load_tokenizer(write(tmp_path / "tok", bpe, config, post), 320)
    text = "".join(f"{t}\n" for t in TEXTS * 40)
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    monkeypatch.setattr(cli, "TEXT_BLOCK", 64)  # many blocks of whole lines
    ids = cli.text_tokens(tok, tmp_path / "in.txt").tolist()
    theirs = oracle(tmp_path / "tok")
    assert ids == theirs.encode(text)
    bos = theirs.bos_token_id  # the texts hold BOS as text too: one more than those, not one per block
    assert ids[0] == bos and ids.count(bos) == theirs.encode(text, add_special_tokens=False).count(bos) + 1
