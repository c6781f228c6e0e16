"""``irlm compile``: a model (model.py, Hugging Face directory, safetensors, GGUF) → OUT/.

A compile is a list of :class:`Stage` s run in order over one :class:`CompileJob`; each stage
reads what earlier ones left on the job and adds its own result.  Today the stages are load →
trace → verify → write the frontend IR (``OUT/ir/00-frontend.irlm``); later ones (pass
pipeline, engine writing) are one more entry in :data:`STAGES`.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from ..errors import IRLMError

FRONTEND_IR = Path("ir") / "00-frontend.irlm"
DTYPES = ("f32", "f16", "bf16")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compile", help="compile a model into an output directory (IR dumps, later an engine)",
        description="Compile a model. Give exactly one source: a model.py (or any path irlm "
                    "recognizes: a model directory, a .gguf), --hf DIR, --gguf FILE, or "
                    "--safetensors FILE with --config config.json.")
    p.add_argument("model", nargs="?", metavar="MODEL.py",
                   help="a Python file defining build_model() and example_inputs()")
    p.add_argument("--hf", metavar="DIR", help="a Hugging Face model directory "
                   "(config.json, safetensors, tokenizer.json)")
    p.add_argument("--gguf", metavar="FILE", help="a GGUF file (llama.cpp format)")
    p.add_argument("--safetensors", metavar="FILE", help="a bare safetensors file "
                   "(needs --config)")
    p.add_argument("--config", metavar="JSON", help="the config.json for --safetensors")
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="output directory (created; IR goes to OUT/ir/)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="largest batch the compiled graph accepts (default 8)")
    p.add_argument("--max-seq", type=int, default=None, metavar="N",
                   help="longest sequence the compiled graph accepts (default: the model's "
                        "max_position_embeddings, else 2048)")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="element type of weights and activations (default f32)")
    p.set_defaults(func=run)


# ----- the job and its stages -------------------------------------------------------------------
@dataclass
class CompileJob:
    """Everything a compile knows; each stage fills in its part."""
    args: Any
    out: Path
    model: Any = None      # frontends.loaded_model.LoadedModel, after "load"
    graph: Any = None      # irlm.Graph, after "trace"
    written: list[Path] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str                               # shown in progress and timings
    run: Callable[[CompileJob], None]


def load_stage(job: CompileJob) -> None:
    import torch
    from irlm.frontends.loaded_model import load_model
    a = job.args
    dtype = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    if a.hf is not None:
        from irlm.frontends.hf import load_hf_directory
        job.model = load_hf_directory(_existing(a.hf, "--hf"), dtype=dtype)
    elif a.gguf is not None:
        from irlm.frontends.gguf import load_gguf
        job.model = load_gguf(_existing(a.gguf, "--gguf"), dtype=dtype)
    elif a.safetensors is not None:
        from irlm.frontends.hf import load_safetensors
        job.model = load_safetensors(_existing(a.safetensors, "--safetensors"),
                                     _existing(a.config, "--config"), dtype=dtype)
    else:
        job.model = load_model(_existing(a.model, "MODEL.py"), dtype=dtype)


def trace_stage(job: CompileJob) -> None:
    from irlm.frontends import trace
    m = job.model
    job.graph = trace(m.module, m.example_inputs(), dynamic=True, dims=symbolic_dims(job),
                      weights=m.weights, name=_graph_name(m))


def verify_stage(job: CompileJob) -> None:
    from irlm.verifier import verify
    verify(job.graph)


def write_frontend_ir_stage(job: CompileJob) -> None:
    from irlm.printer import print_graph
    path = job.out / FRONTEND_IR
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(print_graph(job.graph), encoding="utf-8")
    job.written.append(path)


STAGES: list[Stage] = [
    Stage("load", load_stage),
    Stage("trace", trace_stage),
    Stage("verify", verify_stage),
    Stage("write IR", write_frontend_ir_stage),
]


# ----- the command ------------------------------------------------------------------------------
def run(args) -> int:
    check_arguments(args)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise IRLMError(f"-o {out}: exists and is not a directory")
    job = CompileJob(args=args, out=out)
    start = time.perf_counter()
    with _progress() as progress:
        for stage in STAGES:
            t0 = time.perf_counter()
            progress(stage.name)
            stage.run(job)
            job.timings[stage.name] = time.perf_counter() - t0
    print(summary(job, time.perf_counter() - start))
    for note in job.model.notes:
        print(f"irlm: note: {note}", file=sys.stderr)
    return 0


def check_arguments(args) -> None:
    """Exactly one source; --config only with --safetensors; positive dim limits."""
    given = [flag for flag, value in (("MODEL.py", args.model), ("--hf", args.hf),
                                      ("--gguf", args.gguf), ("--safetensors", args.safetensors))
             if value is not None]
    if not given:
        raise IRLMError("no model given: pass a MODEL.py, --hf DIR, --gguf FILE or "
                        "--safetensors FILE --config JSON")
    if len(given) > 1:
        raise IRLMError(f"{' and '.join(given)} both name a model; give exactly one source")
    if args.safetensors is not None and args.config is None:
        raise IRLMError("--safetensors needs --config config.json (a bare safetensors file "
                        "does not say which architecture it holds)")
    if args.config is not None and args.safetensors is None:
        raise IRLMError("--config is only for --safetensors (a model directory or GGUF "
                        "carries its own config)")
    for flag, value in (("--max-batch", args.max_batch), ("--max-seq", args.max_seq)):
        if value is not None and value < 2:
            raise IRLMError(f"{flag} {value}: must be at least 2")


def symbolic_dims(job: CompileJob) -> dict[str, tuple[int, int]]:
    """The ranges of the graph's symbolic dimensions, from --max-batch / --max-seq."""
    a = job.args
    max_seq = a.max_seq
    if max_seq is None:
        max_seq = int(getattr(job.model.config, "max_position_embeddings", 0) or 2048)
    return {"batch": (1, a.max_batch), "seq": (1, max_seq)}


def summary(job: CompileJob, seconds: float) -> str:
    g = job.graph
    n_params = sum(1 for _ in g.params())
    wrote = ", ".join(str(p) for p in job.written)
    return (f"{job.model.source}: {job.model.describe()} → @{g.name}: {len(g)} ops "
            f"({n_params} params); wrote {wrote} in {seconds:.1f}s")


def _existing(path: Optional[str], flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise IRLMError(f"{flag} {path}: no such file or directory")
    return p


def _graph_name(model) -> str:
    cls = type(model.module).__name__
    return "".join(c if c.isalnum() or c == "_" else "_" for c in cls) or "main"


class _progress:
    """Rich progress on stderr while stages run; silent when stderr is not a terminal."""

    def __enter__(self):
        self._live = None
        if sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
            self._live = Progress(SpinnerColumn(), TextColumn("{task.description}"),
                                  TimeElapsedColumn(), console=Console(stderr=True),
                                  transient=True)
            self._live.__enter__()
            self._task = self._live.add_task("compile", total=len(STAGES))
        return self

    def __call__(self, stage_name: str) -> None:
        if self._live is not None:
            self._live.update(self._task, description=stage_name,
                              completed=[s.name for s in STAGES].index(stage_name))

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
        return False
