"""The compiled SmolLM2 engine generates what Hugging Face transformers generates.

`irlm compile --gguf` → engine directory → `LLM.from_engine` on the CPU.  Oracle:
transformers' own GGUF loader and `generate(do_sample=False)` on the same file in fp32.  Ten
chat prompts of varied lengths run together through in-flight batching (chunked prefill with a
small token budget) and each greedy output must equal HF's token for token.
"""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from irlm.cli import main as irlm_main  # noqa: E402
from irlm.runtime import LLM, SamplingParams  # noqa: E402
from irlm_test_helpers import smollm_gguf  # noqa: E402

QUESTIONS = [
    "Hi!",
    "What is the capital of France?",
    "Name three primary colors.",
    "Write a haiku about the sea.",
    "What is 12 times 7?",
    "Explain in one sentence what a compiler does.",
    "Translate 'good morning' into Spanish.",
    "List the planets of the solar system in order from the sun, separated by commas, and "
    "say which one is the largest and which one is the smallest.",
    "Why is the sky blue? Keep it short.",
    "Give me a Python function that returns the square of a number.",
]
NEW_TOKENS = 12




@pytest.fixture(scope="module")
def engine_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2-engine")
    assert irlm_main(["compile", "--gguf", str(smollm_gguf()), "-o", str(out),
                      "--max-seq", "512"]) == 0
    return out


@pytest.fixture(scope="module")
def hf():
    path = smollm_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, torch_dtype=torch.float32).eval()
    return tok, model


