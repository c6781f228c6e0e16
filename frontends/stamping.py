"""Tracing a deep Hugging Face model by tracing three of its layers and stamping the rest.

``torch.export`` costs time in proportion to the ops it traces (symbolic-shape bookkeeping per
op), and a decoder repeats one layer N times: SmolLM2's 30 layers are 2,001 traced ops, 12 s of
a 17 s compile on one core.  :func:`trace_stamped` traces the model with only its first
:data:`TRACED_LAYERS` layers (the real modules and weights: the layer list is swapped for a
shorter one during the export, then restored), and builds the full graph by copying layer 1's
ops for layers 3..N-1 -- params renamed ``model.layers.{i}.…``, locations renamed, each layer's
inputs wired to the previous layer's outputs -- with the ops after the layers (final norm, LM
head) reading the last layer.  The result is the graph the full trace gives, op for op: same
ops in the same order, attributes, types, locations, param names and weight-store entries.

It stamps only what it can show to repeat, and otherwise runs the full trace:

* the config declares no per-layer variation (``layer_types`` with distinct values, a sliding
  window on only some layers, MoE on every k-th layer, dense first layers, layers without
  RoPE, any list with one entry per layer that is not constant, ...);
* layers 1..N-1 are the same module tree: classes, non-tensor attributes (a layer index
  excepted, when the layer's code reads it only to address the KV cache), parameter and buffer
  names, shapes and dtypes, integer buffers' values; none shares a module or a tensor;
* the code of the module holding the layers only iterates the list (no ``len(self.layers)``,
  no ``self.layers[-1]``), so it cannot tell the short list from the whole one; the config is
  left as it is (``num_hidden_layers`` included), so what the code reads from it is the same;
* the three traced layers' ops split into contiguous runs by their ``model.layers.{i}``
  locations, with nothing between them, and stamping layer 2 from layer 1 reproduces the
  traced layer 2 exactly (and the ops after it).

Anything else -- a short trace that fails, a param it cannot bind to the model's own tensor --
falls back to the full trace too: the output never differs from it.
"""
from __future__ import annotations

import ast
import contextlib
import functools
import inspect
import re
import textwrap
from typing import Any, Mapping, Optional

import torch

from irlm.ir import Graph, Location, Op, Value
from irlm.types import DType, TensorType
from irlm.weights import WeightStore

from .trace import trace

__all__ = ["trace_stamped", "TRACED_LAYERS", "MIN_LAYERS"]

#: layers traced for real: layer 0 (whose inputs come from the embeddings), layer 1 (the
#: template) and layer 2 (the check that stamping layer 1 reproduces it)
TRACED_LAYERS = 3
#: below this many layers the short trace saves (next to) nothing: trace them all
MIN_LAYERS = 5

#: attributes that hold a layer's own index (``self.layer_idx = layer_idx``)
_INDEX_ATTRS = frozenset({"layer_idx", "layer_id", "layer_index", "layer_number", "layer_num",
                          "block_idx"})


def trace_stamped(module, example_inputs, *, dynamic: bool = True,
                  dims: Optional[Mapping[str, tuple[int, int]]] = None,
                  weights: Optional[WeightStore] = None,
                  name: str = "main") -> tuple[Graph, str]:
    """:func:`irlm.frontends.trace` of ``module`` (same arguments, same graph), stamping its
    decoder layers when they provably repeat (see the module doc).

    Returns the graph and one line saying what happened: ``"stamped 27 of 30 layers
    (model.layers) from a 3-layer trace"`` or ``"full trace: <why stamping did not apply>"``.
    """
    graph, why = _try_stamping(module, example_inputs, dynamic, dims, weights, name)
    if graph is not None:
        return graph, why
    return trace(module, example_inputs, dynamic=dynamic, dims=dims, weights=weights,
                 name=name), f"full trace: {why}"


