"""irlm.passes.parallel: splitting the inference form across devices.

:mod:`.tp_split` (tensor parallel: attention heads, MLP, vocab; ``tp-split``) and
:mod:`.pp_split` (pipeline parallel: layers; ``pp-split``).  Both mutate only through the
rewriter and copy graphs structurally.  docs/parallelism.md describes the plans.
"""
from .pp_split import PPSplitError, split_for_pipeline
from .tp_split import TPSplitError, split_for_tensor_parallel

__all__ = ["split_for_tensor_parallel", "split_for_pipeline", "TPSplitError", "PPSplitError"]
