"""``irlm.compile(source, config)``: run every stage of a compile and return the engine."""
from __future__ import annotations

import functools
import os
import re
import stat
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
    #: the files of the earlier compile in OUT that this one did not rewrite, which it removed
    #: (:func:`remove_earlier_outputs`)
    removed: list[Path] = field(default_factory=list)
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
        removed = (f"; removed {len(self.removed)} files of the previous compile"
                   if self.removed else "")
        what = self.model_description or self.model.describe()
        return (f"{self.model.source}: {what} → @{g.name}: {traced} → "
                f"{final}; wrote {wrote} in {self.seconds:.1f}s{removed}")


def compile(source, config: CompileConfig, *,
            progress: Optional[ProgressCallback] = None):
    """Compile ``source`` (a model path, a :class:`~irlm.compilation.source.Source`, a
    ``LoadedModel`` or an ``nn.Module``) into ``config.output`` and return the engine.

    Runs load → checks → calibration set → trace → verify → frontend IR → the ``-O`` level's
    passes (+ quantization, + ``config.pipeline``) → tp/pp split → engine files, then removes
    the files of an earlier compile into the same directory that this one did not rewrite
    (:func:`remove_earlier_outputs`).  User mistakes raise :class:`irlm.IRLMError` naming the
    setting; nothing else is caught."""
    if not isinstance(config, CompileConfig):
        raise IRLMError(f"irlm.compile: config must be a CompileConfig, got "
                        f"{type(config).__name__}")
    config.check()
    out = safe_io.prepare_output_dir(config.output, flag="-o", force=config.force,
                                     sources=source_dirs(source), owned=compile_output_owns)
    earlier = earlier_outputs(out)        # before any stage writes
    job = CompileJob(config=config, source=source, out=out)
    start = time.perf_counter()
    for i, stage in enumerate(STAGES):
        if progress is not None:
            progress(stage.name, i, len(STAGES))
        t0 = time.perf_counter()
        stage.run(job)
        job.timings[stage.name] = time.perf_counter() - t0
    removed = remove_earlier_outputs(out, earlier)
    return _result(job, time.perf_counter() - start, removed)


def _result(job: CompileJob, seconds: float, removed: list[Path]):
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
               removed=removed,
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


@functools.lru_cache(maxsize=None)
def _output_layout() -> tuple[tuple[re.Pattern, re.Pattern], ...]:
    """What a compile writes into OUT, from the writers' own names: (directory, file name)
    patterns, the directory relative to OUT ("" is OUT itself).  Only the directories listed
    are irlm's; a file is irlm's when its name matches its directory's pattern."""
    from irlm.lowering.engine_format import MANIFEST, PLAN_FILE, TOKENIZER_FILES, WEIGHTS_FILE
    from irlm.lowering.onnx.export import BUILD_SCRIPT, MODEL_FILE
    from irlm.lowering.onnx.trt_build import ENGINE_FILE as TRT_ENGINE
    from irlm.passes.instrument import DUMP_FILE, PIPELINE_FILE
    from .build import IR_WEIGHTS
    from .stages import CALIB_TOKENS, FRONTEND_IR

    def names(*names: str) -> str:
        return "|".join(re.escape(n) for n in names)
    tmp = r"\..+\.tmp"          # safe_io.atomic_path's temporary file, left by a killed write
    dumps = f"{DUMP_FILE.pattern}|{names(PIPELINE_FILE)}|{tmp}"
    ir = FRONTEND_IR.parent.as_posix()
    layout = {
        # engine_format.write_engine / write_parallel_engine, the calibration set, --target onnx
        "": f"{names(MANIFEST, PLAN_FILE, WEIGHTS_FILE, *TOKENIZER_FILES, CALIB_TOKENS)}|"
            f"{names(MODEL_FILE, MODEL_FILE + '.data', BUILD_SCRIPT, TRT_ENGINE)}|{tmp}",
        r"rank\d+": f"{names(MANIFEST, PLAN_FILE, WEIGHTS_FILE)}|{tmp}",
        # the frontend IR, --dump-ir's pass dumps and the weights they read; per rank after a
        # --tp/--pp split (irlm/compilation/parallel.py)
        re.escape(ir): f"{dumps}|{names(IR_WEIGHTS)}",
        re.escape(ir) + r"/rank\d+": dumps,
        # engine_format._save_tokenizer's private directory, left by a killed write
        r"\.tokenizer-[^/]+": r"[^/]+",
    }
    return tuple((re.compile(d), re.compile(f)) for d, f in layout.items())


def compile_output_owns(name: str) -> bool:
    """Whether an entry of OUT is one a compile writes (so OUT may be compiled into again)."""
    return any((d.fullmatch("") and f.fullmatch(name)) or d.fullmatch(name)
               for d, f in _output_layout())


#: a file's identity: a rewrite (temporary file + rename) gives it a new inode
_Identity = tuple[int, int, int, int]


