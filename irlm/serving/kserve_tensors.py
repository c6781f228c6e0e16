"""The TensorRT-LLM Triton models' tensor interface, shared by KServe v2 HTTP and gRPC.

Two models are served under the names clients of the TensorRT-LLM backend already use:

``ensemble`` (and the ``--served-model-name``): text in, text out; the fields of the
    TensorRT-LLM ensemble (``text_input``, ``max_tokens``, ``stop_words``, ``end_id``, ...).
``tensorrt_llm``: token ids in and out; the ``tensorrt_llm`` model's tensors (``input_ids``,
    ``input_lengths``, ``request_output_len``, ``runtime_top_k``, ... -> ``output_ids``,
    ``sequence_length``, ``cum_log_probs``, ``output_log_probs``).

Every input has a leading batch dimension; each batch row is one request.  Tensors arrive as
numpy arrays (decoded by the protocol module) and results leave as numpy arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import ServingError, bad_field
from .fields import sampling_params

TRTLLM_MODEL = "tensorrt_llm"
EXTENSIONS = ["classification", "model_configuration", "generate", "binary_tensor_data",
              "statistics"]
ENSEMBLE_MODEL = "ensemble"

# (name, datatype, dims without the batch dimension, optional)
COMMON_INPUTS = [
    ("end_id", "INT32", [1]), ("pad_id", "INT32", [1]), ("beam_width", "INT32", [1]),
    ("temperature", "FP32", [1]), ("length_penalty", "FP32", [1]),
    ("repetition_penalty", "FP32", [1]), ("min_length", "INT32", [1]),
    ("presence_penalty", "FP32", [1]), ("frequency_penalty", "FP32", [1]),
    ("random_seed", "UINT64", [1]), ("return_log_probs", "BOOL", [1]),
    ("exclude_input_in_output", "BOOL", [1]), ("min_p", "FP32", [1]),
    ("return_context_logits", "BOOL", [1]), ("return_generation_logits", "BOOL", [1]),
]
ENSEMBLE_INPUTS = [("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1]),
                   ("bad_words", "BYTES", [-1]), ("stop_words", "BYTES", [-1]),
                   ("top_k", "INT32", [1]), ("top_p", "FP32", [1]), ("stream", "BOOL", [1])
                   ] + COMMON_INPUTS
TRTLLM_INPUTS = [("input_ids", "INT32", [-1]), ("input_lengths", "INT32", [1]),
                 ("request_output_len", "INT32", [1]), ("runtime_top_k", "INT32", [1]),
                 ("runtime_top_p", "FP32", [1]), ("streaming", "BOOL", [1]),
                 ("stop_words_list", "INT32", [2, -1]), ("bad_words_list", "INT32", [2, -1])
                 ] + COMMON_INPUTS
ENSEMBLE_OUTPUTS = [("text_output", "BYTES", [-1]), ("cum_log_probs", "FP32", [-1]),
                    ("output_log_probs", "FP32", [-1, -1]),
                    ("sequence_length", "INT32", [-1])]
TRTLLM_OUTPUTS = [("output_ids", "INT32", [-1, -1]), ("sequence_length", "INT32", [-1]),
                  ("cum_log_probs", "FP32", [-1]), ("output_log_probs", "FP32", [-1, -1])]
REQUIRED = {ENSEMBLE_MODEL: ("text_input", "max_tokens"),
            TRTLLM_MODEL: ("input_ids", "request_output_len")}


def model_kind(name: str, served: str) -> str:
    """Which interface a model name speaks; 404 for a name not served."""
    if name == TRTLLM_MODEL:
        return TRTLLM_MODEL
    if name in (ENSEMBLE_MODEL, served, "tensorrt_llm_bls"):
        return ENSEMBLE_MODEL
    raise ServingError(f"model {name!r} is not served here (models: {served}, "
                       f"{ENSEMBLE_MODEL}, {TRTLLM_MODEL})", 404, "model_name")


def io_spec(kind: str):
    if kind == TRTLLM_MODEL:
        return TRTLLM_INPUTS, TRTLLM_OUTPUTS
    return ENSEMBLE_INPUTS, ENSEMBLE_OUTPUTS


def model_config(name: str, kind: str, max_batch_size: int, extra: dict) -> dict:
    """The model's configuration in Triton's JSON form (ModelConfig fields)."""
    inputs, outputs = io_spec(kind)
    return {
        "name": name, "platform": "", "backend": "tensorrtllm" if kind == TRTLLM_MODEL
        else "ensemble", "max_batch_size": max_batch_size,
        "input": [{"name": n, "data_type": "TYPE_" + ("STRING" if d == "BYTES" else d),
                   "dims": dims, "optional": n not in REQUIRED[kind]} for n, d, dims in inputs],
        "output": [{"name": n, "data_type": "TYPE_" + ("STRING" if d == "BYTES" else d),
                    "dims": dims} for n, d, dims in outputs],
        "model_transaction_policy": {"decoupled": True},
        "parameters": {k: {"string_value": str(v)} for k, v in extra.items()},
    }


@dataclass
class Job:
    """One batch row as an engine request."""
    prompt_ids: list[int]
    params: object
    kind: str
    stream: bool = False
    exclude_input: bool = True
    pad_id: int = 0
    return_log_probs: bool = False
    prompt_text: str = ""


def _row(tensors: dict, name: str, b: int):
    a = tensors.get(name)
    if a is None:
        return None
    if a.ndim == 0:
        return a.reshape(1)
    return a[b if a.shape[0] > 1 else 0].reshape(-1)


def _scalar(tensors, name, b, default, cast):
    v = _row(tensors, name, b)
    if v is None or v.size == 0:
        return default
    x = v[0]
    if isinstance(x, (bytes, np.bytes_)):
        raise bad_field(name, "must be a number, not bytes")
    try:
        return cast(x.item() if hasattr(x, "item") else x)
    except (TypeError, ValueError):
        raise bad_field(name, f"must be a number, got {x!r}") from None


def _text_list(tensors, name, b) -> list[str]:
    v = _row(tensors, name, b)
    if v is None:
        return []
    out = []
    for x in v.tolist():
        s = x.decode("utf-8", "strict") if isinstance(x, bytes) else str(x)
        out.extend(w for w in (s,) if w)
    return out


def parse_jobs(client, tensors: dict, kind: str, defaults: dict) -> list[Job]:
    """Every batch row of an inference request as a Job (errors name the tensor)."""
    known = [n for n, _, _ in io_spec(kind)[0]]
    unknown = [n for n in tensors if n not in known]
    if unknown:       # as Triton does: a misspelt input must not be dropped silently
        raise bad_field(unknown[0], f"is not an input of model {kind!r} (its inputs: "
                                    f"{', '.join(known)})")
    for name in REQUIRED[kind]:
        if name not in tensors:
            raise bad_field(name, "is required")
    main = tensors[REQUIRED[kind][0]]
    batch = main.shape[0] if main.ndim > 0 else 1
    info = client.info
    jobs = []
    for b in range(batch):
        sv = lambda n, d, c=int: _scalar(tensors, n, b, d, c)   # noqa: E731
        if kind == TRTLLM_MODEL:
            ids = _row(tensors, "input_ids", b)
            if ids.dtype.kind not in "iu":
                raise bad_field("input_ids", f"must hold integers, got {ids.dtype}")
            n = sv("input_lengths", ids.size)
            if not 0 < n <= ids.size:
                raise bad_field("input_lengths", f"{n} is not in [1, {ids.size}]")
            prompt_ids = [int(t) for t in ids[:n]]
            max_tokens = sv("request_output_len", None)
            top_k, top_p = sv("runtime_top_k", 0), sv("runtime_top_p", 1.0, float)
            stream = bool(sv("streaming", False, bool))
            stop_ids, stop_strs = _stop_words_list(client, _row(tensors, "stop_words_list", b))
            bad_words = _words_list(_row(tensors, "bad_words_list", b), "bad_words_list")
            text = ""
            mt_field = "request_output_len"
        else:
            texts = _text_list(tensors, "text_input", b)
            if len(texts) != 1:
                raise bad_field("text_input", "must hold one non-empty string per batch row")
            text = texts[0]
            prompt_ids = client.encode(text)
            max_tokens = sv("max_tokens", None)
            top_k, top_p = sv("top_k", 0), sv("top_p", 1.0, float)
            stream = bool(sv("stream", False, bool))
            stop_ids, stop_strs = [], _text_list(tensors, "stop_words", b)
            # TensorRT-LLM's preprocessing model: each word tokenized on its own, without
            # special tokens (so " word" and "word" are different words)
            bad_words = [client.encode(w, add_special_tokens=False)
                         for w in _text_list(tensors, "bad_words", b)]
            if any(not w for w in bad_words):
                raise bad_field("bad_words", "a word encodes to no tokens")
            mt_field = "max_tokens"
        if max_tokens is None or max_tokens < 1:
            raise bad_field(mt_field, f"must be an integer >= 1, got {max_tokens}")
        for flag in ("return_context_logits", "return_generation_logits"):
            if sv(flag, False, bool):
                raise bad_field(flag, "logits outputs are not supported by irlm")
        end_id = sv("end_id", None)
        beam = sv("beam_width", 1)
        max_beam = int(defaults.get("max_beam_width", 8))
        if not 1 <= beam <= max_beam:
            raise bad_field("beam_width", f"must be in [1, {max_beam}], got {beam}")
        temperature = sv("temperature", 1.0, float)
        seed = sv("random_seed", None)
        kw = dict(max_tokens=max_tokens, top_k=top_k if top_k > 0 else 0, top_p=top_p,
                  temperature=temperature if beam == 1 else 0.0,
                  repetition_penalty=sv("repetition_penalty", 1.0, float),
                  presence_penalty=sv("presence_penalty", 0.0, float),
                  frequency_penalty=sv("frequency_penalty", 0.0, float),
                  min_tokens=min(sv("min_length", 0), max_tokens),
                  min_p=sv("min_p", 0.0, float),
                  stop=stop_strs, stop_token_ids=stop_ids, bad_words_ids=bad_words,
                  seed=None if seed is None or beam > 1 else seed % 2**63,
                  logprobs=0 if sv("return_log_probs", False, bool) and beam == 1 else None)
        if top_k == 1:                   # TensorRT-LLM: top_k 1 is greedy
            kw["temperature"] = 0.0
        if end_id is not None:           # TensorRT-LLM: end_id replaces the model's EOS
            kw["stop_token_ids"] = kw["stop_token_ids"] + [int(end_id)]
            kw["ignore_eos"] = True
        if beam > 1:
            kw.update(use_beam_search=True, beam_width=beam, n=beam,
                      length_penalty=sv("length_penalty", 1.0, float), top_k=0, top_p=1.0)
        bad_name = "bad_words_list" if kind == TRTLLM_MODEL else "bad_words"
        for w in bad_words:
            if any(not 0 <= t < info.vocab_size for t in w):
                raise bad_field(bad_name, f"token id outside the vocabulary [0, "
                                          f"{info.vocab_size}) in {w}")
        if beam > 1 and bad_words:
            raise bad_field(bad_name, "bad words are not supported with beam_width > 1")
        names = {"top_k": "runtime_top_k" if kind == TRTLLM_MODEL else "top_k",
                 "top_p": "runtime_top_p" if kind == TRTLLM_MODEL else "top_p",
                 "min_tokens": "min_length", "seed": "random_seed", "max_tokens": mt_field,
                 "bad_words_ids": bad_name}
        params = sampling_params(names, **kw)
        pad = sv("pad_id", end_id if end_id is not None else
                 (info.eos_token_ids[0] if info.eos_token_ids else 0))
        exclude = bool(sv("exclude_input_in_output",
                          defaults.get("exclude_input_in_output", True), bool))
        jobs.append(Job(prompt_ids, params, kind, stream, exclude, int(pad),
                        bool(sv("return_log_probs", False, bool)), text))
    return jobs


def _words_list(arr, name: str) -> list[list[int]]:
    """TensorRT-LLM's ``[2, N]`` word list (stop or bad words): the words' token ids
    concatenated, then each word's end offset, -1 padded."""
    if arr is None or arr.size == 0:
        return []
    if arr.size % 2:
        raise bad_field(name, "must have shape [batch, 2, N]")
    if arr.dtype.kind not in "iu":
        raise bad_field(name, f"must hold integers, got {arr.dtype}")
    ids, offsets = arr.reshape(2, -1)
    ids, offsets = ids.tolist(), [int(o) for o in offsets.tolist() if o >= 0]
    words, start = [], 0
    for end in offsets:
        if not start < end <= len(ids):
            raise bad_field(name, f"offset {end} is out of range")
        words.append(ids[start:end])
        start = end
    return words


