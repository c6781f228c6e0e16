"""Shared pytest fixtures."""
import os

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
    # Load-time kernel timing (lowering/tactics.py) off unless a test asks for it
    # (fresh_tactics): runners compared with each other, or spread over worker processes,
    # then run the same kernels whatever the timing noise.
    os.environ.setdefault("IRLM_TACTICS", "0")


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
    random token ids, in passes/llm/calibration.py's format."""
    from irlm.passes.llm.calibration import write_token_lists

    def make(vocab: int, prompts: int, length: int, seed: int) -> str:
        g = torch.Generator().manual_seed(seed)
        ids = [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(prompts)]
        path = tmp_path_factory.mktemp("calib") / "tokens.json"
        return write_token_lists(ids, path).as_posix()
    return make


@pytest.fixture
def bounded():
    """``bounded(fn, *args, seconds=30, memory_mb=1024)``: run ``fn(*args)`` in a forked child
    under a wall-clock limit and an address-space limit ``memory_mb`` above what the child
    already maps, and return its result or re-raise its exception here.  For hostile inputs:
    a hang or a runaway allocation fails the test instead of the machine."""
    import multiprocessing
    import pickle
    import resource

    def child(conn, fn, args, memory_mb):
        with open("/proc/self/status") as f:
            vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        resource.setrlimit(resource.RLIMIT_AS, (vm + (memory_mb << 20), resource.RLIM_INFINITY))
        try:
            result = ("ok", fn(*args))
        except BaseException as e:              # noqa: B036 - handed to the parent
            result = ("err", e)
        try:
            conn.send(result)
        except (pickle.PicklingError, TypeError, AttributeError):
            conn.send(("err", RuntimeError(f"{type(result[1]).__name__}: {result[1]}")))

    def run(fn, *args, seconds: float = 30, memory_mb: int = 1024):
        ctx = multiprocessing.get_context("fork")
        parent, conn = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=child, args=(conn, fn, args, memory_mb), daemon=True)
        proc.start()
        conn.close()
        # A hang guard, not a speed test: the limits are generous because CI runs two test
        # processes on two shared cores (a 30 s case once took longer there under load).
        seconds *= 4
        if not parent.poll(seconds):
            proc.kill()
            proc.join()
            pytest.fail(f"{getattr(fn, '__name__', fn)} did not finish within {seconds} s")
        try:
            kind, value = parent.recv()
        except EOFError:
            proc.join()
            pytest.fail(f"{getattr(fn, '__name__', fn)} died (exit code {proc.exitcode}) "
                        f"under a {memory_mb} MiB memory limit")
        proc.join()
        if kind == "err":
            raise value
        return value
    return run


@pytest.fixture
def fresh_tactics(monkeypatch):
    """Load-time tactic choices (lowering/tactics.py) forgotten before and after the test, with
    timing on (IRLM_TACTICS unset), so that no test sees another's choices."""
    from irlm.lowering import tactics
    monkeypatch.delenv("IRLM_TACTICS", raising=False)
    tactics.forget()
    yield
    tactics.forget()