def _try_stamping(module, example_inputs, dynamic, dims, weights, name):
    """(the stamped graph, what was done), or (None, why not).  Nothing here may fail a
    compile: an error in the short trace or in stamping is a reason to trace it all (whose
    own errors are then the ones reported)."""
    try:
        plan, why = _stamp_plan(module)
    except Exception as e:  # noqa: BLE001 - an unusual model: trace it all
        return None, f"cannot inspect the model's layers ({type(e).__name__}: {_first_line(e)})"
    if plan is None:
        return None, why
    try:
        with plan.shortened():
            short = trace(module, example_inputs, dynamic=dynamic, dims=dims, weights=None,
                          name=name)
    except Exception as e:  # noqa: BLE001 - whatever went wrong, the full trace decides
        return None, (f"the {TRACED_LAYERS}-layer trace failed "
                      f"({type(e).__name__}: {_first_line(e)})")
    try:
        graph, why = stamp_layers(short, plan.prefix, plan.num_layers)
        if graph is None:
            return None, why
        why = _bind_weights(graph, short.weights, plan.tensors(), weights)
    except Exception as e:  # noqa: BLE001 - a stamping bug must not cost a compile
        return None, f"stamping failed ({type(e).__name__}: {_first_line(e)})"
    if why is not None:
        return None, why
    return graph, (f"stamped {plan.num_layers - TRACED_LAYERS} of {plan.num_layers} layers "
                   f"({plan.prefix}) from a {TRACED_LAYERS}-layer trace")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:200] if text else "no message"


# ----- which models: the layer list, the config, the layer modules ----------------------------

class _StampPlan:
    """The decoder-layer ModuleList of a model: where it hangs and how to shorten it."""

    def __init__(self, module, prefix: str, parent, attr: str, layers):
        self.module, self.prefix, self.parent, self.attr, self.layers = \
            module, prefix, parent, attr, layers
        self.num_layers = len(layers)

    @contextlib.contextmanager
    def shortened(self):
        """The model with its first TRACED_LAYERS layers only; its own list back (the same
        object) afterwards, whatever happened."""
        setattr(self.parent, self.attr, torch.nn.ModuleList(list(self.layers)[:TRACED_LAYERS]))
        try:
            yield
        finally:
            setattr(self.parent, self.attr, self.layers)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The model's tensors by state-dict name (tied names each listed)."""
        out = {}
        for n, p in self.module.named_parameters(remove_duplicate=False):
            out[n] = p
        for n, b in self.module.named_buffers(remove_duplicate=False):
            out[n] = b
        return out


def _stamp_plan(module) -> tuple[Optional[_StampPlan], str]:
    """The layer list to stamp, or None and why not."""
    config = getattr(module, "config", None)
    try:
        from transformers import PretrainedConfig, PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of the frontends
        return None, "transformers is not installed"
    if not isinstance(module, PreTrainedModel) or not isinstance(config, PretrainedConfig):
        return None, f"{type(module).__name__} is not a Hugging Face model"
    n = getattr(config, "num_hidden_layers", None)
    if not isinstance(n, int) or isinstance(n, bool):
        return None, "the config has no num_hidden_layers"
    if n < MIN_LAYERS:
        return None, f"{n} layers (stamping starts at {MIN_LAYERS})"
    found = _layer_list(module, n)
    if isinstance(found, str):
        return None, found
    prefix, parent, attr, layers = found
    why = (_config_varies(config, n) or _shared(module, layers, prefix)
           or _layer_list_read_whole(type(parent), attr)
           or _layers_differ(layers, prefix, type(parent)))
    if why:
        return None, why
    return _StampPlan(module, prefix, parent, attr, layers), ""


