"""GGUF files (llama.cpp's format): hyper-parameters, tokenizer and quantized tensors in one file.

Loading a GGUF means undoing what llama.cpp's converter did to a Hugging Face checkpoint:

* hyper-parameters were renamed (``llama.embedding_length`` for ``hidden_size``): each
  architecture's :class:`GGUFArchitecture` entry maps them back to a transformers config;
* tensors were renamed (``blk.0.attn_q.weight`` for ``model.layers.0.self_attn.q_proj.weight``):
  the ``gguf`` package's own name table (``gguf.get_tensor_name_map``) maps them back;
* some tensors were rearranged: for Llama the converter permutes the rows of Wq and Wk so that
  each rotary pair is adjacent (llama.cpp's "interleaved" RoPE), where transformers' RoPE
  rotates the first half of a head against the second half (``rotate_half``);
  :func:`unpermute_rotary_rows` restores transformers' order;
* tensors were quantized: each is dequantized by ``gguf.quants.dequantize`` on first use, one
  tensor at a time, so loading costs nothing until something reads the weights.

Reading the file itself (header, metadata, tensor table) is :mod:`.gguf_file`.

The lm head is tied to the token embedding when the file has no ``output.weight``.
Adding an architecture is one :data:`ARCHITECTURES` entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from irlm.types import DType, TensorType
from irlm.weights import WeightStore

from .gguf_file import GGUFFile
from .loaded_model import LoadedModel, ModelLoadError

# A fix takes the dequantized tensor (torch order) and the transformers config.
TensorFix = Callable[[torch.Tensor, Any], torch.Tensor]


# ----- what llama.cpp's converter did to each architecture ------------------------------------
def unpermute_rotary_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of a Q or K projection (weight rows, or bias).

    llama.cpp stores each head's rows as (d/2 pairs) x 2 interleaved; transformers stores them as
    2 halves x d/2.  The converter did ``reshape(heads, 2, d/2, ...).swapaxes(1, 2)``; this is
    its inverse, ``reshape(heads, d/2, 2, ...).swapaxes(1, 2)``.
    """
    rows = w.shape[0]
    if rows % (2 * n_heads):
        raise ModelLoadError(f"cannot un-permute a rotary projection with {rows} rows over "
                             f"{n_heads} heads (rows must be a multiple of 2 x heads)")
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape).contiguous()


def _unpermute_q(w: torch.Tensor, config) -> torch.Tensor:
    return unpermute_rotary_rows(w, config.num_attention_heads)


def _unpermute_k(w: torch.Tensor, config) -> torch.Tensor:
    return unpermute_rotary_rows(w, config.num_key_value_heads)


def _llama_config_from_tensors(names: set[str]) -> dict:
    # LlamaConfig has switches for biases the GGUF metadata does not state; the tensors do.
    return {"attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": "blk.0.ffn_up.bias" in names}


