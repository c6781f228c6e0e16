"""The OpenAI API: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

Request fields follow OpenAI's reference (with vLLM's common extensions: ``top_k``,
``min_p``, ``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``skip_special_tokens``); responses and server-sent-event chunks have OpenAI's shapes, errors
OpenAI's ``{"error": {...}}`` body.  A client that disconnects aborts its request at once.
"""
from __future__ import annotations

import asyncio
import json
from json.encoder import encode_basestring as _jstr  # = dumps(str, ensure_ascii=False)
import time
import uuid
from typing import Any, AsyncIterator, Optional

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .client import Chunk, EngineClient, RequestStream
from .errors import ServingError, bad_field
from .fields import Fields, sampling_params

_COMMON = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options",
           "stop", "seed", "presence_penalty", "frequency_penalty", "user", "top_k", "min_p",
           "repetition_penalty", "min_tokens", "ignore_eos", "stop_token_ids",
           "skip_special_tokens", "logprobs"}
_COMPLETION = _COMMON | {"prompt", "echo", "best_of"}
_CHAT = _COMMON | {"messages", "max_completion_tokens", "top_logprobs",
                   "add_generation_prompt", "chat_template", "response_format"}
#: the roles OpenAI's chat API defines
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
_IGNORED = {"logit_bias", "metadata", "store", "service_tier", "parallel_tool_calls",
            "tool_choice", "tools", "functions", "function_call", "modalities", "audio",
            "prediction", "reasoning_effort", "suffix", "spaces_between_special_tokens",
            "include_stop_str_in_output"}


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _sse_head(rid: str, obj: str, created: int, model: str) -> str:
    """The constant start of a stream's chunks, up to the choice's index: the common chunk
    (text only, not the last) is then this head plus a few formatted fields, the same bytes
    ``sse`` writes for it without building and encoding a dict per token."""
    return (f'data: {{"id":{_jstr(rid)},"object":"{obj}","created":{created},'
            f'"model":{_jstr(model)},"choices":[{{"index":')


def openai_error(e: ServingError) -> JSONResponse:
    return JSONResponse(e.openai_body(), status_code=e.status)


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ServingError(f"body: not valid JSON ({e})", 400, "body") from None


