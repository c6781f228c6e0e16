"""``irlm compile --pipeline P`` extends the -O level, ``--replace-pipeline`` replaces it, and
the engine-or-not note says the true reason.  The oracle for the pass lists is the named
pipelines of passes/levels.py; for the engine, what is on disk."""
from __future__ import annotations

import pytest

import irlm
from irlm.cli import build_parser, main as irlm_main
from irlm.cli.compile import config_from_args
from irlm.compilation import CompileConfig
from irlm.errors import IRLMError
from irlm.passes import NAMED_PIPELINES


def config(*argv):
    return config_from_args(build_parser().parse_args(["compile", "m.py", "-o", "x", *argv]))


@pytest.mark.parametrize("argv, level, pipeline", [
    ((), "2", None),
    (("--pipeline", "dce"), "2", "dce"),                    # extends the default -O2
    (("-O1", "--pipeline", "dce"), "1", "dce"),
    (("--replace-pipeline", "--pipeline", "dce"), None, "dce"),
])
def test_pipeline_extends_the_level_unless_replaced(argv, level, pipeline):
    c = config(*argv)
    assert (c.opt_level, c.pipeline) == (level, pipeline)


@pytest.mark.parametrize("argv, message", [
    (("--replace-pipeline",), "--replace-pipeline needs --pipeline"),
    (("--replace-pipeline", "--pipeline", "dce", "-O1"), "--replace-pipeline with -O1"),
])
def test_replace_pipeline_misuse_is_one_error(argv, message):
    with pytest.raises(IRLMError, match=message):
        config(*argv)


def test_list_passes_shows_each_levels_causal_lm_form(capsys):
    assert irlm_main(["opt", "--list-passes"]) == 0
    out = capsys.readouterr().out
    for level in ("O0", "O1", "O2"):
        assert f"-{level} causal LM: {NAMED_PIPELINES[level + '-causal-lm']}\n" in out
    # -O2's causal-LM form is more than -O1's (the fusions): the listing shows the difference
    assert "fuse-rms-norm" in NAMED_PIPELINES["O2-causal-lm"]
    assert "fuse-rms-norm" not in NAMED_PIPELINES["O1-causal-lm"]


def test_extended_pipeline_still_writes_an_engine(tiny_llama, tmp_path):
    engine = irlm.compile(tiny_llama, CompileConfig(output=tmp_path / "e", max_seq=32,
                                                    opt_level="1", pipeline="cse"))
    assert engine.engine_written and (tmp_path / "e" / "engine.json").is_file()
    assert engine.pipeline.startswith("canonicalize,cse,substitute-attention")
    assert engine.pipeline.endswith(",dce,cse")


def test_replaced_pipeline_without_substitute_attention_says_why(tiny_llama, tmp_path):
    engine = irlm.compile(tiny_llama, CompileConfig(output=tmp_path / "e", max_seq=32,
                                                    opt_level=None, pipeline="cse"))
    assert not engine.engine_written and not (tmp_path / "e" / "engine.json").exists()
    [note] = [n for n in engine.notes if n.startswith("no engine written")]
    assert "substitute-attention did not run" in note and "causal LM" in note
    assert "only causal LMs" not in note
