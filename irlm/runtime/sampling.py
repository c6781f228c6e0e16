"""Sampling: the parameters of a request, and turning a batch of logits into next tokens.

Semantics follow Hugging Face's logits processors (and vLLM where HF has none):

* ``repetition_penalty`` (HF ``RepetitionPenaltyLogitsProcessor``): for every token id seen in
  the prompt or the output so far, a positive logit is divided by the penalty and a negative
  one multiplied by it;
* ``presence_penalty`` / ``frequency_penalty`` (OpenAI / vLLM): subtract ``presence`` once and
  ``frequency`` per occurrence for every token id in the *output* so far;
* ``min_tokens`` (HF ``MinNewTokensLengthLogitsProcessor``, vLLM ``min_tokens``): until that
  many tokens are generated, the stop token ids (EOS unless ``ignore_eos``, plus
  ``stop_token_ids``) get logit -inf, and stop strings are not checked;
* then ``temperature``, ``top_k``, ``top_p``, ``min_p``, in HF's order and with HF's tie and
  boundary rules (``TopKLogitsWarper`` keeps ties with the k-th, ``TopPLogitsWarper`` keeps the
  smallest set whose mass exceeds ``top_p``, ``MinPLogitsWarper`` scales by the top prob).

Every stage works on the ``[rows, vocab]`` logits of the whole batch at once with per-row
parameters, on whatever device the logits live.  A row draws its randomness from its own
``torch.Generator`` when the request has a seed, so its tokens do not depend on what else is
in the batch.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import SamplingParamsError

# Below this a temperature is treated as 0 (greedy): dividing by it would overflow.
_MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """How to generate for one request (defaults: one sample, temperature 1, 16 tokens).

    Immutable once validated (``stop`` and ``stop_token_ids`` become tuples): a request's
    parameters cannot change after it was checked.  Derive a variant with
    ``dataclasses.replace(params, temperature=0.7)``, which validates again."""
    n: int = 1                          # independent samples of the prompt (beams: returned)
    max_tokens: int = 16
    min_tokens: int = 0                 # no stop token / stop string before this many
    temperature: float = 1.0            # 0: greedy
    top_k: int = 0                      # 0 (or -1): off
    top_p: float = 1.0                  # 1: off
    min_p: float = 0.0                  # 0: off
    repetition_penalty: float = 1.0     # 1: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None             # per-request generator: reproducible, batch-independent
    stop: tuple[str, ...] | list[str] | str | None = None  # stop strings, on the detokenized text
    stop_token_ids: tuple[int, ...] | list[int] = ()
    ignore_eos: bool = False            # do not stop at EOS (it may still be generated)
    logprobs: int | None = None         # return the top-k logprobs at each sampled token
    use_beam_search: bool = False
    beam_width: int = 4
    length_penalty: float = 1.0         # beams: score = sum logprob / generated_len ** this
    early_stopping: bool | str = False  # beams: True, False (heuristic) or "never"
    skip_special_tokens: bool = True    # when detokenizing
    # token sequences never to generate (HF's bad_words_ids, TensorRT-LLM's bad words): a
    # word's last token is banned wherever the tokens before it end the sequence so far
    bad_words_ids: tuple[tuple[int, ...], ...] | list[list[int]] = ()

    def __post_init__(self):
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        for name, value, what in (("stop", stop, "a string or a list of strings"),
                                  ("stop_token_ids", self.stop_token_ids,
                                   "a list of token ids (ints >= 0)")):
            if value is not None and (isinstance(value, (str, bytes, dict))
                                      or not isinstance(value, (list, tuple, set, frozenset))):
                raise SamplingParamsError(f"SamplingParams.{name} must be {what}, got {value!r:.60}")
        object.__setattr__(self, "stop", tuple(stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        try:
            object.__setattr__(self, "bad_words_ids",
                               tuple(tuple(w) for w in self.bad_words_ids or ()))
        except TypeError:
            raise SamplingParamsError(f"SamplingParams.bad_words_ids must be a list of lists of "
                                      f"token ids, got {self.bad_words_ids!r:.60}") from None
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        self._validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < _MIN_TEMPERATURE

    @property
    def uses_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def num_sequences(self) -> int:
        """Sequences the request runs at once: its beams, or its n samples."""
        return self.beam_width if self.use_beam_search else self.n

    def _validate(self) -> None:
        def bad(name, valid):
            raise SamplingParamsError(
                f"SamplingParams.{name} must be {valid}, got {getattr(self, name)!r}")

        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_real(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        if not is_int(self.n) or self.n < 1:
            bad("n", "an int >= 1")
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            bad("max_tokens", "an int >= 1")
        if not is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            bad("min_tokens", f"an int in [0, max_tokens={self.max_tokens}]")
        if not is_real(self.temperature) or self.temperature < 0:
            bad("temperature", "a finite number >= 0 (0 = greedy)")
        if not is_int(self.top_k) or self.top_k < 0:
            bad("top_k", "an int >= 1, or 0 / -1 to disable")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            bad("top_p", "in (0, 1]")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            bad("min_p", "in [0, 1]")
        if not is_real(self.repetition_penalty) or self.repetition_penalty <= 0:
            bad("repetition_penalty", "a finite number > 0 (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not is_real(getattr(self, name)) or not -2 <= getattr(self, name) <= 2:
                bad(name, "in [-2, 2]")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**63):
            bad("seed", "None or an int in [0, 2**63)")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "a non-empty string or a list of them")
        if any(not is_int(t) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "a list of token ids (ints >= 0)")
        if self.logprobs is not None and (not is_int(self.logprobs) or self.logprobs < 0):
            bad("logprobs", "None or an int >= 0")
        if any(not w or any(not is_int(t) or t < 0 for t in w) for w in self.bad_words_ids):
            bad("bad_words_ids", "a list of non-empty lists of token ids (ints >= 0)")
        if not self.use_beam_search:
            return
        if not is_int(self.beam_width) or self.beam_width < 2:
            bad("beam_width", "an int >= 2 with use_beam_search")
        if self.n > self.beam_width:
            bad("n", f"<= beam_width ({self.beam_width}) with use_beam_search")
        if not is_real(self.length_penalty):
            bad("length_penalty", "a finite number")
        if self.early_stopping not in (True, False, "never"):
            bad("early_stopping", "True, False or 'never'")
        # Beam search is deterministic: it ranks by log-probabilities, it does not sample.
        for name, off in (("temperature", (0.0, 1.0)), ("top_k", (0,)), ("top_p", (1.0,)),
                          ("min_p", (0.0,)), ("seed", (None,)), ("stop", ((),)),
                          ("logprobs", (None,)), ("presence_penalty", (0.0,)),
                          ("bad_words_ids", ((),)),
                          ("frequency_penalty", (0.0,))):
            if getattr(self, name) not in off:
                bad(name, f"{' or '.join(map(repr, off))} with use_beam_search "
                          f"(beam search ranks by log-probabilities; it does not sample)")


# ----- logits processing, vectorized over rows ---------------------------------------------
def token_counts(token_lists: Sequence[Sequence[int]], vocab_size: int,
                 device: torch.device) -> torch.Tensor:
    """[rows, vocab] how often each token id occurs in each row's list."""
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.int64)
    for i, t in enumerate(token_lists):
        padded[i, :len(t)] = torch.as_tensor(list(t), dtype=torch.int64)
    padded = padded.to(device)
    counts = torch.zeros(len(token_lists), vocab_size + 1, dtype=torch.float32, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=torch.float32))
    return counts[:, :vocab_size]          # the last column counted the padding