def _layer_list(module, n: int):
    """(state-dict prefix, parent module, attribute, ModuleList) of the model's one ModuleList
    of ``n`` same-class layers, not nested in another such list; else why not."""
    lists = [(fqn, m) for fqn, m in module.named_modules()
             if isinstance(m, torch.nn.ModuleList) and len(m) == n and fqn]
    top = [(fqn, m) for fqn, m in lists
           if not any(fqn.startswith(other + ".") for other, _ in lists)]
    if len(top) != 1:
        return (f"no ModuleList of {n} layers" if not top else
                f"{len(top)} ModuleLists of {n} modules ({', '.join(f for f, _ in top)})")
    prefix, layers = top[0]
    classes = {type(layer) for layer in layers}
    if len(classes) != 1:
        return f"{prefix} holds layers of {len(classes)} classes"
    parent_name, _, attr = prefix.rpartition(".")
    parent = module.get_submodule(parent_name) if parent_name else module
    if getattr(parent, attr, None) is not layers:
        return f"{prefix} is not an attribute of its parent module"
    return prefix, parent, attr, layers


# Scalar config fields that make some layers differ from others: field -> when it does.
_PER_LAYER_FIELDS = {
    "decoder_sparse_step": lambda v: isinstance(v, int) and v > 1,      # MoE every k-th layer
    "moe_layer_freq": lambda v: v not in (None, 1),
    "interleave_moe_layer_step": lambda v: isinstance(v, int) and v > 1,
    "first_k_dense_replace": lambda v: bool(v),                          # dense first layers
    "num_dense_layers": lambda v: bool(v),
    "sliding_window_pattern": lambda v: isinstance(v, int) and v > 1,    # 1 global in k
    "global_attn_every_n_layers": lambda v: bool(v),
    "no_rope_layer_interval": lambda v: bool(v),
    "attn_layer_period": lambda v: bool(v),                              # hybrid (Jamba)
    "expert_layer_period": lambda v: bool(v),
    "scale_attn_by_inverse_layer_idx": lambda v: bool(v),                # GPT-2's option
    "cross_attention_layers": lambda v: bool(v),
}
# Config fields that hold a count or a size, never a per-layer pattern, though their names
# end like one.
_NOT_PER_LAYER = frozenset({"num_hidden_layers", "n_layer", "num_layers", "n_layers",
                            "num_attention_layers", "max_window_layers"})


