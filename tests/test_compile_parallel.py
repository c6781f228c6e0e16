"""`irlm compile --tp N` / `--pp N`: multi-rank engines that generate what the unsplit engine
generates, run on the CPU simulator; bad flag values are refused before the trace.

Tiny seeded HF models saved as directories: a Llama with GQA (4 heads / 2 kv heads, with a
word-level tokenizer so `irlm run --prompt TEXT` works) and an OPT (biases, relu MLP).  The
oracles are the unsplit engine run by the reference interpreter and HF transformers.
"""
import argparse
import json

import pytest
import torch
import transformers

from irlm.cli import main as irlm_main
from irlm.errors import IRLMError
from irlm.lowering.engine_format import load_engine
from irlm.runtime import LLM, SamplingParams
from irlm.runtime.runners.interpreter import runner_for_engine
from irlm.runtime.model_runner import StepBatch

VOCAB = 96
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        word_embed_proj_dim=32, vocab_size=VOCAB, max_position_embeddings=64),
    # wide enough that a rank's o_proj / down_proj slice (64 features) holds int4 groups of 32
    "llama-wide": lambda: transformers.LlamaConfig(
        hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64),
}


def save_word_tokenizer(d):
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(d)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for arch, cfg in CONFIGS.items():
        d = tmp_path_factory.mktemp(arch)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(cfg()).eval()
        model.save_pretrained(d)
        if arch == "llama":
            save_word_tokenizer(d)
        out[arch] = (d, model)
    return out


_engines = {}


def engine_dir(models, tmp_path_factory, arch, *flags):
    key = (arch, flags)
    if key not in _engines:
        out = tmp_path_factory.mktemp(f"{arch}{''.join(flags)}".replace("-", "")) / "engine"
        argv = ["compile", "--hf", str(models[arch][0]), "-o", str(out),
                "--tokens-per-block", "4", *flags]
        assert irlm_main(argv) == 0
        _engines[key] = out
    return _engines[key]


PROMPTS = [[5, 17, 33, 2, 9, 60, 41], [70, 3, 12]]