def _stop_words_list(client, arr) -> tuple[list[int], list[str]]:
    """TensorRT-LLM's ``[2, N]`` stop words: one-token words become stop token ids, longer
    ones stop strings."""
    words = _words_list(arr, "stop_words_list")
    one = [w[0] for w in words if len(w) == 1]
    more = [client.decode(w, skip_special_tokens=False) for w in words if len(w) > 1]
    if more and client.info.tokenizer is None:
        raise bad_field("stop_words_list", "multi-token stop words need a tokenizer")
    return one, [s for s in more if s]


# ----- wire encoding (KServe's datatypes; BYTES elements are 4-byte-length prefixed) -----------
NP_DTYPES = {"BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32,
       "INT64": np.int64, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32,
       "UINT64": np.uint64, "FP16": np.float16, "FP32": np.float32, "FP64": np.float64,
       "BYTES": np.object_}


def np_datatype(a: np.ndarray) -> str:
    if a.dtype == np.object_:
        return "BYTES"
    for k, v in NP_DTYPES.items():
        if a.dtype == v:
            return k
    raise ServingError(f"cannot send a {a.dtype} tensor", 500)


def serialize_bytes(a: np.ndarray) -> bytes:
    out = bytearray()
    for x in a.reshape(-1):
        b = x if isinstance(x, bytes) else str(x).encode()
        out += len(b).to_bytes(4, "little") + b
    return bytes(out)


