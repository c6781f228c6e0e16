"""Splitting a compile into ranks (``tp`` / ``pp``).

Two stages of the compile (irlm/compilation/stages.py); the settings alone are checked with
the rest of the config (:meth:`CompileConfig.check`):

* :func:`check_model_stage` (right after load, before the trace): tp/pp against the model's
  config (heads, kv heads, intermediate size, layers), so a split that tp-split or pp-split
  would refuse is refused before the minutes a trace and the passes take;
* :func:`split_stage` (after the passes) makes ``job.ranks`` and, with ``quant`` int8 /
  int4, quantizes each of them (:func:`passes_after_split`: the passes stage leaves quantize out
  of a split compile); :func:`write_engine` writes them as a multi-rank engine
  (lowering/engine_format.py: ``OUT/engine.json`` + ``OUT/rank{r}/``).
"""
from __future__ import annotations

from dataclasses import replace

from .. import safe_io
from ..errors import IRLMError


def _sizes(config) -> tuple[int, int]:
    return config.tp or 1, config.pp or 1


def _first(cfg, *names):
    for n in names:
        v = getattr(cfg, n, None)
        if isinstance(v, int) and v > 0:
            return n, v
    return None, None


def model_shape(cfg) -> dict:
    """Heads, kv heads, intermediate size and layers from a transformers config (None when
    the config does not say; the passes then check the graph)."""
    _, heads = _first(cfg, "num_attention_heads", "n_head")
    _, kv = _first(cfg, "num_key_value_heads", "num_kv_heads", "multi_query_group_num")
    if kv is None and heads is not None:
        multi_query = getattr(cfg, "multi_query", False) and \
            not getattr(cfg, "new_decoder_architecture", False)
        kv = 1 if multi_query else heads
    inter_name, inter = _first(cfg, "intermediate_size", "ffn_dim", "n_inner")
    if inter is None and getattr(cfg, "model_type", None) == "gpt2":
        _, hidden = _first(cfg, "n_embd", "hidden_size")
        inter_name, inter = "n_inner", 4 * hidden if hidden else None
    _, layers = _first(cfg, "num_hidden_layers", "n_layer", "num_layers")
    return {"heads": heads, "kv_heads": kv, "intermediate": inter,
            "intermediate_name": inter_name, "layers": layers}


def check_model_stage(job) -> None:
    """Refuse --tp/--pp values the model cannot be split by, before the trace."""
    tp, pp = _sizes(job.config)
    if tp == 1 and pp == 1:
        return
    from .stages import is_causal_lm
    if not is_causal_lm(job.model):
        flag = f"--tp {tp}" if tp > 1 else f"--pp {pp}"
        raise IRLMError(f"{flag}: only causal LMs compile to a (splittable) engine; "
                        f"{job.model.source} is not one")
    s = model_shape(job.model.config)
    if tp > 1:
        heads, kv, inter = s["heads"], s["kv_heads"], s["intermediate"]
        if heads is not None and tp > heads:
            raise IRLMError(f"--tp {tp}: the model has only {heads} attention heads; --tp "
                            f"cannot be larger")
        if heads is not None and heads % tp:
            raise IRLMError(f"--tp {tp}: the model has {heads} attention heads, which --tp must "
                            f"divide")
        if kv is not None and kv % tp and tp % kv:
            raise IRLMError(f"--tp {tp}: the model has {kv} kv heads; --tp must divide them or "
                            f"be a multiple of them")
        if inter is not None and inter % tp:
            raise IRLMError(f"--tp {tp}: the model's intermediate size "
                            f"({s['intermediate_name']} = {inter}) is not divisible by it")
        # An unset group is chosen per rank's layer (it then divides the shard by construction).
        group = job.config.quant_group if job.config.quant == "int4" else None
        if group:
            _check_shard_groups(job, s, tp, group)
    if pp > 1 and s["layers"] is not None and s["layers"] % pp:
        raise IRLMError(f"--pp {pp}: the model has {s['layers']} layers, which --pp must "
                        f"divide")


