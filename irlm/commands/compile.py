"""``irlm compile``: a model (model.py, Hugging Face directory, safetensors, GGUF) → OUT/.

A compile is a list of :class:`Stage` s run in order over one :class:`CompileJob`; each stage
reads what earlier ones left on the job and adds its own result: load → trace → verify →
write the frontend IR (``OUT/ir/00-frontend.irlm``) → the pass pipeline (``-O2`` by default;
for causal LMs it ends in the paged inference form) → write the engine into OUT
(``engine.json``, ``plan.irlm``, ``weights.safetensors``, tokenizer; see lowering/engine.py).
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import safe_io
from ..errors import IRLMError
from . import _parallel

FRONTEND_IR = Path("ir") / "00-frontend.irlm"
DTYPES = ("f32", "f16", "bf16")
QUANT_MODES = ("int8", "int4", "int4-awq", "w8a8-sq", "fp8")
CALIBRATED = ("int4-awq", "w8a8-sq", "fp8")
CALIB_TOKENS = "calib-tokens.json"


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
    p.add_argument("--force", action="store_true",
                   help="write into OUT even if it is a non-empty directory that is not an "
                        "earlier irlm output (never into the source model's directory)")
    p.add_argument("--max-batch", type=int, default=8, metavar="N",
                   help="largest batch the compiled graph accepts (default 8)")
    p.add_argument("--max-seq", type=int, default=None, metavar="N",
                   help="longest sequence the compiled graph accepts (default: the model's "
                        "max_position_embeddings, else 2048)")
    p.add_argument("--dtype", choices=DTYPES, default="f32",
                   help="element type of weights and activations (default f32)")
    p.add_argument("--tokens-per-block", type=int, default=16, metavar="N",
                   help="tokens per paged KV-cache block (default 16)")
    p.add_argument("--max-num-tokens", type=int, default=8192, metavar="N",
                   help="most packed tokens one engine step accepts (default 8192)")
    p.add_argument("--quant", choices=QUANT_MODES, default=None,
                   help="quantize the linear layers (LM head kept): int8 / int4 weight-only "
                        "(round to nearest), int4-awq (activation-aware int4), w8a8-sq "
                        "(SmoothQuant: int8 weights and per-token int8 activations), fp8 "
                        "(e4m3 weights and activations, calibrated scales)")
    p.add_argument("--quant-group", type=int, default=None, metavar="N",
                   help="input features per int4 scale group (32, 64 or 128; default: per "
                        "layer, the largest of them that divides its input features)")
    p.add_argument("--kv-cache-dtype", choices=("int8", "fp8"), default=None,
                   help="store the paged KV cache in 8 bits with calibrated per-layer scales")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration prompts for int4-awq, w8a8-sq, fp8 and --kv-cache-dtype: "
                        "a text file (prompts separated by blank lines) or a .json list of "
                        "token-id lists (default: irlm's built-in English/code/chat set)")
    p.add_argument("--device", choices=("any", "cpu", "cuda"), default="any",
                   help="the device the engine is for: cpu records the dtype this CPU "
                        "computes the linears fastest in (config.cpu_linear: bf16 with "
                        "AVX512-BF16/AMX, int8 for --quant int8, else f32); default any")
    p.add_argument("--dump-ir", action="store_true",
                   help="write the IR after every pass under OUT/ir/ (01-PASS.irlm, ...)")
    p.add_argument("--no-engine", action="store_true",
                   help="stop after the pass pipeline (write IR only, no engine)")
    p.add_argument("--target", choices=("engine", "onnx", "tensorrt"), default="engine",
                   help="what to write: irlm's engine (default), onnx (OUT/model.onnx + "
                        "build_trt.sh), or tensorrt (also OUT/model.plan; needs TensorRT)")
    from irlm.passes import add_pipeline_arguments
    add_pipeline_arguments(p, default_level="2")
    _parallel.add_parallel_arguments(p)
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
    notes: list[str] = field(default_factory=list)
    pipeline: str = ""
    calib_tokens: Optional[Path] = None   # OUT/calib-tokens.json, when something calibrates
    timings: dict[str, float] = field(default_factory=dict)
    ranks: list = field(default_factory=list)   # per-rank graphs of --tp / --pp


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
    if not a.no_engine:
        job.model.tokenizer     # the engine ships it: a broken one fails now, not after passes


def trace_stage(job: CompileJob) -> None:
    from irlm.frontends import trace
    m = job.model
    inputs = inference_example_inputs(m) if is_causal_lm(m) else m.example_inputs()
    job.graph = trace(m.module, inputs, dynamic=True, dims=symbolic_dims(job),
                      weights=m.weights, name=_graph_name(m))


def is_causal_lm(model) -> bool:
    """Decoders compile to the paged inference form; encoders stay stateless graphs."""
    module = model.module
    return hasattr(module, "generate") and hasattr(module, "get_output_embeddings") and \
        module.get_output_embeddings() is not None and \
        not getattr(model.config, "is_encoder_decoder", False)


def inference_example_inputs(model) -> dict:
    from irlm.compiler import inference_example_inputs as inputs
    return inputs(int(getattr(model.config, "vocab_size", 2) or 2))


def compile_pipeline(job: CompileJob) -> str:
    """The -O level's passes for this model, ending in the inference form for decoders."""
    a = job.args
    level = (a.opt_level or ("2" if a.pipeline is None else None))
    if level is None:
        return ""
    from irlm.compiler import sliding_window_of
    return default_pipeline(level, is_causal_lm(job.model), a.tokens_per_block,
                            sliding_window_of(job.model.config), a.max_num_tokens)