def apply_penalties(logits: torch.Tensor, prompt_ids: Sequence[Sequence[int]],
                    output_ids: Sequence[Sequence[int]], repetition: torch.Tensor,
                    presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """Repetition penalty over prompt + output tokens; presence/frequency over output tokens.
    ``repetition`` / ``presence`` / ``frequency`` are per-row [rows] tensors."""
    vocab = logits.shape[-1]
    out_counts = token_counts(output_ids, vocab, logits.device)
    seen = (token_counts(prompt_ids, vocab, logits.device) + out_counts) > 0
    rep = repetition.to(logits)[:, None]
    penalized = torch.where(logits < 0, logits * rep, logits / rep)
    logits = torch.where(seen, penalized, logits)
    return (logits - frequency.to(logits)[:, None] * out_counts
            - presence.to(logits)[:, None] * (out_counts > 0).to(logits))


def suppress(logits: torch.Tensor, token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Set each row's listed token ids to -inf."""
    rows = [r for r, ids in enumerate(token_ids) for _ in ids]
    cols = [t for ids in token_ids for t in ids]
    logits = logits.clone()
    logits[torch.tensor(rows, device=logits.device), torch.tensor(cols, device=logits.device)] \
        = float("-inf")
    return logits


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; rows at 0 (greedy) are left alone."""
    t = temperature.to(logits)
    return logits / torch.where(t < _MIN_TEMPERATURE, torch.ones_like(t), t)[:, None]


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (and ties with the k-th); k = 0 keeps all."""
    vocab = logits.shape[-1]
    k = torch.where(top_k <= 0, torch.full_like(top_k, vocab), top_k.clamp(max=vocab))
    kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the most likely tokens whose cumulative probability exceeds top_p (at least one)."""
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p.to(logits))[:, None]
    remove[:, -1] = False
    return logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.to(logits)[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


# ----- row reductions over the vocabulary, fast on a CPU -------------------------------------

@functools.lru_cache(maxsize=None)
def _vocab_chunk(vocab: int) -> int:
    """The largest divisor of ``vocab`` in [64, 2048] (0: none)."""
    return next((c for c in range(min(vocab, 2048), 63, -1) if vocab % c == 0), 0)


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(dim=-1)`` of a [rows, vocab] matrix, the same indices (the first maximum;
    NaN counts as the maximum).  On a CPU torch's argmax is a scalar loop, ~20x slower than
    the vectorized ``amax`` (0.5 ms against 0.03 ms for 8 x 49152 here), a visible part of a
    small model's decode step; so the chunk holding the first maximum is found with ``amax``
    and only that chunk is searched with ``argmax``."""
    rows, vocab = x.shape
    c = _vocab_chunk(vocab) if x.device.type == "cpu" and x.is_contiguous() else 0
    if not c or vocab < 4 * c:
        return x.argmax(dim=-1)
    blocks = x.view(rows, vocab // c, c)
    best = blocks.amax(dim=-1).argmax(dim=-1)                         # [rows]
    return best * c + blocks[torch.arange(rows), best].argmax(dim=-1)


_LOG2E = 1.4426950408889634


def logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """``x.logsumexp(dim=-1)`` of a [rows, vocab] matrix.  On a CPU torch's ``logsumexp``
    takes ~3x as long as ``max + log(sum(exp2((x - max) * log2 e)))`` (exp2 is the cheaper
    vectorized kernel), which agrees with it to float32 rounding; rows whose maximum is not
    finite (all -inf, NaN, +inf) keep torch's own rules."""
    if x.device.type != "cpu":
        return x.logsumexp(dim=-1)
    m = x.amax(dim=-1, keepdim=True)
    if not bool(torch.isfinite(m).all()):
        return x.logsumexp(dim=-1)
    return torch.sub(x, m).mul_(_LOG2E).exp2_().sum(dim=-1).log_().add_(m[:, 0])


def draw(logits: torch.Tensor, greedy: Sequence[bool],
         generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """[rows] next tokens: argmax for greedy rows, a sample from softmax(logits) otherwise.

    Sampling is the exponential race ``argmax(p / q), q ~ Exp(1)``, which equals drawing from
    ``p`` and needs no per-row multinomial call; each seeded row draws its ``q`` from its own
    generator.  ``greedy`` is a host-side list, so an all-greedy batch never syncs."""
    tokens = argmax_rows(logits)
    if all(greedy):
        return tokens
    probs = logits.softmax(dim=-1)
    q = torch.empty_like(probs)
    unseeded = [i for i, g in enumerate(generators) if g is None]
    if unseeded:
        q[unseeded] = torch.empty(len(unseeded), probs.shape[1], dtype=probs.dtype,
                                  device=probs.device).exponential_()
    for i, g in enumerate(generators):
        if g is not None:
            q[i] = torch.empty(probs.shape[1], dtype=probs.dtype,
                               device=probs.device).exponential_(generator=g)
    # q can be exactly 0 (u = 0 in the inverse CDF); 0/0 would be NaN, which argmax prefers.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    sampled = argmax_rows(probs / q)
    return torch.where(torch.tensor(list(greedy), device=tokens.device), tokens, sampled)


def bad_word_bans(token_ids: Sequence[int], words: Sequence[Sequence[int]]) -> list[int]:
    """The tokens ``bad_words_ids`` forbid next after ``token_ids`` (prompt and output): each
    one-token word, and the last token of each longer word whose other tokens end
    ``token_ids``."""
    out = []
    n = len(token_ids)
    for w in words:
        k = len(w) - 1
        if k == 0 or (k <= n and tuple(token_ids[n - k:]) == tuple(w[:k])):
            out.append(w[k])
    return out


# ----- the sampler -------------------------------------------------------------------------
@dataclass
class SampleRow:
    """What sampling one row needs besides its logits."""
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    generator: torch.Generator | None = None
    suppress_ids: Sequence[int] = ()      # token ids that must not be drawn (min_tokens,
                                          # bad words)


@dataclass
class SampleResult:
    token_ids: list[int]
    token_logprobs: list[float]                # raw-model logprob of each sampled token
    top_logprobs: list[dict[int, float] | None]  # when the row asked for logprobs


def process_logits(logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
    """Penalties, temperature, top-k, top-p, min-p: the stages some row needs, batched."""
    def column(values, dtype=torch.float32):
        return torch.tensor(values, dtype=dtype, device=logits.device)

    params = [r.params for r in rows]
    if any(r.suppress_ids for r in rows):
        logits = suppress(logits, [r.suppress_ids for r in rows])
    if any(p.uses_penalties for p in params):
        logits = apply_penalties(logits, [r.prompt_ids for r in rows],
                                 [r.output_ids for r in rows],
                                 column([p.repetition_penalty for p in params]),
                                 column([p.presence_penalty for p in params]),
                                 column([p.frequency_penalty for p in params]))
    if any(not p.greedy and p.temperature != 1.0 for p in params):
        logits = apply_temperature(logits, column([p.temperature for p in params]))
    if any(p.top_k > 0 for p in params):
        logits = apply_top_k(logits, column([p.top_k for p in params], torch.int64))
    if any(p.top_p < 1.0 for p in params):
        logits = apply_top_p(logits, column([p.top_p for p in params]))
    if any(p.min_p > 0.0 for p in params):
        logits = apply_min_p(logits, column([p.min_p for p in params]))
    return logits


@dataclass
class DrawnTokens:
    """Tokens drawn on the logits' device, not yet read by the host.

    :meth:`start_copy` queues their copy to (pinned) host memory behind the kernels that
    computed them and records an event; :meth:`result` waits for that event only.  So the
    host can queue the next step's work first and read these tokens while it runs, instead
    of stalling the device at every step (LLMEngine's ``async_decode``)."""
    tokens: torch.Tensor                      # [rows] int64
    token_lp: torch.Tensor                    # [rows] float32: raw-model logprob of each
    rows: Sequence[SampleRow]
    top: Optional[tuple] = None               # (values, ids, rows wanting logprobs)
    _host: Optional[tuple] = None
    _event: Optional[object] = None

    def start_copy(self, staging: Optional["PinnedStaging"] = None) -> "DrawnTokens":
        if self._host is not None:
            return self
        parts = [self.tokens, self.token_lp] + ([self.top[0], self.top[1]] if self.top else [])
        if self.tokens.device.type == "cuda":
            slot = staging.take() if staging is not None else {}
            host = []
            for j, t in enumerate(parts):
                buf = slot.get(j)
                if buf is None or buf.numel() < t.numel() or buf.dtype != t.dtype:
                    buf = torch.empty(max(t.numel(), 1024), dtype=t.dtype, pin_memory=True)
                    slot[j] = buf
                view = buf[:t.numel()].view(t.shape)
                view.copy_(t, non_blocking=True)
                host.append(view)
            self._event = torch.cuda.Event()
            self._event.record()
            self._host = tuple(host)
        else:
            self._host = tuple(parts)
        return self

    def result(self) -> SampleResult:
        if self._host is None:      # not staged: read the device tensors now (synchronous)
            host = (self.tokens, self.token_lp) + ((self.top[0], self.top[1]) if self.top
                                                   else ())
        else:
            if self._event is not None:
                self._event.synchronize()
            host = self._host
        tokens, token_lp = host[0].tolist(), host[1].tolist()
        top: list[dict[int, float] | None] = [None] * len(self.rows)
        if self.top is not None:
            values, ids = host[2].tolist(), host[3].tolist()
            for j, i in enumerate(self.top[2]):
                kk = self.rows[i].params.logprobs
                entry = dict(zip(ids[j][:kk], values[j][:kk]))
                entry[tokens[i]] = token_lp[i]
                top[i] = entry
        return SampleResult(tokens, token_lp, top)


class PinnedStaging:
    """Pinned host buffers reused across steps for :meth:`DrawnTokens.start_copy`.

    Allocating pinned memory (cudaHostAlloc) synchronizes the whole device, which would undo
    the overlap; two slots alternate, since a step's tokens are read before the step after
    next copies its own."""

    def __init__(self, slots: int = 2):
        self._slots: list[dict] = [{} for _ in range(slots)]
        self._next = 0

    def take(self) -> dict:
        slot = self._slots[self._next]
        self._next = (self._next + 1) % len(self._slots)
        return slot


def draw_tokens(logits: torch.Tensor, rows: Sequence[SampleRow]) -> DrawnTokens:
    """The device half of :func:`sample`: every row's next token, its log-probability and
    the requested top log-probabilities, as device tensors (no host synchronization)."""
    logits = logits.float()
    processed = process_logits(logits, rows)
    tokens = draw(processed, [r.params.greedy for r in rows], [r.generator for r in rows])
    # log p(token) = logit - logsumexp(logits): one read of the [rows, vocab] logits, where a
    # full log_softmax would also write a matrix of that size (263 MB at 512 x 128k, f32)
    token_lp = logits.gather(1, tokens[:, None])[:, 0] - logsumexp_rows(logits)
    wants = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    top = None
    if wants:
        k = max(r.params.logprobs or 0 for r in rows)
        raw_logprobs = logits[wants].log_softmax(dim=-1)
        values, ids = raw_logprobs.topk(min(max(k, 1), logits.shape[1]), dim=-1)
        top = (values, ids, wants)
    return DrawnTokens(tokens, token_lp, rows, top)


def sample(logits: torch.Tensor, rows: Sequence[SampleRow]) -> SampleResult:
    """Next token of every row of ``logits`` [rows, vocab] (float32, any device)."""
    return draw_tokens(logits, rows).result()


def as_sampling_params(params, where: str = "generate") -> "SamplingParams":
    """``params`` as a :class:`SamplingParams`: None → the defaults, a dict → its fields
    (``{"max_tokens": 4}``, what an OpenAI-style caller has at hand).  Anything else, or a
    dict key that is not a field, is one :class:`SamplingParamsError` naming it."""
    if params is None:
        return SamplingParams()
    if isinstance(params, SamplingParams):
        return params
    if isinstance(params, dict):
        fields = SamplingParams.__dataclass_fields__
        unknown = [k for k in params if k not in fields]
        if unknown:
            raise SamplingParamsError(
                f"{where}: {unknown[0]!r:.40} is not a SamplingParams field (valid: "
                f"{', '.join(fields)})")
        return SamplingParams(**params)
    raise SamplingParamsError(f"{where}: sampling parameters must be a SamplingParams or a dict "
                              f"of its fields, got {type(params).__name__}")
