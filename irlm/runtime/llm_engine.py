"""The engine loop: schedule a step, run it, turn its logits into tokens, retire what ended.

One :meth:`LLMEngine.step` is one forward pass of the in-flight batch.  After the runner
returns, every scheduled sequence has ``num_computed`` advanced and its newly full blocks
published for prefix reuse; a sequence whose tokens are now all computed has next-token
logits.  Ordinary sequences are sampled together (one vectorized call for the whole batch);
beams wait until all beams of their request have logits, then take one beam-search step.
"""
from __future__ import annotations

import torch

from ..errors import IRLMError
from .beam_search import BeamSearch
from .detokenizer import IncrementalDetokenizer, Tokenizer
from .kv_cache import BlockManager
from .model_runner import ModelRunner, StepBatch, device_index, fill_device_inputs
from .outputs import CompletionOutput, RequestOutput, StreamOutput
from .sampling import (DrawnTokens, PinnedStaging, SampleRow, SamplingParams, apply_penalties,
                       bad_word_bans, draw_tokens, sample)
from .scheduler import Scheduler, SchedulerConfig
from .sequence import PLACEHOLDER, Request, Sequence


class _InFlight:
    """A step whose sampled tokens are still on the device: (sequence, index of its
    placeholder in token_ids, or -1 when the sequence ended meanwhile) per drawn row."""

    def __init__(self, jobs: list[tuple[Sequence, int]], drawn: DrawnTokens):
        self.jobs, self.drawn = jobs, drawn


