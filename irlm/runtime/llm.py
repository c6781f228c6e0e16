"""``LLM``: the user-facing entry point (offline batches, chat, async streaming).

    from irlm import LLM, SamplingParams
    llm = LLM("out/smollm2")                      # an engine directory from `irlm compile`
    outs = llm.generate(["Hello", "The capital of"], SamplingParams(temperature=0, max_tokens=32))
    async for delta in llm.generate_stream("Tell me", SamplingParams(max_tokens=64)):
        print(delta.text, end="")

``LLM`` takes an engine directory, or any runner implementing
:class:`~irlm.runtime.model_runner.ModelRunner` (with its tokenizer): for tests a
:class:`~irlm.runtime.runners.hf_reference.ReferenceRunner` over a Hugging Face model.
"""
from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from typing import AsyncIterator, Sequence

from ..errors import IRLMError
from .llm_engine import LLMEngine
from .errors import RequestFailedError
from .model_runner import ModelRunner
from .outputs import RequestOutput, StreamOutput
from .sampling import SamplingParams, as_sampling_params

Prompt = str | list[int]


def as_hf_tokenizer(tokenizer):
    """Accept a ``tokenizers.Tokenizer`` too, by wrapping it in ``PreTrainedTokenizerFast``."""
    try:
        from tokenizers import Tokenizer as RawTokenizer
    except ImportError:                                    # pragma: no cover
        return tokenizer
    if isinstance(tokenizer, RawTokenizer):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    return tokenizer


