"""Multi-rank engines over NCCL, one process per GPU (needs >= 2 GPUs; skipped otherwise).

A tiny seeded Llama (fp32) compiled unsplit and split tp 2 / pp 2: the split engines' first-step
logits and greedy tokens (through in-flight batching, decode steps replayed as CUDA graphs
with the NCCL collectives captured in them) equal the unsplit engine's on one GPU.
"""
import pytest
import torch
import transformers

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                                 reason="needs 2 CUDA GPUs")]

PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 12], [8, 8, 40, 1]]


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    from irlm.cli import main as irlm_main
    from irlm.lowering.engine_format import load_engine, write_parallel_engine
    from irlm.passes.parallel import split_for_pipeline, split_for_tensor_parallel
    root = tmp_path_factory.mktemp("distgpu")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
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
