"""Compiling into an earlier compile's output directory: OUT ends up holding exactly what the
new compile wrote plus the user's own files.

Old behaviour: the earlier compile's files that the new one did not rewrite stayed beside the
new engine: the pass dumps, ir/pipeline.txt and ir/weights.safetensors of a --dump-ir compile
after a plain one; the top-level plan.irlm and weights.safetensors of a single-rank engine
after a --tp 2 compile; the rank*/ folders of a --tp 2 engine after a single-rank compile.

A tiny seeded Llama (4 heads / 2 kv heads) with a word-level tokenizer, saved as a Hugging
Face directory; "what a compile writes" is what the same compile writes into an empty
directory.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from irlm.cli import main as irlm_main  # noqa: E402

VOCAB = 96


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    d = tmp_path_factory.mktemp("tiny-llama")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).eval().save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(d)
    return d


def compile_to(hf_dir, out, *flags) -> int:
    return irlm_main(["compile", "--hf", str(hf_dir), "-o", str(out), "--tokens-per-block", "4",
                      *flags])


def files(out: Path) -> set[str]:
    """Every file and symlink under ``out`` (relative paths; links are not followed)."""
    found = set()
    for root, dirs, names in os.walk(out):
        for name in names + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            found.add(os.path.relpath(os.path.join(root, name), out))
    return found


_fresh: dict = {}


@pytest.fixture
def fresh(hf_dir, tmp_path_factory):
    """``fresh(*flags)``: the files the compile with ``flags`` writes into an empty directory."""
    def get(*flags) -> set[str]:
        if flags not in _fresh:
            out = tmp_path_factory.mktemp("fresh") / "out"
            assert compile_to(hf_dir, out, *flags) == 0
            _fresh[flags] = files(out)
        return _fresh[flags]
    return get


def test_plain_compile_over_a_dump_ir_compile_leaves_none_of_its_dumps(hf_dir, tmp_path, fresh,
                                                                       capsys):
    out = tmp_path / "out"
    assert compile_to(hf_dir, out, "--dump-ir") == 0
    dumps = sorted(p.name for p in (out / "ir").iterdir())
    assert {"00-frontend.irlm", "pipeline.txt", "weights.safetensors"} <= set(dumps)
    assert len([d for d in dumps if d.endswith(".irlm")]) > 5
    capsys.readouterr()

    assert compile_to(hf_dir, out) == 0
    summary = capsys.readouterr().out
    assert sorted(p.name for p in (out / "ir").iterdir()) == ["00-frontend.irlm"]
    assert files(out) == fresh()
    # one summary line, saying what went
    assert len(summary.strip().splitlines()) == 1
    assert f"removed {len(dumps) - 1} files of the previous compile" in summary


def test_dump_ir_compile_over_a_longer_one_numbers_and_keeps_only_its_own_dumps(
        hf_dir, tmp_path, fresh):
    """The per-rank dumps continue the numbering of this compile's passes, not of the files an
    earlier compile left in OUT/ir."""
    out = tmp_path / "out"
    assert compile_to(hf_dir, out, "--dump-ir", "--pipeline", "cse,dce,canonicalize") == 0
    assert compile_to(hf_dir, out, "--dump-ir", "--tp", "2") == 0
    assert files(out) == fresh("--dump-ir", "--tp", "2")


def test_tp_compile_over_a_single_rank_engine_runs(hf_dir, tmp_path, fresh, capsys):
    out = tmp_path / "out"
    assert compile_to(hf_dir, out) == 0
    assert compile_to(hf_dir, out, "--tp", "2") == 0
    assert not (out / "plan.irlm").exists() and not (out / "weights.safetensors").exists()
    assert files(out) == fresh("--tp", "2")
    capsys.readouterr()
    assert irlm_main(["run", str(out), "--prompt", "w5 w17 w33 w2", "--max-tokens", "4",
                      "--no-stream", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.split()) == 4


def test_single_rank_compile_over_a_tp_engine_leaves_no_rank_folders(hf_dir, tmp_path, fresh):
    out = tmp_path / "out"
    assert compile_to(hf_dir, out, "--tp", "2", "--dump-ir") == 0
    assert (out / "rank1" / "plan.irlm").is_file() and (out / "ir" / "rank1").is_dir()
    assert compile_to(hf_dir, out) == 0
    assert not list(out.glob("rank*")) and not list((out / "ir").glob("rank*"))
    assert files(out) == fresh()


def test_the_users_own_files_survive(hf_dir, tmp_path, fresh):
    out = tmp_path / "out"
    assert compile_to(hf_dir, out, "--tp", "2", "--dump-ir") == 0
    mine = {"ir/edited.irlm": "my edit\n", "ir/notes.txt": "keep\n",
            "rank0/notes.txt": "keep too\n"}
    for rel, text in mine.items():
        (out / rel).write_text(text)
    assert compile_to(hf_dir, out) == 0
    # a file beside the output makes OUT need --force, and stays too
    mine["notes.txt"] = "and me\n"
    (out / "notes.txt").write_text(mine["notes.txt"])
    assert compile_to(hf_dir, out, "--dump-ir") == 1
    assert compile_to(hf_dir, out, "--dump-ir", "--force") == 0
    assert compile_to(hf_dir, out, "--force") == 0
    assert files(out) == fresh() | set(mine)
    assert {rel: (out / rel).read_text() for rel in mine} == mine


def test_a_directory_that_is_not_an_irlm_output_loses_nothing(hf_dir, tmp_path):
    """--force into a directory holding files with the names irlm writes, but no earlier
    compile (no ir/00-frontend.irlm, no irlm engine.json): nothing is removed."""
    out = tmp_path / "out"
    out.mkdir()
    theirs = {"notes.txt": "a", "plan.irlm": "b", "model.onnx": "c", "calib-tokens.json": "[]",
              "rank0/weights.safetensors": "d"}
    (out / "rank0").mkdir()
    for rel, text in theirs.items():
        (out / rel).write_text(text)
    assert compile_to(hf_dir, out, "--no-engine", "--force") == 0
    assert {rel: (out / rel).read_text() for rel in theirs} == theirs


def test_symlinks_are_neither_followed_nor_removed(hf_dir, tmp_path, fresh):
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    assert compile_to(hf_dir, out, "--tp", "2", "--dump-ir") == 0
    elsewhere.mkdir()
    for name in ("engine.json", "plan.irlm", "weights.safetensors", "05-dce.irlm"):
        (elsewhere / name).write_text("precious\n")
    # an irlm folder and an irlm file name in OUT, as links to files outside it
    for rel in ("rank1", "ir/rank1"):
        for f in (out / rel).iterdir():
            f.unlink()
        (out / rel).rmdir()
    (out / "rank1").symlink_to(elsewhere)
    (out / "ir" / "rank1").symlink_to(elsewhere)
    (out / "ir" / "07-fuse.irlm").unlink(missing_ok=True)
    (out / "ir" / "07-fuse.irlm").symlink_to(elsewhere / "05-dce.irlm")
    assert compile_to(hf_dir, out) == 0
    assert {p.name: p.read_text() for p in elsewhere.iterdir()} == {
        name: "precious\n" for name in ("engine.json", "plan.irlm", "weights.safetensors",
                                         "05-dce.irlm")}
    assert files(out) == fresh() | {"rank1", "ir/rank1", "ir/07-fuse.irlm"}
    assert all((out / rel).is_symlink() for rel in ("rank1", "ir/rank1", "ir/07-fuse.irlm"))


def test_a_failed_compile_removes_nothing(hf_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert compile_to(hf_dir, out, "--dump-ir") == 0
    before = files(out)
    assert compile_to(hf_dir, out, "--pipeline", "no-such-pass") == 1
    assert "no-such-pass" in capsys.readouterr().err
    assert files(out) == before


def test_irlm_build_over_a_tp_compile_keeps_only_its_engine_and_its_inputs(hf_dir, tmp_path):
    """``irlm build -o OUT`` into an earlier --tp --dump-ir compile: its rank folders and the
    dumps go, except the dump the build reads (edited in place) and the weights it reads."""
    src = tmp_path / "src"
    assert compile_to(hf_dir, src, "--dump-ir") == 0
    out = tmp_path / "out"
    assert compile_to(hf_dir, out, "--tp", "2", "--dump-ir") == 0
    last = sorted((out / "ir").glob("[0-9][0-9]-*.irlm"))[-1]
    last.write_text(sorted((src / "ir").glob("[0-9][0-9]-*.irlm"))[-1].read_text())
    assert irlm_main(["build", str(last), "--weights", str(src / "weights.safetensors"),
                      "--weights", str(out / "ir" / "weights.safetensors"), "-o", str(out),
                      "--from", str(src)]) == 0
    left = files(out)
    assert not any(f.startswith("rank") or f.startswith("ir/rank") for f in left), left
    assert {"engine.json", "plan.irlm", "weights.safetensors"} <= left
    assert os.path.relpath(last, out) in left and "ir/weights.safetensors" in left
    assert {f for f in left if f.startswith("ir/")} == {os.path.relpath(last, out),
                                                         "ir/weights.safetensors"}
    assert irlm_main(["run", str(out), "--prompt", "w5 w17", "--max-tokens", "3",
                      "--device", "cpu", "--quiet"]) == 0