def default_pipeline(level: str, causal_lm: bool = True, tokens_per_block: int = 16,
                     sliding_window: int = 0, max_num_tokens: int = 8192) -> str:
    """``-O0``: only what the engine needs; ``-O1``: + canonicalize/CSE; ``-O2``: + fusions."""
    level = str(level).lstrip("O")
    if level not in ("0", "1", "2"):
        raise IRLMError(f"-O{level}: unknown optimization level (valid: -O0, -O1, -O2)")
    cleanup = "" if level == "0" else "canonicalize,cse,"
    if not causal_lm:
        return cleanup.rstrip(",")
    sub = (f"substitute-attention{{tokens_per_block={tokens_per_block},"
           f"sliding_window={sliding_window},max_tokens={max_num_tokens}}}")
    text = f"{cleanup}{sub},{cleanup}dce"
    if level == "2":
        from irlm.passes.fusions import FUSION_PIPELINE
        text += "," + FUSION_PIPELINE
    return text


def passes_stage(job: CompileJob) -> None:
    import argparse
    from irlm.passes import run_pipeline_from_args
    a = job.args
    ns = argparse.Namespace(**vars(a))
    ns.opt_level = None
    default = compile_pipeline(job)
    # with --tp/--pp each rank's graph is quantized after the split (_parallel.quantize_ranks)
    quant = "" if _parallel.splits(a) else quant_pipeline(job)
    ns.pipeline = ",".join(p for p in (default, quant, a.pipeline) if p) or None
    if a.dump_ir and not a.dump_ir_dir:
        ns.dump_ir_dir = str(job.out / "ir")
    job.pipeline = ns.pipeline or ""
    if ns.pipeline:
        run_pipeline_from_args(job.graph, ns, stage_offset=1 if ns.dump_ir_dir else 0)


def quant_pipeline(job: CompileJob) -> str:
    """``quantize`` (explicit quantize/dequantize ops, then ``fuse-quant``) and
    ``quantize-kv-cache``; calibrated steps read OUT/calib-tokens.json."""
    a = job.args
    quant, kv = getattr(a, "quant", None), getattr(a, "kv_cache_dtype", None)
    steps = []
    calib = f',calib="{job.calib_tokens.as_posix()}"' if job.calib_tokens else ""
    if quant:
        mode_calib = calib if quant in CALIBRATED else ""
        group = f",group={a.quant_group}" if a.quant_group else ""
        steps.append(f"quantize{{mode={quant}{group},fuse=false{mode_calib}}}")
        steps.append("fuse-quant")
    if kv:
        steps.append(f"quantize-kv-cache{{dtype={kv}{calib}}}")
    return ",".join(steps + ["dce"]) if steps else ""


