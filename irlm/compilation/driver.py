"""``irlm.compile(source, config)``: run every stage of a compile and return the engine."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import safe_io
from ..errors import IRLMError
from .config import CompileConfig
from .source import Source
from .stages import CALIB_TOKENS, STAGES, CompileJob
from irlm.lowering.engine_format import Engine

#: ``progress(stage_name, index, total)``, called before each stage runs
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class CompiledEngine(Engine):
    """What :func:`compile` returns: the engine it wrote (an
    :class:`irlm.lowering.engine_format.Engine`: path, final graph, build config, tokenizer, ranks;
    ``graph`` is rank 0's for a split engine) plus the compile's record."""
    model: Any = None                  # the LoadedModel that was compiled
    full_graph: Any = None             # the whole model's final graph (before a tp/pp split)
    pipeline: str = ""                 # the pipeline text that ran (as in engine.json)
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    #: False when no engine directory was written (write_engine=False, or a model that is
    #: not a causal LM: only its IR is in OUT/ir/)
    engine_written: bool = False
    frontend_ops: int = 0              # ops in OUT/ir/00-frontend.irlm (the traced graph)
    #: how the traced graph was built: "stamped 27 of 30 layers (model.layers) from a 3-layer
    #: trace", or "full trace: <why not>" (irlm.frontends.stamping)
    layer_stamping: str = ""
    model_description: str = ""        # the source model as loaded (LoadedModel.describe)

    def summary(self) -> str:
        """One line: source, model, the op count of each graph beside the file holding it,
        files written, time."""
        g = self.full_graph
        n_params = sum(1 for _ in g.params())
        traced = f"traced {self.frontend_ops} ops (ir/00-frontend.irlm)"
        final = f"{len(g)} ops ({n_params} params) after the passes"
        if self.engine_written and not self.ranks:
            final += " (plan.irlm)"
        elif self.ranks:
            final += f", split into {len(self.ranks)} ranks (rank*/plan.irlm)"
        wrote = ", ".join(str(p) for p in self.written)
        what = self.model_description or self.model.describe()
        return (f"{self.model.source}: {what} → @{g.name}: {traced} → "
                f"{final}; wrote {wrote} in {self.seconds:.1f}s")


def compile(source, config: CompileConfig, *,
            progress: Optional[ProgressCallback] = None):
    """Compile ``source`` (a model path, a :class:`~irlm.compilation.source.Source`, a
    ``LoadedModel`` or an ``nn.Module``) into ``config.output`` and return the engine.

    Runs load → checks → calibration set → trace → verify → frontend IR → the ``-O`` level's
    passes (+ quantization, + ``config.pipeline``) → tp/pp split → engine files.  User
    mistakes raise :class:`irlm.IRLMError` naming the setting; nothing else is caught."""
    if not isinstance(config, CompileConfig):
        raise IRLMError(f"irlm.compile: config must be a CompileConfig, got "
                        f"{type(config).__name__}")
    config.check()
    out = safe_io.prepare_output_dir(config.output, flag="-o", force=config.force,
                                     sources=source_dirs(source), owned=compile_output_owns)
    job = CompileJob(config=config, source=source, out=out)
    start = time.perf_counter()
    for i, stage in enumerate(STAGES):
        if progress is not None:
            progress(stage.name, i, len(STAGES))
        t0 = time.perf_counter()
        stage.run(job)
        job.timings[stage.name] = time.perf_counter() - t0
    return _result(job, time.perf_counter() - start)


def _result(job: CompileJob, seconds: float):
    cls = CompiledEngine
    tp, pp = job.config.tp or 1, job.config.pp or 1
    ranks = []
    if job.ranks and job.engine_config is not None:
        ranks = [cls(path=job.out / f"rank{r}", graph=g, config=job.engine_config,
                     tokenizer=job.tokenizer) for r, g in enumerate(job.ranks)]
    return cls(path=job.out, graph=job.ranks[0] if job.ranks else job.graph,
               config=dict(job.engine_config or {}), tokenizer=job.tokenizer,
               chat_template=getattr(job.model, "chat_template", None),
               ranks=ranks, parallel={"tp": tp, "pp": pp} if job.ranks else {},
               model=job.model, full_graph=job.graph, pipeline=job.pipeline, written=list(job.written),
               notes=list(job.model.notes) + job.notes, timings=dict(job.timings),
               seconds=seconds, engine_written=job.engine_config is not None,
               frontend_ops=job.frontend_ops, layer_stamping=job.layer_stamping,
               model_description=job.model_description)


def source_dirs(source) -> list[Path]:
    """The directories a compile reads its model from (never written into)."""
    if isinstance(source, (str, Path)):
        source = Source(source)
    if not isinstance(source, Source):
        return []
    dirs = []
    for f in (source.path, source.config):
        if f:
            dirs += [Path(f)] if Path(f).is_dir() else [Path(f).parent]
    return dirs


def compile_output_owns(name: str) -> bool:
    """Whether an entry of OUT is one a compile writes (so OUT may be compiled into again)."""
    from irlm.lowering.engine_format import MANIFEST, PLAN_FILE, TOKENIZER_FILES, WEIGHTS_FILE
    from irlm.lowering.onnx.export import BUILD_SCRIPT, MODEL_FILE
    onnx = (MODEL_FILE, MODEL_FILE + ".data", BUILD_SCRIPT, "model.plan")
    return (name in (MANIFEST, PLAN_FILE, WEIGHTS_FILE, CALIB_TOKENS, "ir", *TOKENIZER_FILES,
                     *onnx)
            or re.fullmatch(r"rank\d+|\..+\.tmp|\.tokenizer-.+", name) is not None)
