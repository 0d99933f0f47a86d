"""Shared fixtures: one tiny perturbed Mixtral checkpoint reused by loader, hook and intervention tests."""

import os

import torch

if not torch.cuda.is_available():  # no GPU: Triton kernels run on the CPU interpreter, set before any triton import
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import transformers as tf  # noqa: E402

from oracle import make_checkpoint  # noqa: E402

MIXTRAL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, num_local_experts=6, num_experts_per_tok=2)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where no CUDA GPU is visible."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="session", autouse=True)
def hash_cache(tmp_path_factory):
    """The digests tests compute are remembered in a temporary hash cache, never in the user's."""
    os.environ["WORKBENCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("hash-cache"))


@pytest.fixture
def one_thread():
    """Torch on one thread for the test (a module opts in with `pytestmark = pytest.mark.usefixtures(...)`):
    traces here run as the forked writers of the crash tests do, and on a busy machine a second intra-op thread
    costs tiny models more in handoffs than it computes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedded():
    """The embedded model in fp32, with torch on one thread while the module's tests run (as `one_thread`)."""
    import workbench as wb
    from workbench.demo import EMBEDDED_MODEL

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield wb.load(EMBEDDED_MODEL, dtype=torch.float32)
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def mixtral_ckpt(tmp_path_factory):
    """(folder, oracle model) of a tiny random Mixtral saved in HF layout."""
    folder = tmp_path_factory.mktemp("mixtral")
    hf = make_checkpoint(tf.MixtralConfig(**MIXTRAL), folder)
    return folder, hf


@pytest.fixture(scope="session")
def mixtral(mixtral_ckpt):
    import workbench as wb

    return wb.load(mixtral_ckpt[0])
