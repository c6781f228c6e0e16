"""CPU-side checks of the kernel launchers: argument errors, RoPE frequencies, split planning."""
import math

import pytest
import torch

from irlm.errors import IRLMError
from irlm.kernels import ops
from irlm.kernels.nvrtc import KernelArgumentError, arch_for_capability, KernelUnavailableError


def test_cpu_tensors_are_refused_with_a_clear_error():
    x = torch.randn(4, 64)
    with pytest.raises(KernelArgumentError, match="x must be on a CUDA device, got cpu"):
        ops.rms_norm(x, torch.ones(64))
    with pytest.raises(KernelArgumentError, match="logits must be on a CUDA device"):
        ops.sample(x)
    with pytest.raises(KernelArgumentError, match="unknown activation 'relu'"):
        ops.gated_act(x, "relu")
    with pytest.raises(KernelArgumentError, match="q must be a torch.Tensor"):
        ops.paged_attention_decode([1, 2], None, 0, None, None)
    assert issubclass(KernelArgumentError, IRLMError) and issubclass(KernelArgumentError, ValueError)


def test_architecture_names():
    assert arch_for_capability(9, 0) == "sm_90a"
    assert arch_for_capability(8, 0) == "sm_80"
    assert arch_for_capability(8, 9) == "sm_89"
    with pytest.raises(KernelUnavailableError, match="8.0 or newer"):
        arch_for_capability(7, 5)


def test_rope_inv_freq_matches_transformers_llama3():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, rope_theta=500000.0,
                      rope_scaling=scaling, max_position_embeddings=131072)
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    ours = ops.rope_inv_freq(128, 500000.0, scaling)
    assert ours.dtype == torch.float32 and ours.shape == (64,)
    torch.testing.assert_close(ours, ref.float(), rtol=1e-6, atol=0)
    plain = ops.rope_inv_freq(64, 10000.0)
    torch.testing.assert_close(plain, 1.0 / 10000.0 ** (torch.arange(0, 64, 2).float() / 64))
    torch.testing.assert_close(ops.rope_inv_freq(64, 10000.0, {"type": "linear", "factor": 4.0}),
                               plain / 4)
    with pytest.raises(KernelArgumentError, match="yarn"):
        ops.rope_inv_freq(64, 10000.0, {"rope_type": "yarn", "factor": 4.0})


@pytest.mark.parametrize("ctas,kv_len", [(8, 2048), (8, 16384), (256, 2048), (2048, 2048),
                                         (8, 100), (1, 300), (64, 4097), (256, 512),
                                         (131, 512), (132, 513)])
def test_split_planning_covers_the_context(ctas, kv_len):
    splits, size = ops.choose_splits(ctas, kv_len, 64, 132)
    assert splits >= 1
    if splits > 1:
        assert size % 64 == 0 and size >= 128
        assert splits * size >= kv_len > (splits - 1) * size
        assert splits <= 64
    if ctas >= 4 * 132 or kv_len < 256 or (ctas >= 132 and kv_len <= 512):
        assert splits == 1
    if ctas < 132 and kv_len >= 256:
        assert splits > 1


def test_quantized_kv_cache_scales_are_checked_and_taken_as_float32():
    bf16, cache8 = torch.bfloat16, torch.empty(1, 1, 2, 16, 1, 64, dtype=torch.int8)
    with pytest.raises(KernelArgumentError, match="the int8 kv_cache needs kv_scales"):
        ops._kv_quantization(cache8, bf16, None)
    with pytest.raises(KernelArgumentError, match="needs kv_scales"):
        ops._kv_quantization(cache8, bf16, (0.1,))
    with pytest.raises(KernelArgumentError, match="positive and finite"):
        ops._kv_quantization(cache8, bf16, (0.1, float("inf")))
    with pytest.raises(KernelArgumentError, match="positive and finite"):
        ops._kv_quantization(cache8, bf16, (1e-50, 0.1))        # 0 as a float32
    dt, ks, vs = ops._kv_quantization(cache8.view(torch.float8_e4m3fn), bf16, [0.1, 0.3])
    assert dt == torch.float8_e4m3fn
    assert (ks, vs) == tuple(torch.tensor([0.1, 0.3], dtype=torch.float32).tolist())
    assert ops._kv_quantization(cache8.to(bf16), bf16, ()) == (None, 1.0, 1.0)
    with pytest.raises(KernelArgumentError, match="kv_scales are for an int8 or float8"):
        ops._kv_quantization(cache8.to(bf16), bf16, (0.1, 0.1))
    with pytest.raises(KernelArgumentError, match="kv_cache dtype torch.float32 differs"):
        ops._kv_quantization(cache8.float(), bf16, None)


def test_kernel_selection_hands_the_ops_kv_scales_to_the_launcher(monkeypatch):
    from irlm.lowering import kernel_selection
    seen = {}
    monkeypatch.setattr(ops, "paged_attention", lambda *a, **kw: seen.update(kw) or "out")

    class Ctx:
        state = {}
    qkv = [torch.zeros(2, 4, 64)] * 3 + [None] * 4
    attrs = {"layer": 0, "scale": None, "sliding_window": 0, "alibi_slopes": ()}
    assert kernel_selection._paged_attention(Ctx(), qkv, dict(attrs, kv_scales=(0.5, 0.25))) \
        == ["out"]
    assert seen["kv_scales"] == (0.5, 0.25)
    kernel_selection._paged_attention(Ctx(), qkv, dict(attrs, kv_scales=()))
    assert seen["kv_scales"] is None


@pytest.mark.parametrize("q_lens,cached,want", [
    ([1, 1, 64, 100, 100], [40, 7, 128, 0, 0], (3, 66, 64, 100, 100)),   # running, then new
    ([30, 100, 50], [0, 0, 0], (0, 0, 0, 100, None)),                    # all new, mixed lengths
    ([1, 1], [3, 4], None),                                               # decode only
    ([40, 1], [0, 3], None),                  # a new prompt before a running one: not a suffix
    ([1, 40, 7], [3, 0, 0], (1, 1, 1, 40, None)),
])
def test_fresh_suffix_is_the_trailing_run_of_requests_with_nothing_cached(q_lens, cached, want):
    got = ops.FreshSuffix.of(q_lens, cached)
    assert (got if got is None else tuple(got)) == want


def test_fold_splits_setting(monkeypatch):
    monkeypatch.delenv("IRLM_FOLD_SPLITS", raising=False)
    assert not ops.fold_splits_enabled()            # off until measured on a GPU
    monkeypatch.setenv("IRLM_FOLD_SPLITS", "1")
    assert ops.fold_splits_enabled()
    monkeypatch.setenv("IRLM_FOLD_SPLITS", "on")
    with pytest.raises(ops.KernelArgumentError, match="IRLM_FOLD_SPLITS must be 0 or 1"):
        ops.fold_splits_enabled()
