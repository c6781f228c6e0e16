"""The runtime on CUDA tensors: sampling stays on the device and agrees with the CPU; the
whole loop runs a CUDA model; the KV pool is sized from free GPU memory."""
import random

import pytest
import torch

from irlm.runtime import LLM, ReferenceRunner, SamplingParams
from irlm.runtime.kv_cache import kv_block_bytes, num_blocks_for_free_memory
from irlm.runtime.sampling import SampleRow, process_logits, sample
from irlm_test_helpers import hf_generate

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def rows(n):
    kinds = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, top_k=10, seed=3),
             SamplingParams(top_p=0.9, min_p=0.05, seed=4, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.2)]
    return [SampleRow(kinds[i % 3], [1, 2, 3], [4, 4, i]) for i in range(n)]


def test_logits_processing_on_cuda_equals_cpu():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0)) * 3
    r = rows(6)
    cpu = process_logits(logits, r)
    gpu = process_logits(logits.cuda(), r)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-5, atol=1e-5)


def test_sampling_on_cuda_is_greedy_where_asked_and_seeded_rows_repeat():
    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(1)).cuda() * 3

    def run():
        r = rows(6)
        for row in r:
            if row.params.seed is not None:
                row.generator = torch.Generator(device="cuda").manual_seed(row.params.seed)
        return sample(logits, r).token_ids
    first, second = run(), run()
    assert first == second
    assert first[0] == int(logits[0].argmax()) and first[3] == int(logits[3].argmax())


def test_the_loop_runs_a_cuda_model_and_matches_hf_greedy():
    from irlm.runtime.testing import tiny_llama, tiny_tokenizer
    tok = tiny_tokenizer()
    model = tiny_llama(len(tok)).cuda()
    rng = random.Random(0)
    prompts = [[rng.randrange(2, len(tok)) for _ in range(3 + 5 * i)] for i in range(6)]
    llm = LLM(ReferenceRunner(model, block_size=4, num_blocks=128), tok, max_num_tokens=16,
              policy="max-utilization")
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=10))
    for p, o in zip(prompts, outs):
        hf = hf_generate(model, torch.tensor([p], device="cuda"), do_sample=False,
                         max_new_tokens=10, pad_token_id=1)
        assert o.outputs[0].token_ids == hf[0, len(p):].tolist()
    seeded = SamplingParams(temperature=0.8, seed=9, max_tokens=8, n=2)
    a = llm.generate(prompts[:1], seeded)[0]
    b = llm.generate(prompts[:1], seeded)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_pool_sized_from_free_gpu_memory():
    per_block = kv_block_bytes(30, 16, 3, 64, torch.float16)
    n = num_blocks_for_free_memory(per_block, fraction=0.5)
    free, _ = torch.cuda.mem_get_info()
    assert n == int(free * 0.5) // per_block and n > 0


def test_async_decode_on_the_cuda_executor_gives_the_synchronous_outputs():
    """Overlapped steps on the GPU (in-flight tokens filled on the device, copied to pinned
    memory behind an event) produce exactly the synchronous engine's tokens."""
    from irlm.compilation import compile_causal_lm
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    from irlm.runtime.testing import tiny_llama, tiny_tokenizer
    tok = tiny_tokenizer()
    # head_dim 64: the attention kernels' smallest
    model = tiny_llama(len(tok), hidden=256, heads=4, kv_heads=2).to(torch.bfloat16)
    graph = compile_causal_lm(model, level="2", max_seq=256, tokens_per_block=16)
    rng = random.Random(1)
    prompts = [[rng.randrange(2, len(tok)) for _ in range(rng.randrange(3, 40))]
               for _ in range(10)]
    # Length limits only: a request that ends on a token read late keeps a (wasted) row in
    # the next step, which changes that step's batch shape and so bf16 rounding elsewhere;
    # the CPU tests (tests/test_runtime_async.py) cover stops exactly in f32.
    params = [SamplingParams(temperature=0, max_tokens=6 + i % 5, ignore_eos=True) if i % 2
              else SamplingParams(temperature=0.8, top_k=20, seed=i, max_tokens=7,
                                  ignore_eos=True) for i in range(10)]

    def run(async_decode):
        runner = CudaGraphRunner(graph, num_blocks=128, max_model_len=256)
        llm = LLM(runner, tok, max_num_tokens=64, max_batch_size=4, async_decode=async_decode)
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert run(True) == run(False)


def test_an_f32_engine_on_the_gpu_says_to_compile_it_for_the_gpu(tmp_path):
    """An engine compiled without --device cuda computes in f32: running it on the GPU works,
    with one warning that names the engine and the flag."""
    import warnings

    import irlm
    from irlm.compilation import CompileConfig
    from irlm.lowering.engine_format import load_engine
    from irlm.runtime.runners.interpreter import runner_for_engine
    from irlm.runtime.testing import tiny_llama
    model = tiny_llama(300, hidden=256, heads=4, kv_heads=2)     # head_dim 64
    engine = irlm.compile(model, CompileConfig(output=tmp_path / "e", max_seq=32))
    with pytest.warns(RuntimeWarning, match=r"computes in f32.*bf16 for the GPU \(--device cuda"):
        runner_for_engine(load_engine(engine.path), device="cuda", num_blocks=8)
    bf16 = irlm.compile(model.to(torch.bfloat16),
                        CompileConfig(output=tmp_path / "b", max_seq=32, device="cuda"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        runner_for_engine(load_engine(bf16.path), device="cuda", num_blocks=8)
