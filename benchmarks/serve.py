"""Load generator for `irlm serve` (like vLLM's benchmark_serving): throughput, TTFT, TPOT,
ITL and end-to-end latency percentiles over a server on loopback.

Against a running server:

    python benchmarks/serve.py --url http://127.0.0.1:8000 --model NAME \
        --num-prompts 512 --max-concurrency 512 --input-len 128 --output-len 128 [--tokens]
    python benchmarks/serve.py ... --request-rate 1 --num-prompts 30      # Poisson arrivals
    python benchmarks/serve.py ... --dataset prompts.txt                  # one prompt a line
    python benchmarks/serve.py ... --protocol grpc --grpc 127.0.0.1:8001  # Triton clients' path

Protocols: ``openai`` (streaming /v1/completions, default), ``kserve`` (generate_stream),
``grpc`` (ModelStreamInfer on the tensorrt_llm tensors; token ids).  Random prompts are token
ids (``--tokens``; needed for engines without a tokenizer) or random words.  Every request
ignores EOS so that it produces exactly ``--output-len`` tokens.

GPU acceptance (Llama-3-8B shape, random bf16 weights, on the device), one command:

    python benchmarks/serve.py --gpu-acceptance [--layers 32] [--json OUT.json]

runs ``benchmarks/gpu_decode.py --sections build,b1,inflight`` (offline figures) in a child
process, then serves the same engine (``--factory benchmarks/serve.py:llama3_8b_llm``) and
measures 512 concurrent streams of 128/128 and TTFT at 1 request/s, and prints served
throughput as a fraction of offline in-flight throughput and TTFT p50 minus offline b1 TTFT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
NO_TOKEN = 2**31 - 1      # end_id of the KServe requests: no token has it, so EOS is ignored


@dataclass
class Result:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""
    start: float = 0.0         # when the request was sent
    last: float = 0.0          # when the previous chunk arrived

    def begin(self) -> None:
        self.start = self.last = time.perf_counter()

    def chunk(self) -> None:
        """A streamed chunk arrived: the first sets TTFT, the others add an inter-token gap."""
        now = time.perf_counter()
        if self.ttft == 0.0:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now

    def done(self) -> None:
        self.e2e = time.perf_counter() - self.start
        self.ok = True


# ----- one request per protocol -----------------------------------------------------------------
def _events(line: bytes):
    """The JSON of one server-sent-event ``data:`` line, None for anything else."""
    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
        return None
    return json.loads(line[6:])


async def openai_request(http, args, prompt, res: Result) -> None:
    body = {"model": args.model, "prompt": prompt, "max_tokens": args.output_len,
            "temperature": 0.0, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    res.begin()
    async with http.post(args.url + "/v1/completions", json=body, headers=headers) as r:
        if r.status != 200:
            res.error = f"HTTP {r.status}: {(await r.read())[:200]!r}"
            return
        async for line in r.content:
            msg = _events(line)
            if msg is None:
                continue
            if msg.get("usage"):
                res.output_len = msg["usage"]["completion_tokens"]
                res.prompt_len = msg["usage"]["prompt_tokens"]
            if not msg.get("choices"):
                continue
            res.chunk()
    res.done()


async def kserve_request(http, args, prompt, res: Result) -> None:
    body = {"text_input": prompt, "max_tokens": args.output_len, "temperature": 0.0,
            "stream": True, "end_id": NO_TOKEN}
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    res.begin()
    async with http.post(f"{args.url}/v2/models/ensemble/generate_stream", json=body,
                         headers=headers) as r:
        if r.status != 200:
            res.error = f"HTTP {r.status}"
            return
        async for line in r.content:
            msg = _events(line)
            if msg is None:
                continue
            if "error" in msg:
                res.error = msg["error"]
                return
            res.chunk()
            res.output_len += int(msg.get("sequence_length", 1))
    res.done()


async def grpc_request(client, args, ids, res: Result) -> None:
    import numpy as np
    import tritonclient.grpc as g

    def inp(name, arr):
        i = g.InferInput(name, list(arr.shape), g.np_to_triton_dtype(arr.dtype))
        i.set_data_from_numpy(arr)
        return i
    inputs = [inp("input_ids", np.array([ids], np.int32)),
              inp("input_lengths", np.array([[len(ids)]], np.int32)),
              inp("request_output_len", np.array([[args.output_len]], np.int32)),
              # an end id no token has: the request ignores EOS (exactly output_len tokens)
              inp("end_id", np.array([[NO_TOKEN]], np.int32)),
              inp("streaming", np.array([[True]], bool))]

    async def requests():
        yield {"model_name": "tensorrt_llm", "inputs": inputs}
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else None
    res.begin()
    async for result, error in client.stream_infer(requests(), headers=headers):
        if error is not None:
            res.error = str(error)
            return
        res.chunk()
        res.output_len += int(result.as_numpy("sequence_length").reshape(-1)[0])
        if result.get_response().parameters["triton_final_response"].bool_param:
            break
    res.prompt_len = len(ids)
    res.done()


# ----- the load -----------------------------------------------------------------------------------
def make_prompts(args) -> list:
    rng = random.Random(args.seed)
    if args.dataset:
        lines = [ln.strip() for ln in Path(args.dataset).read_text().splitlines() if ln.strip()]
        return [lines[i % len(lines)] for i in range(args.num_prompts)]
    if args.tokens or args.protocol == "grpc":
        return [[rng.randrange(100, args.vocab) for _ in range(args.input_len)]
                for _ in range(args.num_prompts)]
    words = "the of and to in is was that for on with as by at from his her it".split()
    return [" ".join(rng.choice(words) for _ in range(args.input_len))
            for _ in range(args.num_prompts)]


async def run_load(args) -> dict:
    results, t0, t1 = await load_results(args)
    return summarize(results, t1 - t0)


async def load_results(args, share: tuple[int, int] = (0, 1)):
    """Run this process's share (every ``share[1]``-th prompt from ``share[0]``) of the load;
    returns its Results and the wall-clock (time.time) start and end."""
    # aiohttp (a C HTTP parser, a pool that scales to hundreds of connections): with httpx
    # the load generator itself was the bottleneck at 512 streams
    import aiohttp
    prompts = make_prompts(args)[share[0]::share[1]]
    results = [Result() for _ in prompts]
    limit = -(-(args.max_concurrency or len(prompts) * share[1]) // share[1])
    sem = asyncio.Semaphore(limit)
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600.0),
                                 connector=aiohttp.TCPConnector(limit=limit))
    grpc = None
    if args.protocol == "grpc":
        import tritonclient.grpc.aio as ga
        grpc = ga.InferenceServerClient(args.grpc)
    rng = random.Random(args.seed + 1 + share[0])
    rate = args.request_rate / share[1]

    async def one(i):
        async with sem:
            try:
                if args.protocol == "openai":
                    await openai_request(http, args, prompts[i], results[i])
                elif args.protocol == "kserve":
                    await kserve_request(http, args, prompts[i], results[i])
                else:
                    await grpc_request(grpc, args, prompts[i], results[i])
            except Exception as e:        # counted, reported; the run goes on
                results[i].error = f"{type(e).__name__}: {e}"

    t0 = time.time()
    tasks = []
    for i in range(len(prompts)):
        tasks.append(asyncio.ensure_future(one(i)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    await asyncio.gather(*tasks)
    t1 = time.time()
    await http.close()
    if grpc is not None:
        await grpc.close()
    return results, t0, t1


def _load_share(job):
    args, share = job
    return asyncio.run(load_results(args, share))


def load_in_procs(args) -> dict:
    """The load, split over ``args.client_procs`` processes (one Python client process tops
    out below what the server carries); summarized over all of them."""
    procs = max(1, getattr(args, "client_procs", 1) or 1)
    if procs == 1:
        return asyncio.run(run_load(args))
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(procs) as pool:
        parts = pool.map(_load_share, [(args, (k, procs)) for k in range(procs)])
    results = [r for rs, _, _ in parts for r in rs]
    return summarize(results, max(p[2] for p in parts) - min(p[1] for p in parts))


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def summarize(results: list[Result], duration: float) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_len for r in ok)
    in_tokens = sum(r.prompt_len for r in ok)
    ttft = [r.ttft for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1]
    itl = [x for r in ok for x in r.itl]
    e2e = [r.e2e for r in ok]
    s = {"completed": len(ok), "failed": len(results) - len(ok), "duration_s": duration,
         "request_throughput": len(ok) / duration, "output_tokens_per_s": out_tokens / duration,
         "total_tokens_per_s": (in_tokens + out_tokens) / duration,
         "output_tokens": out_tokens}
    for name, xs in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        s[f"{name}_ms_mean"] = statistics.fmean(xs) * 1e3 if xs else float("nan")
        for p in (50, 90, 99):
            s[f"{name}_ms_p{p}"] = pct(xs, p) * 1e3
    errors = [r.error for r in results if not r.ok]
    if errors:
        s["first_error"] = errors[0]
    return s


def report(title: str, s: dict) -> None:
    print(f"== {title}: {s['completed']} ok, {s['failed']} failed in {s['duration_s']:.1f} s; "
          f"{s['request_throughput']:.2f} req/s, {s['output_tokens_per_s']:.0f} output tok/s, "
          f"{s['total_tokens_per_s']:.0f} total tok/s", flush=True)
    for name in ("ttft", "tpot", "itl", "e2e"):
        print(f"   {name.upper():4s} ms  mean {s[f'{name}_ms_mean']:8.2f}  p50 "
              f"{s[f'{name}_ms_p50']:8.2f}  p90 {s[f'{name}_ms_p90']:8.2f}  p99 "
              f"{s[f'{name}_ms_p99']:8.2f}", flush=True)
    if "first_error" in s:
        print(f"   first error: {s['first_error']}", flush=True)


# ----- GPU acceptance: the 8B-shape engine, offline vs served ----------------------------------
def llama3_8b_llm(**kwargs):
    """Factory for ``irlm serve --factory benchmarks/serve.py:llama3_8b_llm``: the random-weight
    Llama-3-8B-shape engine that benchmarks/gpu_decode.py builds, warmed up (decode graphs
    captured) as gpu_decode's in-flight section does, with its scheduler settings."""
    import importlib.util
    from irlm.runtime import LLM
    spec = importlib.util.spec_from_file_location("gpu_decode", HERE / "gpu_decode.py")
    gd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gd)
    layers = int(os.environ.get("IRLM_BENCH_LAYERS", "32"))
    _cfg, _graph, runner = gd.build(layers)
    runner.capture(max_context=int(os.environ.get("IRLM_BENCH_CONTEXT", "256")))
    kwargs.setdefault("max_num_tokens", 8192)
    kwargs.setdefault("max_batch_size", 512)
    kwargs.setdefault("max_waiting", 4096)
    kwargs.setdefault("enable_prefix_caching", False)
    return LLM(runner, None, **kwargs)


