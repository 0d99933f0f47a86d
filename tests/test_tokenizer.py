"""Tokenizers: the checkpoint's tokenizer.json through `tokenizers`, bytes as the fallback."""

import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import workbench as wb
from workbench.tokenizer import ByteTokenizer


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
