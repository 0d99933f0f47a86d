"""Tokenizers: a checkpoint's `tokenizer.json` (through `tokenizers`) with the special tokens, BOS/EOS settings
and chat template of its `tokenizer_config.json`; raw bytes for a byte vocabulary; a stand-in that names the
missing files where a larger vocabulary comes without them.

Encoding follows the checkpoint's own tokenizer as transformers builds it from these files: a named special
token (`bos_token`, `eos_token`, any other `*_token`) is registered as a special added token, and where the
config sets `add_bos_token`/`add_eos_token` those decide what `encode` adds (they take precedence over the
post-processor in `tokenizer.json`, as transformers' tokenizer classes given the config do); without them the
post-processor in `tokenizer.json` decides. Chat templates are untrusted text from the checkpoint: they render
in jinja2's immutable sandbox, with the options and variables transformers gives them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from .checkpoint import CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG, TOKENIZER_FILES, TOKENIZER_JSON, _read_json
from .errors import CheckpointError, shorten

BYTE_VOCAB = 256  # a vocabulary of exactly the 256 byte values is taken as bytes when no tokenizer file says more


class ByteTokenizer:
    """Byte-level tokenizer: token id = byte value (+ offset), for models trained on raw bytes. It has no
    special tokens and no chat template."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens:
            raise ValueError("the byte tokenizer has no BOS token to add (add_special_tokens=True)")
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(i - self.offset for i in ids if 0 <= i - self.offset < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **variables: Any) -> str | list[int]:
        raise ValueError("the byte tokenizer has no chat template (the checkpoint has no tokenizer files)")