def deserialize_bytes(raw: bytes, name: str) -> list[bytes]:
    out, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise bad_field(name, "truncated BYTES element")
        n = int.from_bytes(raw[i:i + 4], "little")
        if i + 4 + n > len(raw):
            raise bad_field(name, "truncated BYTES element")
        out.append(raw[i + 4:i + 4 + n])
        i += 4 + n
    return out



# ----- results ---------------------------------------------------------------------------------
@dataclass
class Beam:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    cum: float = 0.0
    finish_reason: Optional[str] = None


def result_tensors(job: Job, beams: list[Beam], client, partial: bool = False) -> dict:
    """Output tensors (batch dimension 1) for one Job's beams: final, or a stream increment
    (``partial``: only the new tokens / text)."""
    if job.kind == TRTLLM_MODEL:
        prefix = [] if job.exclude_input or partial else job.prompt_ids
        seqs = [prefix + b.token_ids for b in beams]
        width = max((len(s) for s in seqs), default=0)
        out = np.full((1, len(seqs), width), job.pad_id, dtype=np.int32)
        for i, s in enumerate(seqs):
            out[0, i, :len(s)] = s
        res = {"output_ids": out,
               "sequence_length": np.array([[len(s) for s in seqs]], dtype=np.int32)}
    else:
        prefix = "" if job.exclude_input or partial else job.prompt_text
        res = {"text_output": np.array([[(prefix + b.text).encode("utf-8") for b in beams]],
                                       dtype=np.object_),
               "sequence_length": np.array([[len(b.token_ids) for b in beams]],
                                           dtype=np.int32)}
    if job.return_log_probs:
        width = max((len(b.logprobs) for b in beams), default=0)
        lp = np.zeros((1, len(beams), width), dtype=np.float32)
        for i, b in enumerate(beams):
            lp[0, i, :len(b.logprobs)] = b.logprobs
        res["output_log_probs"] = lp
        res["cum_log_probs"] = np.array([[b.cum for b in beams]], dtype=np.float32)
    return res


