"""The GPU forms of the mixture-of-experts ops (lowering/moe_kernels.py), checked on the CPU.

Oracles: ``core.grouped_mm``'s reference implementation (one GEMM per expert over its rows)
and ``torch.histc``.  The path choice is checked against torch's own layout rule for its
grouped kernel.  Then the decode step of every causal architecture that the CUDA runner
captures runs on torch's ``meta`` device with the runner's kernel table: a meta tensor has no
data, so any op that reads device data on the host (``.item()``, ``.tolist()``, ``int(t)``),
which would break a CUDA graph capture, fails there.
"""
from __future__ import annotations

import pytest
import torch

from irlm.lowering.moe_kernels import (grouped_mm, grouped_mm_dense, grouped_mm_grouped,
                                       grouped_mm_path, histc_scatter, row_experts)
from irlm.registry import get_op_def


def reference(x, w, offs):
    return get_op_def("core.grouped_mm").reference(None, [x, w, offs], {})[0]


def routed(rows=13, k=32, n=24, experts=5, dtype=torch.float32, counts=(3, 0, 6, 2, 0),
           transposed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(dtype)
    if transposed:      # [experts, n, k] stored, read as [experts, k, n] (the traced form)
        w = torch.randn(experts, n, k, generator=g).to(dtype).transpose(1, 2)
    else:
        w = torch.randn(experts, k, n, generator=g).to(dtype)
    offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
    return x, w, offs


@pytest.mark.parametrize("counts", [(3, 0, 6, 2, 0), (13, 0, 0, 0, 0), (0, 0, 0, 0, 13),
                                    (1, 2, 3, 4, 3)])
@pytest.mark.parametrize("transposed", [False, True])
def test_dense_grouped_mm_equals_per_expert_reference(counts, transposed):
    """Rows 11 and 12 lie past the last offset in the first case: zero, as the op says."""
    x, w, offs = routed(counts=counts, transposed=transposed)
    want = reference(x, w, offs)
    got = grouped_mm_dense(x, w, offs)
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if sum(counts) < x.shape[0]:
        assert (got[sum(counts):] == 0).all()


def test_dense_grouped_mm_bf16_rounds_like_the_reference():
    x, w, offs = routed(dtype=torch.bfloat16, counts=(4, 4, 0, 5, 0), transposed=True)
    want = reference(x, w, offs).float()
    got = grouped_mm_dense(x, w, offs).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_torch_grouped_kernel_wrapper_zeroes_rows_past_the_last_offset():
    """torch._grouped_mm (here torch's CPU form of it) leaves rows past the last offset
    unwritten; the wrapper zeroes them on the device."""
    x, w, offs = routed(rows=16, k=32, n=24, dtype=torch.bfloat16, counts=(3, 0, 6, 2, 0),
                        transposed=True)
    want = reference(x, w, offs).float()
    got = grouped_mm_grouped(x, w, offs).float()
    assert (got[11:] == 0).all()
    assert ((got - want).norm() / want.norm()).item() < 1e-2


def test_row_experts_counts_offsets_at_or_below_each_row():
    offs = torch.tensor([2, 2, 5], dtype=torch.int32)
    assert row_experts(offs, 7).tolist() == [0, 0, 2, 2, 2, 3, 3]


H100 = (9, 0)


@pytest.mark.parametrize("case,capability,capturing,want", [
    ("bf16", H100, True, "grouped"),
    ("bf16", H100, False, "grouped"),
    ("bf16", (10, 0), True, "grouped"),
    ("bf16", (8, 0), True, "dense"),          # A100: torch's grouped kernel is sm_90 / sm_100
    ("bf16", (8, 0), False, "per-expert"),
    ("bf16", None, False, "per-expert"),
    ("fp16", H100, True, "dense"),            # its fp16 path loops over experts on the host
    ("fp16", H100, False, "per-expert"),
    ("f32", H100, True, "dense"),
    ("k12", H100, True, "dense"),             # 24-byte rows: not 16-byte aligned
    ("w-strided", H100, True, "dense"),       # neither of w's last two dims contiguous
    ("x-offset", H100, True, "dense"),        # x starts 2 bytes past an aligned address
])
def test_grouped_mm_path(case, capability, capturing, want):
    dtype = {"fp16": torch.float16, "f32": torch.float32}.get(case, torch.bfloat16)
    k = 12 if case == "k12" else 32
    x, w, _ = routed(k=k, dtype=dtype, transposed=True)
    if case == "w-strided":
        w = torch.randn(5, 2 * k, 2 * 24).to(dtype)[:, ::2, ::2]
    if case == "x-offset":
        x = torch.randn(13 * 32 + 1).to(dtype)[1:].view(13, 32)
    assert grouped_mm_path(x, w, capturing=capturing, capability=capability) == want


def test_grouped_mm_on_the_cpu_is_the_reference():
    x, w, offs = routed()
    assert torch.equal(grouped_mm(x, w, offs), reference(x, w, offs))
    empty = grouped_mm(x[:0], w, offs * 0)
    assert empty.shape == (0, 24)


@pytest.mark.parametrize("values", ["experts", "floats"])
def test_histc_scatter_bins_as_torch_histc(values):
    g = torch.Generator().manual_seed(3)
    if values == "experts":     # what a MoE layer counts: expert ids 0..7, bins 8 over [0, 7]
        x = torch.randint(0, 8, (50,), generator=g).float()
        bins, lo, hi = 8, 0.0, 7.0
    else:                       # values inside, on both edges and outside the range
        x = torch.cat([torch.rand(200, generator=g) * 3 - 1, torch.tensor([0.0, 1.0, -2, 5])])
        bins, lo, hi = 7, 0.0, 1.0
    want = torch.histc(x, bins, lo, hi)
    got = histc_scatter(x, bins, lo, hi)
    assert got.dtype == want.dtype and torch.equal(got, want)


# ----- decode steps with no host read of device data ----------------------------------------------

def _meta_kernel_table(capability):
    """The CUDA runner's kernel table with every irlm kernel launch replaced by what it
    computes on a meta tensor: the launchers read shapes and the per-step state only, never
    device data; everything else (the MoE forms above as they run inside a capture on a GPU
    of this compute capability, every other op's reference) runs."""
    from irlm.lowering.kernel_selection import KERNELS
    table = dict(KERNELS)
    table["core.grouped_mm"] = lambda ctx, x, a: [grouped_mm(*x, capturing=True,
                                                             capability=capability)]

    def attention(ctx, x, a):
        q, v = x[0], x[2]
        return [torch.empty(q.shape[0], q.shape[1], v.shape[2], dtype=q.dtype, device="meta")]

    def ref(name):
        return get_op_def(name).reference

    table["llm.paged_attention"] = attention
    for name in ("llm.rope", "llm.rms_norm", "llm.add_rms_norm", "llm.gated_act"):
        table[name] = ref(name)
    return table


class _MetaWeights:
    def __init__(self, graph):
        self.types = {op.attrs["name"]: op.results[0].type for op in graph.params()}

    def get(self, name):
        t = self.types[name]
        return torch.empty([int(d) for d in t.shape], dtype=t.dtype.torch, device="meta")


_graphs: dict = {}


def _compiled(arch):
    if arch not in _graphs:
        _graphs[arch] = _compile(arch)
    return _graphs[arch]


def _compile(arch):
    transformers = pytest.importorskip("transformers")
    from irlm.compilation import compile_causal_lm
    cfg = {
        "mixtral": lambda: transformers.MixtralConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128, num_local_experts=4, num_experts_per_tok=2),
        "gptj": lambda: transformers.GPTJConfig(n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                                                n_positions=64, vocab_size=128),
    }[arch]()
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    return compile_causal_lm(model, max_seq=64)


