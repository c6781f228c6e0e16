"""Hugging Face checkpoints: a model directory (``config.json`` + safetensors, sharded or not,
+ tokenizer files) or a bare ``.safetensors`` file with a separate ``config.json``.

The module is built from the config by transformers with its parameters on the ``meta``
device; the checkpoint's tensors are registered memory-mapped in a
:class:`~irlm.weights.WeightStore` under the module's own ``state_dict`` names.  Checkpoints do
not always spell those names the same way (a ``BertModel`` saved with or without the ``bert.``
prefix, old ``LayerNorm.gamma``/``beta`` names, an ``lm_head`` tied to the embedding and not
stored), so :func:`bind_checkpoint` maps one onto the other and names any tensor it cannot find.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Union

import torch

from irlm.types import DType, TensorType
from irlm.weights import WeightStore

from .loaded_model import LoadedModel, ModelLoadError

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


# ----- config ---------------------------------------------------------------------------------
#: config.json larger than this is refused unread (real ones are a few kB)
MAX_CONFIG_BYTES = 16 << 20

def read_config(path: Union[str, Path]):
    """A transformers config from a ``config.json`` file (or a directory holding one)."""
    import transformers
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such config file (a Hugging Face model needs its "
                             f"config.json)")
    from irlm.input_limits import parse_json_bounded, read_bounded
    data = parse_json_bounded(read_bounded(path, MAX_CONFIG_BYTES, "config", ModelLoadError),
                              str(path), max_depth=64, error=ModelLoadError)
    if not isinstance(data, dict) or "model_type" not in data:
        raise ModelLoadError(f"{path}: has no \"model_type\" key, so irlm cannot tell which "
                             f"transformers architecture it describes")
    model_type = data.pop("model_type")
    if not isinstance(model_type, str):
        raise ModelLoadError(f"{path}: model_type must be a string, got {model_type!r:.40}")
    from .hyperparameters import check_sizes
    check_sizes(data, str(path))                 # "32" or 0 where a size belongs
    try:
        return transformers.AutoConfig.for_model(model_type, **data)
    except ValueError as e:
        if model_type not in transformers.CONFIG_MAPPING:
            raise ModelLoadError(f"{path}: model_type \"{model_type}\" is not an architecture "
                                 f"this transformers ({transformers.__version__}) knows") from None
        raise ModelLoadError(f"{path}: not a valid {model_type} config: "
                             f"{' '.join(str(e).split())}") from None
    except Exception as e:       # e.g. TypeError on "32" where a number belongs
        detail = " ".join(str(e).split())           # one line, whatever transformers wrote
        raise ModelLoadError(f"{path}: not a valid {model_type} config: "
                             f"{type(e).__name__}: {detail}") from None


# ----- the module skeleton --------------------------------------------------------------------
def build_meta_module(config, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The transformers model for ``config`` with parameters on ``meta`` and real buffers.

    The class is the one ``config.architectures`` names (what the checkpoint was saved from),
    else the causal-LM class for the model type, else the bare ``AutoModel``.  The KV cache is
    switched off: irlm traces the stateless forward and adds its own paged cache later.
    """
    from accelerate import init_empty_weights
    cls = _model_class(config)
    if hasattr(config, "use_cache"):
        config.use_cache = False
    try:
        # include_buffers=False: rotary inv_freq and position ids are computed by the
        # constructor and the traced graph needs their values; they are tiny.
        with init_empty_weights(include_buffers=False):
            module = cls._from_config(config, dtype=dtype)
    except Exception as e:  # a config transformers rejects (inconsistent sizes, ...)
        raise ModelLoadError(f"transformers cannot build {cls.__name__} from this config: "
                             f"{type(e).__name__}: {e}") from None
    if hasattr(module, "tie_weights"):
        module.tie_weights()  # share tied Parameters as transformers' loading would
    module.eval()
    return module


def _model_class(config):
    import transformers
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise ModelLoadError(f"transformers has no model class for model_type "
                         f"\"{config.model_type}\"")


def tied_weight_aliases(module: torch.nn.Module) -> dict[str, str]:
    """``{target: source}`` for state_dict entries that share another entry's data (an LM head
    tied to the input embedding), as transformers would tie them for this config."""
    expanded = getattr(module, "get_expanded_tied_weights_keys", None)
    if expanded is not None:
        try:
            return dict(expanded())
        except TypeError:
            pass
    # Fallback for models without the transformers-5 helper: tie, then find shared Parameters.
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    first: dict[int, str] = {}
    out: dict[str, str] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[name] = first[id(p)]
        else:
            first[id(p)] = name
    return out


