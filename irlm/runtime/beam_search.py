"""Beam search over the step interface, with Hugging Face's semantics.

Each live beam is an ordinary sequence in the batch; when all of a request's beams have their
next-token logits, :meth:`BeamSearch.step` ranks the continuations and says which beam each new
beam continues.  The engine then reuses a parent's sequence for its first continuation and
forks the parent (sharing its full KV blocks) for any other, so the beams of a request share
the prompt's blocks and every common prefix that fills a block.

The rules replicate ``GenerationMixin._beam_search`` (transformers 4.50+ / 5.x), which this
module was checked against token for token:

* candidates: the top ``K = max(2, 1 + #stop ids) * width`` of ``beam score + logprob`` over
  all beams and tokens (K > width so that ``width`` non-finished continuations always exist);
* a candidate *finishes* when its token is a stop id or the sequence reaches ``max_len``; only
  candidates ranked among the first ``width`` may enter the finished set, scored
  ``sum logprob / generated_len ** length_penalty``; the finished set keeps the best ``width``;
* the next running beams are the best ``width`` non-finishing candidates (raw sums, no penalty);
* stop when every candidate finishes; or ``early_stopping=True`` and ``width`` hypotheses are
  finished; or (``False`` / ``"never"``) the finished set is full and the best running beam
  can no longer beat its worst member, the running beam's length being the current one (or,
  for ``"never"`` with a positive length penalty, the longest possible).

Scores are float32 tensors, as in HF, so that near-ties break the same way.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Hypothesis:
    """A finished beam."""
    output_ids: list[int]
    score: float                 # cumulative logprob / generated_len ** length_penalty
    cumulative_logprob: float
    stopped: bool                # ended on a stop id (else: hit max_len)


@dataclass
class Continuation:
    """A running beam for the next step: ``parent`` (index into the current beams) + token."""
    parent: int
    token: int
    cumulative_logprob: float


class BeamSearch:
    def __init__(self, width: int, prompt_len: int, max_len: int, stop_ids: list[int],
                 length_penalty: float = 1.0, early_stopping: bool | str = False):
        self.width, self.prompt_len, self.max_len = width, prompt_len, max_len
        self.stop_ids = set(stop_ids)
        self.length_penalty, self.early_stopping = length_penalty, early_stopping
        self.num_candidates = max(2, 1 + len(self.stop_ids)) * width
        self.cur_len = prompt_len                    # length of every running beam
        self.scores = torch.zeros(1)                 # running beams' cumulative logprobs
        self.finished: list[Hypothesis] = []         # best first
        self.done = False

    def step(self, logprobs: torch.Tensor, outputs: list[list[int]]) -> list[Continuation]:
        """``logprobs``: [beams, vocab] log-probabilities of each running beam's next token
        (penalties applied); ``outputs``: each beam's generated tokens.  Returns the next
        running beams, best first (empty when the search is done)."""
        lp = logprobs.float().cpu()
        vocab = lp.shape[1]
        total = (lp + self.scores[:, None]).reshape(-1)
        top_scores, top_ids = total.topk(min(self.num_candidates, total.numel()))
        parents, tokens = (top_ids // vocab).tolist(), (top_ids % vocab).tolist()
        at_max = self.cur_len + 1 >= self.max_len
        hits = torch.tensor([at_max or t in self.stop_ids for t in tokens])

        # Finished candidates among the first `width`, length-normalized, merged into the set.
        normalized = top_scores / ((self.cur_len + 1 - self.prompt_len) ** self.length_penalty)
        for j in range(min(self.width, len(tokens))):
            if hits[j]:
                self.finished.append(Hypothesis(outputs[parents[j]] + [tokens[j]],
                                                float(normalized[j]), float(top_scores[j]),
                                                stopped=tokens[j] in self.stop_ids))
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.width:]

        # Running: the best `width` candidates that did not finish.
        ranked = (top_scores + hits.float() * -1.0e9).topk(min(self.width, len(tokens)))
        keep = [j for j in ranked.indices.tolist() if not hits[j]]
        self.scores = top_scores[keep]
        self.cur_len += 1
        self.done = not keep or self._cannot_improve()
        if self.done:
            return []
        return [Continuation(parents[j], tokens[j], float(top_scores[j])) for j in keep]

    def _cannot_improve(self) -> bool:
        if len(self.finished) < self.width:
            return False
        if self.early_stopping is True:
            return True
        if self.early_stopping == "never" and self.length_penalty > 0.0:
            best_len = self.max_len - self.prompt_len
        else:
            best_len = self.cur_len - self.prompt_len
        best_running = self.scores[:1] / (best_len ** self.length_penalty)
        worst_finished = torch.tensor([h.score for h in self.finished]).min()
        return not bool(best_running[0] > worst_finished)
