"""The tracing frontend: ``torch.export`` an ``nn.Module`` and convert its ATen graph to irlm IR.

``trace(model, example_inputs)`` exports the module with symbolic ``batch`` and ``seq``
dimensions, then walks the exported FX graph node by node:

* parameters, buffers and lifted constants become ``param`` ops named by their state-dict key
  (a lifted constant of at most 16 elements, a tensor the model's code makes, becomes a
  ``core.constant`` instead),
  backed by a :class:`~irlm.weights.WeightStore` (the module's own tensors, never copied; on the
  ``meta`` device they are registered without data);
* user tensor inputs become graph inputs, typed ``tensor<[batch]x[seq]xi64>``;
* every ATen op is converted by one small function in the table of
  :mod:`irlm.frontends._aten_converters`; an op missing from the table is an error that names
  the op and where it came from -- there is no fallback;
* ``sym_size`` and SymInt arithmetic produce no ops: torch's symbolic expressions (``s0*s1``)
  are translated into irlm dimension expressions (``batch*seq``) and folded into the
  attributes of the ops that use them;
* after each node, the irlm type of every result is checked against the shape and dtype that
  torch itself propagated, so a converter bug surfaces at its node, not as wrong numbers later.

Each op carries a :class:`~irlm.ir.Location`: the innermost HF module path
(``model.layers.3.self_attn.q_proj``) and the innermost model-source frame
(``modeling_llama.py:243``).
"""
from __future__ import annotations

import contextlib
import inspect
import operator
import os
import sys
import re
from dataclasses import dataclass
from typing import Mapping, Optional

import sympy
import torch
import torch.utils._pytree as pytree

from irlm.builder import Builder
from irlm.errors import IRError, IRLMError
from irlm.ir import Graph, Location, Value
from irlm.types import DType, TensorType, format_type, normalize_dim, sym
from irlm.weights import WeightStore

from ._aten_converters import (CONVERTERS, DROPPED_OPS, SYMBOLIC_INT_OPS, SUPPORTED_OPS_DOC,
                               Unavailable, op_key)

__all__ = ["trace", "TraceError", "UnsupportedOpError"]

DEFAULT_BATCH_RANGE = (1, 256)
DEFAULT_SEQ_RANGE = (1, 4096)


class TraceError(IRLMError):
    """The model could not be traced or converted; the message names the op and its source."""


class UnsupportedOpError(TraceError):
    """An ATen op that the frontend has no mapping for."""

    def __init__(self, op: str, loc: Location):
        self.op, self.loc = op, loc
        super().__init__(
            f"{op} has no irlm mapping (at {loc}); the ATen ops the tracing frontend supports "
            f"are listed in {SUPPORTED_OPS_DOC}")


# ----- the public entry point ------------------------------------------------------------------

def trace(module, example_inputs, *, dynamic: bool = True,
          dims: Optional[Mapping[str, tuple[int, int]]] = None,
          weights: Optional[WeightStore] = None, name: str = "main") -> Graph:
    """Trace ``module`` on ``example_inputs`` into an irlm :class:`~irlm.ir.Graph`.

    ``example_inputs`` is a tensor, a tuple of positional inputs or a dict of keyword inputs
    (``{"input_ids": ..., "attention_mask": ...}``); the graph's inputs are its tensors, named
    after the forward parameters.  With ``dynamic=True`` every input's dim 0 is the symbolic
    ``batch`` and dim 1 (inputs of rank >= 2) the symbolic ``seq``; ``dims`` overrides their
    inclusive ranges, e.g. ``{"batch": (1, 64), "seq": (1, 2048)}`` (defaults: batch 1..256,
    seq 1..the model's ``max_position_embeddings``, else 4096; torch may narrow a range the
    model's code requires, e.g. seq <= 512 for BERT's position table).

    For Hugging Face models ``use_cache=False`` is passed unless given, and the outputs are
    ``logits`` (causal LMs) or ``last_hidden_state`` (encoders); otherwise every tensor output.
    A module in training mode is exported in eval mode (and restored).

    ``module`` may also be a ``torch.export.ExportedProgram`` (e.g. one already run through
    ``run_decompositions``); then ``example_inputs`` is ignored and its own symbols are named
    ``batch``/``seq`` by the same input-dim convention.

    ``weights``: a store (e.g. from a safetensors loader) keyed by the same state-dict names:
    params take their entries from it (their types must agree); tensors it lacks (non-persistent
    buffers such as rotary ``inv_freq``) are added to it.  Without one, a new store holding
    the module's own tensors is created.  The store is ``graph.weights`` either way.
    """
    if isinstance(module, torch.export.ExportedProgram):
        ep, dim_names = module, _dim_names_by_convention(module, dynamic)
        ranges, real_buffers = {}, {}
    else:
        with _buffers_on_meta(module) as real_buffers:
            ep, dim_names, ranges = _export(module, example_inputs, dynamic, dict(dims or {}))
    in_place = plan_in_place(ep)
    if in_place is None:
        # Mutations of views or inputs, or higher-order ops (autocast / grad-mode regions):
        # let torch functionalize and inline them rather than reason about aliasing here.
        ep = ep.run_decompositions({})
        in_place = {}
    return _GraphConverter(ep, dim_names, weights, name, in_place, ranges,
                           real_buffers).convert()


