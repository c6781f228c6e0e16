"""Patterns: what a rewrite looks for, stated so that it reads like the math.

Two ways to write a pattern:

**Declarative DAG patterns** (the usual way).  Build the expression you are looking for out of
``op(...)``, ``Var(...)``, ``Const(...)``, ``Or(...)``, then attach a rewrite with ``@rule``::

    x = Var("x")

    @rule(x * 1.0)                                   # op("core.mul")(x, Const(1.0))
    def mul_by_one(m, rw):
        '''x * 1 = x   (when broadcasting does not change x's type)'''
        return m.x if m.x.type == m.root.result.type else None

- ``op("core.reshape", "core.view")`` matches either op; keyword arguments constrain
  attributes: ``op("core.softmax", dim=-1)`` (equal), ``dim=lambda d: d < 0`` (predicate),
  ``dim=Var("d")`` (capture; repeating the name requires equal attributes).
- Calling an op pattern gives its operands: ``op("core.matmul")(x, w)``; a trailing ``...``
  accepts any further operands; not calling it accepts any operands.  Operands of ops the
  registry marks ``commutative`` are tried in both orders, automatically.
- ``Var("x")`` matches any value and captures it as ``m.x``; the same name twice means the
  same value (``x * x``).  ``Wildcard()`` (or ``ANY``) matches any value without capturing.
- ``Const(1.0)`` matches a constant whose every element is 1.0 (``core.constant`` or
  ``core.full``); ``Const()`` any constant.
- Constraints chain and apply to the value matched: ``.has_dtype(DType.f32)``,
  ``.is_float()``, ``.has_rank(2)``, ``.has_shape(None, 576)``, ``.one_use()``,
  ``.where(lambda v: ...)``.  ``.named("t")`` captures an op pattern's op as ``m.t``.
- ``p | q`` (or ``Or(p, q)``) tries ``p`` then ``q``.
- ``+ - * / @`` and unary ``-`` build ``core.add/sub/mul/div/matmul/neg``; numbers become
  ``Const``.

A rewrite function receives the :class:`Match` ``m`` (``m.root`` is the matched op) and the
:class:`~irlm.passes.rewriting.rewriter.Rewriter` ``rw``, and returns the value(s) that replace the root's
results, or ``None`` to decline (having changed nothing).  If it declines, the next way of
matching (the other operand order, the next ``Or`` branch) is tried.

**Imperative patterns** for what a DAG cannot say: subclass :class:`RewritePattern`, set
``root`` (an op name or a tuple of them) and implement ``match_and_rewrite(op, rw) -> bool``.
Mutate only through ``rw``, and only once you are sure to succeed.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch

from irlm.ir import Op, Value
from irlm.registry import get_op_def, has_op
from irlm.types import DType, dims_equal

from ..errors import RewriteError

Env = dict[str, Any]


# ----- helpers ---------------------------------------------------------------------------------


def constant_tensor(v: Value) -> Optional[torch.Tensor]:
    """The data of a ``core.constant`` result, else None."""
    p = v.producer
    if p is not None and p.name == "core.constant":
        return p.attrs["value"]
    return None


def splat_value(v: Value) -> Optional[float]:
    """The one value every element of ``v`` has, when ``v`` is a constant splat; else None.

    ``core.full`` is a splat by definition; a ``core.constant`` is one when all its elements
    are equal (and it is not empty).
    """
    p = v.producer
    if p is None:
        return None
    if p.name == "core.full":
        return p.attrs["value"]
    if p.name == "core.constant":
        t = p.attrs["value"]
        if t.numel() == 0:
            return None
        first = t.reshape(-1)[0]
        if t.numel() == 1 or bool(torch.all(t == first)):
            return first.item()
    return None


def same_type(a, b) -> bool:
    """Do two values (or two TensorTypes) have the same type?

    Equal to ``a.type == b.type`` but fast where rewrites need it: shapes usually share their
    dim objects, and a static dim never equals a symbolic one (constant expressions are
    normalized to ints), so sympy is consulted only for two different symbolic dims."""
    if isinstance(a, Value):
        a = a.type
    if isinstance(b, Value):
        b = b.type
    if a is b:
        return True
    if a.dtype is not b.dtype:
        return False
    sa, sb = a.shape, b.shape
    if len(sa) != len(sb):
        return False
    for x, y in zip(sa, sb):
        if x is y:
            continue
        if type(x) is int or type(y) is int:
            if not (type(x) is int and type(y) is int and x == y):
                return False
        elif not dims_equal(x, y):
            return False
    return True


def is_graph_output(v: Value) -> bool:
    g = v.producer.graph if v.producer is not None else None
    return g is not None and any(o is v for o in g.outputs)


def has_one_use(v: Value) -> bool:
    """Exactly one operand reads ``v`` and it is not a graph output."""
    return len(v.uses) == 1 and not is_graph_output(v)


def _attr_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, list):
        a = tuple(a)
    if isinstance(b, list):
        b = tuple(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    return a == b


# ----- the pattern nodes -----------------------------------------------------------------------


class Pattern:
    """Matches one value.  Immutable: every constraint method returns a new pattern."""

    def __init__(self):
        self._checks: tuple[tuple[str, Callable[[Value], bool]], ...] = ()
        self._capture: Optional[str] = None

    def op_names(self) -> frozenset[str]:
        """Every op name this pattern (and its operand patterns) can match."""
        return frozenset()

    # -- constraints on the matched value ---------------------------------------------------
    def where(self, predicate: Callable[[Value], bool], what: str = "") -> "Pattern":
        """Also require ``predicate(value)``."""
        return self._with_check(what or getattr(predicate, "__name__", "where"), predicate)

    def has_dtype(self, *dtypes: DType) -> "Pattern":
        """The value's element type is one of ``dtypes``."""
        allowed = frozenset(dtypes)
        return self._with_check("dtype in {" + ",".join(sorted(d.value for d in allowed)) + "}",
                                lambda v: v.type.dtype in allowed)

    def is_float(self) -> "Pattern":
        return self._with_check("float", lambda v: v.type.dtype.is_float)

    def is_int(self) -> "Pattern":
        return self._with_check("int", lambda v: v.type.dtype.is_int)

    def has_rank(self, *ranks: int) -> "Pattern":
        allowed = frozenset(ranks)
        return self._with_check(f"rank in {sorted(allowed)}", lambda v: v.type.rank in allowed)

    def has_shape(self, *dims) -> "Pattern":
        """The value's shape is ``dims``; ``None`` accepts any size at that position."""
        def check(v: Value) -> bool:
            s = v.type.shape
            return len(s) == len(dims) and all(d is None or dims_equal(a, d)
                                               for a, d in zip(s, dims))
        return self._with_check(f"shape {list(dims)}", check)

    def one_use(self) -> "Pattern":
        """Exactly one op reads the value (and it is not a graph output), so a rewrite that
        absorbs it does not duplicate work."""
        return self._with_check("one use", has_one_use)

    def named(self, name: str) -> "Pattern":
        """Capture what this pattern matched as ``m.<name>``: the op for an op pattern (to
        read its attributes), the value otherwise."""
        out = copy.copy(self)
        out._capture = name
        return out

    def _with_check(self, what: str, fn: Callable[[Value], bool]) -> "Pattern":
        out = copy.copy(self)
        out._checks = self._checks + ((what, fn),)
        return out

    def _checks_pass(self, v: Value) -> bool:
        for _, fn in self._checks:
            if not fn(v):
                return False
        return True

    # -- matching ---------------------------------------------------------------------------
    def match_value(self, v: Value, env: Optional[Env] = None) -> Iterator[Env]:
        """Every way this pattern matches ``v`` (each an environment of captures)."""
        raise NotImplementedError

    def root_names(self) -> Optional[frozenset[str]]:
        """Op names a match must be rooted at (None: this pattern cannot be a root)."""
        return None

    # -- operator sugar: the pattern reads like the expression --------------------------------
    def __add__(self, other): return op("core.add")(self, _lift(other))
    def __radd__(self, other): return op("core.add")(_lift(other), self)
    def __sub__(self, other): return op("core.sub")(self, _lift(other))
    def __rsub__(self, other): return op("core.sub")(_lift(other), self)
    def __mul__(self, other): return op("core.mul")(self, _lift(other))
    def __rmul__(self, other): return op("core.mul")(_lift(other), self)
    def __truediv__(self, other): return op("core.div")(self, _lift(other))
    def __rtruediv__(self, other): return op("core.div")(_lift(other), self)
    def __matmul__(self, other): return op("core.matmul")(self, _lift(other))
    def __neg__(self): return op("core.neg")(self)
    def __or__(self, other): return Or(self, _lift(other))

    def _suffix(self) -> str:
        out = "".join(f".{w}" for w, _ in self._checks)
        return out + (f" as {self._capture}" if self._capture else "")