def _config_varies(config, n: int) -> Optional[str]:
    """Why the config says some layers differ, or None."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if not isinstance(layer_types, (list, tuple)) or len(set(layer_types)) > 1:
            return f"config.layer_types varies per layer ({_short(layer_types)})"
    if getattr(config, "use_sliding_window", False) and getattr(config, "sliding_window", None):
        mwl = getattr(config, "max_window_layers", None)
        if isinstance(mwl, int) and mwl < n:
            return (f"config.max_window_layers = {mwl} < {n} layers: a sliding window on "
                    f"some layers only")
    for key, varies in _PER_LAYER_FIELDS.items():
        value = getattr(config, key, None)
        try:
            if value is not None and varies(value):
                return f"config.{key} = {_short(value)} makes layers differ"
        except Exception:  # noqa: BLE001 - an unexpected type: assume the worst
            return f"config.{key} = {_short(value)} may make layers differ"
    try:
        fields = config.to_dict()
    except Exception:  # noqa: BLE001
        return "the config cannot be read as a dict"
    for key, value in fields.items():
        if key in _NOT_PER_LAYER or key == "layer_types":
            continue
        names_layers = key.endswith(("_layers", "_layer_ids", "_layer_idx", "_layer_indices"))
        if isinstance(value, (list, tuple)):
            if len(value) == n:      # one entry per layer: fine while they are all the same
                if len({repr(v) for v in value}) > 1:
                    return f"config.{key} has {n} entries that differ ({_short(value)})"
            elif names_layers and value:
                return f"config.{key} = {_short(value)} names some layers"
        elif names_layers and isinstance(value, (int, dict)) and not isinstance(value, bool) \
                and value:
            return f"config.{key} = {_short(value)} names some layers"
    return None


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _shared(module, layers, prefix: str) -> Optional[str]:
    """Why some module or tensor of layers 1..N-1 is not the layer's own (shared with another
    layer or the rest of the model: torch.export names it once, by its first path), or None."""
    modules: dict[int, int] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        modules[id(m)] = modules.get(id(m), 0) + 1
    tensors: dict[int, int] = {}
    for _, t in list(module.named_parameters(remove_duplicate=False)) + \
            list(module.named_buffers(remove_duplicate=False)):
        tensors[id(t)] = tensors.get(id(t), 0) + 1
    for i in range(1, len(layers)):
        for path, m in layers[i].named_modules(remove_duplicate=False):
            if modules[id(m)] > 1:
                return f"{prefix}.{i}" + (f".{path}" if path else "") + " is shared"
        for path, t in list(layers[i].named_parameters(remove_duplicate=False)) + \
                list(layers[i].named_buffers(remove_duplicate=False)):
            if tensors[id(t)] > 1:
                return f"{prefix}.{i}.{path} is shared (tied)"
    return None


def _layers_differ(layers, prefix: str, parent_class) -> Optional[str]:
    """Why layers 1..N-1 are not the same module tree as layer 1 (layer 0 is traced for real,
    so it may differ), or None.  ``parent_class``: the class of the module that holds the
    layers (its code is read for uses of a layer index too)."""
    template = _module_signature(layers[1])
    if isinstance(template, str):
        return f"{prefix}.1: {template}"
    index_attrs: set = set()
    for i in range(2, len(layers)):
        why = _signature_difference(_module_signature(layers[i]), template, f"{prefix}.{i}",
                                    index_attrs)
        if why:
            return why
    for attr in sorted({attr for _, attr in index_attrs}):
        classes = {parent_class} | {cls for cls, a in index_attrs if a == attr}
        for cls in sorted(classes, key=lambda c: c.__qualname__):
            why = _index_read_outside_cache(cls, attr)
            if why:
                return why
    return None


def _signature_difference(sig, template, where: str, index_attrs: Optional[set] = None,
                          depth: int = 0) -> Optional[str]:
    """How a module's :func:`_module_signature` differs from layer 1's, or None.  Layer-index
    attributes (:data:`_INDEX_ATTRS`) may differ when ``index_attrs`` collects them."""
    if isinstance(sig, str):
        return f"{where}: {sig}"
    if len(sig) != len(template):
        return f"{where} has {len(sig)} submodules, layer 1 {len(template)}"
    for (path, a), (path1, b) in zip(sig, template):
        at = where + (f".{path}" if path else "")
        if path != path1 or a["class"] is not b["class"]:
            return f"{at} is not built like layer 1's" + (f" {path1}" if path1 else "")
        if a["tensors"] != b["tensors"]:
            return f"{at}: its parameters or buffers differ from layer 1's"
        if a["int_buffers"].keys() != b["int_buffers"].keys() or any(
                not _same(a["int_buffers"][k], b["int_buffers"][k], depth)
                for k in a["int_buffers"]):
            return f"{at}: its integer buffers differ from layer 1's"
        if a["attrs"].keys() != b["attrs"].keys():
            return f"{at}: its attributes differ from layer 1's"
        for k in a["attrs"]:
            if _same(a["attrs"][k], b["attrs"][k], depth):
                continue
            if index_attrs is not None and k in _INDEX_ATTRS \
                    and type(a["attrs"][k]) is int and type(b["attrs"][k]) is int:
                index_attrs.add((a["class"], k))
                continue
            return f"{at}.{k} = {_short(a['attrs'][k])} differs from layer 1's"
    return None


_SKIPPED_ATTRS = frozenset({"training", "_parameters", "_buffers", "_modules",
                            "_non_persistent_buffers_set", "_is_hf_initialized"})


def _module_signature(layer):
    """Per submodule of ``layer`` (in order): its class, non-tensor attributes, tensor names
    with shapes and dtypes, and integer buffers; a string when something cannot be compared
    (hooks)."""
    out = []
    for path, m in layer.named_modules(remove_duplicate=False):
        attrs, tensors, int_buffers = {}, [], {}
        for k, v in vars(m).items():
            if k in _SKIPPED_ATTRS:
                continue
            if k.startswith("_") and "hook" in k:
                if "forward" in k and v:
                    return f"{path or 'the layer'} has forward hooks"
                continue
            attrs[k] = v
        for k, p in m._parameters.items():
            tensors.append((k, "param", None if p is None else (tuple(p.shape), p.dtype)))
        for k, b in m._buffers.items():
            persistent = k not in m._non_persistent_buffers_set
            tensors.append((k, "buffer", persistent,
                            None if b is None else (tuple(b.shape), b.dtype)))
            if b is not None and not b.dtype.is_floating_point and not b.dtype.is_complex:
                int_buffers[k] = b
        out.append((path, {"class": type(m), "attrs": attrs, "tensors": tensors,
                           "int_buffers": int_buffers}))
    return out


def _same(a, b, depth: int = 0) -> bool:
    """Whether two attribute values are the same for tracing purposes (conservative)."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
            return False
        return a.device.type != "meta" and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y, depth) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k], depth) for k in a)
    if isinstance(a, (bool, int, float, str, bytes, type(None), torch.dtype, torch.device)):
        return a == b or (isinstance(a, float) and a != a and b != b)
    if isinstance(a, functools.partial):
        return a.func is b.func and _same(a.args, b.args, depth) \
            and _same(a.keywords, b.keywords, depth)
    if isinstance(a, torch.nn.Module):
        # a module held outside _modules (a per-instance kernel wrapper): same tree, by value
        return depth < 3 and _signature_difference(
            _module_signature(a), _module_signature(b), "", None, depth + 1) is None
    try:
        return (a == b) is True
    except Exception:  # noqa: BLE001
        return False


