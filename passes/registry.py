"""The pass registry: each pass is registered once, by name, with its typed options.

A pass is a function ``fn(graph, ctx)`` (or ``fn(graph)``) that rewrites the graph in place,
or a class whose instances are made with the options as keyword arguments and whose
``run(graph, ctx)`` rewrites it.  ``ctx`` is a :class:`~irlm.passes.context.PassContext`:
``ctx.options`` holds the option values, ``ctx.stats`` the counters ``--stats`` prints.

::

    @register_pass("fold-identity-arith", doc="x * 1 = x, x + 0 = x")
    def fold_identity_arith(graph, ctx):
        apply_patterns(graph, [mul_by_one, add_zero], ctx)
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from irlm.ir import Graph

from .context import PassContext
from .errors import PassError, did_you_mean
from .options import Option, resolve_options

PASS_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")
OPTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


@dataclass
class PassInfo:
    """A registered pass: ``run(graph, ctx)`` plus what ``--list-passes`` shows."""
    name: str
    impl: Any                       # the decorated function or class
    options: dict[str, Option] = field(default_factory=dict)
    doc: str = ""
    source: str = ""                # "file:line" of the definition, for duplicate errors

    @property
    def summary(self) -> str:
        """The doc's first paragraph on one line."""
        return " ".join(self.doc.strip().split("\n\n")[0].split())

    def resolve(self, given: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Typed option values with defaults filled in; errors name this pass."""
        return resolve_options(self.name, self.options, given or {})

    def run(self, graph: Graph, ctx: PassContext) -> None:
        impl = self.impl
        if inspect.isclass(impl):
            impl(**ctx.options.as_dict()).run(graph, ctx)
        elif _takes_one_argument(impl):
            impl(graph)
        else:
            impl(graph, ctx)


_PASSES: dict[str, PassInfo] = {}


def register_pass(name: str, *, options: Optional[dict[str, Option]] = None,
                  doc: Optional[str] = None, replace: bool = False,
                  source: Optional[str] = None):
    """Decorator: register a pass function or class under ``name``.

    ``options`` maps option names (identifiers) to :class:`Option`; ``doc`` defaults to the
    docstring.  Registering a name twice is an error unless ``replace=True`` or both
    registrations come from the same file (a plugin loaded twice).
    """
    if not isinstance(name, str) or not PASS_NAME.fullmatch(name):
        raise PassError(f"invalid pass name {name!r}: use letters, digits, '_', '-' and '.'")
    options = dict(options or {})
    for key, opt in options.items():
        if not OPTION_NAME.fullmatch(key):
            raise PassError(f"pass '{name}': invalid option name {key!r} (use an identifier)")
        if not isinstance(opt, Option):
            raise PassError(f"pass '{name}': option '{key}' must be an Option, got "
                            f"{type(opt).__name__}")

    def decorate(impl):
        # Built-ins first, so a user pass that takes a built-in's name is the one refused.
        _ensure_builtin_passes()
        if not callable(impl):
            raise PassError(f"pass '{name}': register_pass decorates a function or a class")
        if inspect.isclass(impl) and not hasattr(impl, "run"):
            raise PassError(f"pass '{name}': class {impl.__name__} has no run(graph, ctx) method")
        where = source or _source_of(impl)
        old = _PASSES.get(name)
        if old is not None and not replace and _file(old.source) != _file(where):
            raise PassError(f"pass '{name}' is already registered (by {old.source}); "
                            f"pick another name or pass replace=True")
        _PASSES[name] = PassInfo(name, impl, options, inspect.cleandoc(doc or impl.__doc__ or ""),
                                 where)
        return impl
    return decorate


def get_pass(name: str) -> PassInfo:
    _ensure_builtin_passes()
    try:
        return _PASSES[name]
    except KeyError:
        raise PassError(f"unknown pass '{name}'" + did_you_mean(name, _PASSES, "passes")) from None


def has_pass(name: str) -> bool:
    _ensure_builtin_passes()
    return name in _PASSES


def all_passes() -> dict[str, PassInfo]:
    _ensure_builtin_passes()
    return dict(sorted(_PASSES.items()))


def unregister_pass(name: str) -> None:
    """Remove a pass (tests use this to undo what they registered)."""
    _PASSES.pop(name, None)


_builtins = "not loaded"


def _ensure_builtin_passes() -> None:
    global _builtins
    if _builtins != "not loaded":
        return  # loaded, or loading (a built-in module registering its own pass)
    _builtins = "loading"
    try:
        from . import builtin  # noqa: F401  (registers canonicalize, cse, dce, ...)
    except BaseException:
        _builtins = "not loaded"
        raise
    _builtins = "loaded"


def _source_of(obj) -> str:
    try:
        return f"{inspect.getsourcefile(obj)}:{inspect.getsourcelines(obj)[1]}"
    except (OSError, TypeError):
        return getattr(obj, "__module__", "?") or "?"


def _file(source: str) -> str:
    return source.rsplit(":", 1)[0]


def _takes_one_argument(fn: Callable) -> bool:
    try:
        params = [p for p in inspect.signature(fn).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return False
    return len(params) == 1