class LLM:
    """Generate with a compiled engine: ``LLM(engine_dir)`` or ``LLM(runner, tokenizer)``.

    For an engine directory, ``device`` is ``cpu``, ``cuda`` or ``auto`` (cuda when a GPU is
    present), and the tokenizer, chat template and EOS ids saved in the engine are used unless
    given here.  ``max_num_tokens`` (the per-step token budget) defaults to 512, or less where
    the engine was compiled for less.

    A multi-rank engine (``--tp``/``--pp``) runs one process per rank (docs/distributed.md):
    this process is rank 0 and starts the others, or, when a launcher (torchrun) started every
    rank, joins them; on a launched rank other than 0 the constructor serves that rank until
    rank 0 closes the engine, then exits the process (``os._exit(0)`` after flushing
    stdout and stderr: no atexit handlers run there).  ``parallel="simulator"`` runs all ranks
    in threads of this process instead (CPU, a test oracle).  :meth:`close` (or ``with``)
    stops the workers.

    On the CPU, ``executor`` is ``fast`` (default: the bound CPU executor,
    irlm/runtime/runners/cpu.py) or ``reference`` (the interpreter; slow, for debugging);
    ``threads`` sets torch's CPU threads (default: the process's setting)."""

    def __init__(self, model: "str | os.PathLike | ModelRunner", tokenizer=None, *,
                 device: str = "auto", num_blocks: int | None = None,
                 max_num_tokens: int | None = None,
                 max_batch_size: int = 64, policy: str = "guaranteed-no-evict",
                 max_waiting: int = 1024, enable_prefix_caching: bool = True,
                 chat_template: str | None = None,
                 eos_token_id: int | list[int] | None = None,
                 async_decode: bool | None = None,
                 parallel: str = "processes", executor: str | None = None,
                 threads: int | None = None):
        if isinstance(model, (str, os.PathLike)):
            runner, engine = _open_engine(model, device, num_blocks, parallel, executor,
                                          threads)
            tokenizer = engine.tokenizer if tokenizer is None else tokenizer
            chat_template = engine.chat_template if chat_template is None else chat_template
            if eos_token_id is None:
                eos_token_id = engine.config.get("eos_token_id")
        else:
            runner = model
        if max_num_tokens is None:
            max_num_tokens = min(512, getattr(runner, "max_num_tokens", None) or 512)
        self.tokenizer = as_hf_tokenizer(tokenizer)
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = getattr(self.tokenizer, "eos_token_id", None)
        self.chat_template = chat_template
        self.engine = LLMEngine(runner, self.tokenizer, max_num_tokens=max_num_tokens,
                                max_batch_size=max_batch_size, policy=policy,
                                max_waiting=max_waiting,
                                enable_prefix_caching=enable_prefix_caching,
                                eos_token_id=eos_token_id, async_decode=async_decode)
        self._streams: dict[int, asyncio.Queue] = {}
        self._loop_task: asyncio.Task | None = None

    @classmethod
    def from_engine(cls, engine_dir, *, device: str = "auto", num_blocks: int | None = None,
                    **kwargs) -> "LLM":
        """``LLM(engine_dir, ...)`` under its older name."""
        return cls(engine_dir, device=device, num_blocks=num_blocks, **kwargs)

    def close(self) -> None:
        """Release the runner's processes and devices (a multi-rank engine's workers)."""
        close = getattr(self.engine.runner, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ----- offline ---------------------------------------------------------------------------
    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        """Generate for every prompt (text, or a list of token ids); outputs in prompt order.

        Prompts beyond the waiting queue's bound are fed in as room frees up."""
        prompts = self._as_prompt_list(prompts)
        if params is None or isinstance(params, (SamplingParams, dict)):
            params = [as_sampling_params(params)] * len(prompts)
        elif isinstance(params, (list, tuple)):
            params = [as_sampling_params(p, f"generate: params[{i}]")
                      for i, p in enumerate(params)]
        else:
            params = [as_sampling_params(params)]      # the one clear error
        if len(params) != len(prompts):
            raise IRLMError(f"generate: {len(params)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._encode(p) for p in prompts]     # every error before any work
        pending = deque(enumerate(zip(prompts, encoded, params)))
        ids: list[int | None] = [None] * len(prompts)
        engine = self.engine
        try:
            while pending or any(not engine.requests[i].finished for i in ids if i is not None):
                while pending and engine.queue_has_room:
                    k, (prompt, prompt_ids, p) = pending.popleft()
                    ids[k] = engine.add_request(prompt_ids, p,
                                                prompt=prompt if isinstance(prompt, str) else None)
                engine.step()
        except BaseException:
            for i in ids:
                if i is not None:
                    engine.abort(i)
                    engine.pop_output(i)
            raise
        return [engine.pop_output(i) for i in ids]

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             params: SamplingParams | Sequence[SamplingParams] | None = None, *,
             chat_template: str | None = None, add_generation_prompt: bool = True
             ) -> list[RequestOutput]:
        """Generate replies to one conversation (a list of ``{"role", "content"}`` dicts) or to
        several; the chat template is a jinja2 string (argument, or the LLM's) or the
        tokenizer's own."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, chat_template=chat_template,
                                            add_generation_prompt=add_generation_prompt)
                   for c in conversations]
        # The template writes the special tokens (BOS...) itself: encode without adding more.
        token_ids = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outs = self.generate(token_ids, params)
        for out, prompt in zip(outs, prompts):
            out.prompt = prompt
        return outs

    def apply_chat_template(self, messages: list[dict], *, chat_template: str | None = None,
                            add_generation_prompt: bool = True) -> str:
        template = chat_template or self.chat_template
        if template is not None:
            return _render_chat_template(template, messages, add_generation_prompt,
                                         self.tokenizer)
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise IRLMError("chat needs a chat template: pass chat_template= (a jinja2 string) "
                            "or use a tokenizer that has one")
        return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # ----- streaming -------------------------------------------------------------------------
    async def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None
                              ) -> AsyncIterator[StreamOutput]:
        """Yield each sequence's new text and tokens as they are generated.  The engine loop
        runs as a task on the current event loop while any request is unfinished; leaving the
        iteration early cancels the request and frees its blocks."""
        prompt_ids = self._encode(prompt)
        params = as_sampling_params(params, "generate_stream")
        request_id = self.engine.add_request(prompt_ids, params, stream=True,
                                             prompt=prompt if isinstance(prompt, str) else None)
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = queue
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run_engine())
        try:
            while True:
                item = await queue.get()
                if item is None:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self._streams.pop(request_id, None)
            self.engine.abort(request_id)          # no-op when it finished
            self.engine.pop_output(request_id)

    async def _run_engine(self) -> None:
        engine = self.engine
        try:
            while True:
                if engine.has_unfinished():
                    engine.step()
                self._dispatch_streams()
                if not engine.has_unfinished():
                    return
                await asyncio.sleep(0)           # let consumers run and new requests arrive
        except Exception as e:   # not attributable to one request: every waiting stream gets it
            for queue in self._streams.values():
                queue.put_nowait(e)

    def _dispatch_streams(self) -> None:
        """Hand every open stream what its request produced (from the request's state, so
        steps run by a concurrent ``generate`` call are not missed either)."""
        for request_id, queue in list(self._streams.items()):
            req = self.engine.requests.get(request_id)
            if req is None:
                continue
            for delta in self.engine.stream_deltas(request_id):
                queue.put_nowait(delta)
            if req.finished:
                # a request that failed alone ends its own stream with its reason
                queue.put_nowait(RequestFailedError(req.error) if req.error else None)
                del self._streams[request_id]

    # ----- helpers ---------------------------------------------------------------------------
    @staticmethod
    def _as_prompt_list(prompts) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]                        # one prompt given as token ids
        return prompts

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise IRLMError("a text prompt needs a tokenizer; pass token ids instead")
            return list(self.tokenizer.encode(prompt))
        return [int(t) for t in prompt]


def _open_engine(path, device: str, num_blocks, parallel: str, executor=None, threads=None):
    """(runner, engine) for an engine directory; a multi-rank one as one process per rank."""
    from .runners.interpreter import runner_for_engine
    from irlm.lowering.engine_format import load_engine
    from .distributed.runner import is_multi_rank
    if parallel == "processes" and is_multi_rank(path):
        from .distributed.runner import DistributedRunner, launched_rank, serve_rank
        env = launched_rank()
        if env is not None and env[0] != 0:
            serve_rank(path, device=device, num_blocks=num_blocks, threads=threads,
                       executor=executor)
            # Exit without the interpreter's teardown, as a spawned worker does: c10d's
            # background threads (store client, gloo) abort the process (SIGABRT, "terminate
            # called without an active exception") when they are destroyed there.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)
        runner = DistributedRunner(path, device=device, num_blocks=num_blocks, threads=threads,
                                   executor=executor)
        return runner, runner.header
    engine = load_engine(path)
    return runner_for_engine(engine, device=device, num_blocks=num_blocks,
                             parallel=parallel, executor=executor, threads=threads), engine


def _render_chat_template(template: str, messages: list[dict], add_generation_prompt: bool,
                          tokenizer) -> str:
    """Render a jinja2 chat template the way HF does (sandboxed, bounded: chat_template.py)."""
    from .chat_template import render_chat_template
    return render_chat_template(template, messages, add_generation_prompt, tokenizer)