_CACHE_WORDS = re.compile(r"cache|past", re.IGNORECASE)


def _methods_reading(cls, attr: str):
    """(class name, method name, parsed source or None when unreadable) of every method but
    ``__init__`` of ``cls``'s model-specific classes whose source mentions ``attr``; shared
    infrastructure (torch, transformers outside transformers.models) is skipped."""
    for klass in cls.__mro__:
        module = getattr(klass, "__module__", "") or ""
        if module.startswith(("torch.", "builtins")) or (
                module.startswith("transformers.") and
                not module.startswith("transformers.models.")):
            continue
        for fn_name, fn in vars(klass).items():
            fn = getattr(fn, "__func__", fn)
            if fn_name == "__init__" or not inspect.isfunction(fn):
                continue
            try:
                source = textwrap.dedent("".join(inspect.getsourcelines(inspect.unwrap(fn))[0]))
            except (OSError, TypeError, ValueError):
                yield klass.__name__, fn_name, None
                continue
            if attr not in source:
                continue
            try:
                yield klass.__name__, fn_name, ast.parse(source)
            except SyntaxError:
                yield klass.__name__, fn_name, None


@functools.lru_cache(maxsize=None)
def _index_read_outside_cache(cls, attr: str) -> Optional[str]:
    """Why the code of ``cls`` reads ``<x>.<attr>`` (the layer index) other than as an
    argument of a KV-cache call or a subscript of a cache (``cache.update(k, v,
    self.layer_idx)``), or None when it does not: the traced graph has no cache, so then the
    index cannot reach it."""
    for cls_name, fn_name, tree in _methods_reading(cls, attr):
        if tree is None:
            return f"cannot read {cls_name}.{fn_name} to see how it uses .{attr} (the layer index)"
        if _reads_outside_cache(tree, attr):
            return (f"{cls_name}.{fn_name} reads .{attr} (the layer index) for more than the KV "
                    f"cache")
    return None