def calibration_stage(job: CompileJob) -> None:
    """Tokenize --calib (or the built-in set) into OUT/calib-tokens.json when a calibrated
    mode asks for it: right after loading, so a missing tokenizer fails before tracing."""
    a = job.args
    if getattr(a, "quant", None) in CALIBRATED or getattr(a, "kv_cache_dtype", None):
        job.calib_tokens = write_calibration_tokens(job)


def write_calibration_tokens(job: CompileJob) -> Path:
    """Tokenize --calib (or the built-in set) with the model's tokenizer into OUT/, so the
    recorded pipeline names every input it read."""
    from irlm.passes.calibration import (DEFAULT_CALIBRATION, read_prompts, read_token_lists,
                                         tokenize_prompts, write_token_lists)
    given = getattr(job.args, "calib", None)
    src = Path(given) if given else DEFAULT_CALIBRATION
    if src.suffix == ".json":
        tokens = read_token_lists(src)
    else:
        tok = job.model.tokenizer
        if tok is None:
            raise IRLMError(f"--calib {src}: {job.model.source} has no tokenizer to read text "
                            f"with; give --calib FILE.json with token ids ([[1, 2, ...], ...])")
        tokens = tokenize_prompts(read_prompts(src), tok)
    path = write_token_lists(tokens, job.out / CALIB_TOKENS)
    job.written.append(path)
    return path.resolve()


def engine_stage(job: CompileJob) -> None:
    if job.args.no_engine or getattr(job.args, "target", "engine") != "engine":
        return
    if not any(v.name == "kv_cache" for v in job.graph.inputs):
        job.notes.append("no engine written: only causal LMs compile to a runnable engine "
                         "(this model's IR is in OUT/ir/)")
        return
    cfg = job.model.config
    eos = getattr(cfg, "eos_token_id", None)
    config = {
        "source": str(job.model.source),
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(job.model.module).__name__,
        "dtype": job.args.dtype,
        "max_model_len": int(symbolic_dims(job)["seq"][1]),
        "eos_token_id": eos,
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        "pipeline": job.pipeline,
        "irlm_version": _irlm_version(),
    }
    if getattr(job.args, "device", "any") == "cpu":
        from irlm.runtime.cpu_runner import default_linear_dtype
        config["cpu_linear"] = default_linear_dtype(job.args.quant)
    config["activation_arena_bytes"] = activation_plan(job.graph, job.args.max_num_tokens,
                                                       config["max_model_len"]).arena_bytes
    tok = job.model.tokenizer
    if tok is not None and job.model.chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = job.model.chat_template
    _parallel.write_engine(job, config, tok)
    job.written.append(job.out / "engine.json")


