"""The stages of a compile, run in order over one :class:`CompileJob`.

Each stage reads what earlier ones left on the job and adds its own result: load → check the
parallel split against the model → tokenize the calibration set → trace → verify → write the
frontend IR (``OUT/ir/00-frontend.irlm``) → the pass pipeline (the ``-O`` level's named
pipeline; for causal LMs it ends in the paged inference form) → split into ranks (``tp``/``pp``)
→ write the engine into OUT (``engine.json``, ``plan.irlm``, ``weights.safetensors``,
tokenizer; see lowering/engine_format.py).  A new stage is one entry in :data:`STAGES`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from .. import safe_io
from ..errors import IRLMError
from . import parallel
from .config import CALIBRATED, CompileConfig

FRONTEND_IR = Path("ir") / "00-frontend.irlm"
CALIB_TOKENS = "calib-tokens.json"


@dataclass
class CompileJob:
    """Everything a compile knows; each stage fills in its part."""
    config: CompileConfig
    source: Any
    out: Path
    model: Any = None      # frontends.loaded_model.LoadedModel, after "load"
    graph: Any = None      # irlm.Graph, after "trace"
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pipeline: str = ""
    calib_tokens: Optional[Path] = None   # OUT/calib-tokens.json, when something calibrates
    timings: dict[str, float] = field(default_factory=dict)
    ranks: list = field(default_factory=list)   # per-rank graphs of tp / pp
    engine_config: Optional[dict] = None        # engine.json's build facts, when written
    tokenizer: Any = None
    frontend_ops: int = 0                       # ops in OUT/ir/00-frontend.irlm
    dump_params: set = field(default_factory=set)   # param names any IR dump reads
    #: the number the next IR dump gets (00 is ir/00-frontend.irlm; the passes stage counts
    #: its passes, not the files in the dump directory, which may hold an earlier compile's)
    next_dump: int = 1
    layer_stamping: str = ""                    # how "trace" built the graph (stamping.py)
    #: the element dtype the engine computes in (engine.json's "dtype"), after "load"
    dtype: str = ""
    #: the loaded model in one line, taken before the passes add derived weights to its store
    model_description: str = ""


_TORCH_NAMES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}


@dataclass(frozen=True)
class Stage:
    name: str                               # shown in progress and timings
    run: Callable[[CompileJob], None]


def load_stage(job: CompileJob) -> None:
    from .source import load_source, module_dtype
    job.model = load_source(job.source, job.config.element_dtype)
    job.dtype = job.config.element_dtype
    # A module, a model.py's build_model() and a model loaded by the caller keep the weights
    # they were built with (nothing here converts them): they compile in their own dtype.
    if job.model.format in ("module", "model.py") or job.model is job.source:
        job.dtype = module_dtype(job.model.module)
        if job.config.dtype is not None and job.config.dtype != job.dtype:
            how = (f"build it in {job.config.dtype} in build_model()"
                   if job.model.format == "model.py" else
                   f"convert it first (model.to(torch.{_TORCH_NAMES[job.config.dtype]}))")
            raise IRLMError(f"--dtype {job.config.dtype}: {job.model.source} is a model of its "
                            f"own dtype ({job.dtype}); {how} or leave --dtype unset")
    job.model_description = job.model.describe()
    if job.config.write_engine:
        job.model.tokenizer     # the engine ships it: a broken one fails now, not after passes


def trace_stage(job: CompileJob) -> None:
    from irlm.frontends import trace
    m = job.model
    inputs = inference_example_inputs(m, min(2, job.config.max_batch)) if is_causal_lm(m) \
        else m.example_inputs()
    if job.config.static and is_causal_lm(m):
        raise IRLMError(f"--static: {type(m.module).__name__} is a causal LM, whose engine "
                        f"needs a symbolic sequence length; use --dims seq=1:N (or --max-seq)")
    args = dict(dynamic=not job.config.static, dims=symbolic_dims(job), weights=m.weights,
                name=_graph_name(m))
    if job.config.stamp_layers:
        # the same graph, from a 3-layer trace when the decoder layers provably repeat
        from irlm.frontends.stamping import trace_stamped
        job.graph, job.layer_stamping = trace_stamped(m.module, inputs, **args)
    else:
        job.graph = trace(m.module, inputs, **args)
        job.layer_stamping = "full trace: --no-stamp-layers"


def is_causal_lm(model) -> bool:
    """Decoders compile to the paged inference form; encoders stay stateless graphs."""
    module = model.module
    return hasattr(module, "generate") and hasattr(module, "get_output_embeddings") and \
        module.get_output_embeddings() is not None and \
        not getattr(model.config, "is_encoder_decoder", False)


def inference_example_inputs(model, batch: int = 2) -> dict:
    from .causal_lm import inference_example_inputs as inputs, takes_position_ids
    return inputs(int(getattr(model.config, "vocab_size", 2) or 2), batch=batch,
                  position_ids=takes_position_ids(model.module))


def level_pipeline(job: CompileJob) -> str:
    """The -O level's named pipeline for this model (irlm.passes.levels), its
    substitute-attention options filled in from the build."""
    c = job.config
    if c.opt_level is None:
        return ""
    from .causal_lm import pipeline_for, sliding_window_of
    causal = is_causal_lm(job.model)
    return pipeline_for(c.opt_level, causal, c.tokens_per_block,
                        sliding_window_of(job.model.config) if causal else 0, c.max_num_tokens)


def run_passes(graph, text: str, config: CompileConfig, *, dump_dir=None,
               stage_offset: int = 0, check_numerics: Optional[bool] = None,
               extra_instruments=()):
    """Run pipeline ``text`` over ``graph`` with the config's instruments; the
    :class:`~irlm.passes.PipelineReport`."""
    from irlm.passes import PassManager, load_plugin, parse_pipeline
    from irlm.passes.cli import make_instruments
    c = config
    for path in c.pass_plugins:
        load_plugin(path)
    instruments = make_instruments(
        print_ir_before=c.print_ir_before, print_ir_after=c.print_ir_after,
        dump_ir_dir=dump_dir,
        check_numerics=c.check_numerics if check_numerics is None else check_numerics,
        numerics_atol=c.numerics_atol, numerics_rtol=c.numerics_rtol,
        numerics_seed=c.numerics_seed, numerics_int_max=c.numerics_int_max,
        timing=c.timing, stats=c.stats) + list(extra_instruments)
    return PassManager(parse_pipeline(text), instruments, verify_each=c.verify_each,
                       stage_offset=stage_offset).run(graph)


def passes_stage(job: CompileJob) -> None:
    c = job.config
    # with tp/pp each rank's graph is quantized after the split (parallel.passes_after_split)
    quant = "" if c.splits else quant_pipeline(job)
    text = ",".join(p for p in (level_pipeline(job), quant, c.pipeline) if p)
    dump_dir = dump_directory(job)
    job.pipeline = text
    if dump_dir is not None:
        job.dump_params |= {op.attrs["name"] for op in job.graph.params()}
    extra = [_ParamNames(job.dump_params)] if dump_dir is not None else []
    if text:
        job.next_dump += len(run_passes(job.graph, text, c, dump_dir=dump_dir,
                                        stage_offset=1 if dump_dir else 0,
                                        extra_instruments=extra).stages)
    cast = "" if c.splits else cpu_weights_pipeline(job)
    if cast:
        # f16/bf16 rounding of the weights is the point: --check-numerics' f32 tolerances
        # do not apply
        job.next_dump += len(run_passes(job.graph, cast, c, dump_dir=dump_dir,
                                        stage_offset=job.next_dump if dump_dir else 0,
                                        check_numerics=False, extra_instruments=extra).stages)
        job.pipeline = f"{text},{cast}" if text else cast


def cpu_weights_pipeline(job: CompileJob) -> str:
    """``cast-weights{dtype=D}`` for an engine whose CPU linears run in D = f16 or bf16
    (``--device cpu``, or ``--cpu-linear``): its weight matrices are stored as they are run
    (with --tp/--pp on each rank's graph, after the split).  Not for quantized engines, whose
    float linears run in bf16."""
    c = job.config
    if c.quant or not c.write_engine or c.target != "engine":
        return ""
    linear = c.cpu_linear
    if linear is None and c.device == "cpu":
        from irlm.lowering.kernel_selection import default_linear_dtype
        linear = default_linear_dtype(None)
    if linear not in ("f16", "bf16") or (job.dtype or c.element_dtype) != "f32":
        return ""
    return f"cast-weights{{dtype={linear}}}"


def dump_directory(job: CompileJob) -> Optional[Path]:
    c = job.config
    d = c.dump_ir_dir or (job.out / "ir" if c.dump_ir else None)
    return Path(d) if d is not None else None


class _ParamNames:
    """Collects the param names of the graph after every pass (what the dumps read)."""

    def __init__(self, names: set):
        self.names = names

    def before_pipeline(self, graph, pipeline, stage_offset):
        pass

    def before_pass(self, graph, stage):
        pass

    def after_pass(self, graph, result):
        self.names |= {op.attrs["name"] for op in graph.params()}

    def pass_failed(self, graph, stage, error):
        pass

    def after_pipeline(self, graph, report):
        pass


def ir_weights_stage(job: CompileJob) -> None:
    """With --dump-ir: OUT/ir/weights.safetensors holds every weight a dump reads that the
    engine's weights.safetensors does not (the original names before fusions, the unfused
    parts), so any dump can be re-fed (irlm build DUMP --weights OUT/weights.safetensors
    --weights OUT/ir/weights.safetensors)."""
    d = dump_directory(job)
    if d is None or not job.dump_params:
        return
    from irlm.lowering.engine_format import write_weights
    in_engine = set()
    if job.engine_config is not None and not job.ranks and d.resolve() == (job.out / "ir").resolve():
        in_engine = {op.attrs["name"] for op in job.graph.params()}
    store = job.graph.weights
    names = sorted(n for n in job.dump_params - in_engine if n in store)
    path = d / "weights.safetensors"
    write_weights({n: store.get(n) for n in names}, path)
    job.written.append(path)


def quant_pipeline(job: CompileJob) -> str:
    """``quantize`` (explicit quantize/dequantize ops, then ``fuse-quant``) and
    ``quantize-kv-cache``; calibrated steps read OUT/calib-tokens.json."""
    c = job.config
    steps = []
    calib = f',calib="{job.calib_tokens.as_posix()}"' if job.calib_tokens else ""
    if c.quant:
        mode_calib = calib if c.quant in CALIBRATED else ""
        group = f",group={c.quant_group}" if c.quant_group else ""
        steps.append(f"quantize{{mode={c.quant}{group},fuse=false{mode_calib}}}")
        steps.append("fuse-quant")
    if c.kv_cache_dtype:
        steps.append(f"quantize-kv-cache{{dtype={c.kv_cache_dtype}{calib}}}")
    return ",".join(steps + ["dce"]) if steps else ""


def calibration_stage(job: CompileJob) -> None:
    """Tokenize the calibration prompts into OUT/calib-tokens.json when a calibrated mode asks
    for it: right after loading, so a missing tokenizer fails before tracing."""
    if job.config.calibrates:
        job.calib_tokens = write_calibration_tokens(job)


def write_calibration_tokens(job: CompileJob) -> Path:
    """Tokenize ``calib`` (or the built-in set) with the model's tokenizer into OUT/, so the
    recorded pipeline names every input it read."""
    from irlm.passes.llm.calibration import (DEFAULT_CALIBRATION, read_prompts, read_token_lists,
                                         tokenize_prompts, write_token_lists)
    given = job.config.calib
    src = Path(given) if given else DEFAULT_CALIBRATION
    if src.suffix == ".json":
        tokens = read_token_lists(src)
    else:
        tok = job.model.tokenizer
        if tok is None:
            c = job.config
            fix = "give --calib FILE.json with token ids ([[1, 2, ...], ...])"
            if given:
                raise IRLMError(f"--calib {src}: {job.model.source} has no tokenizer to read "
                                f"text with; {fix}")
            flag = f"--quant {c.quant}" if c.quant in CALIBRATED else \
                f"--kv-cache-dtype {c.kv_cache_dtype}"
            raise IRLMError(f"{flag} calibrates on irlm's built-in text prompts, but "
                            f"{job.model.source} has no tokenizer to read them with; {fix}")
        tokens = tokenize_prompts(read_prompts(src), tok)
    path = write_token_lists(tokens, job.out / CALIB_TOKENS)
    job.written.append(path)
    return path.resolve()


def engine_stage(job: CompileJob) -> None:
    if not job.config.write_engine or job.config.target != "engine":
        return
    from irlm.ops.llm import KV_CACHE_INPUT
    if not any(v.name == KV_CACHE_INPUT for v in job.graph.inputs):
        job.notes.append(no_engine_reason(job))
        return
    cfg = job.model.config
    eos = getattr(cfg, "eos_token_id", None)
    config = {
        "source": str(job.model.source),
        "model_type": getattr(cfg, "model_type", None),
        "architecture": type(job.model.module).__name__,
        "dtype": job.dtype,
        "max_model_len": int(symbolic_dims(job)["seq"][1]),
        "eos_token_id": eos,
        "bos_token_id": getattr(cfg, "bos_token_id", None),
        "pipeline": job.pipeline,
        "irlm_version": _irlm_version(),
    }
    if job.config.cpu_linear:
        config["cpu_linear"] = job.config.cpu_linear
    elif job.config.device == "cpu":
        from irlm.lowering.kernel_selection import default_linear_dtype
        config["cpu_linear"] = default_linear_dtype(job.config.quant)
    config["activation_arena_bytes"] = activation_plan(job.graph, job.config.max_num_tokens,
                                                       config["max_model_len"]).arena_bytes
    tok = job.model.tokenizer
    if tok is not None and job.model.chat_template and not getattr(tok, "chat_template", None):
        tok.chat_template = job.model.chat_template
    parallel.write_engine(job, config, tok)
    job.engine_config, job.tokenizer = config, tok
    job.written.append(job.out / "engine.json")


def no_engine_reason(job: CompileJob) -> str:
    """Why a compile that was to write an engine wrote only IR (the engine runs the paged
    inference form that substitute-attention makes of a causal LM)."""
    where = "its IR is in OUT/ir/00-frontend.irlm" + \
        (" and the pass dumps beside it" if job.config.dump_ir else
         " (--dump-ir writes the graph after every pass)")
    if not is_causal_lm(job.model):
        return (f"no engine written: {type(job.model.module).__name__} is not a causal LM, and "
                f"only causal LMs compile to a runnable engine (they run with a paged KV "
                f"cache); {where}; --target onnx exports any graph")
    ran = [p.split("{")[0] for p in job.pipeline.split(",") if p]
    why = ("substitute-attention did not run" if "substitute-attention" not in ran else
           "substitute-attention found no attention to turn into paged attention")
    return (f"no engine written: {why}, so this causal LM stayed a stateless graph "
            f"(pipeline: {job.pipeline or 'none'}); drop --replace-pipeline or add "
            f"substitute-attention to --pipeline for an engine; {where}")


def activation_plan(graph, max_num_tokens: int, max_model_len: int):
    """The activation memory plan of the engine's largest step (lowering/memory_plan.py)."""
    from irlm.lowering.memory_plan import plan_activation_memory
    from irlm.ops.llm import KVCacheLayout, kv_cache_input
    block = KVCacheLayout.of(kv_cache_input(graph)).block_size
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
    from irlm.text.printer import print_graph
    path = job.out / FRONTEND_IR
    safe_io.make_dir(path.parent)
    safe_io.write_text(path, print_graph(job.graph))
    job.frontend_ops = len(job.graph)
    job.written.append(path)


