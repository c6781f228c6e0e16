"""Multi-rank engines over NCCL (needs CUDA; skipped otherwise).

A tiny seeded Llama (fp32) compiled unsplit and split tp 2 / pp 2: the split engines' first-step
logits and greedy tokens (through in-flight batching, decode steps replayed as CUDA graphs
with the NCCL collectives captured in them) equal the unsplit engine's on one GPU.  With two
GPUs, one process per GPU; on one GPU, the tp 2 engine's two processes share it
(``ranks_per_gpu=2``: NCCL over its socket transport, docs/distributed.md).
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 12], [8, 8, 40, 1]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from irlm.cli import main as irlm_main
    from irlm.lowering.engine_format import load_engine, write_parallel_engine
    from irlm.passes.parallel import split_for_pipeline, split_for_tensor_parallel
    root = tmp_path_factory.mktemp("distgpu")
    torch.manual_seed(0)
    # head_dim 64: the smallest head size irlm's CUDA attention kernels take
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=128, max_position_embeddings=256)
    transformers.AutoModelForCausalLM.from_config(cfg).eval().save_pretrained(root / "hf")
    assert irlm_main(["compile", "--hf", str(root / "hf"), "-o", str(root / "base")]) == 0
    engine = load_engine(root / "base")
    out = {"base": root / "base"}
    for name, ranks, tp, pp in (("tp2", split_for_tensor_parallel(engine.graph, 2), 2, 1),
                                ("pp2", split_for_pipeline(engine.graph, 2), 1, 2)):
        out[name] = write_parallel_engine(ranks, root / name, engine.config, tp=tp, pp=pp)
    return out


def run(runner):
    from irlm.runtime import LLM, SamplingParams
    from irlm.runtime.model_runner import StepBatch
    batch = StepBatch.pack([0, 1], PROMPTS[:2], [0, 0], [[0, 1], [2]])
    logits = runner.step(batch).float().cpu()
    llm = LLM(runner, None, max_batch_size=2)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 5, 9)]
    return logits, [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)]


@two_gpus
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_nccl_engine_equals_the_unsplit_engine(engines, layout):
    from irlm.lowering.engine_format import load_engine
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    from irlm.runtime.distributed import DistributedRunner
    want_logits, want = run(CudaGraphRunner(load_engine(engines["base"]).graph, num_blocks=64))
    runner = DistributedRunner(engines[layout], device="cuda", num_blocks=64)
    try:
        got_logits, got = run(runner)
        assert runner.worker.runner.stats["graph_replays"] > 0    # decode steps as CUDA graphs
    finally:
        runner.close()
    scale = float(want_logits.max() - want_logits.min())
    assert (got_logits - want_logits).abs().max().item() <= 1e-4 * scale
    assert got == want and [len(t) for t in got] == [12, 5, 9]


# Rank 0 in a fresh interpreter: the shared-GPU NCCL settings (a host id per rank, the socket
# transport) are process-wide, and NCCL caches them, so they must not leak into this process
# (whose other tests run NCCL one process per GPU).
SHARED_GPU_RANK0 = r"""
import json, sys, torch
from irlm.runtime import LLM, SamplingParams
from irlm.runtime.distributed import DistributedRunner
from irlm.runtime.model_runner import StepBatch
prompts = json.loads(sys.argv[2])
runner = DistributedRunner(sys.argv[1], device="cuda", num_blocks=64, ranks_per_gpu=2,
                           timeout=120)
try:
    devices = [str(runner.worker.device)]
    logits = runner.step(StepBatch.pack([0, 1], prompts[:2], [0, 0], [[0, 1], [2]]))
    logits = logits.float().cpu()
    llm = LLM(runner, None, max_batch_size=2)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (12, 5, 9)]
    tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    replays = runner.worker.runner.stats["graph_replays"]
    workers = [p.pid for p in runner._procs.values()]
finally:
    runner.close()
with open(sys.argv[3], "w") as f:
    json.dump({"logits": logits.tolist(), "tokens": tokens, "replays": replays,
               "device": devices[0], "workers": workers}, f)
"""


def test_two_processes_sharing_one_gpu_over_nccl_equal_the_unsplit_engine(engines, tmp_path):
    from irlm.lowering.engine_format import load_engine
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    mode = subprocess.run(["nvidia-smi", "--query-gpu=compute_mode", "--format=csv,noheader",
                           "-i", "0"], capture_output=True, text=True).stdout.strip()
    if mode.lower().startswith("exclusive"):
        pytest.skip(f"GPU 0's compute mode is {mode}: one process per GPU only")
    want_logits, want = run(CudaGraphRunner(load_engine(engines["base"]).graph, num_blocks=64))
    # one visible GPU: rank 0 and its worker can only both be on it
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES",
                                                                "0").split(",")[0])
    done = subprocess.run([sys.executable, "-c", SHARED_GPU_RANK0, str(engines["tp2"]),
                           json.dumps(PROMPTS), str(tmp_path / "out.json")],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    got = json.loads((tmp_path / "out.json").read_text())
    assert got["device"] == "cuda:0" and len(got["workers"]) == 1
    assert got["replays"] > 0                       # decode steps ran as CUDA graphs
    got_logits = torch.tensor(got["logits"])
    scale = float(want_logits.max() - want_logits.min())
    assert (got_logits - want_logits).abs().max().item() <= 1e-4 * scale
    assert got["tokens"] == want and [len(t) for t in want] == [12, 5, 9]
    for pid in got["workers"]:                      # the worker is gone
        try:
            with open(f"/proc/{pid}/stat") as f:
                assert f.read().split(") ")[1][0] == "Z", f"worker {pid} left running"
        except FileNotFoundError:
            pass
