"""Each quantized mode of a Llama on the GPU agrees with the unquantized engine.

Agreement as docs/quantization.md defines it for the seeded test models: the relative L2
error of the logits over every row of every step, and the fraction of rows whose argmax
(greedy token) is the same, quantized engine against the same model unquantized, both run
by the CUDA runner (prefills eager, decode steps as CUDA graph replays) on the same token
sequences.  The engines are what ``irlm compile --quant MODE [--quant-group N]`` builds
(``quantize{...,fuse=false},fuse-quant,dce`` after -O2), in bf16.

Bounds: about twice what these modes measure on this model with the reference ops on the
CPU (bf16, ``measure`` below), where the GPU kernels add only bf16 rounding; the weight-only
int8 error must stay below the int4 ones, as the method promises.  (tests/test_quant_gpu.py checks each kernel path against its reference op; this
file checks what a user sees: the quantized engine against the unquantized one.)
"""
from __future__ import annotations

import json

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

VOCAB = 512

#: mode -> (quantize options, bound on the relative logit error, minimum argmax agreement).
#: Measured with the reference ops on the CPU (``measure``, 29 rows): int8 0.019 / 97%,
#: int4 g32 0.196 / 59%, int4 g128 0.256 / 62%, int4-awq g128 0.258 / 55%, w8a8-sq 0.026 /
#: 93%, fp8 0.080 / 76%, fp8-weight 0.067 / 83%.  A random-weight model's logits are flat, so
#: argmax agreement is a coarse signal here; the error bound is the sharp one.
MODES = {
    "int8": ("mode=int8", 0.04, 0.85),
    "int4-g32": ("mode=int4,group=32", 0.4, 0.35),
    "int4-g128": ("mode=int4,group=128", 0.5, 0.35),
    "int4-awq-g128": ('mode=int4-awq,group=128,calib="{calib}"', 0.5, 0.35),
    "w8a8-sq": ('mode=w8a8-sq,calib="{calib}"', 0.05, 0.8),
    "fp8": ('mode=fp8,calib="{calib}"', 0.16, 0.55),
    "fp8-weight": ("mode=fp8-weight", 0.13, 0.6),
}


def llama():
    import transformers
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=1,
                                   vocab_size=VOCAB, head_dim=64)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()


def engine(mode, tmp_path):
    """The -O2 inference form, quantized as ``irlm compile --quant`` does (None: unquantized)."""
    from irlm.compilation import compile_causal_lm
    if mode is None:
        return compile_causal_lm(llama(), max_seq=256)
    calib = tmp_path / "calib.json"
    g = torch.Generator().manual_seed(5)
    calib.write_text(json.dumps([torch.randint(0, VOCAB, (24,), generator=g).tolist()
                                 for _ in range(4)]))
    options = MODES[mode][0].format(calib=calib)
    return compile_causal_lm(llama(), max_seq=256, extra_pipeline=(
        f"quantize{{{options},fuse=false}},fuse-quant,dce"))


def run_steps(runner) -> list[torch.Tensor]:
    """Prefill three requests (eager), three decode steps (graph replays), a fourth request's
    prefill, four decode steps with all four: the logits of every step."""
    from irlm.runtime.model_runner import StepBatch
    g = torch.Generator().manual_seed(2)
    seqs = [torch.randint(0, VOCAB, (90,), generator=g) for _ in range(4)]
    tables = [list(range(r * 12, r * 12 + 12)) for r in range(4)]
    done = [0, 0, 0, 0]
    schedule = [{0: 60, 1: 30, 2: 20}] + [{0: 1, 1: 1, 2: 1}] * 3 + [{3: 10}] + \
               [{0: 1, 1: 1, 2: 1, 3: 1}] * 4
    out = []
    for step in schedule:
        reqs = sorted(step)
        batch = StepBatch.pack(reqs, [seqs[r][done[r]:done[r] + step[r]].tolist() for r in reqs],
                               [done[r] for r in reqs], [tables[r] for r in reqs])
        out.append(runner.step(batch).float().cpu())
        for r in reqs:
            done[r] += step[r]
    return out


def agreement(got: list[torch.Tensor], want: list[torch.Tensor]) -> tuple[float, float]:
    """(relative L2 error over every row of every step, fraction of equal argmaxes)."""
    g, w = torch.cat(got), torch.cat(want)
    err = ((g - w).norm() / w.norm()).item()
    return err, (g.argmax(-1) == w.argmax(-1)).float().mean().item()


def measure(tmp_path) -> dict:
    """The same comparison with the reference ops on the CPU (what the bounds are set from):
    ``python -c "import pathlib, tempfile, test_quant_agreement_gpu as t;
    print(t.measure(pathlib.Path(tempfile.mkdtemp())))"`` from tests/."""
    from irlm.runtime.runners.interpreter import GraphRunner
    want = run_steps(GraphRunner(engine(None, tmp_path), num_blocks=64))
    return {m: agreement(run_steps(GraphRunner(engine(m, tmp_path), num_blocks=64)), want)
            for m in MODES}


# ----- on the GPU ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unquantized(tmp_path_factory):
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    runner = CudaGraphRunner(engine(None, tmp_path_factory.mktemp("bf16")), num_blocks=64)
    logits = run_steps(runner)
    assert runner.stats["graph_replays"] == 7
    return logits


_errors: dict = {}


@pytest.mark.parametrize("mode", list(MODES))
def test_quantized_llama_agrees_with_unquantized_on_the_gpu(mode, unquantized, tmp_path):
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    runner = CudaGraphRunner(engine(mode, tmp_path), num_blocks=64)
    assert "reference" not in runner.quant_plan.summary(), runner.quant_plan.summary()
    err, agree = agreement(run_steps(runner), unquantized)
    print(f"{mode}: logit rel. error {err:.4f}, argmax agreement {agree:.1%}")
    _, bound, least = MODES[mode]
    assert err <= bound and agree >= least, (mode, err, agree)
    assert runner.stats["graph_replays"] == 7 and runner.stats["graph_captures"] == 1
    _errors[mode] = err
    if mode == "int4-g128" and "int8" in _errors and "int4-g32" in _errors:
        assert _errors["int8"] < min(_errors["int4-g32"], err)