# ----- export ----------------------------------------------------------------------------------

def _normalize_inputs(module, example_inputs) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise TraceError(f"example_inputs must be a tensor, a tuple of inputs or a dict of "
                         f"keyword inputs, not {type(example_inputs).__name__}")
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        params = {}
    # Hugging Face models: no KV cache in the traced, stateless graph.
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    device = _module_device(module)
    if device is not None and device.type == "meta":
        # A model on the meta device traces on meta inputs (no data anywhere).
        args = tuple(a.to("meta") if isinstance(a, torch.Tensor) else a for a in args)
        kwargs = {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return args, kwargs


@contextlib.contextmanager
def _buffers_on_meta(module):
    """For a module whose parameters are on the meta device (a loader's), its buffers that are
    not (BERT's position and token-type ids, kept real by the loader) are exported as meta
    tensors too: torch 2.11 refuses an embedding of meta weights at CPU indices.  Yields
    {buffer name: real tensor}, which the converter uses for their values."""
    real, moved = {}, []
    if isinstance(module, torch.nn.Module) and \
            getattr(_module_device(module), "type", None) == "meta":
        for name, buf in list(module.named_buffers()):
            if buf is not None and buf.device.type != "meta":
                owner_name, _, attr = name.rpartition(".")
                owner = module.get_submodule(owner_name) if owner_name else module
                real[name] = buf
                moved.append((owner, attr, buf))
                owner._buffers[attr] = buf.to("meta")
    try:
        yield real
    finally:
        for owner, attr, buf in moved:
            owner._buffers[attr] = buf


def _module_device(module) -> Optional[torch.device]:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return None


def _default_ranges(module, dims: dict) -> dict[str, tuple[int, int]]:
    ranges = {"batch": DEFAULT_BATCH_RANGE, "seq": DEFAULT_SEQ_RANGE}
    config = getattr(module, "config", None)
    max_pos = None
    for attr in ("max_position_embeddings", "n_positions", "max_seq_len"):
        max_pos = max_pos or getattr(config, attr, None)
    if isinstance(max_pos, int) and max_pos > 1:
        ranges["seq"] = (1, max_pos)
    for k, v in dims.items():
        if k not in ranges:
            raise TraceError(f"dims: unknown dimension '{k}' (the traced dims are batch and seq)")
        lo, hi = v
        if not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise TraceError(f"dims: the range of {k} must be two ints 1 <= min <= max, got {v}")
        ranges[k] = (lo, hi)
    return ranges


def _dynamic_shapes(module, args, kwargs, ranges):
    """``{input name: {axis: Dim}}``: dim 0 is batch, dim 1 (rank >= 2) is seq."""
    from torch.export import Dim
    # A fixed range (min == max, e.g. --max-batch 1) is a static size, not a Dim.  torch
    # (2.11) takes a symbolic size to be at least 2, so a range up to 2 would collapse to the
    # constant 2, the example's: export up to 3, and the graph declares the range asked for.
    batch, seq = (None if lo == hi else Dim(k, min=lo, max=max(hi, 3))
                  for k, (lo, hi) in ((k, ranges[k]) for k in ("batch", "seq")))

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        axes = {0: batch} if x.dim() == 1 else {0: batch, 1: seq}
        return {a: d for a, d in axes.items() if d is not None} or None

    if not kwargs:
        return tuple(spec(a) for a in args)
    # Keyword inputs: torch wants one dict keyed by the forward's parameter names.
    try:
        bound = inspect.signature(module.forward).bind_partial(*args)
        names = list(bound.arguments)
    except (TypeError, ValueError) as e:
        raise TraceError(f"example inputs do not match {type(module).__name__}.forward: {e}")
    if len(names) != len(args):
        raise TraceError("give example inputs either all positional or all by keyword")
    out = {n: spec(a) for n, a in zip(names, args)}
    out.update({k: spec(v) for k, v in kwargs.items()})
    return out


_SUGGESTED_RANGE = re.compile(r"(batch|seq) = Dim\('\1'(?:, min=(\d+))?(?:, max=(\d+))?\)")


def _failed_in_guard_report(e: BaseException) -> bool:
    import traceback
    return any(f.name == "prettify_results" for f in traceback.extract_tb(e.__traceback__))


def _export(module, example_inputs, dynamic: bool, dims: dict):
    args, kwargs = _normalize_inputs(module, example_inputs)
    ranges = _default_ranges(module, dims)
    if dynamic:
        _check_example_sizes(args, kwargs, ranges)
    was_training = getattr(module, "training", False)
    module.eval()
    quiet = _QuietTorchLogs()
    failed = True
    try:
        quiet.__enter__()
        deferred = False
        for attempt in range(3):
            shapes = _dynamic_shapes(module, args, kwargs, ranges) if dynamic else None
            try:
                with torch.no_grad():
                    ep = torch.export.export(
                        module, args, kwargs, dynamic_shapes=shapes, strict=False,
                        prefer_deferred_runtime_asserts_over_guards=deferred)
                break
            except torch._dynamo.exc.UserError as e:
                # The model's code narrows a range (BERT: seq <= 512): torch says by how much.
                narrowed = _narrowed_ranges(str(e), ranges)
                if attempt == 0 and narrowed is not None:
                    ranges = narrowed
                    continue
                # The model fixes a dim to one size (an MLP's dim 1 is its in_features, not a
                # sequence): that dim is static, and the others stay symbolic.
                fixed = _fixed_dims(str(e), ranges)
                if fixed is not None and attempt < 2:
                    ranges = fixed
                    continue
                # A guard that holds for every value in range but that this torch's symbolic
                # reasoning cannot prove (seen with torch 2.11: min(128*seq, 512*seq) ==
                # 128*seq): keep it as a runtime assert instead, which the converter drops.
                if not deferred and narrowed is None and "Constraints violated" in str(e):
                    deferred = True
                    continue
                raise TraceError(
                    f"{_where(module, e)}torch.export cannot trace {type(module).__name__} "
                    f"with symbolic dims (dim 0 of each input is batch in "
                    f"{list(ranges['batch'])}, dim 1 is seq in {list(ranges['seq'])}): "
                    f"{_first_line(str(e))}; hint: give the ranges the model accepts (dims=, "
                    f"irlm compile --dims batch=1:8,seq=1:512) or static shapes "
                    f"(dynamic=False, --static)") from e
            except Exception as e:  # noqa: BLE001 - torch raises many kinds; name the cause
                # torch 2.11 can fail while wording its guard report (seen on an H200:
                # ValueError in DimConstraints.prettify_results, in some processes and not
                # others for the same model): keep the guards as runtime asserts, as above.
                if dynamic and not deferred and _failed_in_guard_report(e):
                    deferred = True
                    continue
                raise TraceError(
                    f"{_where(module, e)}torch.export failed on {type(module).__name__}: "
                    f"{type(e).__name__}: {_first_line(str(e))}; hint: data-dependent control "
                    f"flow or shapes (an `if` on a tensor's value, a loop over the experts a "
                    f"token picked) cannot be traced: compute both branches and select with "
                    f"torch.where, or use torch.cond") from e
        failed = False
    finally:
        quiet.__exit__(failed)
        if was_training:
            module.train()
    return ep, _dim_names_by_convention(ep, dynamic), ranges


class _QuietTorchLogs:
    """torch.export writes its graph and guard warnings to stderr before it raises; irlm's
    error says what went wrong in one line.  So stderr (the file descriptor: torch's log
    handlers hold their own stream objects) goes to a temporary file during the export, and
    is replayed only when the export succeeds (its warnings may matter then)."""

    def __enter__(self):
        import io
        import tempfile
        self.saved_fd = None
        self.saved_stream, self.text = sys.stderr, io.StringIO()
        try:
            self.saved_stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
        sys.stderr = self.text          # what torch prints through sys.stderr
        try:
            self.capture = tempfile.TemporaryFile()
            self.saved_fd = os.dup(2)
            os.dup2(self.capture.fileno(), 2)
        except (OSError, ValueError, AttributeError):   # no real stderr (embedded, pytest)
            self.saved_fd = None
        return self

    def __exit__(self, failed: bool = False):
        sys.stderr = self.saved_stream
        if not failed and self.text.getvalue():
            sys.stderr.write(self.text.getvalue())
        if self.saved_fd is None:
            return
        os.dup2(self.saved_fd, 2)
        os.close(self.saved_fd)
        if not failed:
            self.capture.seek(0)
            data = self.capture.read()
            if data:
                os.write(2, data)
        self.capture.close()


def _check_example_sizes(args, kwargs, ranges) -> None:
    named = [(f"input {i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    for what, x in named:
        if not isinstance(x, torch.Tensor):
            continue
        for axis, dim in ((0, "batch"), (1, "seq"))[:min(x.dim(), 2)]:
            lo, hi = ranges[dim]
            if lo == hi and x.shape[axis] != lo:
                raise TraceError(
                    f"example {what} has shape {tuple(x.shape)}: its {dim} (dim {axis}) is "
                    f"fixed to {lo}, so the example's must be {lo}")
        if any(n < 2 for axis, n in enumerate(x.shape[:2])
               if ranges[("batch", "seq")[axis]][0] != ranges[("batch", "seq")[axis]][1]):
            raise TraceError(
                f"example {what} has shape {tuple(x.shape)}: for symbolic dims the example's "
                f"batch (dim 0) and seq (dim 1) must be at least 2, because torch.export "
                f"makes a size of 0 or 1 a constant; the graph still accepts sizes down to 1")


def _first_line(text: str) -> str:
    """torch's first meaningful line, without its advice to set environment variables."""
    for line in text.strip().splitlines():
        line = re.sub(r"\s*For more information, run with TORCH_LOGS=\S+\.?", "", line).strip()
        if line:
            return line[:300]
    return "(no message)"


def _where(module, error: BaseException) -> str:
    """``model.py:12: `` for the innermost frame of the failing trace in the model's own code
    (not torch, not irlm, not another installed package); empty when there is none."""
    import sysconfig
    import traceback
    skip = (_TORCH_DIR, os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep,
            sysconfig.get_paths()["purelib"] + os.sep, sysconfig.get_paths()["stdlib"] + os.sep)
    frames = [(f.filename, f.lineno) for f in traceback.extract_tb(error.__traceback__)]
    frames += [(p, int(n)) for p, n in _FRAME.findall(str(error))]
    mod_file = getattr(__import__("inspect").getmodule(type(module)), "__file__", None)
    best = None
    for path, line in frames:
        if path.startswith("<") or os.path.abspath(path).startswith(skip):
            continue
        best = (path, line)
        if mod_file and os.path.abspath(path) == os.path.abspath(mod_file):
            break
    if best is None and mod_file and not os.path.abspath(mod_file).startswith(skip):
        best = (mod_file, None)
    if best is None:
        return ""
    name = os.path.basename(best[0])
    return f"{name}:{best[1]}: " if best[1] else f"{name}: "


def _fixed_dims(message: str, ranges: dict) -> Optional[dict]:
    """torch's "Suggested fixes: seq = 16": the model only works at that size: make that dim
    static (a range of one value); None when torch suggests no constant."""
    if "Suggested fixes" not in message:
        return None
    fixes = message.split("Suggested fixes", 1)[1]
    out, changed = dict(ranges), False
    for m in re.finditer(r"\b(batch|seq) = (\d+)\b", fixes):
        n = int(m.group(2))
        if n >= 1 and ranges[m.group(1)] != (n, n):
            out[m.group(1)] = (n, n)
            changed = True
    return out if changed else None


def _first_lines(text: str, n: int = 6) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return "\n".join(lines[:n]) + ("\n..." if len(lines) > n else "")


def _narrowed_ranges(message: str, ranges: dict) -> Optional[dict]:
    if "Suggested fixes" not in message:
        return None
    fixes = message.split("Suggested fixes", 1)[1]
    if re.search(r"\b(batch|seq) = \d+", fixes):
        return None  # torch wants the dim to be a constant: not a narrowing
    out, changed = dict(ranges), False
    for m in _SUGGESTED_RANGE.finditer(fixes):
        lo, hi = ranges[m.group(1)]
        lo2 = int(m.group(2)) if m.group(2) else lo
        hi2 = int(m.group(3)) if m.group(3) else hi
        if (lo2, hi2) != (lo, hi) and lo <= lo2 <= hi2 <= hi:
            out[m.group(1)] = (lo2, hi2)
            changed = True
    return out if changed else None


def _dim_names_by_convention(ep, dynamic: bool) -> dict:
    """torch symbol -> irlm dim name, from the user inputs' dim 0 (batch) and dim 1 (seq)."""
    names: dict = {}
    if not dynamic:
        return names
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        if spec.kind != torch.export.graph_signature.InputKind.USER_INPUT:
            continue
        val = placeholders[spec.arg.name].meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, dim_name in ((0, "batch"), (1, "seq"))[:min(val.dim(), 2)]:
            d = val.shape[axis]
            if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                names.setdefault(d.node.expr, dim_name)
    return names


# ----- in-place ops ----------------------------------------------------------------------------

# In-place ops that change autograd metadata only, never values: converted as no-ops.
_VALUE_PRESERVING_MUTATIONS = frozenset({"aten.detach_.default"})
# Ops that may return their input itself although their schema does not say so.
_UNANNOTATED_ALIASES = frozenset({"aten.dropout.default", "aten.feature_dropout.default",
                                  "aten.alpha_dropout.default", "aten.type_as.default"})


def _may_alias(node) -> bool:
    """Can ``node``'s result share memory with one of its inputs (a view, or the input)?"""
    t = node.target
    if t is operator.getitem:
        return _may_alias(node.args[0])
    if isinstance(t, torch._ops.OpOverload):
        return (any(r.alias_info is not None for r in t._schema.returns)
                or str(t) in _UNANNOTATED_ALIASES)
    return False


def _functional_twin(target) -> str:
    """``aten.add_.Tensor`` -> ``aten.add.Tensor``."""
    namespace, name = target._schema.name.split("::")
    return f"{namespace}.{name.rstrip('_')}.{target._overloadname}"


def _mutates_first_arg(target) -> bool:
    args = target._schema.arguments
    written = [i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write]
    return written == [0]


def plan_in_place(ep) -> Optional[dict]:
    """Map each in-place node to the node whose value it replaces, when every mutation in the
    graph is local: it writes (through a chain of in-place ops) a tensor the graph computed
    itself, which is neither a view nor viewed by anything.  Then the mutation is simply a new
    SSA value that later readers use.  None when torch must functionalize the graph instead
    (mutated inputs or views, higher-order ops, in-place ops without a functional converter).
    """
    root: dict = {}          # in-place node -> the node it ultimately writes
    members: dict = {}       # written node -> itself and its in-place writers so far
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        t = node.target
        if isinstance(t, torch._ops.HigherOrderOperator):
            return None
        if not (isinstance(t, torch._ops.OpOverload) and t._schema.is_mutable) \
                or str(t) in _VALUE_PRESERVING_MUTATIONS:
            continue
        written = node.args[0] if node.args else None
        if not (_mutates_first_arg(t) and _functional_twin(t) in CONVERTERS
                and isinstance(written, torch.fx.Node)):
            return None
        r = root.get(written, written)
        if r.op != "call_function" or _may_alias(r):
            return None  # an input, a parameter or a view is written
        group = members.setdefault(r, [r])
        for m in group:
            for user in m.users:
                if user in root or user is node:
                    continue  # the chain of writers itself
                if _may_alias(user) and not (isinstance(user.target, torch._ops.OpOverload)
                                             and user.target._schema.is_mutable):
                    return None  # a view of the written tensor sees the write
        root[node] = r
        group.append(node)
    return root


# ----- symbolic dims ---------------------------------------------------------------------------

class SymbolTable:
    """Translates torch's symbolic sizes (sympy over ``s0, s1``) into irlm dims over
    ``batch`` and ``seq``."""

    def __init__(self, names: dict):
        self.names = dict(names)
        self._cache: dict = {}

    def dim(self, d, where: str = ""):
        """An irlm dim (int or sympy expression) for an int, SymInt or torch sympy expression."""
        if isinstance(d, bool):
            raise TraceError(f"{where}: expected a size, got {d!r}")
        if isinstance(d, int):
            return d
        if isinstance(d, torch.SymInt):
            expr = d.node.expr
        elif isinstance(d, sympy.Basic):
            expr = d
        else:
            raise TraceError(f"{where}: expected a size, got {type(d).__name__} {d!r}")
        if expr not in self._cache:
            self._cache[expr] = normalize_dim(self._translate(expr, where))
        return self._cache[expr]

    def _translate(self, e, where):
        from torch.utils._sympy import functions as F
        if e.is_Integer:
            return int(e)
        if e.is_Symbol:
            if e not in self.names:
                raise TraceError(
                    f"{where}: size {e} is not a batch or seq dimension of the inputs "
                    f"(a data-dependent shape, which the traced graph cannot express)")
            return sym(self.names[e])
        args = [self._translate(a, where) for a in e.args]
        if isinstance(e, sympy.Add):
            return sympy.Add(*args)
        if isinstance(e, sympy.Mul):
            return sympy.Mul(*args)
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
            return args[0] ** int(e.exp)
        if isinstance(e, (F.FloorDiv, F.CleanDiv)):
            return sympy.floor(sympy.sympify(args[0]) / args[1])
        if isinstance(e, (F.Mod, F.PythonMod)):
            a, b = sympy.sympify(args[0]), args[1]
            return a - b * sympy.floor(a / b)
        if isinstance(e, (sympy.Max, F.Max)):
            return sympy.Max(*args)
        if isinstance(e, (sympy.Min, F.Min)):
            return sympy.Min(*args)
        raise TraceError(f"{where}: symbolic size {e} ({type(e).__name__}) has no irlm form")


# ----- locations -------------------------------------------------------------------------------

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def _wrapper_dirs() -> tuple[str, ...]:
    """Where frames are never the model's own line: torch, and Hugging Face's ``kernels``
    (its hub-kernel decorator wraps functions such as ``apply_rotary_pos_emb``: without this
    every RoPE op was located at ``"layer.py":856``, the wrapper's ``return func(...)``)."""
    import importlib.util
    dirs = [_TORCH_DIR]
    try:
        spec = importlib.util.find_spec("kernels")
    except (ImportError, ValueError):
        spec = None
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        dirs.append(os.path.join(d, ""))
    return tuple(dirs)


_WRAPPER_DIRS = _wrapper_dirs()


def node_location(node) -> Location:
    """The innermost module path and the innermost model-source frame of an FX node.

    Frames inside torch itself (``nn/modules/linear.py``) and in function wrappers
    (:func:`_wrapper_dirs`) are skipped: they are the same for every op of a kind; the model
    line that called them is what a reader needs.
    """
    module = ""
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = list(stack.values())[-1][0]
        module = path.replace("L['self'].", "").replace("L__self__.", "")
        if module.startswith("L__self__"):
            module = ""
    file, line = "", 0
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    for path, ln in reversed(frames):
        if not path.startswith(_WRAPPER_DIRS):
            file, line = os.path.basename(path), int(ln)
            break
    return Location(module, file, line)


# ----- the converter ---------------------------------------------------------------------------

@dataclass
class _LazyParam:
    """A parameter placeholder; its ``param`` op is created at its first use."""
    name: str
    tensor: torch.Tensor
    #: a small constant the model's code made: a ``core.constant`` rather than a ``param``
    inline: bool = False
    value: Optional[Value] = None


class NodeContext:
    """What a converter function sees: the node's types and an op builder with its location."""

    def __init__(self, conv: "_GraphConverter", node):
        self.conv = conv
        self.node = node
        self.loc = node_location(node)
        self.builder = conv.builder
        self.builder.loc = self.loc
        self.op_name = op_key(node.target)
        self.out = node.meta.get("val")

    # --- errors and types ---
    def fail(self, message: str):
        raise TraceError(f"{self.op_name} at {self.loc}: {message}")

    def where(self) -> str:
        return f"{self.op_name} at {self.loc}"

    def dtype(self, torch_dtype: torch.dtype) -> DType:
        try:
            return DType.from_torch(torch_dtype)
        except IRError as e:
            self.fail(str(e))

    def type_of(self, fake) -> TensorType:
        shape = [self.conv.symbols.dim(d, self.where()) for d in fake.shape]
        return TensorType(shape, self.dtype(fake.dtype))

    def out_type(self, index: Optional[int] = None) -> TensorType:
        fake = self.out if index is None else self.out[index]
        return self.type_of(fake)

    def out_shape(self, index: Optional[int] = None) -> tuple:
        return self.out_type(index).shape

    @property
    def out_dtype(self) -> DType:
        return self.out_type().dtype

    def weight_data(self, name: str) -> Optional[torch.Tensor]:
        """The data of a small weight the model holds (None on meta or when large)."""
        tensor = self.conv.module_tensors.get(name)
        if tensor is None or tensor.device.type == "meta" or tensor.numel() > 1 << 16:
            return None
        return tensor

    # --- building ---
    def op(self, name: str, *operands: Value, **attrs):
        try:
            return self.builder.op(name, *operands, **attrs)
        except IRError as e:
            message = str(e)
            prefix = f"{name} at {self.loc}: "
            if message.startswith(prefix):
                message = message[len(prefix):]
            raise TraceError(f"{self.where()}: as {name}: {message}") from None

    def const(self, value, dtype: DType) -> Value:
        """A 0-d ``core.constant`` holding a Python scalar in ``dtype``."""
        if not isinstance(value, (bool, int, float)):
            self.fail(f"expected a Python number, got {type(value).__name__} {value!r} "
                      "(a symbolic size used as a tensor value is not supported)")
        return self.op("core.constant", value=torch.tensor(value, dtype=dtype.torch))

    def scalar(self, value, dtype: DType) -> Value:
        """A Python number as the 0-d operand of an op computing in ``dtype``.  For f16/bf16 the
        constant is f32: torch keeps a Python scalar at float precision when it combines it
        with a half-precision tensor (``0.7978845608 * x`` does not round the factor to bf16),
        and irlm, like torch, lets a 0-d operand of the same category keep its own dtype."""
        if dtype in (DType.f16, DType.bf16):
            dtype = DType.f32
        return self.const(value, dtype)

    def cast(self, v: Value, dtype: DType) -> Value:
        return v if v.type.dtype is dtype else self.op("core.cast", v, dtype=dtype)

    def result_dtype(self, *xs) -> DType:
        """torch's type promotion over tensors (0-d ones count as scalars) and Python numbers."""
        from torch._prims_common import ELEMENTWISE_TYPE_PROMOTION_KIND, elementwise_dtypes
        proxies = []
        for x in xs:
            if isinstance(x, Value):
                # Only the rank class matters to promotion: 0-d tensors count as scalars.
                shape = () if x.type.rank == 0 else (1,)
                proxies.append(torch.empty(shape, dtype=x.type.dtype.torch, device="meta"))
            elif isinstance(x, (bool, int, float)):
                proxies.append(x)
            else:
                self.fail(f"expected a tensor or a number, got {type(x).__name__} {x!r} "
                          "(a symbolic size used as a tensor value is not supported)")
        _, dtype = elementwise_dtypes(
            *proxies, type_promotion_kind=ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT)
        return self.dtype(dtype)

    def promote(self, *xs, dtype: Optional[DType] = None,
                computed: bool = True) -> list[Value]:
        """The operands as Values of one dtype (torch's promotion unless given): numbers
        become 0-d constants (see :meth:`scalar`), tensors of another dtype get an explicit
        ``core.cast``.  ``computed=False``: the op selects values rather than computing
        with them (where), so numbers are constants of exactly ``dtype``."""
        dtype = dtype or self.result_dtype(*xs)
        number = self.scalar if computed else self.const
        return [self.cast(x, dtype) if isinstance(x, Value) else number(x, dtype) for x in xs]


#: lifted constant tensors up to this many elements become ``core.constant`` ops, larger
#: ones weights
_INLINE_CONSTANT_NUMEL = 16


class _GraphConverter:
    def __init__(self, ep, dim_names: dict, weights: Optional[WeightStore], name: str,
                 in_place: dict, ranges: Optional[dict] = None,
                 real_buffers: Optional[dict] = None):
        self.ep = ep
        self.real_buffers = real_buffers or {}  # exported as meta (see _buffers_on_meta)
        self.ranges = ranges or {}  # the ranges asked for (export may have used wider ones)
        self.in_place = in_place  # in-place node -> the node whose value it replaces
        self.writers: dict = {}
        for node, written in in_place.items():
            self.writers.setdefault(written, []).append(node)
        self.symbols = SymbolTable(dim_names)
        self.graph = Graph(name)
        self.builder = Builder(self.graph)
        self.given_store = weights
        self.store = weights if weights is not None else WeightStore()
        self.graph.weights = self.store
        self.env: dict = {}
        self.module_tensors: dict[str, torch.Tensor] = {}

    # --- driver ---
    def convert(self) -> Graph:
        ep = self.ep
        self._declare_dims()
        specs = {s.arg.name: s for s in ep.graph_signature.input_specs
                 if hasattr(s.arg, "name")}
        outputs = self._select_outputs()
        live = self._live_nodes([n for n, _ in outputs])
        for node in ep.graph.nodes:
            if node.op == "placeholder":
                self._placeholder(node, specs[node.name])
            elif node.op == "call_function":
                if node in live:
                    self._call(node)
            elif node.op == "get_attr":
                continue  # submodules of higher-order ops; rejected where they are called
            elif node.op == "output":
                break
            else:
                raise TraceError(f"unexpected FX node {node.op} {node.target}")
        values = []
        for node, out_name in outputs:
            v = self._value(node, f"graph output {out_name}")
            if not isinstance(v, Value):
                raise TraceError(f"graph output {out_name} is not a tensor ({v!r})")
            values.append(v)
        self.graph.set_outputs(values)
        return self.graph

    def _declare_dims(self):
        declared = {}
        for s, dim_name in self.symbols.names.items():
            vr = self.ep.range_constraints.get(s)
            lo, hi = (int(vr.lower), vr.upper) if vr is not None else (1, None)
            try:
                hi = int(hi)
            except (TypeError, ValueError):  # unbounded (int_oo)
                hi = 2 ** 31 - 1
            if dim_name in declared and declared[dim_name] != (lo, hi):
                raise TraceError(f"dimension {dim_name} has two torch symbols with different "
                                 f"ranges: {declared[dim_name]} and {(lo, hi)}")
            if dim_name in self.ranges:
                hi = min(hi, self.ranges[dim_name][1])
            declared[dim_name] = (max(lo, 1), hi)
        for dim_name, (lo, hi) in declared.items():
            self.graph.declare_dim(dim_name, lo, hi)

    def _select_outputs(self) -> list:
        """(FX node, name) of the outputs to keep: ``logits`` or ``last_hidden_state`` for HF
        model outputs, else every tensor output."""
        from torch.export.graph_signature import OutputKind
        sig = self.ep.graph_signature
        out_node = next(n for n in self.ep.graph.nodes if n.op == "output")
        returned = list(out_node.args[0])
        user = []
        for spec, node in zip(sig.output_specs, returned):
            if spec.kind == OutputKind.USER_OUTPUT:
                user.append(node)
            elif spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION):
                raise TraceError(f"the model mutates {spec.target!r} in its forward; a traced "
                                 "inference graph must be free of state updates")
        try:
            tree = pytree.tree_unflatten(list(range(len(user))), self.ep.call_spec.out_spec)
            leaves = pytree.tree_flatten_with_path(tree)[0]
        except Exception:  # an unusual output container: keep the flat list
            leaves = [((pytree.SequenceKey(i),), i) for i in range(len(user))]
        named = []
        for path, idx in leaves:
            key = _path_name(path) if path else "output"
            named.append((key, idx))
        top = {k: i for k, i in named}
        for preferred in ("logits", "last_hidden_state"):
            if preferred in top:
                named = [(preferred, top[preferred])]
                break
        out = []
        for key, idx in named:
            node = user[idx]
            if isinstance(node, torch.fx.Node) and isinstance(node.meta.get("val"), torch.Tensor):
                out.append((node, key))
        if not out:
            raise TraceError("the model returns no tensors")
        return out

    def _live_nodes(self, roots) -> set:
        """The nodes the outputs depend on, including in-place writes to any of them."""
        live, stack = set(), list(roots)
        while stack:
            n = stack.pop()
            if n in live:
                continue
            live.add(n)
            stack.extend(n.all_input_nodes)
            stack.extend(self.writers.get(self.in_place.get(n, n), ()))
        return live

    # --- placeholders and params ---
    def _placeholder(self, node, spec):
        from torch.export.graph_signature import InputKind
        val = node.meta.get("val")
        if spec.kind == InputKind.USER_INPUT:
            if isinstance(val, torch.Tensor):
                cx = NodeContext(self, node)
                self.env[node] = self.graph.add_input(cx.type_of(val), node.name)
            else:
                self.env[node] = val  # a constant non-tensor input (use_cache=False)
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            t = self._tensor_of(spec)
            # a small lifted constant is a tensor the model's code makes (torch.tensor(0.0) in
            # a mask helper): code, not a weight, so it stays in the graph, where passes can
            # see its value (substitute-attention proves masks by evaluating them)
            inline = spec.kind == InputKind.CONSTANT_TENSOR and t.device.type != "meta" \
                and t.numel() <= _INLINE_CONSTANT_NUMEL
            self.env[node] = _LazyParam(spec.target, t, inline=inline)
        else:
            raise TraceError(f"input {node.name} of kind {spec.kind.name} is not supported")

    def _tensor_of(self, spec) -> torch.Tensor:
        t = self.real_buffers.get(spec.target)
        if t is None:
            t = self.ep.state_dict.get(spec.target)
        if t is None:
            t = self.ep.constants.get(spec.target)
        if not isinstance(t, torch.Tensor):
            raise TraceError(f"no tensor for {spec.kind.name.lower()} '{spec.target}'")
        return t.detach()

    def _param(self, p: _LazyParam) -> Value:
        if p.value is None and p.inline:
            owner = p.name.rsplit(".", 1)[0] if "." in p.name else ""
            p.value = self.builder.constant(p.tensor.clone(), loc=Location(owner))
        if p.value is None:
            try:
                ttype = TensorType(tuple(p.tensor.shape), DType.from_torch(p.tensor.dtype))
            except IRError as e:
                raise TraceError(f"weight '{p.name}': {e}") from None
            if p.name in self.store:
                have = self.store.type_of(p.name)
                if self.given_store is not None and have != ttype:
                    raise TraceError(
                        f"weight '{p.name}' is {format_type(have)} in the given weight store but "
                        f"{format_type(ttype)} in the model; the store and the model disagree")
            else:
                self.store.add_tensor(p.name, p.tensor, source="module")
            self.module_tensors[p.name] = p.tensor
            owner = p.name.rsplit(".", 1)[0] if "." in p.name else ""
            p.value = self.builder.param(p.name, ttype, loc=Location(owner))
        return p.value

    # --- values ---
    def _value(self, x, where: str):
        """The converted form of an FX argument (recursing into lists)."""
        if isinstance(x, torch.fx.Node):
            if x not in self.env:
                raise TraceError(f"{where}: {x.name} was not converted")
            v = self.env[x]
            if isinstance(v, _LazyParam):
                return self._param(v)
            if isinstance(v, Unavailable):
                raise TraceError(f"{where}: uses {v.reason}")
            return v
        if isinstance(x, (list, tuple)):
            return type(x)(self._value(a, where) for a in x)
        if isinstance(x, torch.SymInt):
            return self.symbols.dim(x, where)
        return x

    def _call(self, node):
        target = node.target
        key = op_key(target)
        val = node.meta.get("val")
        if key in DROPPED_OPS:
            self.env[node] = None
            return
        if key in SYMBOLIC_INT_OPS:
            # sym_size and SymInt arithmetic: the value is torch's own symbolic result.
            self.env[node] = self._symbolic_value(val, node)
            return
        if key == "operator.getitem":
            seq, idx = node.args
            items = self.env[seq]
            item = items[idx]
            if isinstance(item, Unavailable):
                raise TraceError(f"{key} at {node_location(node)}: uses {item.reason}")
            self.env[node] = item
            return
        written = self.in_place.get(node)
        fn = CONVERTERS.get(_functional_twin(target) if written is not None else key)
        if fn is None:
            raise UnsupportedOpError(key, node_location(node))
        cx = NodeContext(self, node)
        args = self._bound_args(node, cx)
        result = fn(cx, **args)
        if written is not None:
            # x.add_(y): the functional result, in x's dtype, replaces x for later readers.
            result = cx.cast(result, cx.out_dtype)
            for alias in [written] + self.writers[written]:
                self.env[alias] = result
        self._check(cx, result)
        self.env[node] = result

    def _symbolic_value(self, val, node):
        if isinstance(val, (bool, torch.SymBool)):
            return val  # only consumed by dropped runtime asserts
        if isinstance(val, (int, torch.SymInt)):
            return self.symbols.dim(val, f"{op_key(node.target)} at {node_location(node)}")
        raise TraceError(f"{op_key(node.target)} at {node_location(node)}: symbolic value "
                         f"{val!r} of type {type(val).__name__} is not supported")

    def _bound_args(self, node, cx) -> dict:
        """The node's arguments by ATen schema name (``self`` is passed as ``x``), converted,
        with defaults filled in; device/layout/memory-format placement arguments are dropped
        (placement is the compiler's job, not the graph's)."""
        target = node.target
        where = cx.where()
        schema = getattr(target, "_schema", None)
        if schema is None:
            raise TraceError(f"{where}: no schema to bind arguments to")
        out = {}
        args = list(node.args)
        for i, a in enumerate(schema.arguments):
            if i < len(args) and not a.kwarg_only:
                v = args[i]
            elif a.name in node.kwargs:
                v = node.kwargs[a.name]
            elif a.has_default_value():
                v = a.default_value
            else:
                raise TraceError(f"{where}: missing argument {a.name}")
            if a.name in _PLACEMENT_ARGS:
                continue
            out["x" if a.name == "self" else a.name] = self._value(v, where)
        return out

    def _check(self, cx: NodeContext, result):
        """The converted result must have exactly the type torch propagated."""
        val = cx.out
        if isinstance(val, torch.Tensor):
            self._check_one(cx, result, val, "")
        elif isinstance(val, (list, tuple)):
            if not isinstance(result, (list, tuple)) or len(result) != len(val):
                raise TraceError(f"{cx.where()}: internal error: converter returned "
                                 f"{result!r} for {len(val)} results")
            for i, (r, v) in enumerate(zip(result, val)):
                if isinstance(v, torch.Tensor) and not isinstance(r, Unavailable):
                    self._check_one(cx, r, v, f" result {i}")

    def _check_one(self, cx, result, fake, what):
        if not isinstance(result, Value):
            raise TraceError(f"{cx.where()}: internal error: converter returned "
                             f"{type(result).__name__} for a tensor{what}")
        want = cx.type_of(fake)
        if result.type != want:
            raise TraceError(f"{cx.where()}: internal error: the converted{what} is "
                             f"{format_type(result.type)} but torch computed {format_type(want)}")


_PLACEMENT_ARGS = frozenset({"device", "layout", "pin_memory", "memory_format", "non_blocking"})


def _path_name(path) -> str:
    parts = []
    for k in path:
        for attr in ("name", "key", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
    name = "_".join(parts)
    if name and name[0].isdigit():
        name = "output" + name
    return re.sub(r"\W", "_", name) or "output"