class LLMEngine:
    def __init__(self, runner: ModelRunner, tokenizer: Tokenizer | None = None, *,
                 max_num_tokens: int = 512, max_batch_size: int = 64,
                 policy: str = "guaranteed-no-evict", max_waiting: int = 1024,
                 enable_prefix_caching: bool = True,
                 eos_token_id: int | list[int] | None = None,
                 async_decode: bool | None = None):
        """``async_decode``: while the device runs step N, schedule and launch step N+1
        before reading step N's tokens (see :meth:`_step_overlapped`); used while every
        request is plain sampling (no beams, n = 1, no penalties) under the no-evict
        policy, otherwise steps run one at a time.  The outputs are the same either way.
        ``None`` (the default): on for a runner on a GPU, where it was faster in every
        section of benchmarks/gpu_decode.py (docs/performance.md); off on a CPU, where the
        runner computes on the host and there is nothing to overlap."""
        if not isinstance(runner, ModelRunner):
            missing = [a for a in ("vocab_size", "block_size", "num_blocks", "max_model_len",
                                   "step") if not hasattr(runner, a)]
            raise IRLMError(f"{type(runner).__name__} is not a ModelRunner: it lacks "
                            f"{', '.join(missing)}")
        self.runner, self.tokenizer = runner, tokenizer
        self.block_manager = BlockManager(runner.num_blocks, runner.block_size,
                                          enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_tokens=max_num_tokens, max_batch_size=max_batch_size,
                            policy=policy, max_waiting=max_waiting,
                            max_model_len=runner.max_model_len), self.block_manager)
        if eos_token_id is None:
            eos_token_id = []
        self.eos_token_ids = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        self.requests: dict[int, Request] = {}
        self._inflight: _InFlight | None = None
        self._staging = PinnedStaging()
        # host inputs of a GPU runner go through pinned memory (see StepBatch.pack)
        self._pin = getattr(getattr(runner, "device", None), "type", "cpu") == "cuda"
        self.async_decode = self._pin if async_decode is None else bool(async_decode)
        self.num_steps = 0
        self._next_request_id = 0
        self._next_seq_id = 0

    # ----- requests ------------------------------------------------------------------------
    def add_request(self, prompt_ids: list[int], params: SamplingParams | None = None, *,
                    prompt: str | None = None, stream: bool = False) -> int:
        """Queue a request; returns its id.  Raises QueueFullError / RequestRejectedError."""
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise IRLMError(f"add_request: params must be a SamplingParams, got "
                            f"{type(params).__name__}")
        if params.stop and self.tokenizer is None:
            raise IRLMError("stop strings need a tokenizer to detokenize the output")
        if params.logprobs is not None and params.logprobs > self.runner.vocab_size:
            raise IRLMError(f"SamplingParams.logprobs must be <= the vocabulary size "
                            f"({self.runner.vocab_size}), got {params.logprobs}")
        prompt_ids = [int(t) for t in prompt_ids]
        if any(not 0 <= t < self.runner.vocab_size for t in prompt_ids):
            raise IRLMError(f"prompt token ids must be in [0, {self.runner.vocab_size})")
        max_len = min(len(prompt_ids) + params.max_tokens, self.runner.max_model_len)
        req = Request(self._next_request_id, prompt_ids, params, max_len, prompt=prompt,
                      stream=stream)
        first = self._new_sequence(req, list(prompt_ids), index=0)
        req.seqs.append(first)
        if params.use_beam_search:
            req.beam = BeamSearch(params.beam_width, len(prompt_ids), max_len,
                                  self._stop_ids(params), params.length_penalty,
                                  params.early_stopping)
        self.scheduler.add(req)          # may raise: the id is only used once it is accepted
        self._next_request_id += 1
        self.requests[req.request_id] = req
        return req.request_id

    def abort(self, request_id: int) -> None:
        """Cancel a request: its blocks are freed now; its output so far stays readable."""
        req = self.requests.get(request_id)
        if req is None or req.finished:
            return
        for seq in req.seqs:
            seq.finish_reason = "abort"
            if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
                seq.token_ids.pop()            # its token in flight is dropped
        self.scheduler.finish(req)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def queue_has_room(self) -> bool:
        return len(self.scheduler.waiting) < self.scheduler.config.max_waiting

    # ----- the step ------------------------------------------------------------------------
    def step(self) -> list[Request]:
        """Run one step; returns the requests that got new tokens or finished."""
        if self._can_overlap():
            return self._step_overlapped()
        changed = self._drain()
        plan = self.scheduler.schedule()
        if not plan.rows:
            if self.scheduler.has_unfinished():
                raise AssertionError("the scheduler made no progress with requests pending")
            return list(changed.values())
        bm = self.block_manager
        batch = StepBatch.pack([s.seq_id for s, _ in plan.rows],
                               [s.token_ids[s.num_computed:s.num_computed + n]
                                for s, n in plan.rows],
                               [s.num_computed for s, _ in plan.rows],
                               [bm.block_table(s.seq_id) for s, _ in plan.rows],
                               pin_memory=self._pin)
        rows = plan.rows
        try:
            logits = self.runner.step(batch)
        except Exception as e:                   # noqa: BLE001 - isolated per request below
            rows, logits = self._step_each_request(rows, e)
        self.num_steps += 1
        ready = []
        for row, (seq, n) in enumerate(rows):
            seq.num_computed += n
            bm.commit(seq.seq_id, seq.token_ids, seq.num_computed)
            if seq.num_uncomputed == 0:       # else: a prompt chunk, its logits are unused
                ready.append((seq, row))
        self._sample([(s, r) for s, r in ready if s.request.beam is None], logits, changed)
        for seq, row in ready:
            if seq.request.beam is not None:
                seq.beam_logits = logits[row].clone()   # not a view pinning the batch
        for req in {id(s.request): s.request for s, _ in ready if s.request.beam}.values():
            if all(s.beam_logits is not None for s in req.seqs):
                with self._failing_alone(req):
                    self._beam_step(req)
                changed[req.request_id] = req
        return list(changed.values())

    # ----- one request fails alone ----------------------------------------------------------
    def _step_each_request(self, rows, error: Exception):
        """The batch's forward pass raised: run each request's rows alone, so that a failure
        attributable to one request ends that request only.  Returns the rows that ran and
        their logits.  When no request runs alone either (a dead worker, a lost device), or the
        batch held one request, the failure is the engine's: ``error`` is raised as it was.
        (Re-running rows rewrites the same cache slots with the same values.)"""
        by_request: dict[int, list] = {}
        for seq, n in rows:
            by_request.setdefault(seq.request.request_id, []).append((seq, n))
        if len(by_request) == 1:          # nothing to tell a request's fault from the engine's
            raise error
        kept, parts, failed = [], [], []
        bm = self.block_manager
        for group in by_request.values():
            batch = StepBatch.pack([s.seq_id for s, _ in group],
                                   [s.token_ids[s.num_computed:s.num_computed + n]
                                    for s, n in group],
                                   [s.num_computed for s, _ in group],
                                   [bm.block_table(s.seq_id) for s, _ in group],
                                   pin_memory=self._pin)
            try:
                parts.append(self.runner.step(batch))
                kept += group
            except Exception as e:               # noqa: BLE001 - this request's failure?
                failed.append((group[0][0].request, e))
        if not kept:                      # every request fails alone too: the engine's fault
            raise error
        for req, e in failed:
            self._fail(req, e)
        return kept, torch.cat(parts)

    def _fail(self, req: Request, error: BaseException) -> None:
        """End ``req`` alone with finish_reason "error" and the reason; free its blocks."""
        if req.finished:
            return
        reason = str(error) if isinstance(error, IRLMError) else \
            f"{type(error).__name__}: {error}".rstrip(": ")
        req.error = f"request {req.request_id} failed: {reason}"
        for seq in req.seqs:
            if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
                seq.token_ids.pop()
            seq.finish_reason = "error"
        self.scheduler.finish(req)

    def _failing_alone(self, req: Request) -> "_FailingAlone":
        """A context in which an exception fails ``req`` alone instead of the batch."""
        return _FailingAlone(self, req)

    # ----- overlapped (async) decode --------------------------------------------------------
    def _can_overlap(self) -> bool:
        if not self.async_decode or self.scheduler.config.policy != "guaranteed-no-evict":
            return False
        for reqs in (self.scheduler.running, self.scheduler.waiting):
            for req in reqs:
                p = req.params
                if req.beam is not None or p.num_sequences > 1 or p.uses_penalties:
                    return False
                # a multi-token bad word's ban depends on the token still being drawn
                if any(len(w) > 1 for w in p.bad_words_ids):
                    return False
        return True

    def _step_overlapped(self) -> list[Request]:
        """One step that does not wait for the previous one's tokens.

        The previous step's sampled sequences carry a PLACEHOLDER as their last token, so the
        scheduler gives each its decode row as usual; the runner fills those rows' input ids
        from the device tensor of sampled tokens (``StepBatch.device_inputs``).  Only after
        this step is queued (and its tokens drawn, on the device) does the host read the
        previous step's tokens, check stops and retire what ended, while the device works.
        A sequence that ended that way wasted its row in this step; its result is dropped.
        A sequence certain to end (at its length limit) is drained first instead."""
        inflight = self._inflight
        if inflight is not None and any(
                i >= 0 and len(s.token_ids) >= s.request.max_len for s, i in inflight.jobs):
            changed = self._drain()
            if not self._can_overlap():
                return list(changed.values()) + self.step()
        else:
            changed = {}
        inflight = self._inflight
        plan = self.scheduler.schedule()
        if not plan.rows:
            changed.update(self._drain())
            if not changed and self.scheduler.has_unfinished():
                raise AssertionError("the scheduler made no progress with requests pending")
            return list(changed.values())
        bm = self.block_manager
        chunks = [s.token_ids[s.num_computed:s.num_computed + n] for s, n in plan.rows]
        batch = StepBatch.pack([s.seq_id for s, _ in plan.rows], chunks,
                               [s.num_computed for s, _ in plan.rows],
                               [bm.block_table(s.seq_id) for s, _ in plan.rows],
                               pin_memory=self._pin)
        if inflight is not None:
            src = {id(seq): j for j, (seq, _) in enumerate(inflight.jobs)}
            dst, rows, offset = [], [], 0
            for (seq, _), chunk in zip(plan.rows, chunks):
                if chunk and chunk[-1] == PLACEHOLDER:
                    dst.append(offset + len(chunk) - 1)
                    rows.append(src[id(seq)])
                offset += len(chunk)
            if dst:
                if getattr(self.runner, "supports_device_inputs", False):
                    batch.device_inputs = (inflight.drawn.tokens, dst, rows)
                else:   # a runner that cannot: read the tokens now (correct, not overlapped)
                    fill_device_inputs(batch.input_ids,
                                       (inflight.drawn.tokens.cpu(), dst, rows))
        logits = self.runner.step(batch)
        self.num_steps += 1
        jobs = [(seq, row) for row, (seq, n) in enumerate(plan.rows)
                if seq.num_computed + n == len(seq.token_ids)]
        drawn = None
        if jobs:
            sample_rows = [SampleRow(s.request.params, s.request.prompt_ids, (),
                                     s.generator(logits.device), self._suppressed(s))
                           for s, _ in jobs]
            drawn = draw_tokens(self._rows_of(logits, [r for _, r in jobs]), sample_rows) \
                .start_copy(self._staging)
        changed.update(self._drain())       # the previous step's tokens, read while this runs
        for seq, n in plan.rows:
            if seq.finished:                 # ended by a token the drain just read
                continue
            seq.num_computed += n
            bm.commit(seq.seq_id, seq.token_ids, seq.num_computed)
        if drawn is not None:
            placed = []
            for seq, _ in jobs:
                if seq.finished:
                    placed.append((seq, -1))
                else:
                    seq.token_ids.append(PLACEHOLDER)
                    placed.append((seq, len(seq.token_ids) - 1))
            self._inflight = _InFlight(placed, drawn)
        return list(changed.values())

    @staticmethod
    def _rows_of(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """logits[rows], without a copy when that is every row in order (steady decode)."""
        if rows == list(range(logits.shape[0])):
            return logits
        return logits.index_select(0, device_index(rows, logits.device))

    def _drain(self) -> dict[int, Request]:
        """Read the in-flight step's tokens into their sequences: stops, retirement."""
        changed: dict[int, Request] = {}
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return changed
        result = inflight.drawn.result()
        for (seq, idx), token, lp, top in zip(inflight.jobs, result.token_ids,
                                              result.token_logprobs, result.top_logprobs):
            if idx < 0 or seq.finished or idx >= len(seq.token_ids):
                continue                     # ended (or aborted) while its token was drawn
            seq.token_ids[idx] = token
            seq.cumulative_logprob += lp
            if seq.logprobs is not None:
                seq.logprobs.append(top)
            self._check_stop(seq)
            changed[seq.request.request_id] = seq.request
            if seq.finished:
                self._retire(seq)
        return changed

    def _sample(self, ready: list[tuple[Sequence, int]], logits: torch.Tensor,
                changed: dict[int, Request]) -> None:
        jobs = []
        for seq, row in ready:
            req = seq.request
            jobs.append((seq, row))
            if req.pending_forks and not seq.num_output:
                # The first token of n > 1 samples: the other samples start here, sharing the
                # prompt's full blocks, and draw their first token from the same logits.
                for _ in range(req.pending_forks):
                    child = self._fork(seq, index=len(req.seqs))
                    req.seqs.append(child)
                    jobs.append((child, row))
        if not jobs:
            return
        # output_ids copies the list: only the penalties read it
        rows = [SampleRow(s.request.params, s.request.prompt_ids,
                          s.output_ids if s.request.params.uses_penalties else (),
                          s.generator(logits.device), self._suppressed(s)) for s, _ in jobs]
        drawn = self._sample_isolating(logits, jobs, rows)
        for (seq, _), (token, lp, top) in zip(jobs, drawn):
            changed[seq.request.request_id] = seq.request
            if token is None or seq.request.finished:     # its request failed
                continue
            with self._failing_alone(seq.request):
                seq.token_ids.append(token)
                seq.cumulative_logprob += lp
                if seq.logprobs is not None:
                    seq.logprobs.append(top)
                self._check_stop(seq)
        for seq, _ in jobs:
            if seq.finished and not seq.request.finished:
                self._retire(seq)

    def _sample_isolating(self, logits, jobs, rows) -> list[tuple]:
        """(token, logprob, top logprobs) per job, sampled as one batch; when that raises,
        each request's rows are sampled alone (from the generator states they had) and a
        request whose rows still raise fails alone (its entries are (None, None, None))."""
        gens = [r.generator for r in rows]
        states = [g.get_state() if g is not None else None for g in gens]
        try:
            res = sample(self._rows_of(logits, [r for _, r in jobs]), rows)
            return list(zip(res.token_ids, res.token_logprobs, res.top_logprobs))
        except Exception:                        # noqa: BLE001 - isolated per request below
            pass
        for g, st in zip(gens, states):
            if g is not None:
                g.set_state(st)
        out: list[tuple] = [(None, None, None)] * len(jobs)
        groups: dict[int, list[int]] = {}
        for k, (seq, _) in enumerate(jobs):
            groups.setdefault(seq.request.request_id, []).append(k)
        for ks in groups.values():
            try:
                res = sample(self._rows_of(logits, [jobs[k][1] for k in ks]),
                             [rows[k] for k in ks])
            except Exception as e:               # noqa: BLE001 - this request's failure
                self._fail(jobs[ks[0]][0].request, e)
                continue
            for k, t, lp, top in zip(ks, res.token_ids, res.token_logprobs, res.top_logprobs):
                out[k] = (t, lp, top)
        return out

    def _stop_ids(self, params: SamplingParams) -> list[int]:
        return list(params.stop_token_ids) + ([] if params.ignore_eos else self.eos_token_ids)

    def _suppressed(self, seq: Sequence) -> list[int]:
        """Token ids a sequence may not draw now: stop ids before ``min_tokens``, and what
        ``bad_words_ids`` forbids after its tokens so far."""
        p = seq.request.params
        out = self._stop_ids(p) if seq.num_output < p.min_tokens else []
        if p.bad_words_ids:
            out = out + bad_word_bans(seq.token_ids, p.bad_words_ids)
        return out

    def _check_stop(self, seq: Sequence) -> None:
        req, p = seq.request, seq.request.params
        token = seq.token_ids[-1]
        # Detokenized (when needed) whatever ends it, so that a stream's text is complete.
        may_stop = seq.num_output >= p.min_tokens
        found = seq.detokenizer.update(seq.output_ids, may_stop) if seq.detokenizer else None
        if token in p.stop_token_ids:
            seq.finish_reason, seq.stop_reason = "stop", token
        elif not p.ignore_eos and token in self.eos_token_ids:
            seq.finish_reason = "stop"
        elif found is not None:
            seq.finish_reason, seq.stop_reason = "stop", found
        elif len(seq.token_ids) >= req.max_len:
            seq.finish_reason = "length"

    def _retire(self, seq: Sequence) -> None:
        """A sample ended: free its blocks; the request ends with its last sample."""
        req = seq.request
        self.block_manager.free(seq.seq_id)
        req.seqs.remove(seq)
        req.done.append(seq)
        if not req.seqs and not req.pending_forks:
            self.scheduler.finish(req)

    def _beam_step(self, req: Request) -> None:
        beams, p = req.seqs, req.params
        logprobs = torch.stack([s.beam_logits for s in beams]).float().log_softmax(dim=-1)
        for s in beams:
            s.beam_logits = None
        if p.repetition_penalty != 1.0:      # HF applies processors to the log-probs
            n = len(beams)
            logprobs = apply_penalties(logprobs, [req.prompt_ids] * n,
                                       [s.output_ids for s in beams],
                                       torch.full((n,), p.repetition_penalty),
                                       torch.zeros(n), torch.zeros(n))
        if len(beams[0].output_ids) < p.min_tokens:   # beams all have the same length
            logprobs[:, self._stop_ids(p)] = float("-inf")
        continuations = req.beam.step(logprobs, [s.output_ids for s in beams])
        if req.beam.done:
            self.scheduler.finish(req)
            return
        # A parent's first continuation extends the parent itself; any other forks it.  Forks
        # are made before any parent grows, so that they copy the parent as it was.
        claimed: set[int] = set()
        next_beams = []
        for c in continuations:
            if c.parent in claimed:
                next_beams.append(self._fork(beams[c.parent], index=0))
            else:
                claimed.add(c.parent)
                next_beams.append(beams[c.parent])
        for i, beam in enumerate(beams):
            if i not in claimed:
                self.block_manager.free(beam.seq_id)
        for beam, c in zip(next_beams, continuations):
            beam.token_ids.append(c.token)
            beam.cumulative_logprob = c.cumulative_logprob
        req.seqs = next_beams

    # ----- sequences -----------------------------------------------------------------------
    def _new_sequence(self, req: Request, token_ids: list[int], index: int) -> Sequence:
        seq = Sequence(self._next_seq_id, req, token_ids, index=index)
        self._next_seq_id += 1
        p = req.params
        if p.logprobs is not None:
            seq.logprobs = []
        if self.tokenizer is not None and not p.use_beam_search and (p.stop or req.stream):
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, p.stop,
                                                     p.skip_special_tokens)
        return seq

    def _fork(self, parent: Sequence, index: int) -> Sequence:
        """A new sequence with the parent's tokens, sharing the parent's full KV blocks."""
        child = self._new_sequence(parent.request, list(parent.token_ids), index)
        child.cumulative_logprob = parent.cumulative_logprob
        if parent.logprobs is not None:
            child.logprobs = list(parent.logprobs)
        child.num_computed = self.block_manager.fork(parent.seq_id, child.seq_id,
                                                     parent.num_computed)
        return child

    # ----- outputs -------------------------------------------------------------------------
    def _text(self, seq: Sequence) -> str | None:
        if seq.detokenizer is not None:
            return seq.detokenizer.text
        return self._decode(seq.output_ids, seq.request.params)

    def _decode(self, ids: list[int], params: SamplingParams) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(ids, skip_special_tokens=params.skip_special_tokens)

    def output(self, request_id: int) -> RequestOutput:
        """A request's output as it stands (final once ``finished``)."""
        req = self.requests[request_id]
        if req.beam is not None:
            outs = self._beam_outputs(req)
        else:
            outs = [CompletionOutput(s.index, self._text(s), s.output_ids, s.finish_reason,
                                     s.stop_reason, s.cumulative_logprob, s.logprobs)
                    for s in sorted(req.done + req.seqs, key=lambda s: s.index)]
        return RequestOutput(req.request_id, req.prompt, req.prompt_ids, outs, req.finished,
                             req.error)

    def _beam_outputs(self, req: Request) -> list[CompletionOutput]:
        p = req.params
        if req.finished and req.beam.done:        # the n best finished hypotheses
            return [CompletionOutput(i, self._decode(h.output_ids, p), h.output_ids,
                                     "stop" if h.stopped else "length",
                                     cumulative_logprob=h.cumulative_logprob, beam_score=h.score)
                    for i, h in enumerate(req.beam.finished[:p.n])]
        # Running or cancelled: the live beams as they stand, best first.
        return [CompletionOutput(i, self._decode(s.output_ids, p), s.output_ids,
                                 s.finish_reason, cumulative_logprob=s.cumulative_logprob)
                for i, s in enumerate(req.seqs[:p.n])]

    def pop_output(self, request_id: int) -> RequestOutput:
        """The output of a request, forgetting the request if it has finished."""
        out = self.output(request_id)
        if out.finished:
            del self.requests[request_id]
        return out

    def stream_deltas(self, request_id: int) -> list[StreamOutput]:
        """What each sequence of a streamed request produced since the last call."""
        req = self.requests[request_id]
        if req.beam is not None:               # beams are only known at the end
            if not req.finished:
                return []
            return [StreamOutput(req.request_id, o.index, o.text or "", o.token_ids,
                                 o.finish_reason) for o in self.output(request_id).outputs]
        deltas = []
        for seq in sorted(req.done + req.seqs, key=lambda s: s.index):
            if seq.stream_done:
                continue
            new_ids = seq.output_ids[seq.num_streamed:]
            text = seq.detokenizer.delta(final=seq.finished) if seq.detokenizer else ""
            if new_ids or text or seq.finished:
                deltas.append(StreamOutput(req.request_id, seq.index, text, new_ids,
                                           seq.finish_reason))
            seq.num_streamed, seq.stream_done = len(seq.output_ids), seq.finished
        return deltas


class _FailingAlone:
    """LLMEngine._failing_alone's context (one class, not one per call: it is entered per row
    and step, and a class made per call cost ~6 us and left cyclic garbage for the collector)."""
    __slots__ = ("engine", "req")

    def __init__(self, engine: LLMEngine, req: Request):
        self.engine, self.req = engine, req

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is not None and isinstance(error, Exception):
            self.engine._fail(self.req, error)
            return True
        return False
