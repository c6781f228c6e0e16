"""The greedy pattern driver: apply a pattern set until nothing matches.

The algorithm (after MLIR's GreedyPatternRewriteDriver):

1. Put every op on a worklist, in graph order.
2. Pop an op.  If it is pure and nothing reads it, erase it.  Otherwise offer it to the
   patterns whose root is its op name (and to root-less patterns), highest benefit first, in
   the order given; the first that rewrites wins.
3. Every change the rewriter reports puts the ops it affects back on the worklist: created
   ops, readers of replaced values, producers of erased ops' operands (they may now be dead or
   have a single use).
4. Stop when the worklist is empty: a fixpoint.  A bound on the number of rewrites turns a
   set of patterns that undo each other into an error naming them.

Cost is proportional to the graph plus the rewrites, not graph × patterns, because patterns
are indexed by root op name.  Everything is ordered by graph position and pattern order, never
by hashing, so the same input gives the same output.
"""
from __future__ import annotations

import inspect
import sys
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence, Union

from irlm.errors import IRLMError
from irlm.ir import Graph, Op, Value
from irlm.registry import is_dead

from ..context import PassContext, Statistics
from ..errors import PassError, PassFailedError, RewriteError, RewriteLimitError, closest
from .pattern import RewritePattern
from .rewriter import RewriteListener, Rewriter

PatternLike = Union[RewritePattern, type]


def _did_you_mean_op(name: str, known) -> str:
    hint = closest(name, known)
    return f"; did you mean '{hint}'?" if hint else ""


class PatternSet:
    """Patterns indexed by root op name, each bucket in (benefit desc, given order)."""

    def __init__(self, patterns: Iterable[PatternLike]):
        self.patterns: list[RewritePattern] = []
        for p in patterns:
            if inspect.isclass(p) and issubclass(p, RewritePattern):
                p = p()
            if not isinstance(p, RewritePattern):
                raise TypeError(f"not a pattern: {p!r} (use @rule or subclass RewritePattern)")
            self.patterns.append(p)
        self._check_op_names()
        self._rank = {id(p): i for i, p in enumerate(self.patterns)}
        self._by_root: dict[str, list[RewritePattern]] = {}
        self._any_root: list[RewritePattern] = []
        for p in self.patterns:
            roots = p.roots
            if roots is None:
                self._any_root.append(p)
            else:
                for r in roots:
                    self._by_root.setdefault(r, []).append(p)
        self._cache: dict[str, tuple[RewritePattern, ...]] = {}

    def _check_op_names(self) -> None:
        """A misspelt op name (``op("core.mull")``) would silently never match: refuse it."""
        from irlm.registry import all_ops
        known = all_ops()
        for p in self.patterns:
            for name in sorted(p.op_names()):
                if name not in known:
                    raise PassError(f"pattern '{p.name}' names unknown op '{name}'"
                                    + _did_you_mean_op(name, known))

    def for_op(self, name: str) -> tuple[tuple[RewritePattern, Optional[Callable]], ...]:
        """(pattern, prefilter) for an op named ``name``, in the order to try them.

        A prefilter is a cheap necessary condition (declarative rules have one: root name,
        operand count, operand producers' names); most ops fail it without further work."""
        out = self._cache.get(name)
        if out is None:
            cands = self._by_root.get(name, []) + self._any_root
            ordered = sorted(cands, key=lambda p: (-p.benefit, self._rank[id(p)]))
            out = tuple((p, getattr(p, "prefilter", None)) for p in ordered)
            self._cache[name] = out
        return out

    def __len__(self) -> int:
        return len(self.patterns)

    def __iter__(self):
        return iter(self.patterns)


@dataclass
class DriverResult:
    rewrites: int          # successful pattern applications
    erased_dead: int       # ops erased because nothing read them
    visited: int           # ops popped from the worklist

    @property
    def changed(self) -> bool:
        return bool(self.rewrites or self.erased_dead)


