"""Tokenizers: the checkpoint's `tokenizer.json` through `tokenizers`, or raw bytes for tiny models."""

from __future__ import annotations

from pathlib import Path


class ByteTokenizer:
    """Byte-level tokenizer: token id = byte value (+ offset), for models trained on raw bytes."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.offset for i in ids if 0 <= i - self.offset < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizer.json` loaded with the `tokenizers` library (no special tokens added on encode)."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer

        self.inner = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.inner.decode(list(ids))


def load_tokenizer(folder: Path, vocab_size: int) -> ByteTokenizer | HFTokenizer | None:
    """The checkpoint's tokenizer; bytes when it has none and its vocabulary covers 256 bytes."""
    if (folder / "tokenizer.json").is_file():
        return HFTokenizer(folder / "tokenizer.json")
    return ByteTokenizer() if vocab_size >= 256 else None