class HFTokenizer:
    """A checkpoint's `tokenizer.json` and `tokenizer_config.json` (+ `chat_template.jinja`), read once."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.folder = folder
        path = folder / TOKENIZER_JSON
        try:
            self.inner = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises its own exception type for malformed files
            raise CheckpointError(f"unreadable tokenizer ({shorten(str(e))})", file=str(path)) from None
        config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
        self.special_tokens = _register_special_tokens(self.inner, config, str(folder / TOKENIZER_CONFIG))
        self.inner.encode_special_tokens = config.get("split_special_tokens") is True
        self.bos_token, self.eos_token = self.special_tokens.get("bos_token"), self.special_tokens.get("eos_token")
        self.bos_token_id = None if self.bos_token is None else self.inner.token_to_id(self.bos_token)
        self.eos_token_id = None if self.eos_token is None else self.inner.token_to_id(self.eos_token)
        # the config's BOS/EOS flags decide what encode adds; without them, tokenizer.json's post-processor does
        self.add_bos = bool(config.get("add_bos_token")) and self.bos_token_id is not None
        self.add_eos = bool(config.get("add_eos_token")) and self.eos_token_id is not None
        self.use_post_processor = not {"add_bos_token", "add_eos_token"} & config.keys() \
            and self.inner.post_processor is not None
        self.chat_template, self.template_file = _chat_template(folder, config)
        self._compiled: Any = None

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text`. None: with the special tokens the checkpoint adds (transformers' `encode(text)`);
        False: none; True: the BOS token forced at the start (and EOS where the checkpoint adds one)."""
        if add_special_tokens and self.bos_token_id is None:
            raise ValueError(f"{self.folder}: the tokenizer names no bos_token, so add_special_tokens=True has "
                             "no BOS to add")
        if add_special_tokens is None and self.use_post_processor:
            return self.inner.encode(text).ids
        ids = self.inner.encode(text, add_special_tokens=False).ids
        if add_special_tokens is False:
            return ids
        return [self.bos_token_id] * (add_special_tokens or self.add_bos) + ids + [self.eos_token_id] * self.add_eos

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`, special tokens shown unless `skip_special_tokens`."""
        return self.inner.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **variables: Any) -> str | list[int]:
        """`messages` ({"role", "content"} dicts) rendered by the checkpoint's chat template: the text by
        default; with `tokenize=True` its ids, encoded without adding special tokens (the template has them).
        `variables` reach the template too (e.g. `tools=[...]`, or a model-specific switch such as `thinking`)."""
        if self.chat_template is None:
            raise CheckpointError(f"no chat template: neither {CHAT_TEMPLATE_FILE} nor a chat_template in "
                                  f"{TOKENIZER_CONFIG}", file=str(self.folder))
        if self._compiled is None:
            self._compiled = _compile(self.chat_template, self.template_file)
        chat = [{k: v for k, v in dict(m).items() if v is not None} for m in messages]  # as transformers does
        context = {"tools": None, "documents": None, **self.special_tokens, **variables,
                   "messages": chat, "add_generation_prompt": add_generation_prompt}
        try:
            text = self._compiled.render(context)
        except Exception as e:  # the template's own failures: sandbox violations, raise_exception, type errors
            raise CheckpointError(f"chat template failed ({type(e).__name__}: {shorten(str(e))})",
                                  file=self.template_file) from None
        return self.encode(text, add_special_tokens=False) if tokenize else text


class MissingTokenizer:
    """Stands in for the tokenizer of a checkpoint whose vocabulary is not bytes and that ships no
    `tokenizer.json`: the model loads and takes token ids; text raises, naming the missing files."""

    def __init__(self, folder: Path, vocab_size: int):
        self.folder, self.vocab_size = folder, vocab_size

    def _missing(self) -> CheckpointError:
        missing = ", ".join(n for n in (TOKENIZER_JSON, TOKENIZER_CONFIG) if not (self.folder / n).is_file())
        return CheckpointError(f"no tokenizer: the checkpoint lacks {missing} and its vocabulary of "
                               f"{self.vocab_size:,} tokens is not bytes; add the checkpoint's tokenizer files, or "
                               "feed token ids", file=str(self.folder))

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        raise self._missing()

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        raise self._missing()

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **variables: Any) -> str | list[int]:
        raise self._missing()


def load_tokenizer(folder: Path, vocab_size: int) -> ByteTokenizer | HFTokenizer | MissingTokenizer | None:
    """The checkpoint's tokenizer: its `tokenizer.json`, else bytes for a vocabulary of exactly 256, else a
    stand-in raising on use (vocabulary over 256: the model loads for token ids); None under 256 (tiny models)."""
    if (folder / TOKENIZER_JSON).is_file():
        return HFTokenizer(folder)
    if vocab_size == BYTE_VOCAB:
        return ByteTokenizer()
    return MissingTokenizer(folder, vocab_size) if vocab_size > BYTE_VOCAB else None


def _register_special_tokens(inner: Any, config: dict, file: str) -> dict[str, str]:
    """Register the config's added and special tokens with `inner` as transformers does (those it lacks as
    added tokens are added, keeping their id where the vocabulary has them); {name: text} of the named ones."""
    from tokenizers import AddedToken

    def added(value: Any, name: str, special: bool | None) -> AddedToken:
        """An AddedToken from a string or an AddedToken object; special=None: as the object says."""
        if isinstance(value, str):
            return AddedToken(value, special=True)
        if not isinstance(value, dict) or not isinstance(value.get("content"), str):
            raise CheckpointError(f"{name} must be a string or an AddedToken object, got {shorten(repr(value))}",
                                  file=file)
        flags = {k: bool(value[k]) for k in ("lstrip", "rstrip", "single_word", "normalized") if k in value}
        return AddedToken(value["content"], special=bool(value.get("special")) if special is None else special,
                          **flags)

    table = config.get("added_tokens_decoder", {})
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if not isinstance(table, dict) or not isinstance(extra, (list, dict)):
        raise CheckpointError("added_tokens_decoder must be an object and extra_special_tokens a list or object",
                              file=file)
    named = {k: added(v, k, True) for k, v in config.items() if k.endswith("_token") and isinstance(v, (str, dict))}
    extra = extra.values() if isinstance(extra, dict) else extra
    tokens = [added(v, f"added_tokens_decoder[{k}]", None) for k, v in table.items()] + list(named.values()) \
        + [added(v, "extra_special_tokens", True) for v in extra]
    have = {t.content for t in inner.get_added_tokens_decoder().values()}
    inner.add_tokens([t for t in tokens if t.content not in have])
    return {k: t.content for k, t in named.items()}


def _chat_template(folder: Path, config: dict) -> tuple[str | None, str]:
    """The chat template text (None: the checkpoint has none) and the file it came from."""
    path = folder / CHAT_TEMPLATE_FILE
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8"), str(path)
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot be read ({e})", file=str(path)) from None
    template, file = config.get("chat_template"), str(folder / TOKENIZER_CONFIG)
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
        if template is None:
            raise CheckpointError(f"chat_template names no 'default' template (has {shorten(repr(list(named)))})",
                                  file=file)
    if template is not None and not isinstance(template, str):
        raise CheckpointError(f"chat_template must be a string, got {type(template).__name__}", file=file)
    return template, file


def _compile(template: str, file: str) -> Any:
    """The template compiled in jinja2's immutable sandbox (no attribute access to Python internals, no
    mutation of the values passed in; any attempt is an error, not an empty string), with transformers'
    options: trim_blocks, lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII text,
    `raise_exception(message)` and `strftime_now(format)`."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

    class Sandbox(ImmutableSandboxedEnvironment):
        def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
            raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__} is not allowed")

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda fmt: datetime.now().strftime(fmt))
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise CheckpointError(f"chat template syntax error on line {e.lineno}: {shorten(e.message or '')}",
                              file=file) from None