@functools.lru_cache(maxsize=None)
def _layer_list_read_whole(cls, attr: str) -> Optional[str]:
    """Why the code of ``cls`` (the module holding the layer list ``attr``) may see that the
    list is short: ``len(self.layers)``, or an index into it other than a slice from the start
    or a constant below TRACED_LAYERS (``self.layers[-1]`` is another layer in the short
    model); None when it only iterates it (``for layer in self.layers[: n]``)."""
    for cls_name, fn_name, tree in _methods_reading(cls, attr):
        if tree is None:
            return f"cannot read {cls_name}.{fn_name} to see how it uses .{attr}"
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                    and node.func.id == "len" and node.args \
                    and isinstance(node.args[0], ast.Attribute) and node.args[0].attr == attr:
                return f"{cls_name}.{fn_name} reads len(.{attr})"
            if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) \
                    and node.value.attr == attr and not _prefix_index(node.slice):
                return f"{cls_name}.{fn_name} indexes .{attr} with {ast.unparse(node.slice)}"
    return None


def _prefix_index(index) -> bool:
    if isinstance(index, ast.Slice):
        lower = index.lower
        return index.step is None and (lower is None or (
            isinstance(lower, ast.Constant) and lower.value == 0))
    return isinstance(index, ast.Constant) and isinstance(index.value, int) \
        and 0 <= index.value < TRACED_LAYERS


def _reads_outside_cache(tree, attr: str) -> bool:
    parents = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr == attr):
            continue
        up = parents.get(node)
        while up is not None and not isinstance(up, (ast.Call, ast.Subscript, ast.stmt)):
            up = parents.get(up)
        if isinstance(up, ast.Call) and _CACHE_WORDS.search(ast.unparse(up.func)):
            continue
        if isinstance(up, ast.Subscript) and _CACHE_WORDS.search(ast.unparse(up.value)):
            continue
        return True
    return False


# ----- the graph: split the short trace, stamp the layers -------------------------------------

def stamp_layers(short: Graph, prefix: str, num_layers: int) -> tuple[Optional[Graph], str]:
    """The graph of ``num_layers`` layers built from ``short``, the trace of the model cut to
    its first :data:`TRACED_LAYERS` layers under ``prefix`` (``model.layers``); None and why
    when its layers do not split into runs or stamping does not reproduce the traced layer 2.

    The result's ``weights`` is ``short.weights`` (see :func:`_bind_weights`)."""
    if num_layers < TRACED_LAYERS:
        return None, f"{num_layers} layers: fewer than the {TRACED_LAYERS} traced"
    segments = _segments(short, prefix)
    if isinstance(segments, str):
        return None, segments
    check = _stamped(short, segments, prefix, TRACED_LAYERS)
    if isinstance(check, str):
        return None, check
    diff = first_difference(check, short)
    if diff is not None:
        return None, f"layer 2 stamped from layer 1 differs from the traced layer 2: {diff}"
    graph = _stamped(short, segments, prefix, num_layers)
    if isinstance(graph, str):
        return None, graph
    return graph, ""


class _Segments:
    def __init__(self, before: list[Op], layers: list[list[Op]], after: list[Op]):
        self.before, self.layers, self.after = before, layers, after


def _segments(g: Graph, prefix: str):
    """The ops before the layers, each traced layer's ops, the ops after them; or why the
    ops do not split so (an op outside the layers between two of them, layers out of order)."""
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)(?:\.|$)")
    before, after = [], []
    layers: list[list[Op]] = [[] for _ in range(TRACED_LAYERS)]
    current = -1
    for op in g.ops:
        m = pattern.match(op.loc.module) if op.loc.module else None
        if m is None:
            if current == -1:
                before.append(op)
            else:
                after.append(op)
                current = TRACED_LAYERS   # past the layers: no layer op may follow
            continue
        i = int(m.group(1))
        if i >= TRACED_LAYERS:
            return f"an op is located in {prefix}.{i} of a {TRACED_LAYERS}-layer trace"
        if i < current or current == TRACED_LAYERS:
            return (f"{op.name} at {op.loc} comes after ops of a later layer or of the "
                    f"model after the layers: the layers' ops are not contiguous")
        if i > current + 1:
            return f"{prefix}.{current + 1} has no ops"
        current = i
        layers[i].append(op)
    if any(not ops for ops in layers):
        return "a traced layer has no ops"
    return _Segments(before, layers, after)


