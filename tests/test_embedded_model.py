"""The shipped DeepSeek-V4-architecture model (data/models/wb-v4-mini): integrity, quality against a unigram
byte model, routing that specialises by domain, and agreement with the transformers oracle."""

import hashlib
import json

import pytest
import torch

import workbench as wb
from workbench.demo import EMBEDDED_MODEL, heldout_texts, route

DOMAINS = {"code", "prose", "french", "spanish", "german", "numbers", "structured"}


@pytest.fixture(scope="module")
def model():
    return wb.load(EMBEDDED_MODEL, dtype=torch.float32)


def test_weights_match_the_published_checksum():
    digest = hashlib.sha256((EMBEDDED_MODEL / "model.safetensors").read_bytes()).hexdigest()
    assert (EMBEDDED_MODEL / "SHA256SUMS").read_text().split()[0] == digest
    assert digest in (EMBEDDED_MODEL / "README.md").read_text()


def test_heldout_bits_per_byte_clearly_beat_a_unigram_byte_model():
    ev = json.loads((EMBEDDED_MODEL / "eval.json").read_text())
    assert set(ev["heldout_bits_per_byte"]) == DOMAINS
    card = (EMBEDDED_MODEL / "README.md").read_text()
    for domain, bpb in ev["heldout_bits_per_byte"].items():
        assert bpb < 0.8 * ev["unigram_bits_per_byte"][domain], domain
        assert f"| {domain} | {bpb:.3f} |" in card


def test_tokenizer_is_bytes(model):
    assert model.tokenizer.encode("héllo {1}") == list("héllo {1}".encode())
    assert model.tokenizer.decode(list("é!".encode())) == "é!"


def test_routing_specialises_by_domain(model):
    """In at least half of the routed layers some expert takes >= 2 k/E of some domain's tokens, and (so that a
    collapsed router, busy for every domain, does not count) >= twice its mean share of the other domains."""
    r = route(model, heldout_texts(4096))
    assert set(r.domains) == DOMAINS and len(r.layers) == 6
    others = (r.share.sum(1, keepdims=True) - r.share) / (len(r.domains) - 1)  # [layer, domain, expert]
    selective = (r.share >= 2 * r.baseline) & (r.share >= 2 * others)
    specialised = [layer for i, layer in enumerate(r.layers) if selective[i].any()]
    assert len(specialised) >= len(r.layers) / 2, (specialised, r.share.max(axis=(1, 2)) / r.baseline)
    torch.testing.assert_close(torch.tensor(r.share.sum(-1)), torch.full(r.share.shape[:2], float(r.k),
                                                                          dtype=torch.float64))


def test_agrees_with_the_transformers_oracle(model):
    """Logits of the shipped weights within 1e-4 of transformers' deepseek_v4 (128 tokens: at most 32 CSA
    entries, all kept by the indexer, so its tie order cannot matter)."""
    import transformers

    from oracle import assert_close_scaled

    hf = transformers.AutoModelForCausalLM.from_pretrained(EMBEDDED_MODEL, dtype=torch.float32).eval()
    ids = torch.tensor([list(heldout_texts(128)[d][:128]) for d in ("code", "french")])
    with torch.no_grad():
        ref = hf(ids).logits
    assert_close_scaled(model(ids), ref, 1e-4, "embedded model logits")