def activation_plan(graph, max_num_tokens: int, max_model_len: int):
    """The activation memory plan of the engine's largest step (lowering/memory_plan.py)."""
    from irlm.lowering.memory_plan import plan_activation_memory
    block = next(v for v in graph.inputs if v.name == "kv_cache").type.shape[3]
    dims = {"tokens": max_num_tokens, "reqs": min(512, max_num_tokens),
            "max_blocks": -(-max_model_len // block), "cache_blocks": 1}
    return plan_activation_memory(graph, dims)


def _irlm_version() -> str:
    from irlm import __version__
    return __version__


def verify_stage(job: CompileJob) -> None:
    from irlm.verifier import verify
    verify(job.graph)


def write_frontend_ir_stage(job: CompileJob) -> None:
    from irlm.printer import print_graph
    path = job.out / FRONTEND_IR
    safe_io.make_dir(path.parent)
    safe_io.write_text(path, print_graph(job.graph))
    job.written.append(path)


def onnx_stage(job: CompileJob) -> None:
    """--target onnx / tensorrt: irlm.lowering.onnx writes OUT/model.onnx (+ model.plan)."""
    a = job.args
    if getattr(a, "target", "engine") == "engine" or a.no_engine:
        return
    from irlm.lowering.onnx.targets import lower_to_target
    export, engine = lower_to_target(job.graph, job.out, a.target, dtype=a.dtype,
                                     quant=getattr(a, "quant", None))
    job.written += [export.model_path, export.data_path, export.build_script] + \
        ([engine] if engine else [])


STAGES: list[Stage] = [
    Stage("load", load_stage),
    Stage("check parallel", _parallel.check_model_stage),
    Stage("calibration set", calibration_stage),
    Stage("trace", trace_stage),
    Stage("verify", verify_stage),
    Stage("write IR", write_frontend_ir_stage),
    Stage("passes", passes_stage),
    Stage("split", _parallel.split_stage),
    Stage("write engine", engine_stage),
    Stage("write ONNX", onnx_stage),
]


# ----- the command ------------------------------------------------------------------------------
def run(args) -> int:
    check_arguments(args)
    out = safe_io.prepare_output_dir(args.output, flag="-o", force=getattr(args, "force", False),
                                     sources=source_dirs(args), owned=compile_output_owns)
    job = CompileJob(args=args, out=out)
    start = time.perf_counter()
    with _progress() as progress:
        for stage in STAGES:
            t0 = time.perf_counter()
            progress(stage.name)
            stage.run(job)
            job.timings[stage.name] = time.perf_counter() - t0
    print(summary(job, time.perf_counter() - start))
    for note in list(job.model.notes) + job.notes:
        print(f"irlm: note: {note}", file=sys.stderr)
    return 0


def source_dirs(args) -> list[Path]:
    """The directories the compile reads its model from (never written into)."""
    dirs = [Path(args.hf)] if getattr(args, "hf", None) else []
    for f in (getattr(args, k, None) for k in ("model", "gguf", "safetensors", "config")):
        if f:
            dirs += [Path(f)] if Path(f).is_dir() else [Path(f).parent]
    return dirs


def compile_output_owns(name: str) -> bool:
    """Whether an entry of OUT is one a compile writes (so OUT may be compiled into again)."""
    from irlm.lowering.engine import MANIFEST, PLAN_FILE, TOKENIZER_FILES, WEIGHTS_FILE
    return (name in (MANIFEST, PLAN_FILE, WEIGHTS_FILE, CALIB_TOKENS, "ir", *TOKENIZER_FILES)
            or re.fullmatch(r"rank\d+|\..+\.tmp|\.tokenizer-.+", name) is not None)


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
    quant, kv = getattr(args, "quant", None), getattr(args, "kv_cache_dtype", None)
    if getattr(args, "calib", None) is not None:
        if not (quant in CALIBRATED or kv):
            raise IRLMError(f"--calib is only read by --quant {', '.join(CALIBRATED)} and "
                            f"--kv-cache-dtype; with "
                            f"{'--quant ' + quant if quant else 'no --quant'} "
                            f"nothing is calibrated")
        _existing(args.calib, "--calib")
    if quant in ("int4", "int4-awq") and args.quant_group not in (None, 32, 64, 128):
        raise IRLMError(f"--quant-group {args.quant_group}: must be 32, 64 or 128")
    for flag, value in (("--max-batch", args.max_batch), ("--max-seq", args.max_seq)):
        if value is not None and value < 2:
            raise IRLMError(f"{flag} {value}: must be at least 2")
    for flag, value, top in (("--tokens-per-block", getattr(args, "tokens_per_block", 16), 4096),
                             ("--max-num-tokens", getattr(args, "max_num_tokens", 8192), 1 << 24)):
        if value is not None and not 1 <= value <= top:
            raise IRLMError(f"{flag} {value}: must be in [1, {top}]")
    _parallel.check_parallel_arguments(args)
    if getattr(args, "target", "engine") != "engine":
        from irlm.lowering.onnx.targets import check_target
        if _parallel.splits(args):
            raise IRLMError(f"--target {args.target} writes one network: it does not take "
                            f"--tp/--pp")
        check_target(args.target)


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