def _stamped(short: Graph, seg: _Segments, prefix: str, num_layers: int):
    """``short`` with layers TRACED_LAYERS-1.. replaced by copies of layer 1, up to
    ``num_layers`` layers; the ops after the layers read the last one.  Or why not."""
    g = Graph(short.name, short.weights)
    g.dims = dict(short.dims)
    vmap: dict[int, Value] = {}
    for v in short.inputs:
        vmap[id(v)] = g.add_input(v.type, v.name)

    def copy(op: Op, operands: list[Value], loc: Location, attrs: dict) -> Op:
        new = Op(op.name, operands, [r.type for r in op.results], attrs, loc,
                 [r.name for r in op.results])
        g.append(new)
        for a, b in zip(op.results, new.results):
            vmap[id(a)] = b
        return new

    for op in seg.before + seg.layers[0] + seg.layers[1]:
        copy(op, [vmap[id(v)] for v in op.operands], op.loc, dict(op.attrs))

    template, previous = seg.layers[1], seg.layers[0]
    at_template = {id(op): p for p, op in enumerate(template)}
    at_previous = {id(op): p for p, op in enumerate(previous)}
    outside = {id(op) for op in seg.before}
    one = f"{prefix}.1"
    prev_ops = _tail(g, len(template))     # the copy of layer 1
    for i in range(2, num_layers):
        renamed = f"{prefix}.{i}"
        locs: dict[Location, Location] = {}
        new_ops: list[Op] = []
        for op in template:
            operands = []
            for v in op.operands:
                p = v.producer
                if p is None or id(p) in outside:
                    operands.append(vmap[id(v)])
                elif id(p) in at_template:
                    operands.append(new_ops[at_template[id(p)]].results[v.result_index])
                elif id(p) in at_previous and at_previous[id(p)] < len(prev_ops):
                    operands.append(prev_ops[at_previous[id(p)]].results[v.result_index])
                else:
                    return (f"{op.describe()} reads a value from neither the ops before the "
                            f"layers, layer 0 nor layer 1")
            loc = locs.get(op.loc)
            if loc is None:
                loc = locs[op.loc] = Location(_rename(op.loc.module, one, renamed),
                                              op.loc.file, op.loc.line)
            attrs = dict(op.attrs)
            if op.name == "param":
                name = attrs.get("name")
                if not isinstance(name, str) or not name.startswith(one + "."):
                    return f"{op.describe()} in layer 1 is not a param of layer 1"
                attrs["name"] = renamed + name[len(one):]
            new_ops.append(copy(op, operands, loc, attrs))
        prev_ops = new_ops

    last = {id(op): p for p, op in enumerate(seg.layers[-1])}
    after = {id(op) for op in seg.after}

    def after_layers(v: Value) -> Optional[Value]:
        """What a value read after the layers becomes: the last layer's for the last traced
        layer's, the copy for one from before or after the layers; None for layers 0, 1."""
        p = v.producer
        if p is not None and id(p) in last:
            return prev_ops[last[id(p)]].results[v.result_index]
        if p is None or id(p) in outside or id(p) in after:
            return vmap[id(v)]
        return None

    for op in seg.after:
        operands = [after_layers(v) for v in op.operands]
        if any(v is None for v in operands):
            return f"{op.describe()} after the layers reads a value of layer 0 or 1"
        copy(op, operands, op.loc, dict(op.attrs))
    outputs = [after_layers(v) for v in short.outputs]
    if any(v is None for v in outputs):
        return "a graph output is a value of layer 0 or 1"
    g.set_outputs(outputs)
    return g