def _lift(x) -> Pattern:
    if isinstance(x, Pattern):
        return x
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return Const(x)
    raise TypeError(f"cannot use {x!r} in a pattern (use a Pattern or a number)")


class Var(Pattern):
    """Any value, captured as ``m.<name>``; the same name twice must be the same value."""

    def __init__(self, name: Optional[str] = None):
        super().__init__()
        self._capture = name

    @property
    def name(self) -> Optional[str]:
        return self._capture

    def match_value(self, v, env=None):
        env = {} if env is None else env
        if not self._checks_pass(v):
            return
        name = self._capture
        if name is None:
            yield env
        elif name in env:
            if env[name] is v:
                yield env
        else:
            yield {**env, name: v}

    def __repr__(self):
        return (self._capture or "_") + "".join(f".{w}" for w, _ in self._checks)


def Wildcard() -> Var:
    """Any value, not captured."""
    return Var(None)


ANY = Wildcard()


class Const(Var):
    """A constant value; with ``value``, one whose every element equals it (a splat).

    Matches ``core.constant`` and ``core.full``.  Captured (with ``name``) as the value.
    """

    def __init__(self, value: Optional[float] = None, name: Optional[str] = None):
        super().__init__(name)
        self.value = value

    def match_value(self, v, env=None):
        p = v.producer
        if p is None or p.name not in _CONSTANT_OPS:
            return
        if self.value is not None:
            s = splat_value(v)
            if s is None or s != self.value:
                return
        yield from super().match_value(v, env)

    def __repr__(self):
        return ("const" if self.value is None else repr(self.value)) + self._suffix()