# GGUF key (after "<arch>.") → transformers config attribute, shared by decoder-only LLMs.
_DECODER_HPARAMS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture (``general.architecture``) maps onto transformers."""
    model_type: str                                  # the transformers model_type
    hparams: dict[str, str] = field(default_factory=lambda: dict(_DECODER_HPARAMS))
    required: tuple[str, ...] = ("block_count", "embedding_length", "feed_forward_length",
                                 "attention.head_count")
    # GGUF tensor-name suffix → fix undoing a converter transform
    tensor_fixes: dict[str, TensorFix] = field(default_factory=dict)
    # config facts that only the tensor list tells (biases present or not)
    config_from_tensors: Callable[[set[str]], dict] = lambda names: {}


ARCHITECTURES: dict[str, GGUFArchitecture] = {
    "llama": GGUFArchitecture(
        "llama",
        tensor_fixes={"attn_q.weight": _unpermute_q, "attn_k.weight": _unpermute_k,
                      "attn_q.bias": _unpermute_q, "attn_k.bias": _unpermute_k},
        config_from_tensors=_llama_config_from_tensors),
    # llama.cpp's Qwen converters do not permute: Qwen's RoPE runs in transformers' order.
    "qwen2": GGUFArchitecture("qwen2"),
    "qwen3": GGUFArchitecture("qwen3"),
}


def dequantizable(qtype) -> bool:
    """Whether ``gguf.quants.dequantize`` handles this GGML type."""
    import gguf
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    return isinstance(getattr(gguf.quants, qtype.name, None), type)


# ----- GGUF → transformers config -------------------------------------------------------------
def gguf_config(file: GGUFFile, arch: Optional[GGUFArchitecture] = None):
    """The transformers config a GGUF file's metadata describes."""
    import transformers
    name = file.architecture
    arch = arch or _architecture(file)
    meta = file.metadata
    missing = [k for k in arch.required if f"{name}.{k}" not in meta]
    if missing:
        keys = ", ".join(f"{name}.{k}" for k in missing)
        raise ModelLoadError(f"{file.path}: metadata lacks {keys}, which a {name} model needs")
    values: dict[str, Any] = {}
    for key, attr in arch.hparams.items():
        if f"{name}.{key}" in meta:
            values[attr] = meta[f"{name}.{key}"]
    from .hyperparameters import check_sizes
    check_sizes(values, str(file.path))           # before dividing by any of them
    values.setdefault("num_key_value_heads", values["num_attention_heads"])
    if "token_embd.weight" in file.tensors:
        # the embedding is what the module must match; vocab_size metadata is optional
        values.setdefault("vocab_size", file.torch_shape("token_embd.weight")[0])
    head_dim = values.setdefault("head_dim", values["hidden_size"] // values["num_attention_heads"])
    rotary = meta.get(f"{name}.rope.dimension_count")
    if rotary is not None and int(rotary) != head_dim:
        raise ModelLoadError(f"{file.path}: {name}.rope.dimension_count is {rotary} but heads "
                             f"are {head_dim} wide; partial rotary embeddings are not supported "
                             f"for {name}")
    values.update(_rope_scaling(file, name))
    values["tie_word_embeddings"] = "output.weight" not in file.tensors
    for key, attr in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                      ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            values[attr] = int(meta[f"tokenizer.ggml.{key}"])
    values.update(arch.config_from_tensors(set(file.tensors)))
    try:
        return transformers.AutoConfig.for_model(arch.model_type, **values)
    except Exception as e:
        raise ModelLoadError(f"{file.path}: its hyper-parameters do not make a valid "
                             f"{arch.model_type} config: {type(e).__name__}: {e}") from None


def _rope_scaling(file: GGUFFile, name: str) -> dict:
    kind = file.metadata.get(f"{name}.rope.scaling.type")
    if kind in (None, "none"):
        if "rope_freqs.weight" in file.tensors:
            raise ModelLoadError(f"{file.path}: has a rope_freqs.weight tensor (Llama 3.1-style "
                                 f"RoPE scaling), which irlm's GGUF loader does not support yet")
        return {}
    if kind == "linear":
        factor = float(file.metadata[f"{name}.rope.scaling.factor"])
        return {"rope_scaling": {"rope_type": "linear", "factor": factor}}
    raise ModelLoadError(f"{file.path}: RoPE scaling '{kind}' ({name}.rope.scaling.type) is not "
                         f"supported (supported: none, linear)")


def _architecture(file: GGUFFile) -> GGUFArchitecture:
    name = file.architecture
    if name not in ARCHITECTURES:
        raise ModelLoadError(f"{file.path}: GGUF architecture '{name}' is not supported "
                             f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[name]


# ----- GGUF tensors → module weights ----------------------------------------------------------
def gguf_tensor_names(module: torch.nn.Module, arch_name: str, num_layers: int) -> dict[str, str]:
    """``{module state_dict name: GGUF tensor name}`` from the gguf package's name table."""
    import gguf
    arch_ids = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
    table = gguf.get_tensor_name_map(arch_ids[arch_name], num_layers)
    out = {}
    for name in module.state_dict():
        base, dot, suffix = name.rpartition(".")
        mapped = table.get_name(base) if dot else None
        if mapped is not None:
            out[name] = f"{mapped}.{suffix}"
    return out


def gguf_weights(file: GGUFFile, module: torch.nn.Module, config,
                 arch: GGUFArchitecture) -> WeightStore:
    """A store keyed by ``module``'s state_dict names whose entries dequantize GGUF tensors."""
    from .hf import tied_weight_aliases
    names = gguf_tensor_names(module, file.architecture, config.num_hidden_layers)
    aliases = tied_weight_aliases(module)
    buffers = {n for n, _ in module.named_buffers()}
    store = WeightStore()
    used: set[str] = set()
    for name, tensor in module.state_dict(keep_vars=True).items():
        if name in aliases:
            continue
        gname = names.get(name)
        if gname is None or gname not in file.tensors:
            if name in buffers and tensor.device.type != "meta":
                store.add_tensor(name, tensor.detach(), source="computed by the model")
                continue
            looked = f" (looked for '{gname}')" if gname else ""
            raise ModelLoadError(f"{file.path}: no tensor for weight '{name}' of "
                                 f"{type(module).__name__}{looked}")
        shape = file.torch_shape(gname)
        if shape != tuple(tensor.shape):
            raise ModelLoadError(f"{file.path}: tensor '{gname}' has shape {shape} but "
                                 f"'{name}' of {type(module).__name__} is {tuple(tensor.shape)}")
        qtype = file.tensors[gname].ggml_type
        if not dequantizable(qtype):
            raise ModelLoadError(f"{file.path}: tensor '{gname}' is stored as {qtype.name}, "
                                 f"which the gguf package cannot dequantize")
        used.add(gname)
        fix = arch.tensor_fixes.get(gname.split(".", 2)[-1] if gname.startswith("blk.") else gname)
        want = TensorType(tuple(tensor.shape), DType.from_torch(tensor.dtype))
        store.add_lazy(name, want, _tensor_loader(file, gname, fix, config, tensor.dtype),
                       f"{file.path.name}:{gname} ({qtype.name})")
    for target, source in aliases.items():
        store.add_derived(target, store.type_of(source), [source], lambda t: t, how="tied")
    unused = sorted(set(file.tensors) - used)
    if unused:
        more = f" and {len(unused) - 1} more" if len(unused) > 1 else ""
        raise ModelLoadError(f"{file.path}: tensor '{unused[0]}'{more} has no place in "
                             f"{type(module).__name__}; refusing to load a model that would "
                             f"silently drop weights")
    return store


def _tensor_loader(file: GGUFFile, gname: str, fix: Optional[TensorFix], config,
                   dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        w = file.dequantize(gname)
        if fix is not None:
            w = fix(w, config)
        return w.to(dtype)
    return load


# ----- the loader -----------------------------------------------------------------------------
def load_gguf(path, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A GGUF file as a meta-device transformers module + lazily dequantized weights."""
    from .hf import build_meta_module, example_token_inputs
    from .tokenizer import gguf_tokenizer
    file = GGUFFile(path)
    arch = _architecture(file)
    config = gguf_config(file, arch)
    from .hyperparameters import check_hyperparameters
    check_hyperparameters(config, {n: t.shape for n, t in file.tensors.items()}, str(file.path))
    module = build_meta_module(config, dtype)
    store = gguf_weights(file, module, config, arch)
    meta = file.metadata
    return LoadedModel(module=module, weights=store, config=config, source=file.path,
                       format="gguf", chat_template=meta.get("tokenizer.chat_template"),
                       tokenizer_loader=lambda: gguf_tokenizer(meta, file.path),
                       example_inputs_fn=lambda: example_token_inputs(config, module))
