"""``irlm compile --check-numerics`` names the op a wrong pass broke, at every -O level, and the
compile's counts and locations agree with the files it names.

The wrong passes are docs/examples/wrong_passes.py (the worked example of
docs/writing-a-pass.md); each test knows which op its pass changed, and the check must name
that op.  Counts are checked against the files, parsed back with irlm's parser.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

import irlm
from irlm.compilation import CompileConfig
from irlm.errors import IRLMError
from irlm.runtime.testing import tiny_llama
from irlm.text.parser import parse_file

WRONG = Path(__file__).resolve().parents[1] / "docs" / "examples" / "wrong_passes.py"


@pytest.fixture(scope="module")
def model():
    return tiny_llama(128, layers=2)


def compile_with(model, tmp_path, level, pipeline=None, **kw):
    return irlm.compile(model, CompileConfig(
        output=tmp_path / "out", max_seq=32, opt_level=level, pipeline=pipeline,
        pass_plugins=[WRONG], check_numerics=True, **kw))


@pytest.mark.slow
@pytest.mark.parametrize("level, wrong, op, where", [
    ("0", "bad-attention-scale{layer=1}", "llm.paged_attention", "model.layers.1.self_attn"),
    ("1", "bad-attention-scale{layer=1}", "llm.paged_attention", "model.layers.1.self_attn"),
    ("2", "bad-attention-scale{layer=1}", "llm.paged_attention", "model.layers.1.self_attn"),
    ("2", "bad-eps{layer=1}", "llm.add_rms_norm", "model.layers.1.input_layernorm"),
    ("2", "swap-rope-halves{layer=1}", "llm.rope", "model.layers.1.self_attn"),
])
def test_check_numerics_in_compile_names_the_broken_op(model, tmp_path, level, wrong, op, where):
    with pytest.raises(IRLMError) as info:
        compile_with(model, tmp_path, level, wrong)
    message = str(info.value)
    assert f"pass '{wrong}'" in message and "changed the graph's outputs" in message
    first = re.search(r"first value that differs \(in graph order\): (.*)", message).group(1)
    assert op in first and f"at {where} " in first, message
    assert "%None" not in message and "no value kept its name" not in message
    if wrong.startswith("swap-rope"):       # the pass inserted ops in front of the rope
        assert "it reads what this pass created: core.concat" in message


def test_counts_stats_locations_and_the_passing_summary(model, tmp_path, capsys):
    engine = compile_with(model, tmp_path, "2", dump_ir=True, stats=True)
    err = capsys.readouterr().err
    out = tmp_path / "out"
    # the summary's op counts are those of the files it names
    summary = engine.summary()
    traced = len(parse_file(out / "ir" / "00-frontend.irlm"))
    final = len(parse_file(out / "plan.irlm"))
    assert f"traced {traced} ops (ir/00-frontend.irlm)" in summary, summary
    assert f"→ {final} ops (" in summary and "(plan.irlm)" in summary, summary
    assert traced != final
    # substitute-attention reports what it did (2 layers: 2 attention ops)
    sa = next(line for line in err.splitlines() if "substitute-attention" in line)
    assert "(no changes)" not in sa
    assert re.search(r"attention ops made paged\s*│\s*2\b", err), err
    # every RoPE op is located in the model's source, not in a wrapper library
    for op in parse_file(out / "plan.irlm").ops:
        if op.name == "llm.rope":
            assert op.loc.file == "modeling_llama.py" and \
                re.fullmatch(r"model\.layers\.\d\.self_attn", op.loc.module), op.loc
    # a passing check says so in one line: every pass but substitute-attention (which
    # changes the signature and becomes the new reference) was checked
    from irlm.passes import parse_pipeline
    passes = len(list(parse_pipeline(engine.pipeline)))
    [line] = [ln for ln in err.splitlines() if ln.startswith("numerics: ") and "checked" in ln]
    assert line.startswith(f"numerics: {passes - 1} pass(es) checked"), line