class OpPattern(Pattern):
    """A value produced by one of ``names``, with attribute and operand constraints.

    Built by :func:`op`; call it to give operand patterns.
    """

    def __init__(self, names: Sequence[str], attrs: dict[str, Any],
                 operands: Optional[tuple[Pattern, ...]] = None, variadic: bool = False,
                 result_index: Optional[int] = None):
        super().__init__()
        if not names:
            raise TypeError("op() needs at least one op name")
        self.names = frozenset(names)
        self._names_in_order = tuple(names)
        self.attrs = dict(attrs)
        self.operands = operands
        self.variadic = variadic
        self.result_index = result_index
        self._commutative: Optional[bool] = None

    def op_names(self) -> frozenset[str]:
        names = set(self.names)
        for o in self.operands or ():
            names |= o.op_names()
        return frozenset(names)

    def __call__(self, *operands) -> "OpPattern":
        """The op's operands, in order; a trailing ``...`` accepts any further ones."""
        variadic = bool(operands) and operands[-1] is Ellipsis
        if variadic:
            operands = operands[:-1]
        out = copy.copy(self)
        out.operands = tuple(_lift(o) for o in operands)
        out.variadic = variadic
        return out

    def result(self, index: int) -> "OpPattern":
        """Match only result ``index`` of a multi-result op."""
        out = copy.copy(self)
        out.result_index = index
        return out

    def root_names(self):
        return self.names

    @property
    def commutative(self) -> bool:
        # Looked up lazily: a plugin may build patterns before its dialect is loaded.
        if self._commutative is None:
            self._commutative = all(has_op(n) and get_op_def(n).commutative for n in self.names)
        return self._commutative

    # -- matching ---------------------------------------------------------------------------
    def match_value(self, v, env=None):
        env = {} if env is None else env
        p = v.producer
        if p is None or p.name not in self.names:
            return
        if self.result_index is not None and v.result_index != self.result_index:
            return
        if not self._checks_pass(v):
            return
        yield from self._match_op(p, env)

    def match_op(self, op: Op, env: Optional[Env] = None) -> Iterator[Env]:
        """Every way this pattern matches with ``op`` as its root."""
        env = {} if env is None else env
        if op.name not in self.names:
            return
        if self._checks:
            if not op.results:
                return
            if not self._checks_pass(op.results[self.result_index or 0]):
                return
        yield from self._match_op(op, env)

    def may_match_op(self, op: Op) -> bool:
        """A cheap necessary condition for :meth:`match_op`: the root's name and operand
        count, and the op names of its direct operands' producers.  The driver calls it on
        every candidate op, so most non-matches end here without building generators."""
        if op.name not in self.names:
            return False
        pats = self.operands
        if pats is None:
            return True
        operands = op.operands
        n = len(pats)
        if len(operands) < n or (not self.variadic and len(operands) != n):
            return False
        if _producers_fit(pats, operands):
            return True
        return n >= 2 and self.commutative and \
            _producers_fit((pats[1], pats[0]), operands)

    def _match_op(self, p: Op, env: Env) -> Iterator[Env]:
        env = self._match_attrs(p, env)
        if env is None:
            return
        capture = self._capture
        if capture is not None:
            if capture in env:
                if env[capture] is not p:
                    return
            else:
                env = {**env, capture: p}
        pats = self.operands
        if pats is None:
            yield env
            return
        operands = p.operands
        n = len(pats)
        if len(operands) < n or (not self.variadic and len(operands) != n):
            return
        yield from _match_sequence(pats, operands, 0, env)
        if n >= 2 and self.commutative and operands[0] is not operands[1]:
            swapped = [operands[1], operands[0], *operands[2:]]
            yield from _match_sequence(pats, swapped, 0, env)

    def _match_attrs(self, p: Op, env: Env) -> Optional[Env]:
        for key, want in self.attrs.items():
            have = p.attrs.get(key)
            if isinstance(want, Var):
                name = want.name
                if name is None:
                    continue
                if name in env:
                    if not _attr_equal(env[name], have):
                        return None
                else:
                    env = {**env, name: have}
            elif callable(want) and not isinstance(want, (torch.Tensor, DType)):
                if not want(have):
                    return None
            elif not _attr_equal(have, want):
                return None
        return env

    def __repr__(self):
        name = "|".join(self._names_in_order)
        attrs = ", ".join(f"{k}={_show_attr(v)}" for k, v in self.attrs.items())
        head = name + (f"{{{attrs}}}" if attrs else "")
        if self.operands is None:
            return head + "(...)" + self._suffix()
        ops = [repr(o) for o in self.operands] + (["..."] if self.variadic else [])
        return head + "(" + ", ".join(ops) + ")" + self._suffix()


