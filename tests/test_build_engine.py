"""``irlm build``: dump → edit → build → run (docs/compile.md, "Editing the IR").

Oracles: transformers' ``generate`` on the same tiny Llama (for the edited build, on the model
with the same edit made in torch), and the engine ``irlm compile`` wrote.
"""
from __future__ import annotations

import copy
import re

import pytest
import torch

import irlm
from irlm.cli import main as irlm_main
from irlm.compilation import CompileConfig, WeightsMismatchError, build_engine
from irlm.runtime import LLM, SamplingParams
from irlm.runtime.testing import tiny_llama
from irlm_test_helpers import hf_generate

PROMPT = [5, 17, 3, 99, 42]
GREEDY = SamplingParams(max_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(128)


@pytest.fixture(scope="module")
def engine(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("build") / "engine"
    irlm.compile(model, CompileConfig(output=out, max_seq=64, tokens_per_block=4,
                                      dump_ir=True))
    return out


def weights(engine):
    return [engine / "weights.safetensors", engine / "ir" / "weights.safetensors"]


def greedy(engine_dir) -> list[int]:
    return LLM(engine_dir, device="cpu").generate([PROMPT], GREEDY)[0].outputs[0].token_ids


def hf_greedy(module) -> list[int]:
    with torch.no_grad():
        out = hf_generate(module, torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False,
                          pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


def test_unedited_frontend_dump_builds_the_same_engine(model, engine, tmp_path):
    """00-frontend.irlm is stateless: build runs -O2 over it, as compile did."""
    result = build_engine(engine / "ir" / "00-frontend.irlm", weights(engine), tmp_path / "e",
                          tokens_per_block=4)
    assert "substitute-attention" in result.pipeline
    assert greedy(tmp_path / "e") == greedy(engine) == hf_greedy(model)


def test_every_dump_reads_only_names_the_two_weight_files_hold(engine):
    from safetensors import safe_open
    held = set()
    for f in weights(engine):
        with safe_open(str(f), framework="pt") as st:
            held |= set(st.keys())
    for dump in sorted((engine / "ir").glob("*.irlm")):
        names = set(re.findall(r'param "([^"]+)"', dump.read_text()))
        assert names and names <= held, (dump.name, names - held)


def test_edited_dump_becomes_an_engine_with_the_edited_behaviour(model, engine, tmp_path,
                                                                 capsys):
    """Edit layer 0's attention scale in the last dump's text (1/sqrt(16) -> 1.5), build
    with the CLI, run: the tokens are those of transformers with the same scale."""
    last = sorted((engine / "ir").glob("*.irlm"))[-1]
    text = last.read_text()
    line = next(ln for ln in text.splitlines() if "llm.paged_attention" in ln
                and "layer = 0," in ln)
    edited_line = re.sub(r"scale = [0-9.e+-]+", "scale = 1.5", line)
    assert edited_line != line
    edited = tmp_path / "edited.irlm"
    edited.write_text(text.replace(line, edited_line))
    argv = ["build", str(edited), "-o", str(tmp_path / "e"), "--from", str(engine)]
    for w in weights(engine):
        argv += ["--weights", str(w)]
    assert irlm_main(argv) == 0, capsys.readouterr().err
    oracle = copy.deepcopy(model)
    oracle.model.layers[0].self_attn.scaling = 1.5
    want = hf_greedy(oracle)
    assert want != hf_greedy(model)          # the edit matters
    assert greedy(tmp_path / "e") == want


def test_each_mismatched_param_is_one_located_line(engine, tmp_path, capsys):
    plan = (engine / "plan.irlm").read_text()
    lines = plan.splitlines()
    i = next(k for k, ln in enumerate(lines) if 'param "model.norm.weight"' in ln)
    j = next(k for k, ln in enumerate(lines) if 'param "model.embed_tokens.weight"' in ln)
    lines[i] = lines[i].replace("model.norm.weight", "model.norn.weight")
    lines[j] = re.sub(r"tensor<128x64xf32>", "tensor<128x32xf32>", lines[j], count=1)
    bad = tmp_path / "bad.irlm"
    bad.write_text("\n".join(lines) + "\n")
    with pytest.raises(WeightsMismatchError) as info:
        build_engine(bad, weights(engine), tmp_path / "x", reference=engine)
    assert len(info.value.problems) == 2
    assert irlm_main(["build", str(bad), "--weights", str(engine / "weights.safetensors"),
                      "-o", str(tmp_path / "y"), "--from", str(engine)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert err == [
        f"irlm: error: {bad}:{j + 1}:{lines[j].index('%') + 1}: param 'model.embed_tokens.weight'"
        f" is declared tensor<128x32xf32> but {engine / 'weights.safetensors'} holds "
        f"tensor<128x64xf32>",
        f"irlm: error: {bad}:{i + 1}:{lines[i].index('%') + 1}: param 'model.norn.weight' is "
        f"not in the weights ({engine / 'weights.safetensors'}); did you mean "
        f"'model.norm.weight'?"], err
    assert not (tmp_path / "y").exists()
