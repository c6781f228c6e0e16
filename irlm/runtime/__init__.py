"""The runtime: paged KV cache, in-flight batching, sampling, the LLM API.

Layout (one concept a module): :mod:`.model_runner` (the engine interface), :mod:`.kv_cache`
(blocks and prefix reuse), :mod:`.scheduler` (in-flight batching and its policies),
:mod:`.sampling` (parameters and the vectorized sampler), :mod:`.beam_search`,
:mod:`.detokenizer`, :mod:`.sequence` (request state), :mod:`.llm_engine` (the step loop),
:mod:`.llm` (the user API), :mod:`.runners` (the model runners: interpreter, CUDA graphs, ranks,
HF reference), :mod:`.distributed` (multi-rank engines as one process per rank).
See docs/runtime.md.
"""
from .llm_engine import LLMEngine
from .errors import (QueueFullError, RequestFailedError, RequestRejectedError,
                     SamplingParamsError)
from .kv_cache import BlockManager, kv_block_bytes, num_blocks_for_free_memory
from .llm import LLM
from .model_runner import ModelRunner, StepBatch
from .outputs import CompletionOutput, RequestOutput, StreamOutput
from .runners.hf_reference import RecomputeRunner, ReferenceRunner
from .sampling import SamplingParams
from .scheduler import Scheduler, SchedulerConfig

__all__ = ["LLM", "LLMEngine", "SamplingParams", "RequestOutput", "CompletionOutput",
           "StreamOutput", "ModelRunner", "StepBatch", "ReferenceRunner", "RecomputeRunner",
           "BlockManager", "Scheduler", "SchedulerConfig", "QueueFullError",
           "RequestRejectedError", "RequestFailedError", "SamplingParamsError", "kv_block_bytes",
           "num_blocks_for_free_memory"]