def _producers_fit(pats, operands) -> bool:
    for pat, v in zip(pats, operands):
        names = pat.names if type(pat) is OpPattern else \
            (_CONSTANT_OPS if isinstance(pat, Const) else None)
        if names is not None:
            prod = v.producer
            if prod is None or prod.name not in names:
                return False
    return True


_CONSTANT_OPS = frozenset({"core.constant", "core.full"})


def _show_attr(v) -> str:
    if isinstance(v, Var):
        return repr(v)
    if callable(v) and not isinstance(v, (torch.Tensor, DType)):
        return getattr(v, "__name__", "<predicate>")
    return repr(v)


def _match_sequence(pats: Sequence[Pattern], values: Sequence[Value], i: int,
                    env: Env) -> Iterator[Env]:
    if i == len(pats):
        yield env
        return
    for e in pats[i].match_value(values[i], env):
        yield from _match_sequence(pats, values, i + 1, e)


class Or(Pattern):
    """The first of ``alternatives`` that matches (each is tried in order on backtracking)."""

    def __init__(self, *alternatives: Pattern):
        super().__init__()
        flat: list[Pattern] = []
        for a in alternatives:
            a = _lift(a)
            flat.extend(a.alternatives if isinstance(a, Or) and not a._checks
                        and a._capture is None else [a])
        self.alternatives = tuple(flat)

    def op_names(self) -> frozenset[str]:
        return frozenset().union(*(a.op_names() for a in self.alternatives))

    def match_value(self, v, env=None):
        env = {} if env is None else env
        if not self._checks_pass(v):
            return
        for alt in self.alternatives:
            for e in alt.match_value(v, env):
                yield self._bind(e, v)

    def match_op(self, op, env=None):
        env = {} if env is None else env
        for alt in self.alternatives:
            if not isinstance(alt, (OpPattern, Or)):
                continue
            for e in alt.match_op(op, env):
                if self._checks and not (op.results and self._checks_pass(op.results[0])):
                    continue
                yield self._bind(e, op)

    def may_match_op(self, op) -> bool:
        return any(not isinstance(a, (OpPattern, Or)) or a.may_match_op(op)
                   for a in self.alternatives)

    def _bind(self, env, what):
        if self._capture is None or self._capture in env:
            return env
        return {**env, self._capture: what}

    def root_names(self):
        names: set[str] = set()
        for a in self.alternatives:
            r = a.root_names()
            if r is None:
                return None
            names |= r
        return frozenset(names)

    def __repr__(self):
        return "(" + " | ".join(map(repr, self.alternatives)) + ")" + self._suffix()


def op(*names: str, **attrs) -> OpPattern:
    """An op pattern: ``op("core.transpose", dim0=Var("a"))(x)``.  Several names match any
    of them; keyword arguments constrain attributes (value, predicate or ``Var`` capture)."""
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"op names are strings, got {n!r}")
    return OpPattern(names, attrs)


# ----- matches and rewrite patterns ------------------------------------------------------------