def greedy_tokens(engine_dir, max_tokens: int = 6) -> list[list[int]]:
    """The engine's greedy continuation of every prompt, on the CPU (the interpreter, as the
    multi-rank simulator runs it; the fast CPU executor's int8/int4 GEMMs round inputs to bf16)."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return [o.outputs[0].token_ids for o in LLM.from_engine(
        engine_dir, device="cpu", parallel="simulator", executor="reference").generate(
        PROMPTS, params)]

def stored_shapes(path):
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def first_step_logits(path):
    runner = runner_for_engine(load_engine(path), device="cpu", num_blocks=16,
                               parallel="simulator", executor="reference")
    batch = StepBatch.pack([0, 1], PROMPTS, [0, 0], [[0, 1], [2]])
    return runner.step(batch)


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("flag", ["--tp", "--pp"])
def test_split_engine_generates_like_the_unsplit_one(models, tmp_path_factory, arch, flag):
    base = engine_dir(models, tmp_path_factory, arch)
    split = engine_dir(models, tmp_path_factory, arch, flag, "2")

    manifest = json.loads((split / "engine.json").read_text())
    tp, pp = (2, 1) if flag == "--tp" else (1, 2)
    assert manifest["parallel"]["tp"] == tp and manifest["parallel"]["pp"] == pp
    assert [r["path"] for r in manifest["parallel"]["ranks"]] == ["rank0", "rank1"]
    assert "rank1/engine.json" in manifest["files"]
    engine = load_engine(split)
    assert len(engine.ranks) == 2
    for r, rank in enumerate(engine.ranks):
        ops = [op.name for op in rank.graph.ops]
        if flag == "--tp":
            # o_proj and down_proj per layer, the embedding; the LM head's gather
            assert ops.count("dist.all_reduce") == 5 and ops.count("dist.all_gather") == 1
            # the rank stores only its V/N rows of the token embedding (OPT: tied to the LM
            # head, one shard for both) and no whole table
            shapes = stored_shapes(split / f"rank{r}" / "weights.safetensors")
            table = "model.embed_tokens.weight" if arch == "llama" else "lm_head.weight"
            half = VOCAB // 2
            assert shapes[f"{table}#tp2.r{r}[vocab{r * half}:{(r + 1) * half}]"] == [half, 32]
            assert not any(shape[0] == VOCAB for shape in shapes.values())
            # a rank caches its own kv heads only
            assert rank.graph.inputs[-1].type.shape[4] == load_engine(base).graph.inputs[-1] \
                .type.shape[4] // 2
        else:
            assert ("dist.send" in ops) == (r == 0) and ("dist.recv" in ops) == (r == 1)
            assert rank.graph.inputs[-1].type.shape[0] == 1     # the stage's one layer
        # each rank's weight file holds its shards / its layers only
        assert (split / f"rank{r}" / "weights.safetensors").stat().st_size < \
            (base / "weights.safetensors").stat().st_size

    want, got = first_step_logits(base), first_step_logits(split)
    scale = float(want.max() - want.min())
    assert (got - want).abs().max().item() <= 1e-5 * scale
    with torch.no_grad():  # and HF itself, on the first prompt
        hf = models[arch][1](torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert (got[0] - hf).abs().max().item() <= 1e-4 * scale

    want_tokens, got_tokens = greedy_tokens(base), greedy_tokens(split)
    assert got_tokens == want_tokens and all(len(t) == 6 for t in got_tokens)


def test_dump_ir_per_rank_and_irlm_run(models, tmp_path_factory, capsys):
    d = models["llama"][0]
    out = tmp_path_factory.mktemp("dump") / "engine"
    assert irlm_main(["compile", "--hf", str(d), "-o", str(out), "--tokens-per-block", "4",
                      "--tp", "2", "--dump-ir"]) == 0
    passes = sorted(p.name for p in (out / "ir").glob("[0-9][0-9]-*.irlm"))
    for r in range(2):
        (dump,) = (out / "ir" / f"rank{r}").glob("*.irlm")
        assert dump.name == f"{len(passes):02d}-tp-split.irlm"
        text = dump.read_text()
        assert f"#tp2.r{r}[" in text and "dist.all_reduce" in text
        assert text == (out / f"rank{r}" / "plan.irlm").read_text()
    base = engine_dir(models, tmp_path_factory, "llama")
    capsys.readouterr()           # (what the compiles printed)
    texts = []
    for engine in (base, out):
        assert irlm_main(["run", str(engine), "--prompt", "w5 w17 w33 w2", "--max-tokens", "5",
                          "--no-stream", "--device", "cpu"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] and len(texts[0].split()) == 5


def test_multi_rank_engine_is_refused_by_the_cuda_runner(models, tmp_path_factory):
    split = engine_dir(models, tmp_path_factory, "llama", "--tp", "2")
    engine = load_engine(split)
    with pytest.raises(IRLMError, match="the multi-rank simulator .tp 2, pp 1. runs on the CPU"):
        runner_for_engine(engine, device="cuda", parallel="simulator")
    from irlm.runtime.runners.cuda_graphs import CudaGraphRunner
    with pytest.raises(IRLMError, match="one rank of a multi-rank .* run the whole engine"):
        CudaGraphRunner(engine.ranks[0].graph)


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """12 heads / 4 kv heads, intermediate 50: --tp 6 fails on kv heads, --tp 4 on the MLP."""
    d = tmp_path_factory.mktemp("wide")
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=50, num_hidden_layers=2,
                                   num_attention_heads=12, num_key_value_heads=4,
                                   vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.mark.parametrize("which, flags, message", [
    ("llama", ["--tp", "3"], "--tp 3: the model has 4 attention heads, which --tp must divide"),
    ("llama", ["--tp", "8"], "--tp 8: the model has only 4 attention heads; --tp cannot be "
                             "larger"),
    ("wide", ["--tp", "6"], "--tp 6: the model has 4 kv heads; --tp must divide them or be a "
                            "multiple of them"),
    ("wide", ["--tp", "4"], "--tp 4: the model's intermediate size (intermediate_size = 50) is "
                            "not divisible by it"),
    ("opt", ["--pp", "3"], "--pp 3: the model has 2 layers, which --pp must divide"),
    ("llama", ["--tp", "0"], "--tp 0: must be at least 1"),
    ("llama", ["--pp", "-1"], "--pp -1: must be at least 1"),
    ("llama", ["--tp", "2", "--quant", "int4-awq"],
     "--tp 2 with --quant int4-awq: not supported together yet (its calibration would need all "
     "ranks); with --tp 2, only the weight-only --quant int8 and int4 work"),
    ("opt", ["--pp", "2", "--quant", "w8a8-sq"],
     "--pp 2 with --quant w8a8-sq: not supported together yet (its calibration would need all "
     "ranks); with --pp 2, only the weight-only --quant int8 and int4 work"),
    ("llama", ["--tp", "2", "--quant", "fp8"],
     "--tp 2 with --quant fp8: not supported together yet (its calibration would need all "
     "ranks); with --tp 2, only the weight-only --quant int8 and int4 work"),
    ("llama", ["--pp", "2", "--kv-cache-dtype", "int8"],
     "--pp 2 with --kv-cache-dtype int8: not supported together yet (its scales are calibrated "
     "on the whole model); with --pp 2, only the weight-only --quant int8 and int4 work"),
    # o_proj of a rank reads 4 heads x 8 / 2 = 16 features: no whole group of 32
    ("llama", ["--tp", "2", "--quant", "int4", "--quant-group", "32"],
     "--tp 2 with --quant int4 --quant-group 32: a rank's attention output projection reads 16 "
     "input features (4 heads x head size 8, / 2), which the group must divide; use a smaller "
     "--quant-group or --tp"),
])
def test_bad_parallel_flags_fail_before_the_trace(models, wide_dir, tmp_path, capsys, which,
                                                  flags, message):
    d = wide_dir if which == "wide" else models[which][0]
    out = tmp_path / "out"
    assert irlm_main(["compile", "--hf", str(d), "-o", str(out), *flags]) == 1
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0] == f"irlm: error: {message}", err
    assert not (out / "ir" / "00-frontend.irlm").exists()   # nothing traced


def test_kv_cache_dtype_with_parallel_is_refused():
    from irlm.compilation import CompileConfig
    args = CompileConfig(output="out", tp=1, pp=2, quant=None, kv_cache_dtype="fp8")
    with pytest.raises(IRLMError, match="--pp 2 with --kv-cache-dtype fp8: not supported "
                                        "together yet"):
        args.check()
    CompileConfig(output="out", tp=2, pp=1, quant=None, kv_cache_dtype=None).check()
    for quant in ("int8", "int4"):   # weight-only: accepted
        CompileConfig(output="out", tp=2, pp=1, quant=quant, kv_cache_dtype=None).check()


def fake_quant(w, mode, group=0):
    """The weight a quantized layer effectively multiplies by, from the formats' definitions
    (docs/quantization.md): int8 symmetric per output row; int4 asymmetric per group of
    input features, 4-bit codes with a zero point."""
    w = w.float()
    if mode == "int8":
        s = (w.abs().amax(dim=1, keepdim=True) / 127.0).clamp(min=1e-12)
        return torch.round(w / s).clamp(-127, 127) * s
    g = w.reshape(w.shape[0], -1, group)
    lo, hi = g.amin(-1, keepdim=True).clamp(max=0), g.amax(-1, keepdim=True).clamp(min=0)
    s = ((hi - lo) / 15.0).clamp(min=1e-12)
    z = torch.round(-lo / s).clamp(0, 15)
    q = (torch.round(g / s) + z).clamp(0, 15)
    return ((q - z) * s).reshape(w.shape)


ROW_PARALLEL = ("o_proj", "down_proj", "out_proj", "fc2")


def hf_quantized_logits(model, mode, group=0, tp=1):
    """HF's logits for the first prompt with every projection but the LM head replaced by its
    quantized weight.  With tp > 1 the row-parallel projections (o_proj, down_proj) are
    quantized per rank over their slice of input features, as each rank's graph is."""
    import copy
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, lin in m.named_modules():
            if not isinstance(lin, torch.nn.Linear) or name == "lm_head":
                continue
            w = lin.weight
            if tp > 1 and name.endswith(ROW_PARALLEL):
                lin.weight.copy_(torch.cat([fake_quant(c, mode, group)
                                            for c in w.chunk(tp, dim=1)], 1))
            else:
                lin.weight.copy_(fake_quant(w, mode, group))
        return m(torch.tensor([PROMPTS[0]])).logits[0, -1]