def earlier_outputs(out) -> dict[str, _Identity]:
    """The files an earlier irlm compile (or ``irlm build``) wrote into ``out``: each file of
    :func:`_output_layout` under it, by path relative to ``out``, with its identity (device,
    inode, mtime, size).  Empty unless ``out`` holds an earlier output (its
    ``ir/00-frontend.irlm``, or an ``engine.json`` in irlm's engine format): a directory that
    merely holds files with the same names (``--force``) is none.  Taken before the compile
    writes anything; :func:`remove_earlier_outputs` then removes what it did not rewrite."""
    fd = _open_directory(out)
    if fd is None:
        return {}
    try:
        return _walk_outputs(fd) if _holds_earlier_output(fd) else {}
    finally:
        os.close(fd)


def remove_earlier_outputs(out, earlier: dict[str, _Identity]) -> list[Path]:
    """After a compile into ``out``: remove the files of the earlier output (``earlier``, from
    :func:`earlier_outputs`) that this compile did not rewrite (their identity is unchanged),
    and the irlm directories that leaves empty (``rank*/``, ``ir/rank*/``), so that ``out``
    holds exactly what this compile wrote plus the user's own files.  Every directory is
    opened without following a symlink and every file removed by name inside it: nothing
    outside ``out`` is touched, and a symlink in ``out`` is neither followed nor removed.
    Returns the removed files."""
    if not earlier:
        return []
    fd = _open_directory(out)
    if fd is None:
        return []
    try:
        return [Path(out) / rel for rel in sorted(_walk_outputs(fd, remove=earlier,
                                                                 root=Path(out)))]
    finally:
        os.close(fd)


def _open_directory(path, dir_fd: Optional[int] = None) -> Optional[int]:
    """A descriptor of directory ``path`` (relative to ``dir_fd``), or None where ``path`` is
    not a directory or is a symlink (never followed)."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    try:
        return os.open(path, flags, dir_fd=dir_fd)
    except OSError:
        return None


def _holds_earlier_output(fd: int) -> bool:
    """Whether directory ``fd`` holds an earlier compile's ``ir/00-frontend.irlm`` or an
    ``engine.json`` in irlm's engine format (regular files, not symlinks)."""
    from irlm.input_limits import parse_json_bounded
    from irlm.lowering.engine_files import MAX_MANIFEST_BYTES, MAX_MANIFEST_DEPTH
    from irlm.lowering.engine_format import ENGINE_FORMAT, MANIFEST
    from .stages import FRONTEND_IR
    ir = _open_directory(FRONTEND_IR.parent.as_posix(), fd)
    if ir is not None:
        try:
            if stat.S_ISREG(os.stat(FRONTEND_IR.name, dir_fd=ir,
                                    follow_symlinks=False).st_mode):
                return True
        except OSError:
            pass
        finally:
            os.close(ir)
    try:
        m = os.open(MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    except OSError:
        return False
    with os.fdopen(m, "rb") as f:
        st = os.fstat(m)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_MANIFEST_BYTES:
            return False
        try:
            manifest = parse_json_bounded(f.read(MAX_MANIFEST_BYTES), MANIFEST,
                                          max_depth=MAX_MANIFEST_DEPTH)
        except (OSError, IRLMError):
            return False
    return isinstance(manifest, dict) and manifest.get("format") == ENGINE_FORMAT


def _walk_outputs(fd: int, remove: Optional[dict[str, _Identity]] = None,
                  root: Path = Path(".")) -> dict[str, _Identity]:
    """The regular files under directory ``fd`` that :func:`_output_layout` names (relative
    path -> identity), walked through descriptors: a symlink is neither listed nor entered.
    With ``remove``, the files whose identity is still the one in it are removed instead and
    returned, and each irlm directory emptied by that too (``root``: ``fd``'s path, for
    messages)."""
    layout = _output_layout()
    found: dict[str, _Identity] = {}

    def visit(dir_fd: int, rel: str, files: re.Pattern) -> bool:
        """Walk one directory; whether a file was removed from it (or from below it)."""
        removed = False
        try:
            names = sorted(os.listdir(dir_fd))
        except OSError:             # unreadable: none of its files is listed (or removed)
            return False
        for name in names:
            path = f"{rel}/{name}" if rel else name
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and files.fullmatch(name):
                ident = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
                if remove is None:
                    found[path] = ident
                elif remove.get(path) == ident:
                    try:
                        os.unlink(name, dir_fd=dir_fd)
                    except OSError as e:
                        raise safe_io.OutputError(
                            f"{root / path}: cannot remove this file of the previous compile: "
                            f"{os.strerror(e.errno).lower()}") from None
                    found[path] = ident
                    removed = True
            elif stat.S_ISDIR(st.st_mode):
                sub = next((f for d, f in layout if d.fullmatch(path)), None)
                child = _open_directory(name, dir_fd) if sub is not None else None
                if child is None:
                    continue
                try:
                    removed_below = visit(child, path, sub)
                finally:
                    os.close(child)
                if removed_below:
                    removed = True
                    try:
                        os.rmdir(name, dir_fd=dir_fd)     # only when nothing else is in it
                    except OSError:
                        pass
        return removed

    visit(fd, "", next(f for d, f in layout if d.fullmatch("")))
    return found
