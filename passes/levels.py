"""The optimization levels ``-O0``, ``-O1``, ``-O2``: named pipelines, defined once, here.

Each level has two forms:

* ``O<n>``: what the level runs on any graph (``irlm opt -O<n>``, and ``irlm compile`` on a
  model that is not a causal LM, e.g. an encoder);
* ``O<n>-causal-lm``: what it runs on a traced causal LM, which it turns into the paged
  inference form (``substitute-attention``).  The compile library fills in the
  ``substitute-attention`` options that depend on the model and the build (tokens per KV
  block, sliding window, step token budget: :func:`irlm.compilation.pipeline_for`).

``irlm opt --list-pipelines`` prints this table.
"""
from __future__ import annotations

from .fusions import FUSION_PIPELINE
from .pipeline import register_named_pipeline

LEVELS = ("O0", "O1", "O2")

#: Local simplification and deduplication: what -O1 adds to -O0.
CLEANUP = "canonicalize,cse"

#: The suffix of a level's causal-LM form.
CAUSAL_LM = "-causal-lm"


def _causal_lm(level: str) -> str:
    cleanup = "" if level == "O0" else CLEANUP + ","
    text = f"{cleanup}substitute-attention,{cleanup}dce"
    if level == "O2":
        text += "," + FUSION_PIPELINE
    return text


for _level in LEVELS:
    register_named_pipeline(_level, "" if _level == "O0" else CLEANUP + ",dce")
    register_named_pipeline(_level + CAUSAL_LM, _causal_lm(_level))


def level_name(level, causal_lm: bool = False) -> str:
    """``"2"`` / ``"O2"`` / ``2`` → ``"O2"`` (or ``"O2-causal-lm"``)."""
    name = str(level)
    name = name if name.startswith("O") else f"O{name}"
    return name + (CAUSAL_LM if causal_lm else "")
