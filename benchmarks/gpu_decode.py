"""GPU decode benchmark: Llama-3-8B shape, random bf16 weights, irlm's CUDA executor.

One run answers correctness and speed (run on the device machine):

    python benchmarks/gpu_decode.py [--sections copy,build,b1,profile,prefill,b32,inflight,
                                                inflight2k,hf]
                                    [--json OUT.json] [--layers 32] [--quant bf16,fp8,int8,int4]

--quant: one engine per listed mode, built and measured one after the other in the same run
(bf16: unquantized; otherwise the ``quantize`` pass's mode: int8, int4, int4-awq, w8a8-sq, fp8,
fp8-weight; the calibrated modes calibrate on two random 32-token prompts, which is all random
weights need).  A KV-cache mode, alone (bf16 weights) or joined with ``+``, stores the paged
cache in 8 bits (``quantize-kv-cache``, as ``irlm compile --kv-cache-dtype``): ``kv-int8``,
``kv-fp8``, ``fp8+kv-fp8``.  Result keys of a quantized engine end in ``_MODE`` (``b1_fp8``,
``inflight_128_128_kv-fp8``).

Workloads (prompt of random tokens, greedy, EOS ignored):
  b1        batch 1, 128 prompt / 128 new tokens: tokens/s, decode step time, the fraction of
            the measured copy bandwidth that reading the weights once per token achieves
  profile   GPU time per kernel name of a decode step at 256 cached tokens (torch profiler
            over 8 eager steps), the 20 largest; batch 1, or each of --profile-batch
  prefill   one 128-token prefill step (the TTFT of b1 without the engine loop): wall time
            against the device's busy time, the 15 largest kernels and host ops
  b32       32 prompts at once (static batch, prefill included), 128 / 128
  inflight  512 requests submitted at once, 128 / 128: output tokens/s, TTFT and TPOT p50/p90/p99
  inflight2k  the same with 2048-token prompts
  hf        Hugging Face transformers eager, batch 1, as a sanity baseline in the same run
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback

import torch

RESULTS: dict = {}
QUANT_SUFFIX = ""          # the result-key suffix of the engine being measured ("_int4", ...)


def log(*a):
    print(*a, flush=True)


def llama3_8b_config(layers: int):
    import transformers
    return transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5)


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    bw = 2 * n / statistics.median(times)
    del src, dst
    return bw


def quantize_graph(graph, mode: str, vocab: int) -> dict:
    """Run the quantize pass of ``mode`` on the compiled graph (weights still lazy on the GPU);
    the calibrated modes get two random 32-token prompts.  Returns the pass statistics."""
    import os
    import tempfile
    from irlm.passes import run_pipeline
    from irlm.passes.llm.quantize import CALIBRATED
    calib = ""
    if mode in CALIBRATED:
        fd, path = tempfile.mkstemp(suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(random_prompts(2, 32, vocab, seed=7), f)
        calib = f',calib="{path}"'
    stats = run_pipeline(graph, f"quantize{{mode={mode},measure=false,fuse=false{calib}}},"
                                f"fuse-quant,dce")
    return getattr(stats, "counters", {}) if stats is not None else {}


KV_MODES = {"kv-int8": "int8", "kv-fp8": "fp8"}   # --quant part -> quantize-kv-cache dtype


def split_mode(mode: str) -> tuple[str, str | None]:
    """``"fp8+kv-fp8"`` -> (weight mode, KV-cache dtype): ("fp8", "fp8"); ``"kv-int8"`` ->
    ("bf16", "int8"); ``"int4"`` -> ("int4", None)."""
    weight, kv = "bf16", None
    for part in mode.split("+"):
        if part in KV_MODES:
            kv = KV_MODES[part]
        else:
            weight = part
    return weight, kv


def quantize_kv_cache(graph, dtype: str, vocab: int) -> dict:
    """``quantize-kv-cache{dtype=...}`` with two random 32-token calibration prompts."""
    import os
    import tempfile
    from irlm.passes import run_pipeline
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(random_prompts(2, 32, vocab, seed=7), f)
    stats = run_pipeline(graph, f'quantize-kv-cache{{dtype={dtype},calib="{path}"}}')
    return getattr(stats, "counters", {}) if stats is not None else {}


#: the tokens one step of the benchmark's engines may hold (build's default)
MAX_STEP_TOKENS = 8192


#: --fuse-rope's values: CudaGraphRunner's fuse_rope (None: IRLM_FUSE_ROPE decides)
FUSE_ROPE = {"default": None, "on": True, "off": False}


def build(layers: int, max_num_tokens: int = MAX_STEP_TOKENS, quant: str = "bf16",
          fuse_rope=None):
    """Trace the 8B shape on the meta device, compile -O2, random bf16 weights on the GPU,
    then the quantize pass of the weight mode and quantize-kv-cache of a KV mode
    (:func:`split_mode`)."""
    import transformers
    from irlm.compilation import compile_causal_lm
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    cfg = llama3_8b_config(layers)
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    graph = compile_causal_lm(model, max_batch=8, max_seq=8192, max_num_tokens=max_num_tokens)
    t_compile = time.perf_counter() - t0
    store = graph.weights
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in list(store.names()):
        e = store.entry(name)
        if e.source != "meta":
            continue
        t = e.type
        if "inv_freq" in name:
            store.add_tensor(name, rot.inv_freq.to("cuda", t.dtype.torch))
        elif "norm" in name:
            store.add_lazy(name, t, lambda t=t: torch.ones(t.shape, dtype=t.dtype.torch,
                                                           device="cuda"), "ones")
        else:
            store.add_lazy(name, t, lambda t=t: (torch.randn(
                t.shape, dtype=t.dtype.torch, device="cuda", generator=gen) * 0.02), "random")
    t_quant = 0.0
    weight_mode, kv_dtype = split_mode(quant)
    tq = time.perf_counter()
    if weight_mode != "bf16":
        quantize_graph(graph, weight_mode, cfg.vocab_size)
    if kv_dtype is not None:
        quantize_kv_cache(graph, kv_dtype, cfg.vocab_size)
    t_quant = time.perf_counter() - tq
    t1 = time.perf_counter()
    runner = CudaGraphRunner(graph, fuse_rope=fuse_rope)
    torch.cuda.synchronize()
    t_load = time.perf_counter() - t1
    weight_bytes = sum(runner.weights.get(op.attrs["name"]).nbytes for op in graph.params())
    key = "build" + ("" if quant == "bf16" else "_" + quant)
    RESULTS[key] = {"trace_and_passes_s": t_compile, "quantize_s": t_quant,
                    "weights_to_gpu_and_kv_alloc_s": t_load,
                    "graph_ops": len(graph), "weight_bytes": weight_bytes,
                    "kv_blocks": runner.num_blocks, "block_size": runner.block_size,
                    "kv_cache_dtype": str(runner.kv_cache.dtype).replace("torch.", ""),
                    "quant_linear_paths": runner.quant_plan.summary(),
                    "linear_tactics": runner.linear_tactics(),
                    "linear_plans_s": runner.linear_plans_s,
                    "rope_fusions": runner.rope_fusions}
    log(f"{key}: trace+passes {t_compile:.1f}s, quantize {t_quant:.1f}s, weights+KV "
        f"{t_load:.1f}s, {len(graph)} ops, weights {weight_bytes / 1e9:.2f} GB, "
        f"{runner.num_blocks} KV blocks ({runner.kv_cache.dtype}), quantized linears "
        f"{runner.quant_plan.summary()}, ropes fused into {runner.rope_fusions} attentions")
    log(f"  linear paths chosen in {runner.linear_plans_s:.2f}s (checks, kernel compiles, "
        f"timing)")
    for shape, choice in runner.linear_tactics().items():
        log(f"  linear of {shape}: {choice}")
    return cfg, graph, runner


ASYNC_DECODE = True  # --async-decode


def run_requests(runner, prompts, new_tokens, max_batch, max_num_tokens=8192):
    """Submit every prompt at once; returns (seconds, per-request TTFT, per-request TPOT)."""
    from irlm.runtime import SamplingParams
    from irlm.runtime.llm_engine import LLMEngine
    engine = LLMEngine(runner, None, max_num_tokens=max_num_tokens, max_batch_size=max_batch,
                       max_waiting=len(prompts) + 1, enable_prefix_caching=False,
                       async_decode=ASYNC_DECODE)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ids = [engine.add_request(p, params) for p in prompts]
    first, last = {}, {}
    while engine.has_unfinished():
        changed = engine.step()
        now = time.perf_counter()
        for req in changed:
            first.setdefault(req.request_id, now)
            last[req.request_id] = now
    total = time.perf_counter() - t0
    outs = [engine.pop_output(i) for i in ids]
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    ttft = [first[i] - t0 for i in ids]
    tpot = [(last[i] - first[i]) / max(1, new_tokens - 1) for i in ids]
    return total, n_out, ttft, tpot, engine.num_steps


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def random_prompts(n, length, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (length,), generator=g).tolist() for _ in range(n)]


def reload_runner(graph, fuse_rope):
    """The engine loaded again with another --fuse-rope setting (the caller has dropped the
    old runner, so the KV pool is sized as before)."""
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    gc.collect()            # engines and runners reference each other: free the KV pool now
    torch.cuda.empty_cache()
    runner = CudaGraphRunner(graph, fuse_rope=fuse_rope)
    log(f"engine loaded again: ropes fused into {runner.rope_fusions} attentions")
    return runner


def section_b1(runner, cfg, copy_bw, key="b1", build_key="build"):
    prompts = random_prompts(1, 128, cfg.vocab_size)
    run_requests(runner, prompts, 16, 1, 4096)                      # warm-up and capture
    total, n, ttft, tpot, steps = run_requests(runner, prompts, 128, 1, 4096)
    step = tpot[0]
    wb = RESULTS[build_key]["weight_bytes"]
    RESULTS[key] = {"tokens_per_s": n / total, "decode_tokens_per_s": 1 / step,
                     "ttft_ms": ttft[0] * 1e3, "decode_step_ms": step * 1e3,
                     "weight_bw_fraction_of_copy": wb / step / copy_bw}
    log(f"{key}: {n / total:.1f} tok/s end to end, decode step {step * 1e3:.2f} ms "
        f"({1 / step:.1f} tok/s), TTFT {ttft[0] * 1e3:.1f} ms, weight traffic "
        f"{wb / step / 1e9:.0f} GB/s = {100 * wb / step / copy_bw:.0f}% of copy bandwidth")


def int_list(ap, flag: str, text: str, most: int, why: str = "") -> list[int]:
    """A comma-separated list of integers from 1 to ``most``, or one line from argparse."""
    try:
        values = [int(n) for n in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1 or max(values) > most:
        ap.error(f"{flag}: expected integers from 1 to {most}{why}, comma-separated; got "
                 f"{text!r}")
    return values


def parse_launch(v: str):
    """--launch's settings: (programmatic launch on, GEMV prefetch bytes, IRLM_FOLD_SPLITS);
    None where a setting keeps its default; None for an unknown value."""
    if v == "default":
        return (None, None, None)
    if v == "plain":
        return (False, 0, None)
    if v.startswith("pdl-pf") and v[6:].isdigit():
        return (True, int(v[6:]), None)
    if v in ("fold-on", "fold-off"):
        return (None, None, "1" if v == "fold-on" else "0")
    return None


def section_b1_under(runner, cfg, copy_bw, launch, sfx, build_key):
    """b1 under one --launch setting: the decode graphs are captured again with it."""
    import os
    from irlm.kernels import nvrtc
    pdl, prefetch, fold = parse_launch(launch)
    nvrtc.set_programmatic_launch(pdl)
    # settings left at None keep what the environment says
    saved = {var: os.environ.get(var) for var in ("IRLM_GEMV_PREFETCH", "IRLM_FOLD_SPLITS")}
    for var, value in (("IRLM_GEMV_PREFETCH", prefetch), ("IRLM_FOLD_SPLITS", fold)):
        if value is not None:
            os.environ[var] = str(value)
    runner.release_graphs()
    try:
        section_b1(runner, cfg, copy_bw, "b1" + ("" if launch == "default" else "_" + launch)
                   + sfx, build_key)
    finally:
        nvrtc.set_programmatic_launch(None)
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value
        runner.release_graphs()


def section_profile(runner, cfg, key="profile", steps=8, batch=1, cached=256):
    """GPU time per kernel of a decode step of ``batch`` rows (torch profiler over eager steps:
    the same kernels a graph replay runs, without the replay hiding them), each row at
    ``cached`` cached tokens (its prompt prefilled first, up to 8192 tokens a step)."""
    from torch.profiler import ProfilerActivity, profile
    from irlm.runtime.model_runner import StepBatch
    prompts = random_prompts(batch, cached, cfg.vocab_size, seed=3)
    per_row = -(-(cached + steps + 1) // runner.block_size)
    if batch * per_row > runner.num_blocks:
        raise RuntimeError(f"profile at {batch} rows x {cached} tokens needs {batch * per_row} "
                           f"KV blocks; the pool has {runner.num_blocks}")
    blocks = [list(range(r * per_row, (r + 1) * per_row)) for r in range(batch)]
    rows = list(range(batch))
    chunk = max(1, MAX_STEP_TOKENS // cached)
    for r0 in range(0, batch, chunk):
        part = rows[r0:r0 + chunk]
        runner.step(StepBatch.pack(part, [prompts[r] for r in part], [0] * len(part),
                                   [blocks[r] for r in part]))
    graphs, runner.cuda_graphs = runner.cuda_graphs, False
    try:
        def one(i):
            runner.step(StepBatch.pack(rows, [[p[i % cached]] for p in prompts],
                                       [cached + i] * batch, blocks))
        one(0)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(steps):
                one(i + 1)
            torch.cuda.synchronize()
    finally:
        runner.cuda_graphs = graphs
    per = {}
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t and e.count:
            per[e.key] = (t / steps, e.count / steps)
    total = sum(t for t, _ in per.values())
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[:20]
    RESULTS[key] = {"gpu_us_per_step": total, "kernels_per_step": sum(c for _, c in per.values()),
                    "top": [{"kernel": k[:120], "us_per_step": t, "calls_per_step": c}
                            for k, (t, c) in top]}
    RESULTS[key].update(batch=batch, cached_tokens=cached)
    RESULTS[key]["split"] = split = profile_split(per, runner, cfg, batch, cached + steps // 2)
    log(f"{key}: linears {split['linear_us']:.0f} us (weights at "
        f"{split['linear_weights_GBps']:.0f} GB/s, {split['linear_TFLOPs']:.1f} TFLOP/s); "
        f"attention {split['attention_us']:.0f} us (KV cache at {split['attention_kv_GBps']:.0f} "
        f"GB/s); other kernels {split['other_us']:.0f} us")
    log(f"{key}: {total:.0f} us of GPU time per eager decode step of {batch} row"
        f"{'s' if batch > 1 else ''} at {cached} cached tokens, "
        f"{RESULTS[key]['kernels_per_step']:.0f} kernels")
    for k, (t, c) in top:
        log(f"  {t:8.1f} us {c:5.0f}x  {k[:100]}")


#: kernel-name fragments of the linears' kernels (irlm's GEMVs, cuBLAS(Lt), CUTLASS,
#: tinygemm, Triton's GEMMs) and of attention's
LINEAR_KERNELS = ("gemv", "gemm", "nvjet", "cutlass", "xmma", "tinygemm", "splitkreduce",
                  "w4a16", "w8a16", "dequant", "quantize", "scale_i32", "_mm_")
ATTENTION_KERNELS = ("paged_attention", "split_reduce", "kv_cache_write", "rope_kv_write")


def profile_split(per: dict, runner, cfg, batch: int, context: int) -> dict:
    """A profiled decode step's GPU time split into the linears, attention and the rest, each
    against what it moves: the linears' weights (every parameter but the embedding table, read
    once a step) and FLOPs (2 x rows x the linears' parameters), attention's KV cache
    (``batch`` rows of ``context`` tokens)."""
    def share(frags):
        return sum(t for k, (t, _) in per.items() if any(f in k.lower() for f in frags))
    lin, att = share(LINEAR_KERNELS), share(ATTENTION_KERNELS)
    total = sum(t for t, _ in per.values())
    h, layers, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size
    kvd = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    params = layers * (h * (h + 2 * kvd) + h * h + 3 * h * cfg.intermediate_size) + v * h
    weights = RESULTS.get("build" + QUANT_SUFFIX, {}).get("weight_bytes", 0) - v * h * 2
    kv = batch * context * layers * 2 * kvd * runner.kv_cache.element_size()
    return {"linear_us": lin, "attention_us": att, "other_us": total - lin - att,
            "linear_weights_GBps": weights / lin / 1e3 if lin else 0.0,
            "linear_TFLOPs": 2 * batch * params / lin / 1e6 if lin else 0.0,
            "attention_kv_GBps": kv / att / 1e3 if att else 0.0}


def section_prefill(runner, cfg, key="prefill", prompt_len=128, reps=5):
    """Where a prefill step's time goes (the TTFT of one prompt): wall time of the step,
    synchronized, against the device's busy time in it (torch profiler), and the host ops and
    device kernels that take most.  Wall much above device time means the host (the eager
    interpreter's per-op work) bounds the prefill, not the kernels."""
    from torch.profiler import ProfilerActivity, profile
    from irlm.runtime.model_runner import StepBatch
    prompt = random_prompts(1, prompt_len, cfg.vocab_size, seed=5)[0]
    blocks = list(range(-(-prompt_len // runner.block_size)))
    batch = StepBatch.pack([0], [prompt], [0], [blocks])
    cuda = torch.cuda.is_available()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed():
        runner.step(batch)                    # warm: kernels compiled, graphs captured
        sync()
        out = []
        for _ in range(reps):
            t0 = time.perf_counter()
            runner.step(batch)
            sync()
            out.append(time.perf_counter() - t0)
        return out
    # the same step run eagerly op by op, as every prompt step ran before the piecewise
    # graphs (irlm/runtime/runners/prefill_graphs.py)
    piecewise, runner.piecewise_prefill = runner.piecewise_prefill, False
    try:
        eager_walls = timed()
    finally:
        runner.piecewise_prefill = piecewise
    walls = timed()
    wall = statistics.median(walls)
    eager_wall = statistics.median(eager_walls)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        runner.step(batch)
        sync()
    dev, host = {}, {}
    busy = 0.0
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
        if t:
            dev[e.key] = (t, e.count)
            # the kernels themselves: an op's self device time repeats its kernels' (aten::mm
            # and its nvjet kernel), so busy time counts device-side events only
            if str(getattr(e, "device_type", "")).endswith("CUDA"):
                busy += t
        if e.self_cpu_time_total:
            host[e.key] = (e.self_cpu_time_total, e.count)
    # the Python side of the same step: which functions the host time is spent in
    import cProfile
    import pstats
    py = cProfile.Profile()
    py.enable()
    runner.step(batch)
    sync()
    py.disable()
    st = pstats.Stats(py).stats
    python = {f"{fn} ({path.rsplit('/', 1)[-1]}:{line})": (tt * 1e6, nc)
              for (path, line, fn), (cc, nc, tt, ct, callers) in st.items()}
    top = lambda d: [{"name": k[:120], "us": t, "calls": c}                  # noqa: E731
                     for k, (t, c) in sorted(d.items(), key=lambda kv: -kv[1][0])[:15]]
    RESULTS[key] = {"prompt_tokens": prompt_len, "wall_ms": wall * 1e3,
                    "wall_ms_all": [w * 1e3 for w in walls], "eager_wall_ms": eager_wall * 1e3,
                    "piecewise_graphs": piecewise is not None, "device_busy_ms": busy / 1e3,
                    "device_kernels": sum(c for _, c in dev.values()),
                    "top_device": top(dev), "top_host_self": top(host),
                    "top_python_self": top(python)}
    how = "piecewise graphs" if piecewise is not None else "eager"
    log(f"{key}: {prompt_len}-token prefill step {wall * 1e3:.1f} ms wall ({how}, median of "
        f"{reps}; op by op: {eager_wall * 1e3:.1f} ms), device busy {busy / 1e3:.1f} ms in "
        f"{RESULTS[key]['device_kernels']} kernels")
    for title, rows in (("device", RESULTS[key]["top_device"]),
                        ("host (self)", RESULTS[key]["top_host_self"]),
                        ("Python (self, under cProfile)", RESULTS[key]["top_python_self"])):
        log(f"  top {title}:")
        for r in rows:
            log(f"    {r['us']:9.1f} us {r['calls']:5d}x  {r['name'][:96]}")


def section_b32(runner, cfg, key="b32"):
    prompts = random_prompts(32, 128, cfg.vocab_size, seed=1)
    run_requests(runner, prompts, 8, 32, 4096)
    total, n, ttft, tpot, steps = run_requests(runner, prompts, 128, 32, 4096)
    RESULTS[key] = {"tokens_per_s": n / total, "seconds": total, "steps": steps,
                      "tpot_ms_p50": pct(tpot, 50) * 1e3}
    log(f"{key}: {n / total:.0f} output tok/s ({n} tokens in {total:.2f}s, {steps} steps), "
        f"TPOT p50 {pct(tpot, 50) * 1e3:.2f} ms")


def section_inflight(runner, cfg, isl, key):
    prompts = random_prompts(512, isl, cfg.vocab_size, seed=2)
    # Engine warm-up, as a server does at start: capture every decode batch bucket's graph.
    t0 = time.perf_counter()
    captured = runner.capture(max_context=isl + 128)
    warm = time.perf_counter() - t0
    run_requests(runner, random_prompts(64, isl, cfg.vocab_size, seed=3), 4, 512, 8192)
    total, n, ttft, tpot, steps = run_requests(runner, prompts, 128, 512, 8192)
    RESULTS[key] = {"output_tokens_per_s": n / total, "seconds": total, "steps": steps,
                    "warmup_capture_s": warm, "graphs_captured": captured,
                    **{f"ttft_ms_p{p}": pct(ttft, p) * 1e3 for p in (50, 90, 99)},
                    **{f"tpot_ms_p{p}": pct(tpot, p) * 1e3 for p in (50, 90, 99)}}
    r = RESULTS[key]
    log(f"{key}: warm-up captured {captured} decode graphs in {warm:.1f}s")
    log(f"{key}: {n / total:.0f} output tok/s ({n} tokens, {total:.1f}s, {steps} steps); TTFT "
        f"p50/p90/p99 {r['ttft_ms_p50']:.0f}/{r['ttft_ms_p90']:.0f}/{r['ttft_ms_p99']:.0f} ms; "
        f"TPOT {r['tpot_ms_p50']:.1f}/{r['tpot_ms_p90']:.1f}/{r['tpot_ms_p99']:.1f} ms")


def section_hf(cfg):
    import transformers
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    ids = torch.tensor(random_prompts(1, 128, cfg.vocab_size), device="cuda")
    model.generate(ids, max_new_tokens=4, do_sample=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    RESULTS["hf_eager_b1"] = {"tokens_per_s": (out.shape[1] - 128) / dt}
    log(f"hf eager b1: {(out.shape[1] - 128) / dt:.1f} tok/s")
    del model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sections", default="copy,build,b1,b32,inflight,hf")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--async-decode", choices=("off", "on", "both"), default="on",
                    help="LLMEngine async_decode (schedule step N+1 before reading step N's "
                         "tokens; on by default for GPU engines); both: run each section "
                         "each way")
    ap.add_argument("--quant", default="bf16",
                    help="comma-separated engine modes, built and measured one after the other: "
                         "bf16 (unquantized), int8, int4, int4-awq, w8a8-sq, fp8, fp8-weight; "
                         "kv-int8 / kv-fp8 (an 8-bit KV cache), alone or joined: fp8+kv-fp8")
    ap.add_argument("--prefill-tokens", default="128",
                    help="prompt lengths of the prefill section, comma-separated (each up to "
                         "the engine's max tokens a step; 512 is the largest piecewise bucket)")
    ap.add_argument("--launch", default="default",
                    help="kernel launch settings the b1 section runs under, one after the "
                         "other on the same engine (graphs captured again for each): default; "
                         "plain (no programmatic dependent launch); pdl-pfN (PDL, the GEMVs "
                         "prefetching N bytes of each weight row into L2; pdl-pf0: none); "
                         "fold-on / fold-off (IRLM_FOLD_SPLITS: split decode attention "
                         "combined in its last CTA, or by the reduce kernel)")
    ap.add_argument("--fuse-rope", default="default",
                    help="comma-separated: default (IRLM_FUSE_ROPE), on, off. The first is "
                         "the engine's setting for every section; each further one loads the "
                         "engine again with it and runs b1 (and b32 when asked) as "
                         "b1_rope-VALUE")
    ap.add_argument("--profile-batch", default="1",
                    help="rows of the decode steps the profile section profiles, "
                         "comma-separated (1: batch 1; 32: the b32 section's steps; 512: the "
                         "in-flight sections' decode steps), each at 256 cached tokens")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    global ASYNC_DECODE
    from irlm.passes.llm.quantize import MODES
    quants = a.quant.split(",")
    for q in quants:
        parts = q.split("+")
        weights = [p for p in parts if p not in KV_MODES]
        if (any(p != "bf16" and p not in MODES for p in weights) or len(weights) > 1
                or len(parts) - len(weights) > 1):
            ap.error(f"--quant: unknown mode {q!r} (valid: bf16, {', '.join(MODES)}, "
                     f"{', '.join(KV_MODES)}, or one weight mode + one KV mode: fp8+kv-fp8)")
    prefill_tokens = int_list(ap, "--prefill-tokens", a.prefill_tokens, MAX_STEP_TOKENS,
                              " (the engine's tokens a step)")
    profile_batches = int_list(ap, "--profile-batch", a.profile_batch, 1024)
    launches = a.launch.split(",")
    bad = [v for v in launches if parse_launch(v) is None]
    if bad:
        ap.error(f"--launch: unknown {', '.join(bad)} (default, plain, pdl-pfN with N a byte "
                 f"count, fold-on, fold-off)")
    fuse_values = a.fuse_rope.split(",")
    bad = [v for v in fuse_values if v not in FUSE_ROPE]
    if bad:
        ap.error(f"--fuse-rope: unknown {', '.join(bad)} (default, on, off)")
    sections = a.sections.split(",")
    known = ("copy", "build", "b1", "profile", "prefill", "b32", "inflight", "inflight2k",
             "hf")
    bad = [x for x in sections if x not in known]
    if bad:
        ap.error(f"--sections: unknown {', '.join(bad)} (known: {', '.join(known)})")
    RESULTS["device"] = torch.cuda.get_device_name()
    RESULTS["torch"] = torch.__version__
    RESULTS["date"] = time.strftime("%Y-%m-%d")
    copy_bw = copy_bandwidth()
    RESULTS["copy_bandwidth_GBps"] = copy_bw / 1e9
    log(f"{RESULTS['device']}: device-to-device copy {copy_bw / 1e9:.0f} GB/s (read+write)")
    modes = {"off": [False], "on": [True], "both": [False, True]}[a.async_decode]
    cfg = llama3_8b_config(a.layers)
    global QUANT_SUFFIX
    for quant in quants:
        q = QUANT_SUFFIX = "" if quant == "bf16" else "_" + quant
        try:
            cfg, graph, runner = build(a.layers, quant=quant,
                                       fuse_rope=FUSE_ROPE[fuse_values[0]])
        except Exception:
            traceback.print_exc()
            RESULTS["build" + q] = {"error": traceback.format_exc(limit=3)}
            continue
        for name, fn in (
                ("b1", lambda sfx: [
                    section_b1_under(runner, cfg, copy_bw, v, sfx, "build" + q)
                    for v in launches]),
                ("b32", lambda sfx: section_b32(runner, cfg, "b32" + sfx)),
                ("profile", lambda sfx: [
                    section_profile(runner, cfg, "profile" + ("" if b == 1 else f"_b{b}") + sfx,
                                    batch=b) for b in profile_batches]),
                ("prefill", lambda sfx: [
                    section_prefill(runner, cfg, "prefill" + ("" if n == 128 else f"{n}") + sfx,
                                    prompt_len=n) for n in prefill_tokens]),
                ("inflight", lambda sfx: section_inflight(runner, cfg, 128,
                                                          "inflight_128_128" + sfx)),
                ("inflight2k", lambda sfx: section_inflight(runner, cfg, 2048,
                                                            "inflight_2048_128" + sfx))):
            if name not in sections:
                continue
            for mode in modes:
                ASYNC_DECODE = mode
                sfx = ("_async" if mode and len(modes) > 1 else "") + q
                try:
                    fn(sfx)
                except Exception:
                    traceback.print_exc()
                    RESULTS[name + sfx] = {"error": traceback.format_exc(limit=3)}
        ASYNC_DECODE = True
        RESULTS["runner_stats" + q] = dict(runner.stats)
        for v in fuse_values[1:]:
            runner = None       # dropped before the reload sizes its KV pool
            runner = reload_runner(graph, FUSE_ROPE[v])
            for name, fn in (("b1", lambda k: section_b1(runner, cfg, copy_bw, k, "build" + q)),
                             ("b32", lambda k: section_b32(runner, cfg, k))):
                if name in sections:
                    try:
                        fn(f"{name}_rope-{v}{q}")
                    except Exception:
                        traceback.print_exc()
                        RESULTS[f"{name}_rope-{v}{q}"] = {"error": traceback.format_exc(limit=3)}
        RESULTS["peak_gpu_memory_GB" + q] = torch.cuda.max_memory_allocated() / 1e9
        del runner, graph
        gc.collect()            # engines and runners reference each other: free the KV pool now
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if "hf" in sections:
        try:
            section_hf(cfg)
        except Exception:
            traceback.print_exc()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(RESULTS, f, indent=2)
    log(json.dumps(RESULTS, indent=1))
    if len(quants) > 1:
        log(summary_table(quants))


def summary_table(quants) -> str:
    """One line per mode: b1 tok/s and decode step, b32 tok/s, 512-in-flight out tok/s."""
    rows = ["mode | b1 tok/s (e2e) | b1 decode step ms | b1 weight GB/s | b32 tok/s | "
            "inflight 128/128 out tok/s"]
    for quant in quants:
        q = "" if quant == "bf16" else "_" + quant
        b1, b32 = RESULTS.get("b1" + q, {}), RESULTS.get("b32" + q, {})
        inf = RESULTS.get("inflight_128_128" + q, {})
        wb = RESULTS.get("build" + q, {}).get("weight_bytes", 0)
        step = b1.get("decode_step_ms")
        rows.append(" | ".join([
            quant, f"{b1.get('tokens_per_s', float('nan')):.1f}",
            f"{step:.2f}" if step else "-", f"{wb / (step / 1e3) / 1e9:.0f}" if step else "-",
            f"{b32.get('tokens_per_s', float('nan')):.0f}",
            f"{inf.get('output_tokens_per_s', float('nan')):.0f}"]))
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
