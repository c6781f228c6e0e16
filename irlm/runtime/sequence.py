"""A request and its sequences: the state the scheduler and the engine share.

A request (one prompt, one :class:`SamplingParams`) runs one or more sequences: one normally,
its ``n`` samples, or its live beams.  A sequence is a token list plus how many of those
tokens have keys/values in the cache (``num_computed``); whatever is not computed yet is
what the scheduler feeds the model next: a prompt chunk, one decode token, or, after a
preemption or a fork, the tail to recompute.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from .beam_search import BeamSearch
from .detokenizer import IncrementalDetokenizer
from .sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"      # queued, or preempted and to be recomputed; holds no blocks
    RUNNING = "running"      # admitted; its sequences hold blocks
    FINISHED = "finished"


def sample_seed(seed: int, index: int) -> int:
    """Seed of sample ``index`` of a request: sample 0 uses the request's seed itself, so
    n=1 and the first of n samples agree; the others get well-separated seeds."""
    return seed if index == 0 else (seed + index * 0x9E3779B97F4A7C15) % 2**63


#: stands in token_ids for a token sampled on the device that the host has not read yet
#: (LLMEngine's async_decode); never a valid token id
PLACEHOLDER = -1


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request: "Request"
    token_ids: list[int]
    index: int = 0                       # which of the request's samples (n > 1)
    num_computed: int = 0                # leading tokens whose keys/values are cached
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None     # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string
    detokenizer: IncrementalDetokenizer | None = None
    beam_logits: torch.Tensor | None = None  # beams: next-token logits awaiting the others
    num_streamed: int = 0                # output tokens already handed to a stream
    stream_done: bool = False            # its last stream increment was handed out
    _generator: torch.Generator | None = None

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def output_ids(self) -> list[int]:
        """The generated tokens, without a placeholder for a token still on the device."""
        ids = self.token_ids[self.prompt_len:]
        return ids[:-1] if ids and ids[-1] == PLACEHOLDER else ids

    @property
    def num_output(self) -> int:
        """len(output_ids) without copying them (called per row per step)."""
        return len(self.token_ids) - len(self.request.prompt_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This sample's own random stream (None without a seed), made on first use."""
        seed = self.request.params.seed
        if seed is None:
            return None
        if self._generator is None:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(sample_seed(seed, self.index))
        return self._generator


@dataclass(eq=False)
class Request:
    request_id: int
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int                          # prompt + max_tokens, capped at max_model_len
    prompt: str | None = None
    stream: bool = False
    status: Status = Status.WAITING
    seqs: list[Sequence] = field(default_factory=list)       # live sequences
    done: list[Sequence] = field(default_factory=list)       # finished samples
    beam: BeamSearch | None = None
    error: str | None = None              # why it failed alone (finish_reason "error")

    @property
    def width(self) -> int:
        """Most sequences it runs at once."""
        return self.params.num_sequences

    @property
    def pending_forks(self) -> int:
        """Sequences it will still fork off a live one (n > 1 samples; replaced beams)."""
        if self.status is Status.FINISHED:
            return 0
        if self.beam is not None:
            return self.width - len(self.seqs)
        return self.width - len(self.seqs) - len(self.done)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED
