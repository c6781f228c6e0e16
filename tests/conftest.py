"""Shared pytest fixtures."""
import pytest
import torch


@pytest.fixture
def tiny_llama():
    """A 2-layer Llama (hidden 64, 4 heads / 2 KV heads, vocab 128) with seeded random fp32
    weights, in eval mode."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    return transformers.LlamaForCausalLM(config).eval()


def pytest_configure(config):
    # One torch thread per test process: CI runs two pytest-xdist workers on two cores, and
    # the tests' tiny matrix products only lose from intra-op threading.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tok():
    """The runtime tests' byte-level BPE tokenizer, trained in-process (irlm.runtime.testing)."""
    from irlm.runtime.testing import tiny_tokenizer
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A tiny seeded Llama over ``tok``'s vocabulary (a module may override it)."""
    from irlm.runtime.testing import tiny_llama
    return tiny_llama(len(tok))


@pytest.fixture(scope="session")
def random_calibration(tmp_path_factory):
    """``make(vocab, prompts, length, seed)``: the path (str) of a JSON calibration set of
    random token ids, in passes/calibration.py's format."""
    from irlm.passes.calibration import write_token_lists

    def make(vocab: int, prompts: int, length: int, seed: int) -> str:
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(prompts)]
        path = tmp_path_factory.mktemp("calib") / "tokens.json"
        return write_token_lists(ids, path).as_posix()
    return make