def _tail(g: Graph, n: int) -> list[Op]:
    """The last ``n`` ops of ``g``, in order."""
    out, op = [], g.last
    while op is not None and len(out) < n:
        out.append(op)
        op = op.prev
    return out[::-1]


def _rename(module_path: str, old: str, new: str) -> str:
    if module_path == old or module_path.startswith(old + "."):
        return new + module_path[len(old):]
    return module_path


# ----- comparing graphs -------------------------------------------------------------------------

def first_difference(a: Graph, b: Graph) -> Optional[str]:
    """The first way ``a`` and ``b`` differ as graphs (inputs, dims, ops with their operands,
    attributes, result types and names, locations, outputs), or None when they are the same."""
    if a.name != b.name or a.dims != b.dims:
        return "the graph names or dims differ"
    if [(v.type, v.name) for v in a.inputs] != [(v.type, v.name) for v in b.inputs]:
        return "the graph inputs differ"
    where_a, where_b = _positions(a), _positions(b)
    if len(a) != len(b):
        return f"{len(a)} ops against {len(b)}"
    for k, (x, y) in enumerate(zip(a.ops, b.ops)):
        what = f"op {k} ({y.describe()})"
        if x.name != y.name or x.loc != y.loc:
            return f"{what}: {x.describe()} in its place"
        if [where_a[id(v)] for v in x.operands] != [where_b[id(v)] for v in y.operands]:
            return f"{what}: its operands differ"
        if [(r.type, r.name) for r in x.results] != [(r.type, r.name) for r in y.results]:
            return f"{what}: its result types differ"
        if x.attrs.keys() != y.attrs.keys() or any(not _same_attr(x.attrs[n], y.attrs[n])
                                                   for n in x.attrs):
            return f"{what}: its attributes differ"
    if [where_a[id(v)] for v in a.outputs] != [where_b[id(v)] for v in b.outputs]:
        return "the graph outputs differ"
    return None


def _positions(g: Graph) -> dict[int, tuple]:
    out: dict[int, tuple] = {id(v): ("input", i) for i, v in enumerate(g.inputs)}
    for k, op in enumerate(g.ops):
        for r in op.results:
            out[id(r)] = (k, r.result_index)
    return out


def _same_attr(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same_attr(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a == b or (a != a and b != b)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001
        return False


# ----- weights -----------------------------------------------------------------------------------

def _bind_weights(graph: Graph, short_store: WeightStore, tensors: dict[str, torch.Tensor],
                  given: Optional[WeightStore]) -> Optional[str]:
    """Give ``graph`` the weight store the full trace would: ``given`` (or a new store) with
    every param the store lacks added in the order the params first appear, each the model's
    own tensor under its state-dict name.  None when done; else why not (then ``given`` is
    unchanged)."""
    store = given if given is not None else WeightStore()
    additions: dict[str, torch.Tensor] = {}
    for op in graph.params():
        name, ttype = op.attrs["name"], op.attrs["type"]
        if name in store:
            if given is not None and store.type_of(name) != ttype:
                return f"weight '{name}': the given store's type differs from the model's"
            continue
        if name in additions:
            continue
        tensor = _short_tensor(short_store, name)
        if tensor is None:
            tensor = tensors.get(name)
            if tensor is None:
                return f"weight '{name}' is not a tensor of the model"
            tensor = tensor.detach()
        if TensorType(tuple(tensor.shape), DType.from_torch(tensor.dtype)) != ttype:
            return f"weight '{name}' is not of the traced param's type"
        additions[name] = tensor
    for name, tensor in additions.items():
        store.add_tensor(name, tensor, source="module")
    graph.weights = store
    return None


def _short_tensor(short_store: WeightStore, name: str) -> Optional[torch.Tensor]:
    """The tensor the short trace registered under ``name`` (a meta tensor for a meta one)."""
    if name not in short_store:
        return None
    entry = short_store.entry(name)
    if entry.source == "meta":
        return torch.empty(entry.type.shape, dtype=entry.type.dtype.torch, device="meta")
    return entry.loader()
