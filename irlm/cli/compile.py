"""``irlm compile``: a model (model.py, Hugging Face directory, safetensors, GGUF) → OUT/.

Argument parsing only: the flags become an :class:`irlm.compilation.CompileConfig` and a
:class:`~irlm.compilation.Source`, and :func:`irlm.compile` runs every stage (see
irlm/compilation/stages.py).  This module adds the progress display and the summary line.
"""
from __future__ import annotations

import sys
from typing import Optional

from ..compilation import CompileConfig, Source, compile as compile_model
from ..compilation.config import (DEVICES, DTYPES, KV_CACHE_DTYPES, QUANT_MODES, TARGETS,
                                  parse_dims)
from ..compilation.stages import STAGES
from . import SUMMARIES
from ..errors import IRLMError


def add_parser(sub) -> None:
    from ..lowering.kernel_selection import LINEAR_DTYPES
    p = sub.add_parser(
        "compile", help=SUMMARIES["compile"],
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
    p.add_argument("--dims", metavar="NAME=MIN:MAX,...", default=None,
                   help="ranges of the traced dims (dim 0 of every input is batch, dim 1 "
                        "seq), e.g. batch=1:8,seq=1:2048; seq=16 makes seq static 16 "
                        "(overrides --max-batch / --max-seq)")
    p.add_argument("--static", action="store_true",
                   help="trace with the example inputs' exact shapes: no symbolic dims "
                        "(models that are not causal LMs)")
    p.add_argument("--no-stamp-layers", dest="stamp_layers", action="store_false",
                   help="trace every decoder layer, instead of tracing 3 and stamping the rest "
                        "when they provably repeat (the same graph, faster; for debugging)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="element type of weights and activations (default: bf16 with "
                        "--device cuda, else f32)")
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
    p.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default=None,
                   help="store the paged KV cache in 8 bits with calibrated per-layer scales")
    p.add_argument("--calib", metavar="FILE", default=None,
                   help="calibration prompts for int4-awq, w8a8-sq, fp8 and --kv-cache-dtype: "
                        "a text file (prompts separated by blank lines) or a .json list of "
                        "token-id lists (default: irlm's built-in English/code/chat set)")
    p.add_argument("--device", choices=DEVICES, default="any",
                   help="the device the engine is for: cpu records the dtype this CPU "
                        "runs the linears in (config.cpu_linear: int8 for --quant int8, "
                        "int4 for --quant int4, else f16 weights with f32 arithmetic, or "
                        "f32 where torch lacks fbgemm); default any (the CPU "
                        "executor picks the same at load)")
    p.add_argument("--cpu-linear", choices=LINEAR_DTYPES, default=None, metavar="DTYPE",
                   help="record the dtype a CPU runs the linears in (config.cpu_linear): "
                        "f32 (the graph's own weights and arithmetic), f16 (f16 weights, f32 "
                        "activations and accumulation), bf16, int8 / int4 (the --quant "
                        "int8 / int4 weights through torch's int GEMMs); default: --device's "
                        "choice")
    p.add_argument("--dump-ir", action="store_true",
                   help="write the IR after every pass under OUT/ir/ (01-PASS.irlm, ...)")
    p.add_argument("--no-engine", action="store_true",
                   help="stop after the pass pipeline (write IR only, no engine)")
    p.add_argument("--target", choices=TARGETS, default="engine",
                   help="what to write: irlm's engine (default), onnx (OUT/model.onnx + "
                        "build_trt.sh), or tensorrt (also OUT/model.plan; needs TensorRT)")
    from irlm.passes import add_pipeline_arguments
    add_pipeline_arguments(p, default_level="2")
    p.add_argument("--replace-pipeline", action="store_true",
                   help="run only --pipeline's passes, instead of after the -O level's "
                        "(a causal LM then needs substitute-attention in it for an engine; "
                        "without it the graph stays stateless, e.g. for --target onnx)")
    add_parallel_arguments(p)
    p.set_defaults(func=run)


def add_parallel_arguments(p) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel: split the engine into N ranks (tp-split: attention "
                        "heads, MLP, vocab), written under OUT/rank0 ... (default 1)")
    g.add_argument("--pp", type=int, default=1, metavar="N",
                   help="pipeline parallel: cut the engine into N stages of equal layer "
                        "counts (pp-split), one rank each (default 1)")


def run(args) -> int:
    source = source_from_args(args)
    config = config_from_args(args)
    with _progress() as progress:
        engine = compile_model(source, config, progress=progress)
    print(engine.summary())
    for note in engine.notes:
        print(f"irlm: note: {note}", file=sys.stderr)
    return 0


def source_from_args(args) -> Source:
    """Exactly one source; --config only with --safetensors."""
    given = [flag for flag, value in (("MODEL.py", args.model), ("--hf", args.hf),
                                      ("--gguf", args.gguf), ("--safetensors", args.safetensors))
             if value is not None]
    if args.config is not None and args.safetensors is None:
        raise IRLMError("--config is only for --safetensors (a model directory or GGUF "
                        "carries its own config)")
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
    if args.hf is not None:
        return Source(args.hf, "hf", flag="--hf")
    if args.gguf is not None:
        return Source(args.gguf, "gguf", flag="--gguf")
    if args.safetensors is not None:
        return Source(args.safetensors, "safetensors", config=args.config, flag="--safetensors")
    return Source(args.model, None, flag="MODEL.py")


def config_from_args(args) -> CompileConfig:
    """The flags as a CompileConfig (checked by irlm.compile)."""
    if args.replace_pipeline and args.pipeline is None:
        raise IRLMError("--replace-pipeline needs --pipeline P (the passes to run instead of "
                        "the -O level's)")
    if args.replace_pipeline and args.opt_level is not None:
        raise IRLMError(f"--replace-pipeline with -O{args.opt_level}: the level's passes are "
                        f"what it replaces; give one of them")
    # --pipeline extends the level (default -O2); --replace-pipeline runs it alone
    level: Optional[str] = None if args.replace_pipeline else (args.opt_level or "2")
    return CompileConfig(
        output=args.output, opt_level=level, pipeline=args.pipeline, dtype=args.dtype,
        max_batch=args.max_batch, max_seq=args.max_seq, tokens_per_block=args.tokens_per_block,
        dims=parse_dims(args.dims) if args.dims is not None else None, static=args.static,
        max_num_tokens=args.max_num_tokens, quant=args.quant, quant_group=args.quant_group,
        kv_cache_dtype=args.kv_cache_dtype, calib=args.calib, tp=args.tp, pp=args.pp,
        device=args.device, cpu_linear=args.cpu_linear, target=args.target, force=args.force,
        write_engine=not args.no_engine, stamp_layers=args.stamp_layers, dump_ir=args.dump_ir, dump_ir_dir=args.dump_ir_dir,
        print_ir_before=list(args.print_ir_before), print_ir_after=list(args.print_ir_after),
        timing=args.timing, stats=args.stats, check_numerics=args.check_numerics,
        numerics_atol=args.numerics_atol, numerics_rtol=args.numerics_rtol,
        numerics_seed=args.numerics_seed, numerics_int_max=args.numerics_int_max,
        verify_each=args.verify_each, pass_plugins=list(args.pass_plugin))


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

    def __call__(self, stage_name: str, index: int, total: int) -> None:
        if self._live is not None:
            self._live.update(self._task, description=stage_name, completed=index)

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.__exit__(*exc)
        return False