def test_greedy_chat_matches_transformers_token_for_token(engine_dir, hf):
    tok, model = hf
    import irlm                       # the conventional spelling: irlm.LLM(engine_dir)
    llm = irlm.LLM(engine_dir, device="cpu", max_num_tokens=64)
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    outs = llm.chat(convs, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    lengths = set()
    for conv, out in zip(convs, outs):
        text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        assert out.prompt == text                  # the engine's template is the model's
        ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
        lengths.add(ids.shape[1])
        with torch.no_grad():
            want = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
        got = out.outputs[0].token_ids
        # Both stop at EOS; HF keeps it in the sequence, so compare without it.
        if want and want[-1] == tok.eos_token_id:
            want = want[:-1]
            assert out.outputs[0].finish_reason == "stop", conv[0]["content"]
        if got and got[-1] == tok.eos_token_id:
            got = got[:-1]
        assert got == want, conv[0]["content"]
    assert len(lengths) >= 8                       # the prompts really vary in length


def test_engine_directory_damage_is_refused(engine_dir, tmp_path):
    import shutil
    from irlm.lowering.engine_format import EngineError, load_engine
    bad = tmp_path / "bad"
    shutil.copytree(engine_dir, bad, ignore=shutil.ignore_patterns("weights.safetensors"))
    with pytest.raises(EngineError, match="missing file weights.safetensors"):
        load_engine(bad)
    # a truncated weights file
    with open(engine_dir / "weights.safetensors", "rb") as src, \
            open(bad / "weights.safetensors", "wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(EngineError, match="truncated"):
        load_engine(bad)
    # same size, one flipped byte in the plan
    shutil.copy(engine_dir / "weights.safetensors", bad / "weights.safetensors")
    plan = bytearray((bad / "plan.irlm").read_bytes())
    plan[len(plan) // 2] ^= 1
    (bad / "plan.irlm").write_bytes(bytes(plan))
    with pytest.raises(EngineError, match="checksum mismatch"):
        load_engine(bad)
    with pytest.raises(EngineError, match="not an engine directory"):
        load_engine(tmp_path / "nope")


def test_beam_search_matches_transformers(engine_dir, hf):
    """Beam search (width 4) through the compiled engine equals HF's generate(num_beams=4)."""
    tok, model = hf
    llm = LLM.from_engine(engine_dir, device="cpu", max_num_tokens=64)
    conv = [{"role": "user", "content": "Name a famous painter."}]
    text = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    ids = tok(text, add_special_tokens=False).input_ids
    params = SamplingParams(use_beam_search=True, beam_width=4, n=4, max_tokens=8,
                            early_stopping=True)
    out = llm.generate([ids], params)[0]
    with torch.no_grad():
        want = model.generate(torch.tensor([ids]), num_beams=4, num_return_sequences=4,
                              do_sample=False, max_new_tokens=8, early_stopping=True,
                              pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    beams = []
    for row in want[:, len(ids):].tolist():          # crop HF's padding after EOS
        end = row.index(tok.eos_token_id) if tok.eos_token_id in row else len(row) - 1
        beams.append(row[:end + 1])
    assert [c.token_ids for c in out.outputs] == beams


@pytest.mark.parametrize("linear", ["f32", "default"])
def test_cpu_executor_logits_equal_the_interpreter(engine_dir, linear):
    """The CPU executor (irlm/runtime/runners/cpu.py) against the reference interpreter on the
    real weights: a chat prompt's prefill, then two greedy decode steps.  With f32 linears the
    arithmetic is the interpreter's; the default (f16 weights on a CPU without native bf16)
    rounds the weights only, so the logits stay within 1e-3 of their range."""
    from irlm.lowering.engine_format import load_engine
    from irlm.runtime.runners.cpu import CpuGraphRunner
    from irlm.runtime.runners.interpreter import runner_for_engine
    from irlm.runtime.model_runner import StepBatch
    engine = load_engine(engine_dir)
    if linear == "f32":
        fast = CpuGraphRunner(engine.graph, num_blocks=8, linear_dtype="f32")
    else:
        fast = runner_for_engine(engine, device="cpu", num_blocks=8)
    ref = runner_for_engine(engine, device="cpu", num_blocks=8, executor="reference")
    assert type(fast).__name__ == "CpuGraphRunner" and type(ref).__name__ == "GraphRunner"
    bound = 1e-4 if fast.linear_dtype == "f32" else 1e-3
    text = engine.chat_template and LLM(fast, engine.tokenizer,
                                        chat_template=engine.chat_template).apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    table = [[3, 0, 6, 1]]
    batch = StepBatch.pack([0], [ids], [0], table)
    for step in range(3):
        want, got = ref.step(batch), fast.step(batch)
        scale = float(want.max() - want.min())
        assert (got - want).abs().max().item() <= bound * scale, step
        assert int(got[0].argmax()) == int(want[0].argmax()), step
        n = batch.num_tokens + int(batch.cached_lens[0])
        batch = StepBatch.pack([0], [[int(want[0].argmax())]], [n], table)


@pytest.mark.slow
def test_library_compile_writes_the_cli_engine(engine_dir, tmp_path):
    """``irlm.compile`` with the same settings writes what ``irlm compile`` wrote: a
    byte-equal plan, equal weights and build config; progress names every stage in order."""
    import json

    from safetensors.torch import load_file

    import irlm
    seen = []
    out = tmp_path / "lib"
    engine = irlm.compile(smollm_gguf(), irlm.CompileConfig(output=out, max_seq=512),
                          progress=lambda name, i, n: seen.append((name, i, n)))
    assert [i for _, i, _ in seen] == list(range(len(seen))) and seen[0][0] == "load"
    assert seen[-1][0] == "write ONNX" and {n for _, _, n in seen} == {len(seen)}
    assert engine.engine_written and engine.path == out
    assert (out / "plan.irlm").read_bytes() == (engine_dir / "plan.irlm").read_bytes()
    want, got = load_file(engine_dir / "weights.safetensors"), load_file(out / "weights.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert want[k].dtype == got[k].dtype and torch.equal(want[k], got[k]), k
    manifest = json.loads((out / "engine.json").read_text())
    assert manifest == json.loads((engine_dir / "engine.json").read_text())
    assert engine.config == manifest["config"]                # what it returns is what it wrote
    assert str(engine.graph) == (out / "plan.irlm").read_text()
