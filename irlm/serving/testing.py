"""A tiny seeded model to serve in tests, examples and the CPU smoke benchmark:

    irlm serve --factory irlm.serving.testing:tiny_llm

It is :func:`irlm.runtime.testing.tiny_llama` over the in-process byte-level BPE tokenizer,
behind a :class:`~irlm.runtime.ReferenceRunner` (paged KV cache), with a small chat template.
Byte-level, so random outputs hold partial UTF-8 characters: what streams must not split."""
from __future__ import annotations

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def tiny_llm(num_blocks: int = 256, block_size: int = 4, max_len: int = 256, **llm_kwargs):
    import torch

    from ..runtime import LLM, ReferenceRunner
    from ..runtime.testing import tiny_llama, tiny_tokenizer
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok), max_len=max_len)
    llm_kwargs.setdefault("chat_template", CHAT_TEMPLATE)
    return LLM(ReferenceRunner(model, block_size=block_size, num_blocks=num_blocks), tok,
               **llm_kwargs)


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``irlm serve ARGS`` in a child process on free loopback ports, ready when entered:

        with ServerProcess(["--factory", "irlm.serving.testing:tiny_llm"]) as srv:
            openai.OpenAI(base_url=srv.openai_url, api_key="-")...

    Leaving sends SIGTERM (the server drains) and waits for the exit status (``returncode``)."""

    def __init__(self, args: list[str], *, api_key: str | None = None, grpc: bool = True,
                 timeout: float = 180.0, env: dict | None = None):
        self.port, self.grpc_port = free_port(), (free_port() if grpc else 0)
        self.api_key, self.timeout = api_key, timeout
        self.args = list(args) + ["--port", str(self.port), "--grpc-port", str(self.grpc_port)]
        if api_key:
            self.args += ["--api-key", api_key]
        self.env, self.proc, self.returncode = env, None, None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return self.url + "/v1"

    @property
    def http_addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def grpc_addr(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def __enter__(self) -> "ServerProcess":
        import os
        import subprocess
        import sys
        import time
        import urllib.request
        import tempfile
        env = {**os.environ, **(self.env or {})}
        # stderr to a file, not a pipe: a pipe nobody reads would block a chatty server
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "irlm", "serve", *self.args],
                                     env=env, stderr=self.log, text=True)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"irlm serve exited with {self.proc.returncode}: "
                                   f"{self.log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("irlm serve did not become ready in time")

    def stop(self, timeout: float = 60.0) -> int:
        import signal
        import subprocess
        if self.proc is None or self.returncode is not None:
            return self.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.returncode = self.proc.wait()
        return self.returncode

    def __exit__(self, *exc) -> None:
        self.stop()


class NullRunner:
    """A ModelRunner that computes nothing (random logits): what is left is the runtime's and
    the server's own cost per token, for overhead benchmarks."""

    def __init__(self, vocab_size: int = 1024, block_size: int = 16, num_blocks: int = 65536,
                 max_model_len: int = 4096):
        import torch
        self.vocab_size, self.block_size = vocab_size, block_size
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self._logits = torch.randn(1024, vocab_size)

    def step(self, batch):
        n = batch.q_lens.shape[0]
        return self._logits[:n] if n <= self._logits.shape[0] else \
            self._logits[:1].expand(n, -1).contiguous()


def null_llm(**llm_kwargs):
    """``irlm serve --factory irlm.serving.testing:null_llm``: no tokenizer, no model."""
    import torch

    from ..runtime import LLM
    torch.set_num_threads(1)
    llm_kwargs.setdefault("max_batch_size", 512)
    llm_kwargs.setdefault("max_num_tokens", 8192)
    llm_kwargs.setdefault("enable_prefix_caching", False)
    return LLM(NullRunner(), None, **llm_kwargs)