def _check_shard_groups(job, s, tp, group) -> None:
    """A row-parallel projection of a rank reads 1/tp of the input features; int4 scale groups
    must divide that, or quantize would refuse the rank's graph after the trace."""
    cfg = job.model.config
    heads = s["heads"]
    _, hidden = _first(cfg, "hidden_size", "n_embd")
    _, head_dim = _first(cfg, "head_dim")
    if head_dim is None and heads and hidden:
        head_dim = hidden // heads
    flags = f"--tp {tp} with --quant int4 --quant-group {group}"
    for what, total, how in (
            ("attention output projection", heads * head_dim if heads and head_dim else None,
             f"{heads} heads x head size {head_dim}"),
            ("MLP down projection", s["intermediate"],
             f"{s['intermediate_name']} = {s['intermediate']}")):
        if total is not None and (total // tp) % group:
            raise IRLMError(f"{flags}: a rank's {what} reads {total // tp} input features "
                            f"({how}, / {tp}), which the group must divide; use a smaller "
                            f"--quant-group or --tp")


def split_stage(job) -> None:
    """After the passes: ``job.ranks`` = the per-rank graphs (and their IR with --dump-ir)."""
    tp, pp = _sizes(job.config)
    if tp == 1 and pp == 1:
        return
    from irlm.passes.parallel import split_for_pipeline, split_for_tensor_parallel
    if tp > 1 and pp > 1:
        # stages first, then each stage's tp ranks: rank s*tp + t = tp rank t of stage s
        job.ranks = [g for stage in split_for_pipeline(job.graph, pp)
                     for g in split_for_tensor_parallel(stage, tp)]
        what = f"pp-split{{stages={pp}}},tp-split{{size={tp}}}"
    elif tp > 1:
        job.ranks, what = split_for_tensor_parallel(job.graph, tp), f"tp-split{{size={tp}}}"
    else:
        job.ranks, what = split_for_pipeline(job.graph, pp), f"pp-split{{stages={pp}}}"
    job.pipeline = f"{job.pipeline},{what}" if job.pipeline else what
    n = 0
    if job.config.dump_ir:
        from irlm.text.printer import print_graph
        ir = job.out / "ir"
        n = job.next_dump       # continue the pass dumps' numbering, one folder per rank
        name = "tp-split" if tp > 1 else "pp-split"   # tp x pp: the last split made
        for r, g in enumerate(job.ranks):
            path = ir / f"rank{r}" / f"{n:02d}-{name}.irlm"
            safe_io.make_dir(path.parent)
            safe_io.write_text(path, print_graph(g))
            job.written.append(path)
    passes_after_split(job, n + 1 if job.config.dump_ir else 0)
    job.notes.append(f"split into {len(job.ranks)} ranks ({what}); each rank's engine is "
                     f"under OUT/rank0 ... OUT/rank{len(job.ranks) - 1}")


def passes_after_split(job, stage_offset: int) -> None:
    """``--quant`` with --tp/--pp: the compile's quantize pipeline run on each rank's graph
    (compile.py's passes stage leaves it out when the compile splits); likewise
    ``cast-weights`` for an engine whose CPU linears run in f16 or bf16.  After the split, a
    vocab-parallel LM head is followed by its all_gather and still reaches the graph output,
    so quantize keeps it in full precision as it does unsplit."""
    from .stages import cpu_weights_pipeline, quant_pipeline, run_passes
    text = ",".join(p for p in (quant_pipeline(job), cpu_weights_pipeline(job)) if p)
    if not text:
        return
    for r, g in enumerate(job.ranks):
        # the reference interpreter cannot run a rank's collectives alone; pass plugins were
        # loaded by the passes stage
        dump = job.out / "ir" / f"rank{r}" if job.config.dump_ir else None
        run_passes(g, text, replace(job.config, pass_plugins=[]), dump_dir=dump,
                   stage_offset=stage_offset, check_numerics=False)
    job.pipeline = f"{job.pipeline},{text}"


def write_engine(job, config: dict, tokenizer) -> None:
    """The engine: one graph (lowering/engine_format.py's layout), or one per rank."""
    from irlm.lowering.engine_format import write_engine as write_one, write_parallel_engine
    if not job.ranks:
        write_one(job.graph, job.out, config, tokenizer=tokenizer)
        return
    tp, pp = _sizes(job.config)
    write_parallel_engine(job.ranks, job.out, config, tp=tp, pp=pp, tokenizer=tokenizer)
