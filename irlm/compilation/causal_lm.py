"""A causal LM module → its inference-form graph, in memory (no loading, no files).

:func:`irlm.compile` runs the same trace and pipeline and adds loading, quantization, the
parallel split, dumps and the engine; tests and benchmarks that only want the graph call
:func:`compile_causal_lm`.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..ir import Graph


def inference_example_inputs(vocab_size: int, device=None, batch: int = 2,
                             position_ids: bool = True) -> dict:
    """input_ids, an all-ones attention mask and explicit position_ids (batch 2, so torch does
    not specialize the batch dim to 1): substitute-attention reads positions from
    position_ids, and the explicit mask keeps HF from deriving packed-sequence masks.
    ``position_ids=False`` for a model whose forward takes none (ALiBi: BLOOM)."""
    ids = torch.arange(8 * batch, device=device).remainder(max(2, vocab_size)).reshape(batch, 8)
    out = {"input_ids": ids,
           "attention_mask": torch.ones(batch, 8, dtype=torch.long, device=device)}
    if position_ids:
        out["position_ids"] = torch.arange(8, device=device).repeat(batch, 1)
    return out


def takes_position_ids(module) -> bool:
    """Whether the model's forward has a ``position_ids`` parameter (BLOOM's has none)."""
    import inspect
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return "position_ids" in params


def sliding_window_of(config) -> int:
    if getattr(config, "use_sliding_window", True) is False:
        return 0
    return int(getattr(config, "sliding_window", 0) or 0)


def compile_causal_lm(module, *, level: str = "2", weights=None, max_batch: int = 8,
                      max_seq: Optional[int] = None, tokens_per_block: int = 16,
                      max_num_tokens: int = 8192, extra_pipeline: str = "") -> Graph:
    """Trace ``module`` (a Hugging Face causal LM, possibly on the meta device) and run the
    ``-O{level}`` pipeline, ending in the paged inference form."""
    from irlm.frontends import trace
    from irlm.passes import run_pipeline
    cfg = module.config
    if max_seq is None:
        max_seq = int(getattr(cfg, "max_position_embeddings", 0) or 2048)
    device = next(iter(module.parameters())).device
    g = trace(module, inference_example_inputs(int(cfg.vocab_size), device=device,
                                               batch=min(2, max_batch),
                                               position_ids=takes_position_ids(module)),
              dims={"batch": (1, max_batch), "seq": (1, max_seq)}, weights=weights)
    text = pipeline_for(level, True, tokens_per_block, sliding_window_of(cfg), max_num_tokens)
    if extra_pipeline:
        text = f"{text},{extra_pipeline}"
    run_pipeline(g, text)
    return g


def pipeline_for(level, causal_lm: bool = True, tokens_per_block: int = 16,
                 sliding_window: int = 0, max_num_tokens: int = 8192) -> str:
    """The ``-O{level}`` named pipeline (irlm.passes.levels) for a model: its causal-LM form,
    with substitute-attention's build options, for decoders; the plain form otherwise."""
    from irlm.errors import IRLMError
    from irlm.passes import named_pipeline, parse_pipeline
    from irlm.passes.levels import LEVELS, level_name
    name = level_name(level)
    if name not in LEVELS:
        raise IRLMError(f"-O{str(level).lstrip('O')}: unknown optimization level "
                        f"(valid: -O0, -O1, -O2)")
    if not causal_lm:
        return named_pipeline(name)
    pipeline = parse_pipeline(named_pipeline(level_name(level, causal_lm=True)))
    return str(pipeline.with_options("substitute-attention", tokens_per_block=tokens_per_block,
                                     sliding_window=sliding_window, max_tokens=max_num_tokens))
