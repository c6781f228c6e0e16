"""Checking a model's hyper-parameters before anything is built from them.

A config.json or a GGUF file's metadata is data: ``num_hidden_layers = 10**7`` would make
transformers build ten million layer objects (gigabytes, even on the meta device), a head count
of 0 divides by zero, ``"32"`` instead of ``32`` fails deep inside transformers.  Every loader
calls :func:`check_hyperparameters` on the config it made, with the shapes of the tensors the
checkpoint actually holds, before the module is built: each problem is one
:class:`ModelLoadError` line naming the field and the file.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

from .loaded_model import ModelLoadError

#: the largest value accepted for each size (far above any released model)
LIMITS = {
    "num_hidden_layers": 1 << 12, "hidden_size": 1 << 17, "intermediate_size": 1 << 20,
    "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12, "head_dim": 1 << 12,
    "vocab_size": 1 << 23, "max_position_embeddings": 1 << 24,
}
# A layer index in a tensor name: model.layers.3.x, transformer.h.3.x, blk.3.x, ...
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blk|blocks|block)\.(\d+)\.")


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def check_sizes(values: Mapping[str, Any], where: str) -> dict[str, int]:
    """The sizes of :data:`LIMITS` found in ``values`` (a dict of hyper-parameters), each
    checked to be an int in [1, limit]."""
    out = {}
    for name, top in LIMITS.items():
        v = values.get(name)
        if v is None:
            continue
        if not _is_int(v) or not 1 <= v <= top:
            raise ModelLoadError(f"{where}: {name} must be an int in [1, {top}], got {v!r:.40}")
        out[name] = v
    return out


def check_hyperparameters(config, tensor_shapes: Mapping[str, tuple], where: str) -> None:
    """Refuse sizes that are not positive ints within :data:`LIMITS`, heads that do not divide,
    and more layers than the checkpoint has tensors for."""
    text = getattr(config, "get_text_config", lambda **_: config)(decoder=True)
    values = check_sizes({name: getattr(text, name, None) for name in LIMITS}, where)
    heads, kv = values.get("num_attention_heads"), values.get("num_key_value_heads")
    if heads and kv and heads % kv:
        raise ModelLoadError(f"{where}: num_attention_heads {heads} is not a multiple of "
                             f"num_key_value_heads {kv}")
    hidden = values.get("hidden_size")
    if heads and hidden and "head_dim" not in values and hidden % heads:
        raise ModelLoadError(f"{where}: hidden_size {hidden} is not a multiple of "
                             f"num_attention_heads {heads}")
    layers = values.get("num_hidden_layers")
    indices = {int(m.group(1)) for n in tensor_shapes for m in [_LAYER_INDEX.search(n)] if m}
    if layers and indices and layers > max(indices) + 1:
        raise ModelLoadError(f"{where}: num_hidden_layers is {layers} but the checkpoint holds "
                             f"tensors for {max(indices) + 1} layers")