def gpu_acceptance(args) -> int:
    from irlm.serving.testing import ServerProcess
    results: dict = {}
    off_json = Path(args.json or "serve_acceptance.json").with_suffix(".offline.json")
    print("== offline: benchmarks/gpu_decode.py --sections build,b1,inflight", flush=True)
    subprocess.run([sys.executable, str(HERE / "gpu_decode.py"), "--sections",
                    "build,b1,inflight", "--layers", str(args.layers), "--json", str(off_json)],
                   check=True)
    offline = json.loads(off_json.read_text())
    results["offline"] = offline
    env = {"IRLM_BENCH_LAYERS": str(args.layers)}
    serve_args = ["--factory", f"{HERE / 'serve.py'}:llama3_8b_llm", "--served-model-name",
                  "llama3-8b-random", "--max-queue", "4096", "--log-level", "warning"]
    with ServerProcess(serve_args, timeout=1800, env=env) as srv:
        base = dict(url=srv.url, grpc=srv.grpc_addr, model="llama3-8b-random", api_key=None,
                    tokens=True, vocab=128256, dataset=None, protocol=args.protocol, seed=0,
                    input_len=128, output_len=128, client_procs=args.client_procs)
        warm = argparse.Namespace(**base, num_prompts=64, max_concurrency=64,
                                  request_rate=float("inf"))
        load_in_procs(warm)
        load = argparse.Namespace(**base, num_prompts=512, max_concurrency=512,
                                  request_rate=float("inf"))
        results["served_512"] = s = load_in_procs(load)
        report(f"served ({args.protocol}), 512 concurrent streams, 128/128", s)
        rate = argparse.Namespace(**{**base, "seed": 1}, num_prompts=args.rate_prompts,
                                  max_concurrency=None, request_rate=1.0)
        results["served_1rps"] = r = asyncio.run(run_load(rate))
        report(f"served ({args.protocol}), 1 request/s, 128/128", r)
    inflight = offline.get("inflight_128_128", {})
    b1 = offline.get("b1", {})
    if "output_tokens_per_s" in inflight:
        frac = s["output_tokens_per_s"] / inflight["output_tokens_per_s"]
        results["served_over_offline_throughput"] = frac
        print(f"== served / offline in-flight throughput: {s['output_tokens_per_s']:.0f} / "
              f"{inflight['output_tokens_per_s']:.0f} = {100 * frac:.1f}% (target >= 90%)")
    if "ttft_ms" in b1:
        delta = r["ttft_ms_p50"] - b1["ttft_ms"]
        results["ttft_p50_minus_offline_b1_ms"] = delta
        print(f"== TTFT p50 at 1 req/s {r['ttft_ms_p50']:.1f} ms vs offline batch-1 "
              f"{b1['ttft_ms']:.1f} ms: {delta:+.1f} ms (target within 10 ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def proxy(args) -> int:
    """Serve the proxy engine (irlm.serving.proxy: no model, a token per request per step,
    ``--proxy-step-ms`` per step) and measure what the server and this load generator carry."""
    from irlm.serving.testing import ServerProcess
    env = {"IRLM_PROXY_STEP_MS": str(args.proxy_step_ms),
           "IRLM_PROXY_TOKENIZER": args.proxy_tokenizer}
    n = args.max_concurrency or 512
    serve_args = ["--factory", "irlm.serving.proxy:proxy_llm", "--served-model-name", "proxy",
                  "--max-batch-size", str(n), "--max-queue", "4096", "--log-level", "warning"]
    results: dict = {"step_ms": args.proxy_step_ms, "concurrency": n,
                     "tokenizer": args.proxy_tokenizer}
    if args.proxy_step_ms > 0:     # what the engine alone would give: n streams per step
        results["offered_tokens_per_s"] = n * 1e3 / args.proxy_step_ms
    with ServerProcess(serve_args, env=env) as srv:
        base = dict(url=srv.url, grpc=srv.grpc_addr, model="proxy", api_key=None,
                    tokens=args.proxy_tokenizer == "none", vocab=args.vocab, dataset=None,
                    protocol=args.protocol, seed=0, input_len=args.input_len,
                    output_len=args.output_len, client_procs=args.client_procs)
        load_in_procs(argparse.Namespace(**base, num_prompts=min(64, n), max_concurrency=n,
                                         request_rate=float("inf")))
        cpu0 = _cpu_seconds(srv.proc.pid)
        s = load_in_procs(argparse.Namespace(**base, num_prompts=args.num_prompts or n,
                                             max_concurrency=n, request_rate=float("inf")))
        cpu1 = _cpu_seconds(srv.proc.pid)
    results["served"] = s
    # CPU seconds the server (front end) and the engine core spent per streamed token: on a
    # machine with cores to spare, 1 / that is what one front-end core carries
    for name in cpu0:
        us = (cpu1[name] - cpu0[name]) / max(1, s["output_tokens"]) * 1e6
        results[f"{name}_cpu_us_per_token"] = us
        print(f"== {name} process: {us:.1f} CPU us per streamed token "
              f"(one core carries {1e6 / us if us else float('inf'):.0f} tok/s)")
    report(f"proxy ({args.protocol}, step {args.proxy_step_ms} ms, {n} streams, "
           f"{args.input_len}/{args.output_len}, {args.client_procs} client procs)", s)
    if "offered_tokens_per_s" in results:
        print(f"== served / offered: {s['output_tokens_per_s']:.0f} / "
              f"{results['offered_tokens_per_s']:.0f} = "
              f"{100 * s['output_tokens_per_s'] / results['offered_tokens_per_s']:.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0 if s["failed"] == 0 else 1


def _cpu_seconds(pid: int) -> dict:
    """User + system CPU seconds of the server process (all its threads) and of its children
    (the engine core)."""
    import psutil
    p = psutil.Process(pid)
    t = p.cpu_times()
    kids = [c.cpu_times() for c in p.children(recursive=True)]
    return {"server": t.user + t.system,
            "engine_core": sum(k.user + k.system for k in kids)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--grpc", default="127.0.0.1:8001", help="gRPC address (--protocol grpc)")
    ap.add_argument("--model", default="model")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--protocol", choices=("openai", "kserve", "grpc"), default="openai")
    ap.add_argument("--num-prompts", type=int, default=200)
    ap.add_argument("--request-rate", type=float, default=float("inf"),
                    help="Poisson arrivals per second (default: all at once)")
    ap.add_argument("--max-concurrency", type=int, default=None)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--dataset", default=None, help="text file, one prompt per line")
    ap.add_argument("--tokens", action="store_true", help="random token-id prompts")
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary for --tokens")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--gpu-acceptance", action="store_true")
    ap.add_argument("--layers", type=int, default=32, help="--gpu-acceptance: model layers")
    ap.add_argument("--rate-prompts", type=int, default=30,
                    help="--gpu-acceptance: requests in the 1 request/s run")
    ap.add_argument("--proxy", action="store_true",
                    help="serve the proxy engine (no model) and measure the serving path")
    ap.add_argument("--proxy-step-ms", type=float, default=0.0,
                    help="--proxy: milliseconds per engine step (0: as fast as it goes)")
    ap.add_argument("--proxy-tokenizer", choices=("none", "tiny"), default="none",
                    help="--proxy: token ids only, or the byte-level test tokenizer")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="load generator processes sharing the requests")
    args = ap.parse_args(argv)
    if args.proxy:
        if args.num_prompts == 200:
            args.num_prompts = None
        return proxy(args)
    if args.gpu_acceptance:
        return gpu_acceptance(args)
    s = load_in_procs(args)
    report(f"{args.protocol} {args.input_len}/{args.output_len}", s)
    if args.json:
        Path(args.json).write_text(json.dumps(s, indent=2))
    return 0 if s["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
