"""What the CUDA runner refuses at load, checked without a GPU (the checks run on the graph)."""
import pytest
import torch

from irlm.errors import IRLMError
from irlm.runtime.runners.cuda_graphs import _check_attention_head_dims

transformers = pytest.importorskip("transformers")


def _llama(head_dim):
    from irlm.compilation import compile_causal_lm
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, intermediate_size=128,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, head_dim=head_dim)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return compile_causal_lm(transformers.LlamaForCausalLM(cfg).eval(), max_seq=32)


def test_head_dim_without_an_attention_kernel_is_refused_at_load():
    with pytest.raises(IRLMError, match=r"llm\.paged_attention .*model\.layers\.0\.self_attn.* "
                                        r"head_dim 72, which the GPU attention kernels do not "
                                        r"take \(they take 64, 80, 96, 128, 256\)"):
        _check_attention_head_dims(_llama(72))