@pytest.mark.parametrize("arch, split_flags, quant", [
    ("llama", ["--tp", "2"], ["--quant", "int8"]),
    ("llama", ["--pp", "2"], ["--quant", "int4", "--quant-group", "32"]),
    ("opt", ["--tp", "2"], ["--quant", "int8"]),     # biases, linear_act, tied LM head
    ("llama-wide", ["--tp", "2"], ["--quant", "int4", "--quant-group", "32"]),
])
def test_quantized_split_engine_generates_like_the_unsplit_quantized_one(
        models, tmp_path_factory, arch, split_flags, quant):
    """Each rank's graph is quantized after the split: projections become quant.linear, the LM
    head (vocab-parallel, before its all_gather, or the last stage's) stays float."""
    base = engine_dir(models, tmp_path_factory, arch, *quant)
    split = engine_dir(models, tmp_path_factory, arch, *split_flags, *quant)
    mode, group = quant[1], (int(quant[3]) if len(quant) > 3 else 0)
    engine = load_engine(split)
    tp = 2 if split_flags[0] == "--tp" else 1
    for r, rank in enumerate(engine.ranks):
        ops = [op.name for op in rank.graph.ops]
        # tp: qkv, o, gate|up, down of both layers; pp: those of the stage's one layer
        assert ops.count("quant.linear") == (8 if tp > 1 else 4)
        assert all(op.attrs["mode"] == mode for op in rank.graph.ops if op.name == "quant.linear")
        floats = [op for op in rank.graph.ops if op.name == "core.linear"]
        if tp > 1 or r == 1:
            (head,) = floats   # OPT's is tied: the embedding's table, named lm_head.weight
            assert head.operands[1].producer.attrs["name"].startswith("lm_head.weight")
            assert head.operands[1].type.dtype.value == "f32"
            last = rank.graph.outputs[0].producer
            assert last is head or (last.name == "dist.all_gather" and
                                    last.operands[0].producer is head)
        else:
            assert floats == []
    assert f"quantize{{mode={mode}" in json.loads((split / "rank0" / "engine.json").read_text()) \
        ["config"]["pipeline"]

    want, got = first_step_logits(base), first_step_logits(split)
    scale = float(want.max() - want.min())
    hf = hf_quantized_logits(models[arch][1], mode, group, tp)
    assert (got[0] - hf).abs().max().item() <= 1e-4 * scale
    if tp == 1 or mode == "int4":
        # a stage quantizes whole weights, and int4 groups lie inside a rank's slice: the
        # same quantized weights as the unsplit engine's
        assert (got - want).abs().max().item() <= 1e-5 * scale
    else:         # o_proj/down_proj scales come from each rank's slice: the unsplit int8
        assert (got - want).abs().max().item() <= 1e-2 * scale   # engine is only close
        hf_unsplit = hf_quantized_logits(models[arch][1], mode, group)
        assert (want[0] - hf_unsplit).abs().max().item() <= 1e-4 * scale

    want_tokens, got_tokens = greedy_tokens(base), greedy_tokens(split)
    assert got_tokens == want_tokens and all(len(t) == 6 for t in got_tokens)


def test_quantized_split_dumps_each_ranks_quantize_stages(models, tmp_path_factory):
    out = tmp_path_factory.mktemp("qdump") / "engine"
    assert irlm_main(["compile", "--hf", str(models["llama"][0]), "-o", str(out),
                      "--tokens-per-block", "4", "--tp", "2", "--quant", "int8",
                      "--dump-ir"]) == 0
    n = len(list((out / "ir").glob("[0-9][0-9]-*.irlm")))
    assert not any("quantize" in p.name for p in (out / "ir").glob("*.irlm"))  # not unsplit
    for r in range(2):
        dumps = sorted(p.name for p in (out / "ir" / f"rank{r}").glob("*.irlm"))
        assert dumps == [f"{n:02d}-tp-split.irlm", f"{n + 1:02d}-quantize.irlm",
                         f"{n + 2:02d}-fuse-quant.irlm", f"{n + 3:02d}-dce.irlm"]
        final = (out / "ir" / f"rank{r}" / dumps[-1]).read_text()
        assert "quant.linear" in final and f"#tp2.r{r}[" in final
        assert final == (out / f"rank{r}" / "plan.irlm").read_text()