class Match:
    """The captures of one match: ``m.x`` / ``m["x"]``; ``m.root`` is the op matched."""
    __slots__ = ("root", "captures")

    def __init__(self, root: Op, captures: Env):
        self.root = root
        self.captures = captures

    def __getattr__(self, name: str):
        try:
            return self.captures[name]
        except KeyError:
            raise AttributeError(f"the pattern captured no '{name}' (captures: "
                                 f"{', '.join(self.captures) or 'none'})") from None

    def __getitem__(self, name: str):
        return self.captures[name]

    def __contains__(self, name: str) -> bool:
        return name in self.captures

    def get(self, name: str, default=None):
        return self.captures.get(name, default)

    def __repr__(self):
        return f"Match({self.root.name}, {self.captures})"


class RewritePattern:
    """A rewrite the greedy driver applies: ``match_and_rewrite(op, rw) -> bool``.

    Class attributes: ``root`` (op name, or tuple of names, the driver offers this pattern;
    None: every op), ``benefit`` (higher is tried first), ``name`` (for statistics; the class
    name by default), ``prefilter`` (optional).  The docstring states the rule as an equation.
    """
    root: Union[str, tuple[str, ...], None] = None
    benefit: int = 1
    name: Optional[str] = None
    #: Optional ``prefilter(op) -> bool``, a cheap necessary condition the driver checks first.
    prefilter: Optional[Callable[[Op], bool]] = None

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if "name" not in cls.__dict__ or cls.__dict__["name"] is None:
            cls.name = cls.__name__

    @property
    def roots(self) -> Optional[tuple[str, ...]]:
        r = self.root
        if r is None:
            return None
        return (r,) if isinstance(r, str) else tuple(r)

    def op_names(self) -> frozenset[str]:
        """The op names this pattern refers to (checked against the registry by PatternSet)."""
        return frozenset(self.roots or ())

    def match_and_rewrite(self, op: Op, rw) -> bool:
        raise NotImplementedError(f"{type(self).__name__}.match_and_rewrite")

    def __repr__(self):
        return f"<pattern {self.name}>"


RewriteFn = Callable[[Match, Any], Any]


class Rule(RewritePattern):
    """A declarative pattern plus its rewrite function (see :func:`rule`)."""

    def __init__(self, pattern: Pattern, rewrite: RewriteFn, name: Optional[str] = None,
                 doc: Optional[str] = None, benefit: int = 1):
        if not isinstance(pattern, (OpPattern, Or)) or pattern.root_names() is None:
            raise TypeError(f"a rule's pattern must be rooted at an op (op(...) or an Or of "
                            f"them), got {pattern!r}")
        params = [p for p in inspect.signature(rewrite).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        if len(params) != 2:
            raise TypeError(f"rewrite function {getattr(rewrite, '__name__', rewrite)!r} must "
                            f"take (m, rw)")
        self.pattern = pattern
        self.rewrite = rewrite
        self.name = name or getattr(rewrite, "__name__", "rule")
        self.__doc__ = inspect.cleandoc(doc or rewrite.__doc__ or "")
        self.benefit = benefit
        self.root = tuple(sorted(pattern.root_names()))
        self.prefilter = pattern.may_match_op  # the driver checks it before match_and_rewrite

    def op_names(self) -> frozenset[str]:
        return self.pattern.op_names()

    def match(self, op: Op) -> Optional[Match]:
        """The first match rooted at ``op`` (for tests and tools), else None."""
        for env in self.pattern.match_op(op, {}):
            return Match(op, env)
        return None

    def match_and_rewrite(self, op: Op, rw) -> bool:
        # (the driver has already checked self.prefilter; match_op checks everything anyway)
        for env in self.pattern.match_op(op, {}):
            m = Match(op, env)
            before = rw.change_count
            result = self.rewrite(m, rw)
            if result is None or result is False:
                if rw.change_count != before:
                    raise RewriteError(f"pattern '{self.name}' changed the IR and then declined "
                                       f"(returned {result!r}); decide before rewriting")
                continue  # try the next way of matching
            if result is True:
                return True
            if isinstance(result, Op):
                result = result.results
            if isinstance(result, Value):
                result = [result]
            if not isinstance(result, (list, tuple)) or \
                    not all(isinstance(r, Value) for r in result):
                raise RewriteError(f"pattern '{self.name}' returned {result!r}; return the "
                                   f"replacement value(s), an Op, True or None")
            rw.replace_op(op, list(result))
            return True
        return False

    def __repr__(self):
        return f"<rule {self.name}: {self.pattern!r}>"


def rule(pattern: Pattern, *, benefit: int = 1, name: Optional[str] = None):
    """Decorator: ``@rule(pattern) def name(m, rw): '''equation'''; return replacement``."""
    def decorate(fn: RewriteFn) -> Rule:
        return Rule(pattern, fn, name=name, benefit=benefit)
    return decorate
