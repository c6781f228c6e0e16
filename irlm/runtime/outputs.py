"""What ``LLM.generate`` / ``LLM.chat`` return and what ``LLM.generate_stream`` yields."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompletionOutput:
    """One generated sequence (one of ``n`` samples, or one of the best beams)."""
    index: int
    text: str | None                  # None when the runtime has no tokenizer
    token_ids: list[int]              # generated tokens, the stop token included
    finish_reason: str | None         # "stop" | "length" | "abort" | "error"; None: running
    stop_reason: int | str | None = None   # the stop token id / stop string that ended it
    cumulative_logprob: float = 0.0   # sum of the raw model logprobs of token_ids
    logprobs: list[dict[int, float]] | None = None  # per token: top-k ids -> logprob
    beam_score: float | None = None   # beams: cumulative_logprob / len ** length_penalty


@dataclass
class RequestOutput:
    request_id: int
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]   # by index; beams: best first
    finished: bool
    error: str | None = None          # set when this request failed alone (finish "error")


@dataclass
class StreamOutput:
    """An increment of one sequence of a streamed request."""
    request_id: int
    index: int
    text: str                         # new text since the previous increment of this index
    token_ids: list[int]              # new tokens since the previous increment
    finish_reason: str | None         # set on the sequence's last increment