@pytest.mark.slow
@pytest.mark.parametrize("arch,capability", [("mixtral", H100), ("mixtral", (8, 0)),
                                             ("gptj", H100)],
                         ids=["mixtral-grouped", "mixtral-dense", "gptj"])
def test_decode_step_reads_no_device_data_on_the_host(arch, capability):
    """A decode step of 4 requests through the CUDA runner's op table on the meta device
    (Mixtral's experts both on torch's grouped kernel and on the dense fallback; GPT-J's
    position table and interleaved rotary)."""
    from irlm.interpreter import Interpreter
    graph = _compiled(arch)
    if arch == "mixtral":
        assert {"core.grouped_mm", "core.histc", "core.sort"} <= {op.name for op in graph.ops}
    reqs, blocks = 4, 4
    cache_t = next(v.type for v in graph.inputs if v.name == "kv_cache")
    shape = [8 if not isinstance(d, int) else d for d in cache_t.shape]
    meta = lambda *s, dtype: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
    feeds = {"input_ids": meta(reqs, dtype=torch.int64),
             "position_ids": meta(reqs, dtype=torch.int64),
             "q_lens": meta(reqs, dtype=torch.int32),
             "cached_lens": meta(reqs, dtype=torch.int32),
             "block_tables": meta(reqs, blocks, dtype=torch.int32),
             "kv_cache": meta(*shape, dtype=cache_t.dtype.torch)}
    interp = Interpreter(graph, _MetaWeights(graph), check_types=False,
                         overrides=_meta_kernel_table(capability), device="meta")
    out = interp.run(feeds, state={"decode": True, "max_q_len": 1, "max_kv_len": 64}).outputs[0]
    assert out.device.type == "meta" and tuple(out.shape) == (reqs, 128)
