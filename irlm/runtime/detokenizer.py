"""Incremental detokenization: the text of a growing output, stop strings, stream deltas.

Token boundaries are not character boundaries: a byte-level BPE token can hold half of a
UTF-8 character, and SentencePiece pieces merge spaces.  So text is never built by decoding
tokens one at a time; the whole output is decoded again and the new suffix is what is new.
While the output ends inside a character the decoder shows U+FFFD; that tail is held back
until it resolves (or the sequence ends), so a stream never emits a half character.
"""
from __future__ import annotations

from typing import Protocol, Sequence


class Tokenizer(Protocol):
    """The part of a Hugging Face tokenizer the runtime uses."""
    def encode(self, text: str, **kwargs) -> list[int]: ...
    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False,
               **kwargs) -> str: ...


_PARTIAL = "\ufffd"


def _stable_length(text: str) -> int:
    """Length of ``text`` without a trailing run of U+FFFD (a character still being built)."""
    end = len(text)
    while end and text[end - 1] == _PARTIAL:
        end -= 1
    return end


class IncrementalDetokenizer:
    """Text of one sequence's output so far; finds stop strings; hands out stream deltas."""

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.skip_special_tokens = skip_special_tokens
        self.text = ""               # decoded output, cut before the stop string once matched
        self._searched = 0           # chars of text already searched for stop strings
        self._emitted = 0            # chars of text already handed out as deltas
        # A stream must not emit what may turn out to be the start of a stop string.
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def update(self, output_ids: Sequence[int], find_stop: bool = True) -> str | None:
        """Decode the output again; if a stop string now appears (and ``find_stop``: False
        while ``min_tokens`` forbids stopping), cut the text before it and return it."""
        text = self.tokenizer.decode(list(output_ids),
                                     skip_special_tokens=self.skip_special_tokens)
        found, cut = None, len(text)
        # Only text past what was searched (less a stop string's length, for one straddling
        # the boundary) can hold a new match.
        start = max(0, self._searched - self._hold)
        for s in self.stop if find_stop else ():
            i = text.find(s, start)
            if 0 <= i < cut:
                found, cut = s, i
        self.text = text[:cut]
        self._searched = _stable_length(self.text)
        return found

    def delta(self, final: bool = False) -> str:
        """Text not handed out before.  Until ``final``, holds back a trailing partial
        character and the last few characters that could begin a stop string."""
        end = len(self.text)
        if not final:
            end = min(_stable_length(self.text), len(self.text) - self._hold)
        end = max(end, self._emitted)
        new, self._emitted = self.text[self._emitted:end], end
        return new