# ----- binding checkpoint tensors to module names ---------------------------------------------
def bind_checkpoint(module: torch.nn.Module, checkpoint: WeightStore,
                    where: str) -> tuple[WeightStore, list[str]]:
    """A store keyed by ``module``'s state_dict names whose entries read ``checkpoint``'s tensors.

    ``where`` names the checkpoint in errors (a file or directory).  Tensors are cast lazily to
    the module's dtype when the checkpoint stores another.  Returns the store and notes about
    checkpoint tensors the module does not use.
    """
    state = module.state_dict(keep_vars=True)
    aliases = tied_weight_aliases(module)
    prefix = getattr(module, "base_model_prefix", "") or ""
    available = set(checkpoint.names())
    buffers = {n for n, _ in module.named_buffers()}
    store = WeightStore()
    used: set[str] = set()
    missing: list[str] = []
    for name, tensor in state.items():
        if name in aliases:
            continue
        want = TensorType(tuple(tensor.shape), DType.from_torch(tensor.dtype))
        found = next((c for c in _checkpoint_spellings(name, prefix) if c in available), None)
        if found is None:
            if name in buffers and tensor.device.type != "meta":
                store.add_tensor(name, tensor.detach(), source="computed by the model")
                continue
            missing.append(name)
            continue
        entry = checkpoint.entry(found)
        if tuple(entry.type.shape) != tuple(want.shape):
            raise ModelLoadError(
                f"{entry.source}: tensor '{found}' has shape {_shape(entry.type.shape)} but "
                f"{type(module).__name__} (from the config) expects '{name}' to be "
                f"{_shape(want.shape)}; the checkpoint does not match its config")
        used.add(found)
        if entry.type.dtype is want.dtype:
            store.add_lazy(name, want, entry.loader, entry.source)
        else:
            torch_dtype = want.dtype.torch
            store.add_lazy(name, want, lambda load=entry.loader: load().to(torch_dtype),
                           f"{entry.source} ({entry.type.dtype.value} cast to {want.dtype.value})")
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        sample = ", ".join(sorted(available)[:3])
        raise ModelLoadError(
            f"{where}: no tensor for weight '{missing[0]}'{more} of {type(module).__name__} "
            f"(looked for {' / '.join(repr(c) for c in _checkpoint_spellings(missing[0], prefix))}"
            f"; the checkpoint has {len(available)} tensors, e.g. {sample})")
    for target, source in aliases.items():
        if source not in store:
            raise ModelLoadError(f"{where}: '{target}' is tied to '{source}', which the "
                                 f"checkpoint does not provide")
        store.add_derived(target, store.type_of(source), [source], lambda t: t,
                          how="tied")
    notes = []
    unused = sorted(available - used)
    if unused:
        more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
        notes.append(f"{where}: ignored {len(unused)} checkpoint tensor(s) the model does not "
                     f"use: {', '.join(unused[:3])}{more}")
    return store, notes


def _checkpoint_spellings(name: str, prefix: str) -> list[str]:
    """The names a checkpoint may store module entry ``name`` under, most likely first."""
    bases = [name]
    if prefix:
        if name.startswith(prefix + "."):
            bases.append(name[len(prefix) + 1:])  # a head model loading a bare base checkpoint
        else:
            bases.append(f"{prefix}.{name}")  # a bare base model loading a head checkpoint
    out = list(bases)
    for b in bases:  # checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta
        if "LayerNorm." in b or "layer_norm." in b:
            if b.endswith(".weight"):
                out.append(b[:-len("weight")] + "gamma")
            elif b.endswith(".bias"):
                out.append(b[:-len("bias")] + "beta")
    return out


def _shape(shape) -> str:
    return "(" + ", ".join(str(d) for d in shape) + ")"