class OpenAIServer:
    def __init__(self, client: EngineClient, model_name: str):
        self.client, self.model_name = client, model_name

    def router(self) -> APIRouter:
        r = APIRouter()
        r.add_api_route("/v1/models", self.models, methods=["GET"])
        r.add_api_route("/v1/completions", self.completions, methods=["POST"])
        r.add_api_route("/v1/chat/completions", self.chat, methods=["POST"])
        return r

    async def models(self):
        info = self.client.info
        return {"object": "list", "data": [{
            "id": self.model_name, "object": "model", "created": int(time.time()),
            "owned_by": "irlm", "max_model_len": info.max_model_len}]}

    # ----- request parsing ------------------------------------------------------------------
    def _check_model(self, f: Fields) -> None:
        model = f.get("model")
        if model is not None and model != self.model_name:
            raise ServingError(f"model: {model!r} is not served here (this server serves "
                               f"{self.model_name!r})", 404, "model")

    def _params(self, f: Fields, max_tokens: int, logprobs: Optional[int]):
        n = f.int("n", 1, lo=1)
        best_of = f.int("best_of", n, lo=1)
        if best_of != n:
            raise bad_field("best_of", "must equal n (best_of sampling is not supported)")
        kw = dict(
            n=n, max_tokens=max_tokens, temperature=f.float("temperature", 1.0, lo=0, hi=2),
            top_p=f.float("top_p", 1.0), top_k=f.int("top_k", 0, lo=-1),
            min_p=f.float("min_p", 0.0), seed=f.int("seed", None),
            presence_penalty=f.float("presence_penalty", 0.0, lo=-2, hi=2),
            frequency_penalty=f.float("frequency_penalty", 0.0, lo=-2, hi=2),
            repetition_penalty=f.float("repetition_penalty", 1.0),
            min_tokens=f.int("min_tokens", 0, lo=0), ignore_eos=f.bool("ignore_eos"),
            stop=f.str_list("stop"), stop_token_ids=f.int_list("stop_token_ids"),
            skip_special_tokens=f.bool("skip_special_tokens", True), logprobs=logprobs)
        if kw["seed"] is not None and kw["seed"] < 0:
            kw["seed"] %= 2**63
        if kw["min_tokens"] > max_tokens:
            raise bad_field("min_tokens", f"must be <= max_tokens ({max_tokens})")
        vocab = self.client.info.vocab_size
        for i, t in enumerate(kw["stop_token_ids"]):
            if not 0 <= t < vocab:
                raise bad_field(f"stop_token_ids[{i}]", f"token id {t} is outside the "
                                                        f"vocabulary [0, {vocab})")
        return sampling_params(**kw)

    def _stream_options(self, f: Fields, stream: bool) -> bool:
        opts = f.get("stream_options")
        if opts is None:
            return False
        if not stream:
            raise bad_field("stream_options", "is only allowed with stream: true")
        return Fields(opts, "stream_options.").bool("include_usage")

    def _max_tokens(self, f: Fields, n_prompt: int, *keys: str) -> int:
        for key in keys:
            if f.has(key):
                return f.int(key, lo=1)
        # absent: as much as fits (OpenAI's chat behaviour; bounded by the model length)
        return max(1, self.client.info.max_model_len - n_prompt)

    # ----- /v1/completions ------------------------------------------------------------------
    async def completions(self, request: Request):
        try:
            f = Fields(await read_json(request))
            f.reject_unknown(_COMPLETION, _IGNORED)
            self._check_model(f)
            prompts = self._prompts(f)
            stream = f.bool("stream")
            usage_in_stream = self._stream_options(f, stream)
            lp = f.int("logprobs", None, lo=0, hi=20) if f.has("logprobs") else None
            echo = f.bool("echo")
            max_tokens = (f.int("max_tokens", lo=1) if f.has("max_tokens") else 16)
            params = self._params(f, max_tokens, lp)
            for prompt_ids in prompts:
                self.client.validate(prompt_ids, params)
            streams = []
            try:
                for p in prompts:
                    streams.append(self.client.submit(p, params))
            except ServingError:
                for s in streams:          # all or nothing
                    s.cancel()
                raise
        except ServingError as e:
            return openai_error(e)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        n = params.n
        if stream:
            return self._sse(request, streams, lambda gen: self._completion_chunks(
                gen, streams, rid, created, n, usage_in_stream, echo))
        try:
            results = await self._collect(request, streams)
        except ServingError as e:
            return openai_error(e)
        choices, completion_tokens = [], 0
        for i, (s, outs) in enumerate(zip(streams, results)):
            prefix = self.client.decode(s.prompt_ids) if echo else ""
            for out in outs:
                completion_tokens += len(out["token_ids"])
                choices.append({
                    "index": i * n + out["index"], "text": prefix + out["text"],
                    "logprobs": self._completion_logprobs(out, len(prefix))
                    if lp is not None else None,
                    "finish_reason": out["finish_reason"], "stop_reason": out["stop_reason"]})
        prompt_tokens = sum(len(s.prompt_ids) for s in streams)
        return {"id": rid, "object": "text_completion", "created": created,
                "model": self.model_name, "choices": choices,
                "usage": _usage(prompt_tokens, completion_tokens)}

    def _prompts(self, f: Fields) -> list[list[int]]:
        p = f.body.get("prompt")
        if p is None:
            raise bad_field("prompt", "is required")
        if isinstance(p, str):
            return [self.client.encode(p)]
        if isinstance(p, list) and p:
            if all(isinstance(x, str) for x in p):
                return [self.client.encode(x) for x in p]
            if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
                return [list(p)]
            if all(isinstance(x, list) and x and all(isinstance(t, int) for t in x)
                   for x in p):
                return [list(x) for x in p]
        raise bad_field("prompt", "must be a string, a list of strings, a list of token ids "
                                  "or a list of lists of token ids (non-empty)")

    def _completion_logprobs(self, out, offset0: int = 0) -> dict:
        tokens, offsets, pos = [], [], offset0
        for t in out["token_ids"]:
            s = self.client.decode([t], skip_special_tokens=False)
            tokens.append(s)
            offsets.append(pos)
            pos += len(s)
        tops = out["top_logprobs"] or [None] * len(tokens)
        return {"tokens": tokens, "token_logprobs": [_num(x) for x in out["logprobs"]],
                "top_logprobs": [
                    {self.client.decode([k], skip_special_tokens=False): _num(v)
                     for k, v in (top or {}).items()} for top in tops],
                "text_offset": offsets}

    async def _completion_chunks(self, gen, streams, rid, created, n, usage, echo):
        if echo:
            for i, s in enumerate(streams):
                for j in range(n):
                    yield sse({"id": rid, "object": "text_completion", "created": created,
                               "model": self.model_name, "choices": [{
                                   "index": i * n + j, "text": self.client.decode(s.prompt_ids),
                                   "logprobs": None, "finish_reason": None}]})
        completion_tokens = 0
        head = _sse_head(rid, "text_completion", created, self.model_name)
        async for i, c in gen:
            completion_tokens += len(c.token_ids)
            if c.finish_reason is None and c.top_logprobs is None:
                yield (f'{head}{i * n + c.index},"text":{_jstr(c.text)},"logprobs":null,'
                       f'"finish_reason":null}}]}}\n\n')
                continue
            choice = {"index": i * n + c.index, "text": c.text,
                      "logprobs": self._completion_logprobs(_as_out(c))
                      if c.top_logprobs is not None else None,
                      "finish_reason": c.finish_reason}
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            yield sse({"id": rid, "object": "text_completion", "created": created,
                       "model": self.model_name, "choices": [choice]})
        if usage:
            yield sse({"id": rid, "object": "text_completion", "created": created,
                       "model": self.model_name, "choices": [],
                       "usage": _usage(sum(len(s.prompt_ids) for s in streams),
                                       completion_tokens)})

    # ----- /v1/chat/completions -------------------------------------------------------------
    async def chat(self, request: Request):
        try:
            f = Fields(await read_json(request))
            f.reject_unknown(_CHAT, _IGNORED)
            self._check_model(f)
            rf = f.get("response_format")
            if rf is not None and (not isinstance(rf, dict) or rf.get("type") != "text"):
                raise bad_field("response_format", "only {\"type\": \"text\"} is supported")
            if f.body.get("tools"):
                raise bad_field("tools", "tool calling is not supported")
            prompt_ids = self._chat_prompt(f)
            stream = f.bool("stream")
            usage_in_stream = self._stream_options(f, stream)
            want_lp = f.bool("logprobs")
            top = f.int("top_logprobs", 0, lo=0, hi=20)
            if f.has("top_logprobs") and not want_lp:
                raise bad_field("top_logprobs", "needs logprobs: true")
            max_tokens = self._max_tokens(f, len(prompt_ids), "max_completion_tokens",
                                          "max_tokens")
            params = self._params(f, max_tokens, top if want_lp else None)
            field = ("max_completion_tokens" if f.has("max_completion_tokens")
                     else "max_tokens")
            streams = [self.client.submit(prompt_ids, params, prompt_field="messages",
                                          max_tokens_field=field)]
        except ServingError as e:
            return openai_error(e)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if stream:
            return self._sse(request, streams, lambda gen: self._chat_chunks(
                gen, streams[0], rid, created, usage_in_stream, want_lp, top))
        try:
            (outs,) = await self._collect(request, streams)
        except ServingError as e:
            return openai_error(e)
        choices = [{"index": o["index"],
                    "message": {"role": "assistant", "content": o["text"]},
                    "logprobs": {"content": self._chat_logprobs(o, top)} if want_lp else None,
                    "finish_reason": o["finish_reason"], "stop_reason": o["stop_reason"]}
                   for o in outs]
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": self.model_name, "choices": choices,
                "usage": _usage(len(prompt_ids), sum(len(o["token_ids"]) for o in outs))}

    def _chat_prompt(self, f: Fields) -> list[int]:
        from ..runtime.llm import _render_chat_template
        msgs = f.body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise bad_field("messages", "must be a non-empty list of {role, content} objects")
        conv = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict):
                raise bad_field(f"messages[{i}]", "must be a {role, content} object")
            mf = Fields(m, f"messages[{i}].")
            role = mf.str("role")
            if role not in CHAT_ROLES:
                raise bad_field(f"messages[{i}].role", f"{role!r} is not one of "
                                                       f"{', '.join(CHAT_ROLES)}")
            content = m.get("content")
            if content is None and role != "assistant":     # (an assistant turn of tool calls)
                raise bad_field(f"messages[{i}].content", f"is required for a {role} message")
            if isinstance(content, list):        # content parts: text only
                parts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or \
                            not isinstance(part.get("text"), str):
                        raise bad_field(f"messages[{i}].content[{j}]",
                                        "only text parts ({\"type\": \"text\", \"text\": ...}) "
                                        "are supported")
                    parts.append(part["text"])
                content = "".join(parts)
            elif content is None:
                content = ""
            elif not isinstance(content, str):
                raise bad_field(f"messages[{i}].content", "must be a string or a list of parts")
            conv.append({"role": role, "content": content})
        info = self.client.info
        template = f.get("chat_template") or info.chat_template
        add_gen = f.bool("add_generation_prompt", True)
        tok = info.tokenizer
        if tok is None:
            raise ServingError("this engine has no tokenizer: chat needs one", 400, "messages")
        try:
            if template is not None:
                text = _render_chat_template(template, conv, add_gen, tok)
            elif getattr(tok, "chat_template", None):
                text = tok.apply_chat_template(conv, tokenize=False,
                                               add_generation_prompt=add_gen)
            else:
                raise ServingError("this model has no chat template; use /v1/completions",
                                   400, "messages")
        except ServingError:
            raise
        except Exception as e:                    # a template's raise_exception, jinja errors
            raise bad_field("messages", f"the chat template failed: {e}") from None
        # The template writes the special tokens itself.
        return self.client.encode(text, add_special_tokens=False)

    def _chat_logprobs(self, out, top: int) -> list[dict]:
        content = []
        tops = out["top_logprobs"] or [None] * len(out["token_ids"])
        for t, lp, tp in zip(out["token_ids"], out["logprobs"], tops):
            s = self.client.decode([t], skip_special_tokens=False)
            entry = {"token": s, "logprob": _num(lp), "bytes": list(s.encode()),
                     "top_logprobs": []}
            for k, v in sorted((tp or {}).items(), key=lambda kv: -kv[1])[:top]:
                ks = self.client.decode([k], skip_special_tokens=False)
                entry["top_logprobs"].append({"token": ks, "logprob": _num(v),
                                              "bytes": list(ks.encode())})
            content.append(entry)
        return content

    async def _chat_chunks(self, gen, stream, rid, created, usage, want_lp, top):
        def chunk(choices, **extra):
            return sse({"id": rid, "object": "chat.completion.chunk", "created": created,
                        "model": self.model_name, "choices": choices, **extra})
        for j in range(stream.params.n):
            yield chunk([{"index": j, "delta": {"role": "assistant", "content": ""},
                          "logprobs": None, "finish_reason": None}])
        completion_tokens = 0
        head = _sse_head(rid, "chat.completion.chunk", created, self.model_name)
        async for _, c in gen:
            completion_tokens += len(c.token_ids)
            if not c.text and c.finish_reason is None and not want_lp:
                continue             # a token whose text is held back (half a character)
            if c.finish_reason is None and not want_lp:
                yield (f'{head}{c.index},"delta":{{"content":{_jstr(c.text)}}},'
                       f'"logprobs":null,"finish_reason":null}}]}}\n\n')
                continue
            choice = {"index": c.index, "delta": {"content": c.text} if c.text else {},
                      "logprobs": {"content": self._chat_logprobs(_as_out(c), top)}
                      if want_lp else None, "finish_reason": c.finish_reason}
            if c.finish_reason is not None:
                choice["stop_reason"] = c.stop_reason
            yield chunk([choice])
        if usage:
            yield chunk([], usage=_usage(len(stream.prompt_ids), completion_tokens))

    # ----- plumbing -------------------------------------------------------------------------
    async def _collect(self, request: Request, streams: list[RequestStream]):
        """Run every stream to its end; a client that goes away cancels them all."""
        async def one(s: RequestStream):
            outs = {}
            async for c in s:
                o = outs.setdefault(c.index, {"index": c.index, "text": "", "token_ids": [],
                                              "logprobs": [], "top_logprobs": None,
                                              "finish_reason": None, "stop_reason": None})
                o["text"] += c.text
                o["token_ids"] += c.token_ids
                o["logprobs"] += c.logprobs
                if c.top_logprobs is not None:
                    o["top_logprobs"] = (o["top_logprobs"] or []) + list(c.top_logprobs)
                if c.finish_reason is not None:
                    o["finish_reason"], o["stop_reason"] = c.finish_reason, c.stop_reason
            return [outs[k] for k in sorted(outs)]
        work = asyncio.ensure_future(asyncio.gather(*(one(s) for s in streams)))
        watch = asyncio.ensure_future(_wait_disconnect(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work in done:
                return work.result()
            raise ServingError("client disconnected", 499)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                # a cancelled gather ends with a CancelledError *set* on it: take it, or asyncio
                # logs "exception was never retrieved" for every client that went away
                work.add_done_callback(_retrieve)
            for s in streams:
                s.cancel()

    def _sse(self, request: Request, streams: list[RequestStream], body) -> StreamingResponse:
        async def merged() -> AsyncIterator[tuple[int, Chunk]]:
            if len(streams) == 1:
                async for c in streams[0]:
                    yield 0, c
                return
            q: asyncio.Queue = asyncio.Queue()

            async def pump(i, s):
                try:
                    async for c in s:
                        await q.put((i, c))
                except BaseException as e:
                    await q.put((i, e))
                finally:
                    await q.put((i, None))
            tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
            try:
                left = len(streams)
                while left:
                    i, c = await q.get()
                    if c is None:
                        left -= 1
                    elif isinstance(c, BaseException):
                        raise c
                    else:
                        yield i, c
            finally:
                for t in tasks:
                    t.cancel()

        async def events():
            try:
                async for ev in body(merged()):
                    yield ev
            except ServingError as e:
                yield sse(e.openai_body())
            finally:
                for s in streams:
                    s.cancel()
            yield "data: [DONE]\n\n"
        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def _retrieve(fut: asyncio.Future) -> None:
    if not fut.cancelled():
        fut.exception()


async def _wait_disconnect(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.05)


def _as_out(c: Chunk) -> dict:
    return {"token_ids": c.token_ids, "logprobs": c.logprobs, "top_logprobs": c.top_logprobs}


def _num(x):
    x = float(x)
    return x if x == x and abs(x) != float("inf") else -9999.0


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
