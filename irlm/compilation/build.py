"""``irlm.build_engine(ir_file, weights, output)``: an IR file and its weights → an engine.

What closes the "dump → edit → re-feed" loop.  Any IR dump of a causal LM can be built:

* a dump in the paged inference form (``plan.irlm``, or ``OUT/ir/NN-PASS.irlm`` from
  substitute-attention on) is written as it is (plus ``pipeline``, if given);
* a stateless dump from before substitute-attention (``OUT/ir/00-frontend.irlm``, ...) first
  runs the ``-O`` level's causal-LM pipeline (default ``-O2``), as ``irlm compile`` would.

The weights are safetensors files holding every param the IR reads, by the names it uses:
``ENGINE/weights.safetensors`` holds the final graph's (``plan.irlm``'s), and
``ENGINE/ir/weights.safetensors`` (written by ``irlm compile --dump-ir``) the others that any
dump reads, so a dump of an engine is re-fed with both.  Every param is checked against them
before anything runs: one ``FILE:LINE:COL: param ...`` line per missing name or wrong
shape/dtype (:class:`WeightsMismatchError`).

The build facts an IR file cannot hold (EOS id, context length, tokenizer) come from a
reference engine: ``reference=``, else the engine the IR file sits in (``ENGINE/plan.irlm``,
``ENGINE/ir/*.irlm``).  ``tokenizer=`` overrides its tokenizer; ``max_model_len=`` its context.
"""
from __future__ import annotations

import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Union

from .. import safe_io
from ..errors import IRLMError

PathLike = Union[str, Path]
#: the weights irlm compile --dump-ir writes beside the dumps (names the engine's file lacks)
IR_WEIGHTS = "weights.safetensors"


