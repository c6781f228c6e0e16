"""Model files: a Python file that builds the model itself.

The contract (what ``irlm compile model.py`` relies on)::

    def build_model() -> torch.nn.Module: ...        # required
    def example_inputs() -> tuple[torch.Tensor, ...]: ...   # required to compile; positional
                                                             # inputs of the model's forward

The module holds its own tensors (real or random weights); the loaded model has no separate
weight store, so the tracer takes the module's parameters as they are.  Every failure — the
file is missing, does not import, lacks ``build_model``, or ``build_model`` raises — is one
:class:`~.loaded_model.ModelLoadError` naming the file (and the line, when the file's own code
raised).
"""
from __future__ import annotations

import hashlib
import importlib.util
import traceback
from pathlib import Path
from types import ModuleType

import torch

from .loaded_model import LoadedModel, ModelLoadError

BUILD_FUNCTION = "build_model"
EXAMPLE_INPUTS_FUNCTION = "example_inputs"


def import_model_file(path) -> ModuleType:
    """Execute a model file as a fresh module (not added to ``sys.modules``)."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: no such model file")
    # a unique name per path, so two model files never share a module object
    name = "irlm_model_" + hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ModelLoadError(f"{path}: cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ModelLoadError(f"{path}:{e.lineno}: syntax error: {e.msg}") from None
    except Exception as e:
        raise ModelLoadError(f"{_where(path, e)}: importing the model file raised "
                             f"{type(e).__name__}: {e}") from None
    return module


def load_model_file(path) -> LoadedModel:
    """Import ``path``, call its ``build_model()`` and wrap the result."""
    path = Path(path)
    code = import_model_file(path)
    build = getattr(code, BUILD_FUNCTION, None)
    if not callable(build):
        raise ModelLoadError(f"{path}: defines no {BUILD_FUNCTION}() function (a model file "
                             f"must define {BUILD_FUNCTION}() returning a torch.nn.Module)")
    module = _call(path, build, BUILD_FUNCTION)
    if not isinstance(module, torch.nn.Module):
        raise ModelLoadError(f"{path}: {BUILD_FUNCTION}() returned {type(module).__name__}, "
                             f"not a torch.nn.Module")
    module.eval()
    make_inputs = getattr(code, EXAMPLE_INPUTS_FUNCTION, None)
    example_inputs_fn = None
    if callable(make_inputs):
        def example_inputs_fn():
            inputs = _call(path, make_inputs, EXAMPLE_INPUTS_FUNCTION)
            if isinstance(inputs, torch.Tensor):
                inputs = (inputs,)
            if not isinstance(inputs, (tuple, list)) or \
                    not all(isinstance(x, torch.Tensor) for x in inputs):
                raise ModelLoadError(f"{path}: {EXAMPLE_INPUTS_FUNCTION}() must return a tuple "
                                     f"of tensors, got {type(inputs).__name__}")
            return tuple(inputs)
    return LoadedModel(module=module, weights=None, config=getattr(module, "config", None),
                       source=path, format="model.py", example_inputs_fn=example_inputs_fn)


def _call(path: Path, fn, name: str):
    try:
        return fn()
    except Exception as e:
        raise ModelLoadError(f"{_where(path, e)}: {name}() raised {type(e).__name__}: "
                             f"{e}") from None


def _where(path: Path, error: BaseException) -> str:
    """``path:LINE`` of the deepest frame of ``error``'s traceback that is in the model file."""
    target = str(path.resolve())
    line = None
    for frame in traceback.extract_tb(error.__traceback__):
        try:
            if str(Path(frame.filename).resolve()) == target:
                line = frame.lineno
        except OSError:
            continue
    return f"{path}:{line}" if line else str(path)