class _Worklist(RewriteListener):
    """A LIFO of ops (so work follows the change that caused it) with O(1) membership."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.stack: list[Op] = list(graph.ops)
        self.stack.reverse()   # pop() yields graph order
        self.queued: set[Op] = set(self.stack)  # ops hash by identity; holding them pins ids

    def push(self, op: Optional[Op]) -> None:
        if op is not None and op not in self.queued:
            self.stack.append(op)
            self.queued.add(op)

    def pop(self) -> Op:
        op = self.stack.pop()
        self.queued.discard(op)
        return op

    # -- what the rewriter tells us --------------------------------------------------------
    def op_created(self, op: Op) -> None:
        self.push(op)

    def op_erased(self, op: Op) -> None:
        for v in op.operands:
            self.push(v.producer)

    def op_modified(self, op: Op) -> None:
        self.push(op)
        for r in op.results:
            for u in r.uses:
                self.push(u.op)

    def value_replaced(self, old: Value, new: Value, users: list[Op]) -> None:
        for u in users:
            self.push(u)
        self.push(old.producer)  # may be dead now
        self.push(new.producer)  # has more readers now (one-use patterns may stop matching)


def apply_patterns(graph: Graph, patterns: Union[PatternSet, Iterable[PatternLike]],
                   ctx: Optional[PassContext] = None, *, max_rewrites: Optional[int] = None,
                   erase_dead: bool = True) -> DriverResult:
    """Apply ``patterns`` to ``graph`` until none matches (a fixpoint).

    Statistics go to ``ctx.stats`` (per-pattern application counts, ops created/erased).
    ``max_rewrites`` bounds the work (default: 10 per op, at least 10,000); hitting it raises
    :class:`RewriteLimitError` naming the patterns that kept firing.
    """
    pset = patterns if isinstance(patterns, PatternSet) else PatternSet(patterns)
    stats = ctx.stats if ctx is not None else Statistics()
    if max_rewrites is None or max_rewrites <= 0:
        max_rewrites = max(10 * len(graph), 10_000)
    work = _Worklist(graph)
    rw = Rewriter(graph, stats, work)
    recent: deque[str] = deque(maxlen=1000)
    rewrites = erased = visited = 0

    stack, queued = work.stack, work.queued  # the hot loop pops inline
    while stack:
        op = stack.pop()
        queued.discard(op)
        if op.graph is not graph:
            continue  # erased since it was queued
        visited += 1
        if erase_dead and is_dead(op):
            rw.pattern_name = None
            rw.erase_op(op)
            erased += 1
            continue
        for pattern, prefilter in pset.for_op(op.name):
            if prefilter is not None and not prefilter(op):
                continue
            rw.pattern_name = pattern.name
            rw.loc = op.loc
            rw.set_insertion_point(before=op)
            before = rw.change_count
            try:
                applied = pattern.match_and_rewrite(op, rw)
            except RewriteError:
                raise
            except IRLMError as e:
                raise RewriteError(f"pattern '{pattern.name}' on {op.describe()}: {e}") from e
            except Exception as e:  # noqa: BLE001 - a bug in the pattern: say which one
                raise PassFailedError(f"pattern '{pattern.name}' failed on {op.describe()}: "
                                      f"{type(e).__name__}: {e}{_user_frame(e)}") from e
            if not applied and rw.change_count != before:
                raise RewriteError(f"pattern '{pattern.name}' changed the IR at {op.describe()} "
                                   f"but reported no rewrite; return True after changing it")
            if applied:
                rewrites += 1
                stats.patterns[pattern.name] += 1
                recent.append(pattern.name)
                if rewrites > max_rewrites:
                    raise _limit_error(rewrites, max_rewrites, recent, ctx)
                break
    rw.pattern_name = None
    return DriverResult(rewrites, erased, visited)


def _limit_error(rewrites: int, limit: int, recent: deque, ctx: Optional[PassContext]
                 ) -> RewriteLimitError:
    counts = Counter(recent).most_common(5)
    firing = ", ".join(f"'{n}' ({c} of the last {len(recent)})" for n, c in counts)
    who = f"pass '{ctx.pass_name}': " if ctx is not None else ""
    return RewriteLimitError(
        f"{who}no fixpoint after {limit} rewrites; these patterns keep firing: {firing} -- "
        f"they probably undo each other (if the graph is just very large, raise max_rewrites)")


def _user_frame(e: BaseException) -> str:
    """`` (at my_passes.py:12)``: the innermost frame outside irlm, where the bug likely is."""
    import traceback
    frames = traceback.extract_tb(e.__traceback__)
    for f in reversed(frames):
        if "/passes/" not in f.filename.replace("\\", "/") or "/tests/" in f.filename:
            return f" (at {f.filename}:{f.lineno})"
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def pattern_pass(name: str, patterns: Sequence[PatternLike], *, doc: Optional[str] = None,
                 max_rewrites: Optional[int] = None, replace: bool = False):
    """Register a pass that applies ``patterns`` greedily; returns the pass function.

    ``doc`` defaults to the patterns' names, then their docstrings' first lines (their
    equations), one a line."""
    from ..registry import register_pass
    pset = PatternSet(patterns)
    if doc is None:  # a one-line summary, then one equation a line
        doc = f"Applies {', '.join(p.name for p in pset)}.\n\n" + \
            "\n".join(f"{p.name}: {_first_line(p)}" for p in pset)

    def run(graph: Graph, ctx: PassContext) -> None:
        apply_patterns(graph, pset, ctx, max_rewrites=max_rewrites)

    run.__name__ = name.replace("-", "_")
    run.__doc__ = doc
    run.patterns = pset  # type: ignore[attr-defined]
    # the caller's frame alone: inspect.stack() would read every frame's source lines
    caller = sys._getframe(1)
    register_pass(name, doc=doc, replace=replace,
                  source=f"{caller.f_code.co_filename}:{caller.f_lineno}")(run)
    return run


def _first_line(p) -> str:
    doc = (type(p).__doc__ if not getattr(p, "__doc__", None) else p.__doc__) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""