class WeightsMismatchError(IRLMError):
    """The IR's params and the weights disagree; ``problems`` holds one line per param."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass
class BuildResult:
    """What :func:`build_engine` wrote."""
    path: Path
    graph: object
    config: dict
    pipeline: str = ""
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.config.get('source')}: @{self.graph.name}: {len(self.graph)} ops "
                f"({sum(1 for _ in self.graph.params())} params) → engine {self.path}"
                + (f" (ran {self.pipeline})" if self.pipeline else ""))


def load_weights(files: Sequence[PathLike]):
    """A :class:`~irlm.weights.WeightStore` over the safetensors ``files`` (later files win
    for a name in several)."""
    from irlm.weights import WeightStore
    if not files:
        raise IRLMError("--weights: give the safetensors file(s) holding the IR's params")
    store = WeightStore()
    for f in files:
        p = Path(f)
        if not p.is_file():
            raise IRLMError(f"--weights {f}: no such file")
        store.add_safetensors(p)
    return store


def check_params(graph, store, weight_files: Sequence[PathLike]) -> None:
    """Every ``param`` of ``graph`` is in ``store`` with its declared type; else one line per
    param that is not (``FILE:LINE:COL: param 'NAME' ...``)."""
    from irlm.types import format_type
    problems = []
    where_files = ", ".join(str(f) for f in weight_files)
    names = None
    for op in graph.params():
        name = op.attrs["name"]
        at = "{}:{}:{}: ".format(*op.text_pos) if op.text_pos else ""
        declared = op.result.type
        if name not in store:
            names = names if names is not None else store.names()
            near = difflib.get_close_matches(name, names, n=1)
            hint = f"; did you mean '{near[0]}'?" if near else ""
            problems.append(f"{at}param '{name}' is not in the weights ({where_files}){hint}")
            continue
        held = store.type_of(name)
        if tuple(held.shape) != tuple(declared.shape) or held.dtype != declared.dtype:
            problems.append(f"{at}param '{name}' is declared {format_type(declared)} but "
                            f"{store.entry(name).source} holds {format_type(held)}")
    if problems:
        raise WeightsMismatchError(problems)


def build_engine(ir_file: PathLike, weights: Sequence[PathLike], output: PathLike, *,
                 tokenizer: Optional[PathLike] = None, reference: Optional[PathLike] = None,
                 opt_level: Optional[str] = None, pipeline: Optional[str] = None,
                 max_model_len: Optional[int] = None, tokens_per_block: int = 16,
                 max_num_tokens: int = 8192, force: bool = False) -> BuildResult:
    """Verify ``ir_file``, check its params against ``weights``, run the passes it still
    needs and write an engine into ``output`` (see the module doc)."""
    from irlm.lowering.engine_format import write_engine
    from irlm.ops.llm import KV_CACHE_INPUT
    from irlm.text.parser import parse_file
    from irlm.verifier import verify
    from .driver import compile_output_owns, earlier_outputs, remove_earlier_outputs
    ir_file = Path(ir_file)
    if not ir_file.is_file():
        raise IRLMError(f"{ir_file}: no such IR file")
    for flag, value, low in (("--max-model-len", max_model_len, 2),
                             ("--tokens-per-block", tokens_per_block, 1),
                             ("--max-num-tokens", max_num_tokens, 1)):
        if value is not None and (not isinstance(value, int) or value < low):
            raise IRLMError(f"{flag} {value}: must be at least {low}")
    graph = parse_file(ir_file)
    store = load_weights(weights)
    check_params(graph, store, weights)
    graph.weights = _only(store, {op.attrs["name"] for op in graph.params()})
    verify(graph)
    ref_dir = _reference_engine(ir_file, reference)
    ref_config = _reference_config(ref_dir) if ref_dir is not None else {}

    paged = any(v.name == KV_CACHE_INPUT for v in graph.inputs)
    if not paged and not _stateless_causal_lm(graph):
        raise IRLMError(f"{ir_file}: not a causal LM in the paged inference form (no "
                        f"%{KV_CACHE_INPUT} input), nor a traced one substitute-attention could "
                        f"turn into it (inputs %input_ids and %position_ids and "
                        f"core.scaled_dot_product_attention ops); an engine runs a decoder with "
                        f"a paged KV cache")
    stateless_seq = _dim_max(graph, "seq")
    text = _pipeline(paged, opt_level, pipeline, tokens_per_block, max_num_tokens)
    if text:
        from .stages import run_passes
        from .config import CompileConfig
        run_passes(graph, text, CompileConfig(output=output))
    if not any(v.name == KV_CACHE_INPUT for v in graph.inputs):
        raise IRLMError(f"{ir_file}: not a causal LM in the paged inference form, and "
                        f"substitute-attention could not make it one (pipeline: "
                        f"{text or 'none'}); an engine runs a decoder with a paged KV cache")

    context = max_model_len or ref_config.get("max_model_len") or stateless_seq
    if not context:
        raise IRLMError(f"{ir_file}: the context length is not in the IR (a paged graph); "
                        f"give --max-model-len N or --from ENGINE")
    tok = _tokenizer(tokenizer, ref_dir)
    out = safe_io.prepare_output_dir(
        output, flag="-o", force=force, owned=compile_output_owns,
        sources=[ir_file.parent, *(Path(w).parent for w in weights),
                 *([ref_dir] if ref_dir is not None else [])])
    config = _config(graph, ref_config, ir_file, text, int(context), tok, max_num_tokens)
    # an earlier compile or build in OUT: what this build does not rewrite goes afterwards,
    # except the files it reads (an IR dump edited in place, weights under OUT/ir/)
    inputs = {os.path.realpath(p) for p in [ir_file, *weights, *([tokenizer] if tokenizer
                                                                  else [])]}
    earlier = {rel: ident for rel, ident in earlier_outputs(out).items()
               if os.path.realpath(out / rel) not in inputs}
    write_engine(graph, out, config, tokenizer=tok)
    removed = remove_earlier_outputs(out, earlier)
    notes = [] if ref_dir is not None else [
        "no reference engine: EOS / BOS ids come from the tokenizer (if any)"]
    if removed:
        notes.append(f"removed {len(removed)} files of the previous compile or build in {out}")
    return BuildResult(out, graph, config, text, notes)


def _only(store, names: set):
    """A store of just ``names`` (the IR's params): the weight files may also hold what later
    passes derive (fused QKV of the engine's weights), which the passes must create anew."""
    from irlm.weights import WeightStore
    out = WeightStore()
    for n in names:
        e = store.entry(n)
        out.add_lazy(n, e.type, e.loader, e.source)
    return out


def _pipeline(paged: bool, level, extra, tokens_per_block: int, max_num_tokens: int) -> str:
    """The passes an IR file still needs: a stateless causal LM gets the level's causal-LM
    form (default -O2); a paged graph only what is asked for."""
    from .causal_lm import pipeline_for
    steps = []
    if not paged:
        steps.append(pipeline_for(level or "2", True, tokens_per_block, 0, max_num_tokens))
    elif level is not None:
        steps.append(pipeline_for(level, False))
    if extra:
        steps.append(extra)
    return ",".join(s for s in steps if s)


def _stateless_causal_lm(graph) -> bool:
    names = {v.name for v in graph.inputs}
    return {"input_ids", "position_ids"} <= names and \
        any(op.name == "core.scaled_dot_product_attention" for op in graph.ops)


def _dim_max(graph, name: str) -> Optional[int]:
    r = graph.dims.get(name)
    return int(r.max) if r is not None else None


def _reference_engine(ir_file: Path, reference) -> Optional[Path]:
    from irlm.lowering.engine_format import MANIFEST
    if reference is not None:
        ref = Path(reference)
        if not (ref / MANIFEST).is_file():
            raise IRLMError(f"--from {reference}: not an engine directory (no {MANIFEST})")
        return ref
    for d in (ir_file.parent, ir_file.parent.parent):
        if (d / MANIFEST).is_file() and (ir_file.parent.name == "ir" or d == ir_file.parent):
            return d
    return None


def _reference_config(ref: Path) -> dict:
    """The reference engine's build facts.  Only its manifest is read (and checked): the IR
    file given may be its own edited plan.irlm, which no longer matches the manifest."""
    from irlm.lowering.engine_files import read_manifest
    from irlm.lowering.engine_format import ENGINE_FORMAT, ENGINE_VERSION, MANIFEST
    manifest = read_manifest(ref / MANIFEST, format_name=ENGINE_FORMAT, version=ENGINE_VERSION)
    if manifest.get("parallel"):
        raise IRLMError(f"--from {ref}: a multi-rank engine; build from one of its ranks "
                        f"(--from {ref}/rank0) or a single-rank engine")
    return dict(manifest.get("config") or {})


def _tokenizer(given, ref_dir: Optional[Path]):
    """``--tokenizer DIR|tokenizer.json``, else the reference engine's, else None."""
    from irlm.lowering.engine_format import MANIFEST
    src = Path(given) if given is not None else ref_dir
    if src is None:
        return None
    if given is not None and not src.exists():
        raise IRLMError(f"--tokenizer {given}: no such file or directory")
    directory = src if src.is_dir() else src.parent
    if src.is_file() and src.name != "tokenizer.json":
        raise IRLMError(f"--tokenizer {given}: give a tokenizer.json or the directory holding "
                        f"one")
    if not (directory / "tokenizer.json").is_file():
        if given is not None:
            raise IRLMError(f"--tokenizer {given}: no tokenizer.json there")
        return None
    from transformers import PreTrainedTokenizerFast
    try:
        tok = PreTrainedTokenizerFast.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:   # noqa: BLE001 - tokenizers / transformers raise many types
        raise IRLMError(f"{directory / 'tokenizer.json'}: cannot load the tokenizer: "
                        f"{type(e).__name__}: {' '.join(str(e).split())[:200]}") from None
    template = directory / "chat_template.jinja"
    if not getattr(tok, "chat_template", None) and template.is_file() and \
            (directory / MANIFEST).is_file():
        tok.chat_template = template.read_text()
    return tok


def _config(graph, ref: dict, ir_file: Path, pipeline: str, context: int, tok,
            max_num_tokens: int) -> dict:
    from .stages import _irlm_version, activation_plan
    out_dtype = graph.outputs[0].type.dtype.value if graph.outputs else "f32"
    config = {k: v for k, v in ref.items() if k not in ("activation_arena_bytes",)}
    config.update({
        "source": str(ir_file),
        "dtype": ref.get("dtype", out_dtype),
        "max_model_len": context,
        "pipeline": pipeline,           # what this build ran over the IR file
        "built_from_ir": str(ir_file),
        "irlm_version": _irlm_version(),
    })
    for key in ("eos_token_id", "bos_token_id"):
        if config.get(key) is None and tok is not None:
            config[key] = getattr(tok, key, None)
    tokens = _dim_max(graph, "tokens") or max_num_tokens
    config["activation_arena_bytes"] = activation_plan(graph, tokens, context).arena_bytes
    json.dumps(config)           # what engine.json will hold: JSON values only
    return config
