"""``--pass-plugin FILE``: load a Python file that registers passes and patterns.

The file is an ordinary module; it uses the public API (``irlm.passes.register_pass``,
``pattern_pass``, ``rule``, ``op``, ``Var``, ...).  Anything wrong with it (missing, a syntax
error, an exception while it runs) is one message naming the file and line.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path
from types import ModuleType

from irlm.errors import IRLMError

from .errors import PluginError

_loaded: dict[str, ModuleType] = {}


def load_plugin(path) -> ModuleType:
    """Execute the plugin file (once per resolved path and contents) and return its module."""
    p = Path(path)
    if not p.is_file():
        why = "is a directory" if p.is_dir() else "no such file"
        raise PluginError(f"pass plugin {path}: {why}")
    try:
        source = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise PluginError(f"pass plugin {path}: cannot read it: {e}") from None
    key = f"{p.resolve()}:{hashlib.sha1(source.encode()).hexdigest()}"
    if key in _loaded:
        return _loaded[key]
    try:
        code = compile(source, str(p), "exec")
    except SyntaxError as e:
        col = f":{e.offset}" if e.offset else ""
        raise PluginError(f"pass plugin {path}:{e.lineno}{col}: syntax error: {e.msg}") from None
    name = "irlm_plugin_" + "".join(c if c.isalnum() else "_" for c in p.stem) + "_" + \
        hashlib.sha1(key.encode()).hexdigest()[:8]
    spec = importlib.util.spec_from_loader(name, loader=None, origin=str(p))
    module = importlib.util.module_from_spec(spec)
    module.__file__ = str(p)
    sys.modules[name] = module
    try:
        exec(code, module.__dict__)
    except IRLMError as e:
        sys.modules.pop(name, None)
        raise PluginError(f"pass plugin {path}{_line_in(e, p)}: {e}") from e
    except Exception as e:  # noqa: BLE001 - the plugin's bug, reported as one line
        sys.modules.pop(name, None)
        raise PluginError(f"pass plugin {path}{_line_in(e, p)}: {type(e).__name__}: {e}") from e
    _loaded[key] = module
    return module


def _line_in(e: BaseException, path: Path) -> str:
    """``:LINE`` of the innermost frame in the plugin file, if any."""
    target = str(path)
    for f in reversed(traceback.extract_tb(e.__traceback__)):
        if f.filename == target:
            return f":{f.lineno}"
    return ""