def onnx_stage(job: CompileJob) -> None:
    """target onnx / tensorrt: irlm.lowering.onnx writes OUT/model.onnx (+ model.plan)."""
    c = job.config
    if c.target == "engine" or not c.write_engine:
        return
    from irlm.lowering.onnx.targets import lower_to_target
    export, engine = lower_to_target(job.graph, job.out, c.target,
                                     dtype=job.dtype or c.element_dtype, quant=c.quant)
    job.written += [export.model_path, export.data_path, export.build_script] + \
        ([engine] if engine else [])


def symbolic_dims(job: CompileJob) -> dict[str, tuple[int, int]]:
    """The ranges of the graph's symbolic dimensions, from max_batch / max_seq."""
    c = job.config
    max_seq = c.max_seq
    if max_seq is None:
        max_seq = int(getattr(job.model.config, "max_position_embeddings", 0) or 2048)
    dims = {"batch": (1, c.max_batch), "seq": (1, max_seq)}
    dims.update({k: tuple(v) for k, v in (c.dims or {}).items()})    # --dims wins
    return dims


def _graph_name(model) -> str:
    cls = type(model.module).__name__
    return "".join(c if c.isalnum() or c == "_" else "_" for c in cls) or "main"


STAGES: list[Stage] = [
    Stage("load", load_stage),
    Stage("check parallel", parallel.check_model_stage),
    Stage("calibration set", calibration_stage),
    Stage("trace", trace_stage),
    Stage("verify", verify_stage),
    Stage("write IR", write_frontend_ir_stage),
    Stage("passes", passes_stage),
    Stage("split", parallel.split_stage),
    Stage("write engine", engine_stage),
    Stage("write IR weights", ir_weights_stage),
    Stage("write ONNX", onnx_stage),
]
