"""The runtime's user-facing errors (all :class:`irlm.errors.IRLMError`)."""
from __future__ import annotations

from ..errors import IRLMError


class SamplingParamsError(IRLMError):
    """A :class:`SamplingParams` field is out of range; the message names the field."""


class RequestRejectedError(IRLMError):
    """A request can never run: longer than ``max_model_len`` or than the whole KV cache."""


class RequestFailedError(IRLMError):
    """One request failed on its own (its step, sampling or detokenization raised); the other
    requests of the batch went on.  The message is the reason."""


class QueueFullError(IRLMError):
    """The waiting queue holds ``max_waiting`` requests; retry once some have been admitted."""
