"""What ``irlm.compile`` accepts as a model, and loading it.

A source is a path (chosen by what it is: a directory → Hugging Face checkpoint, ``*.gguf``,
``*.py`` model file, ``*.safetensors`` with ``config=``), a :class:`Source` that forces the
format (what ``irlm compile --hf/--gguf/--safetensors`` give), an already loaded
:class:`~irlm.frontends.loaded_model.LoadedModel`, or an ``nn.Module`` holding its own weights
(a Hugging Face model built in Python).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import IRLMError
from .config import existing

FORMATS = ("hf", "gguf", "safetensors", "model.py")


@dataclass(frozen=True)
class Source:
    """A model path and the format to read it as (None: guessed from the path).

    ``config``: the config.json of a bare safetensors file.  ``flag``: how errors name the
    path (``--gguf`` for the CLI)."""
    path: Union[str, Path]
    format: Optional[str] = None
    config: Optional[Union[str, Path]] = None
    flag: Optional[str] = None


def load_source(source: Any, dtype: str):
    """The :class:`LoadedModel` of ``source`` (see the module doc)."""
    import torch
    from irlm.frontends.loaded_model import LoadedModel
    if isinstance(source, LoadedModel):
        return source
    if isinstance(source, torch.nn.Module):
        return _from_module(source)
    if not isinstance(source, Source):
        source = Source(source)
    torch_dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[dtype]
    fmt, flag = source.format, source.flag
    if fmt is not None and fmt not in FORMATS:
        raise IRLMError(f"source format '{fmt}': not one of {', '.join(FORMATS)}")
    if fmt == "hf":
        from irlm.frontends.hf import load_hf_directory
        return load_hf_directory(existing(source.path, flag or "source"), dtype=torch_dtype)
    if fmt == "gguf":
        from irlm.frontends.gguf import load_gguf
        return load_gguf(existing(source.path, flag or "source"), dtype=torch_dtype)
    if fmt == "safetensors" or (fmt is None and source.config is not None):
        from irlm.frontends.hf import load_safetensors
        if source.config is None:
            raise IRLMError(f"{source.path}: a bare safetensors file needs a config "
                            f"(Source(path, config='config.json'))")
        return load_safetensors(existing(source.path, flag or "source"),
                                existing(source.config, "--config" if flag else "config"),
                                dtype=torch_dtype)
    from irlm.frontends.loaded_model import load_model
    return load_model(existing(source.path, flag or "source"), dtype=torch_dtype)


def module_dtype(module) -> str:
    """The element dtype (f32, f16, bf16) most of a module's floating-point parameters have
    (by element count: a bf16 model may keep its norms in f32); f32 when it has none."""
    import collections

    import torch
    names = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}
    counts = collections.Counter()
    for p in module.parameters():
        if p.is_floating_point():
            counts[names.get(p.dtype, "f32")] += p.numel()
    return counts.most_common(1)[0][0] if counts else "f32"


def _from_module(module):
    """An nn.Module with real weights (e.g. ``AutoModelForCausalLM.from_config(...)``)."""
    from irlm.frontends.loaded_model import LoadedModel
    config = getattr(module, "config", None)
    example = None
    if config is not None and hasattr(module, "get_input_embeddings"):
        from irlm.frontends.hf import example_token_inputs

        def example():
            return example_token_inputs(config, module)
    return LoadedModel(module=module, weights=None, config=config,
                       source=Path(f"<{type(module).__name__}>"), format="module",
                       example_inputs_fn=example)
