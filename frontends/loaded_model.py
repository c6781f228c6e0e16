"""What every model loader returns: a :class:`LoadedModel`, and :func:`load_model`, which picks
the loader from what a path is.

A loaded model is an ``nn.Module`` whose *parameters* live on the ``meta`` device (no memory,
no copy of the checkpoint) plus a lazy :class:`~irlm.weights.WeightStore` keyed by that
module's ``state_dict`` names.  The tracer records the module's structure and turns each
parameter into a ``param`` op that names a store entry; the data is read (memory-mapped or
dequantized) only when something runs the graph.  Buffers (rotary ``inv_freq``, BERT's
``position_ids``) are small and computed by the module's constructor, so they are real tensors.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from irlm.errors import IRLMError
from irlm.weights import WeightStore


class ModelLoadError(IRLMError):
    """A model source (HF directory, safetensors file, GGUF file, model.py) cannot be loaded."""


@dataclass
class LoadedModel:
    """A model ready to trace.

    ``module``: the model, parameters on ``meta``, buffers real.
    ``weights``: the store backing every ``state_dict`` entry, or None when the module holds
    its own data (a model.py that builds real tensors).
    ``config``: the Hugging Face config (None for a model.py).
    ``source``: the path the model came from; ``format``: ``hf``, ``safetensors``, ``gguf`` or
    ``model.py``.
    ``notes``: things the user may want to know that are not errors (ignored tensors, ...).
    """
    module: torch.nn.Module
    weights: Optional[WeightStore]
    config: Any
    source: Path
    format: str
    chat_template: Optional[str] = None
    notes: list[str] = field(default_factory=list)
    # Building a tokenizer costs about a second for a 50k vocabulary and compile does not need
    # it, so loaders hand over a function and the tokenizer is built on first use.
    tokenizer_loader: Optional[Callable[[], Any]] = field(default=None, repr=False)
    example_inputs_fn: Optional[Callable[[], Any]] = field(default=None, repr=False)

    @cached_property
    def tokenizer(self):
        """The tokenizer (a ``transformers.PreTrainedTokenizerFast``); None if there is none.
        A tokenizer the file describes badly (a corrupted BPE merge, ...) is one
        :class:`ModelLoadError` line."""
        if self.tokenizer_loader is None:
            return None
        try:
            return self.tokenizer_loader()
        except ModelLoadError:
            raise
        except Exception as e:       # tokenizers / transformers raise many types
            detail = " ".join(str(e).split())[:300]
            raise ModelLoadError(f"{self.source}: cannot build its tokenizer: "
                                 f"{type(e).__name__}: {detail}") from None

    def example_inputs(self):
        """Example inputs for tracing: a tuple of positional inputs, or a dict of keyword
        inputs (causal LMs: ``input_ids``, ``attention_mask``, ``position_ids``)."""
        if self.example_inputs_fn is None:
            raise ModelLoadError(f"{self.source}: no example inputs are known for this model "
                                 f"(a model.py must define example_inputs())")
        return self.example_inputs_fn()

    def describe(self) -> str:
        """One line: ``gguf llama (LlamaForCausalLM), 272 weights, 135M parameters``."""
        kind = getattr(self.config, "model_type", None)
        n = sum(p.numel() for p in self.module.parameters())
        parts = [self.format + (f" {kind}" if kind else ""), f"({type(self.module).__name__})"]
        if self.weights is not None:
            parts.append(f"{len(self.weights)} weights,")
        parts.append(f"{_human(n)} parameters")
        return " ".join(parts)


def _human(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.0f}{unit}" if n >= 10 * size else f"{n / size:.1f}{unit}"
    return str(n)


def load_model(path, *, config=None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load any supported source, chosen by what ``path`` is:

    a directory → Hugging Face checkpoint; ``*.gguf`` → GGUF; ``*.py`` → model file;
    ``*.safetensors`` → bare safetensors (needs ``config``: a config.json path or HF config).
    """
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file or directory")
    if path.is_dir():
        from .hf import load_hf_directory
        return load_hf_directory(path, dtype=dtype)
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        from .gguf import load_gguf
        return load_gguf(path, dtype=dtype)
    if suffix == ".py":
        from .model_file import load_model_file
        return load_model_file(path)
    if suffix == ".safetensors":
        if config is None:
            raise ModelLoadError(f"{path}: a bare safetensors file needs a config "
                                 f"(pass config= a config.json path)")
        from .hf import load_safetensors
        return load_safetensors(path, config, dtype=dtype)
    raise ModelLoadError(f"{path}: cannot tell what kind of model this is (expected a Hugging "
                         f"Face directory, a .gguf, a .safetensors or a .py file)")
