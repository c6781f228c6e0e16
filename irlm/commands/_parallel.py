"""``irlm compile --tp N`` / ``--pp N``: split the compiled graph into per-rank graphs.

Three hooks into the compile (irlm/commands/compile.py):

* :func:`check_parallel_arguments` (with the other argument checks): the flags alone;
* :func:`check_model_stage` (right after load, before the trace): the flags against the
  model's config (heads, kv heads, intermediate size, layers), so a split that tp-split or
  pp-split would refuse is refused before the minutes a trace and the passes take;
* :func:`split_stage` (after the passes) makes ``job.ranks``, and :func:`write_engine` writes
  them as a multi-rank engine (lowering/engine.py: ``OUT/engine.json`` + ``OUT/rank{r}/``).
"""
from __future__ import annotations

from ..errors import IRLMError


def add_parallel_arguments(p) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tp", type=int, default=1, metavar="N",
                   help="tensor parallel: split the engine into N ranks (tp-split: attention "
                        "heads, MLP, vocab), written under OUT/rank0 ... (default 1)")
    g.add_argument("--pp", type=int, default=1, metavar="N",
                   help="pipeline parallel: cut the engine into N stages of equal layer "
                        "counts (pp-split), one rank each (default 1)")


def _sizes(args) -> tuple[int, int]:
    return getattr(args, "tp", 1) or 1, getattr(args, "pp", 1) or 1


def check_parallel_arguments(args) -> None:
    tp, pp = getattr(args, "tp", 1), getattr(args, "pp", 1)
    for flag, value in (("--tp", tp), ("--pp", pp)):
        if value is not None and value < 1:
            raise IRLMError(f"{flag} {value}: must be at least 1")
    tp, pp = _sizes(args)
    if tp > 1 and pp > 1:
        raise IRLMError(f"--tp {tp} with --pp {pp}: not supported together yet (the CPU "
                        f"simulator has one group per engine); use one of them")
    if tp == 1 and pp == 1:
        return
    flag = f"--tp {tp}" if tp > 1 else f"--pp {pp}"
    for other, value in (("--quant", getattr(args, "quant", None)),
                         ("--kv-cache-dtype", getattr(args, "kv_cache_dtype", None))):
        if value:
            raise IRLMError(f"{flag} with {other} {value}: not supported together yet")


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
    tp, pp = _sizes(job.args)
    if tp == 1 and pp == 1:
        return
    from .compile import is_causal_lm
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
    if pp > 1 and s["layers"] is not None and s["layers"] % pp:
        raise IRLMError(f"--pp {pp}: the model has {s['layers']} layers, which --pp must "
                        f"divide")


def split_stage(job) -> None:
    """After the passes: ``job.ranks`` = the per-rank graphs (and their IR with --dump-ir)."""
    tp, pp = _sizes(job.args)
    if tp == 1 and pp == 1:
        return
    from irlm.passes.tp_split import split_for_pipeline, split_for_tensor_parallel
    if tp > 1:
        job.ranks, what = split_for_tensor_parallel(job.graph, tp), f"tp-split{{size={tp}}}"
    else:
        job.ranks, what = split_for_pipeline(job.graph, pp), f"pp-split{{stages={pp}}}"
    job.pipeline = f"{job.pipeline},{what}" if job.pipeline else what
    if job.args.dump_ir:
        from irlm.printer import print_graph
        ir = job.out / "ir"
        # continue the pass dumps' numbering, one folder per rank
        n = len(list(ir.glob("[0-9][0-9]-*.irlm"))) if ir.is_dir() else 0
        name = "tp-split" if tp > 1 else "pp-split"
        for r, g in enumerate(job.ranks):
            path = ir / f"rank{r}" / f"{n:02d}-{name}.irlm"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(print_graph(g), encoding="utf-8")
            job.written.append(path)
    job.notes.append(f"split into {len(job.ranks)} ranks ({what}); each rank's engine is "
                     f"under OUT/rank0 ... OUT/rank{len(job.ranks) - 1}")


def write_engine(job, config: dict, tokenizer) -> None:
    """The engine: one graph (lowering/engine.py's layout), or one per rank."""
    from irlm.lowering.engine import write_engine as write_one, write_parallel_engine
    if not job.ranks:
        write_one(job.graph, job.out, config, tokenizer=tokenizer)
        return
    tp, pp = _sizes(job.args)
    write_parallel_engine(job.ranks, job.out, config, tp=tp, pp=pp, tokenizer=tokenizer)