# ----- checkpoint files -----------------------------------------------------------------------
def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory: the shards its index names, or the one file."""
    index = directory / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index}: not a safetensors index (expected a JSON object "
                                 f"with a \"weight_map\"): {e}") from None
        files = [directory / f for f in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{index}: names shard {f.name}, which is not in "
                                     f"{directory}")
        return files
    single = directory / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if len(found) == 1:
        return found
    if (directory / "pytorch_model.bin").exists():
        raise ModelLoadError(f"{directory}: has only pytorch_model.bin; irlm reads safetensors "
                             f"(save the model with save_pretrained(..., "
                             f"safe_serialization=True))")
    raise ModelLoadError(f"{directory}: has no {SAFETENSORS_FILE} or {SAFETENSORS_INDEX}")


def open_checkpoint(files: Iterable[Path]) -> WeightStore:
    """Every tensor of the safetensors ``files``, memory-mapped, under its checkpoint name."""
    store = WeightStore()
    for f in files:
        store.add_safetensors(f)
    return store


# ----- loaders --------------------------------------------------------------------------------
def load_hf_directory(directory, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A Hugging Face model directory: ``config.json``, safetensors, ``tokenizer.json``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: not a directory (a Hugging Face model is a "
                             f"directory with config.json and safetensors)")
    from .tokenizer import has_hf_tokenizer
    config = read_config(directory)
    files = safetensors_files(directory)
    return _load(config, files, directory, "hf", dtype,
                 tokenizer_dir=directory if has_hf_tokenizer(directory) else None)


def load_safetensors(file, config, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A bare safetensors file; ``config`` is a config.json path or a transformers config."""
    file = Path(file)
    if not file.is_file():
        raise ModelLoadError(f"{file}: no such safetensors file")
    if isinstance(config, (str, Path)):
        config = read_config(config)
    from .tokenizer import has_hf_tokenizer
    # a safetensors file next to its tokenizer files (a model directory used file by file)
    tokenizer_dir = file.parent if has_hf_tokenizer(file.parent) else None
    return _load(config, [file], file, "safetensors", dtype, tokenizer_dir=tokenizer_dir)


def _load(config, files: list[Path], source: Path, fmt: str, dtype: torch.dtype,
          tokenizer_dir: Optional[Path]) -> LoadedModel:
    from .hyperparameters import check_hyperparameters
    from .tokenizer import load_hf_tokenizer, read_chat_template
    where = str(files[0]) if len(files) == 1 else f"{source} ({len(files)} shards)"
    checkpoint = open_checkpoint(files)          # memory-mapped: names and shapes only
    check_hyperparameters(config, {n: checkpoint.type_of(n).shape for n in checkpoint.names()},
                          str(source))
    module = build_meta_module(config, dtype)
    store, notes = bind_checkpoint(module, checkpoint, where)
    loader = (lambda: load_hf_tokenizer(tokenizer_dir)) if tokenizer_dir is not None else None
    template = read_chat_template(tokenizer_dir) if tokenizer_dir is not None else None
    return LoadedModel(module=module, weights=store, config=config, source=source, format=fmt,
                       chat_template=template, notes=notes, tokenizer_loader=loader,
                       example_inputs_fn=lambda: example_token_inputs(config, module))


def example_token_inputs(config, module: Optional[torch.nn.Module] = None, batch: int = 2,
                         seq: int = 8):
    """Example inputs for tracing a transformers model: deterministic ids below the vocab size.

    A causal LM gets keyword inputs ``input_ids``, an all-ones ``attention_mask`` and explicit
    ``position_ids``: the inference form reads positions from ``position_ids``, and an explicit
    mask keeps transformers from deriving packed-sequence masks from the positions (ops that
    only training needs).  Other models (encoders) get ``(input_ids,)``.
    Batch and sequence sizes are both above 1 because torch.export specializes a dimension it
    sees as 1 to the constant 1.
    """
    vocab = int(getattr(config, "vocab_size", 0) or 1000)
    ids = (torch.arange(batch * seq, dtype=torch.int64).reshape(batch, seq) * 7 + 3) % vocab
    if module is None or not is_causal_lm(module):
        return (ids,)
    return {"input_ids": ids,
            "attention_mask": torch.ones(batch, seq, dtype=torch.int64),
            "position_ids": torch.arange(seq, dtype=torch.int64).repeat(batch, 1)}


def is_causal_lm(module: torch.nn.Module) -> bool:
    """Whether ``module`` is one of transformers' causal-LM classes (has an LM head)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING
    try:
        classes = set(MODEL_FOR_CAUSAL_LM_MAPPING.values())
    except Exception:  # a mapping entry whose module cannot import; fall back to the name
        classes = set()
    return type(module) in classes or type(module).__name__.endswith("ForCausalLM")
