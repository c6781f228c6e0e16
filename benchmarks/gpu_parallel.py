"""Multi-GPU decode benchmark: a tp / pp engine of the Llama-3-8B shape (random bf16 weights)
run as one process per GPU over NCCL (irlm.runtime.distributed).  Run on the device machine:

    python benchmarks/gpu_parallel.py --tp 2 [--pp 1] [--layers 8]
                                      [--sections b1,inflight,allreduce] [--json OUT.json]

Sections:
  b1         batch 1, 128 prompt / 128 new tokens: tokens/s and the decode step time
  inflight   512 requests at once, 128 / 128: output tokens/s, TTFT and TPOT p50/p90
  allreduce  NCCL all-reduce of one decode step's partial sums ([batch, hidden] bf16, 2 per
             layer + the embedding's), captured in a CUDA graph like the decode step:
             microseconds per call and per decode step, at batch 1 and 512
  single     the unsplit engine on one GPU, b1 and inflight, for comparison (--single)

The engine is written to a temporary directory (random weights, --layers of the 8B widths;
8 layers keep the write short; --layers 32 is the full model).  NCCL_NVLS_ENABLE=0 is set by
irlm (see docs/distributed.md).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_decode import llama3_8b_config, pct, random_prompts, run_requests  # noqa: E402

RESULTS: dict = {}


def log(*a):
    print(*a, flush=True)


def write_engine(cfg, tp: int, pp: int, out: Path) -> Path:
    """Trace on meta, compile -O2, fill random bf16 weights, split, write the engine."""
    import transformers
    from irlm.compilation import compile_causal_lm
    from irlm.lowering.engine_format import write_engine as write_one, write_parallel_engine
    from irlm.passes.parallel import split_for_pipeline, split_for_tensor_parallel
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg).to(torch.bfloat16)
    graph = compile_causal_lm(model, max_batch=8, max_seq=8192, max_num_tokens=8192)
    store = graph.weights
    rot = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(cfg)
    gen = torch.Generator(device="cuda").manual_seed(0)
    for name in list(store.names()):
        e = store.entry(name)
        if e.source != "meta":
            continue
        t = e.type
        if "inv_freq" in name:
            store.add_tensor(name, rot.inv_freq.to(t.dtype.torch))
        elif "norm" in name:
            store.add_tensor(name, torch.ones(t.shape, dtype=t.dtype.torch))
        else:
            store.add_tensor(name, (torch.randn(t.shape, dtype=t.dtype.torch, device="cuda",
                                                generator=gen) * 0.02).cpu())
    config = {"max_model_len": 8192, "eos_token_id": None}
    if tp == 1 and pp == 1:
        write_one(graph, out, config)
    else:
        stages = split_for_pipeline(graph, pp) if pp > 1 else [graph]
        ranks = [g for s in stages for g in (split_for_tensor_parallel(s, tp) if tp > 1 else [s])]
        write_parallel_engine(ranks, out, config, tp=tp, pp=pp)
    log(f"engine tp {tp} x pp {pp}: written in {time.perf_counter() - t0:.1f}s to {out}")
    return out


def section_b1(runner, cfg, key):
    prompts = random_prompts(1, 128, cfg.vocab_size)
    run_requests(runner, prompts, 16, 1)                         # warm-up and capture
    total, n, ttft, tpot, _ = run_requests(runner, prompts, 128, 1)
    RESULTS[key] = {"tokens_per_s": n / total, "decode_tokens_per_s": 1 / tpot[0],
                    "decode_step_ms": tpot[0] * 1e3, "ttft_ms": ttft[0] * 1e3}
    log(f"{key}: {n / total:.1f} tok/s end to end, decode step {tpot[0] * 1e3:.2f} ms "
        f"({1 / tpot[0]:.1f} tok/s), TTFT {ttft[0] * 1e3:.1f} ms")


def section_inflight(runner, cfg, key):
    prompts = random_prompts(512, 128, cfg.vocab_size, seed=2)
    run_requests(runner, prompts, 8, 512)          # warm-up: captures the decode buckets
    total, n, ttft, tpot, steps = run_requests(runner, prompts, 128, 512)
    RESULTS[key] = {"output_tokens_per_s": n / total, "seconds": total, "steps": steps,
                    **{f"ttft_ms_p{p}": pct(ttft, p) * 1e3 for p in (50, 90)},
                    **{f"tpot_ms_p{p}": pct(tpot, p) * 1e3 for p in (50, 90)}}
    r = RESULTS[key]
    log(f"{key}: {n / total:.0f} output tok/s ({n} tokens, {total:.1f}s, {steps} steps); "
        f"TTFT p50/p90 {r['ttft_ms_p50']:.0f}/{r['ttft_ms_p90']:.0f} ms; TPOT p50/p90 "
        f"{r['tpot_ms_p50']:.1f}/{r['tpot_ms_p90']:.1f} ms")


def _allreduce_rank(rank: int, world: int, port: int, hidden: int, calls: int, q) -> None:
    import torch.distributed as dist
    from irlm.runtime.distributed import configure_nccl_env
    from kernel_launches import events_time
    configure_nccl_env()
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, device_id=torch.device("cuda", rank))
    out = {}
    for batch in (1, 512):
        x = torch.randn(batch, hidden, dtype=torch.bfloat16, device="cuda")
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                dist.all_reduce(x)
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                dist.all_reduce(x)
        step = events_time(g.replay, 20) * 1e3      # microseconds, after 3 warm-up replays
        out[batch] = {"us_per_step": step, "us_per_call": step / calls, "calls_per_step": calls}
    if rank == 0:
        q.put(out)
    dist.barrier()
    dist.destroy_process_group()


def section_allreduce(cfg, tp: int):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    calls = 2 * cfg.num_hidden_layers + 1
    procs = [ctx.Process(target=_allreduce_rank,
                         args=(r, tp, port, cfg.hidden_size, calls, q)) for r in range(tp)]
    for p in procs:
        p.start()
    out = q.get(timeout=300)
    for p in procs:
        p.join(60)
    RESULTS["allreduce"] = {str(k): v for k, v in out.items()}
    for b, v in out.items():
        log(f"allreduce tp {tp}, batch {b}: {v['us_per_call']:.1f} us per call, "
            f"{v['us_per_step']:.0f} us per decode step ({calls} calls: 2 per layer + "
            f"the embedding's)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--sections", default="b1,inflight,allreduce")
    ap.add_argument("--single", action="store_true", help="also run the unsplit engine")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if torch.cuda.device_count() < args.tp * args.pp:
        log(f"needs {args.tp * args.pp} GPUs, found {torch.cuda.device_count()}")
        return 2
    cfg = llama3_8b_config(args.layers)
    sections = args.sections.split(",")
    failed = False
    with tempfile.TemporaryDirectory(prefix="irlm-par-") as tmp:
        layouts = [(args.tp, args.pp)] + ([(1, 1)] if args.single else [])
        for tp, pp in layouts:
            tag = f"tp{tp}pp{pp}"
            try:
                path = write_engine(cfg, tp, pp, Path(tmp) / tag)
                torch.cuda.empty_cache()      # the KV pools are sized from free memory
                if tp * pp > 1:
                    from irlm.runtime.distributed import DistributedRunner
                    t0 = time.perf_counter()
                    runner = DistributedRunner(path, device="cuda")
                    log(f"{tag}: {tp * pp} ranks up in {time.perf_counter() - t0:.1f}s, "
                        f"{runner.num_blocks} KV blocks")
                else:
                    from irlm.lowering.engine_format import load_engine
                    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
                    runner = CudaGraphRunner(load_engine(path).graph)
                try:
                    if "b1" in sections:
                        section_b1(runner, cfg, f"{tag}_b1")
                    if "inflight" in sections:
                        section_inflight(runner, cfg, f"{tag}_inflight")
                finally:
                    if hasattr(runner, "close"):
                        runner.close()
                    del runner
                    torch.cuda.empty_cache()
            except Exception:                                  # noqa: BLE001
                traceback.print_exc()
                failed = True
        if "allreduce" in sections and args.tp > 1:
            try:
                section_allreduce(cfg, args.tp)
            except Exception:                                  # noqa: BLE001
                traceback.print_exc()
                failed = True
    if args.json:
        Path(args.json).write_text(json.dumps(RESULTS, indent=2))
    log(json.dumps(RESULTS, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
