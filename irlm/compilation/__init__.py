"""irlm.compilation: the compile library, ``irlm.compile(source, CompileConfig(...))``.

::

    import irlm
    engine = irlm.compile("SmolLM2-135M-Instruct.Q4_1.gguf",
                          irlm.CompileConfig(output="smollm2-engine", max_seq=512))
    llm = irlm.runtime.LLM.from_engine(engine.path)

Modules: :mod:`.config` (the typed settings), :mod:`.source` (what can be compiled and how
it is loaded), :mod:`.stages` (the stages, in order), :mod:`.parallel` (the tp/pp split
stages), :mod:`.driver` (:func:`compile`), :mod:`.build` (:func:`build_engine`: an IR
file and its weights → an engine), :mod:`.causal_lm` (a module → its inference-form
graph in memory, for tests and benchmarks).  ``irlm compile`` (irlm/cli/compile.py) is
argument parsing around :func:`compile`.
"""
from .build import BuildResult, WeightsMismatchError, build_engine
from .causal_lm import compile_causal_lm, inference_example_inputs, pipeline_for
from .config import CompileConfig
from .driver import CompiledEngine, ProgressCallback, compile
from .source import Source

__all__ = ["compile", "CompileConfig", "CompiledEngine", "ProgressCallback", "Source",
           "build_engine", "BuildResult", "WeightsMismatchError",
           "compile_causal_lm", "inference_example_inputs", "pipeline_for"]