def concat_batch(results: list[dict]) -> dict:
    """Stack per-row results along the batch dimension (padding ragged dimensions)."""
    if len(results) == 1:
        return results[0]
    out = {}
    for name in results[0]:
        arrs = [r[name] for r in results]
        shape = [max(a.shape[d] for a in arrs) for d in range(arrs[0].ndim)]
        padded = []
        for a in arrs:
            fill = b"" if a.dtype == np.object_ else 0
            p = np.full([a.shape[0]] + shape[1:], fill, dtype=a.dtype)
            p[tuple(slice(0, s) for s in a.shape)] = a
            padded.append(p)
        out[name] = np.concatenate(padded, axis=0)
    return out


async def run_job(client, job: Job, on_chunk=None) -> list[Beam]:
    """Run one Job to its end; ``on_chunk(result_tensors)`` gets each stream increment."""
    stream = client.submit(job.prompt_ids, job.params,
                           prompt_field="input_ids" if job.kind == TRTLLM_MODEL
                           else "text_input",
                           max_tokens_field="request_output_len" if job.kind == TRTLLM_MODEL
                           else "max_tokens")
    beams = [Beam() for _ in range(job.params.n)]
    try:
        async for c in stream:
            b = beams[c.index]
            b.token_ids += c.token_ids
            b.text += c.text
            b.logprobs += c.logprobs
            b.cum += sum(c.logprobs)
            if c.finish_reason is not None:
                b.finish_reason = c.finish_reason
            if on_chunk is not None and (c.token_ids or c.text or c.finish_reason):
                inc = Beam(c.token_ids, c.text, c.logprobs, b.cum, c.finish_reason)
                await on_chunk(job, c.index, inc, stream.finished)
    finally:
        stream.cancel()
    return beams
