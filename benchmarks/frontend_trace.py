"""Benchmark: trace a Llama-3-8B-shaped model on the meta device (no weights in memory).

    python benchmarks/frontend_trace.py [--layers 32] [--attn sdpa] [--stamp-layers]

Builds LlamaConfig(hidden 4096, 32 layers, 32 heads / 8 KV heads, intermediate 14336,
vocab 128256) under ``torch.device("meta")``, traces it with symbolic batch and seq, verifies
the graph and prints it to text.  Reports seconds per stage and the peak RSS of the process
(the budget: well under 60 s and 3 GiB).  ``--stamp-layers`` traces 3 layers and stamps the
rest, as ``irlm compile`` does by default (irlm.frontends.stamping; the same graph).
"""
from __future__ import annotations

import argparse
import resource
import sys
import time


def cpu_seconds() -> float:
    """User + system CPU time of this process: unlike wall time, not inflated when other
    work shares the machine."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def peak_rss_gib() -> float:
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 2 ** 20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--attn", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--stamp-layers", action="store_true",
                   help="trace 3 layers and stamp the others (irlm compile's default)")
    args = p.parse_args(argv)

    t0 = time.perf_counter()
    import torch
    import transformers

    from irlm.frontends import trace
    from irlm.frontends.stamping import trace_stamped
    from irlm.verifier import verify
    t_import = time.perf_counter() - t0

    config = transformers.LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        max_position_embeddings=8192)
    config._attn_implementation = args.attn
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config).eval()
    t_build = time.perf_counter() - t0

    ids = torch.zeros(2, 8, dtype=torch.int64)
    mask = torch.ones(2, 8, dtype=torch.int64)
    t0, c0 = time.perf_counter(), cpu_seconds()
    how = "every layer traced"
    if args.stamp_layers:
        graph, how = trace_stamped(model, {"input_ids": ids, "attention_mask": mask})
    else:
        graph = trace(model, {"input_ids": ids, "attention_mask": mask})
    t_trace, c_trace = time.perf_counter() - t0, cpu_seconds() - c0

    t0 = time.perf_counter()
    verify(graph)
    t_verify = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = str(graph)
    t_print = time.perf_counter() - t0

    n_params = sum(1 for _ in graph.params())
    print(f"Llama-3-8B shape, {args.layers} layers, {args.attn}, meta device: "
          f"{len(graph)} ops, {n_params} params, {len(text.splitlines())} lines of IR")
    print(f"  import   {t_import:6.2f} s")
    print(f"  build    {t_build:6.2f} s   (model on meta)")
    print(f"  trace    {t_trace:6.2f} s   (torch.export + conversion; {c_trace:.2f} s of CPU; "
          f"{how})")
    print(f"  verify   {t_verify:6.2f} s")
    print(f"  print    {t_print:6.2f} s")
    print(f"  peak RSS {peak_rss_gib():6.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
