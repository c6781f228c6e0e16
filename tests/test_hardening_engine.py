"""A hostile engine directory is refused with one line, in bounded time, without reading any
file outside the directory or any file its manifest does not list (issue 21, finding 1).

Each case takes a real engine (lowering.engine_format.write_engine: a tiny plan, its weights and a
trained tokenizer), damages it the way an attacker who can write the directory would (editing
engine.json and recomputing its checksum, since that needs no secret), and loads it in a forked
child under a time and memory limit (the ``bounded`` fixture)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest
import torch

from irlm import Builder, DType, Graph, TensorType
from irlm.lowering.engine_format import EngineError, load_engine, write_engine, write_parallel_engine
from irlm.lowering.engine_files import manifest_digest
from irlm.weights import WeightStore


def tiny_graph(seed: int = 0, size: int = 4) -> Graph:
    """``x + w`` over ``size`` floats, ``w`` a weight."""
    ws = WeightStore()
    ws.add_tensor("w", torch.arange(size, dtype=torch.float32) + seed)
    g = Graph("tiny", ws)
    x = g.add_input(TensorType((size,), DType.f32), "x")
    b = Builder(g)
    g.set_outputs([b.op("core.add", x, b.param("w", ws.type_of("w")))])
    return g


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("engine") / "e"
    write_engine(tiny_graph(), out, {"source": "tiny", "max_model_len": 64}, tokenizer=tok)
    return out


@pytest.fixture
def copy(engine, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(engine, dst)
    return dst


def edit_manifest(path, change) -> None:
    """Apply ``change`` to engine.json and re-sign it as an attacker could."""
    m = json.loads((path / "engine.json").read_text())
    change(m)
    m["manifest_sha256"] = manifest_digest(m)
    (path / "engine.json").write_text(json.dumps(m))


def listing(path) -> dict:
    return {"bytes": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def load(path):
    e = load_engine(path)
    return type(e.graph).__name__, e.tokenizer is not None


def test_intact_engine_loads(bounded, engine):
    assert bounded(load, engine) == ("Graph", True)


@pytest.mark.parametrize("spelling", ["absolute", "dotdot"])
def test_manifest_entry_outside_the_directory_is_refused_unread(bounded, copy, tmp_path,
                                                                spelling):
    """Old behaviour: the outside file was stat'ed and hashed; matching size and hash loaded
    silently (a hash oracle), and the message leaked the file's size otherwise."""
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")
    name = str(secret) if spelling == "absolute" else "../secret.txt"
    edit_manifest(copy, lambda m: m["files"].__setitem__(name, listing(secret)))
    with pytest.raises(EngineError, match="only files\\s+inside its own directory") as e:
        bounded(load, copy)
    assert "6 bytes" not in str(e.value) and "secret.txt" in str(e.value)


def test_symlink_out_of_the_directory_is_refused(bounded, copy, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shutil.copy(copy / "weights.safetensors", outside)
    (copy / "weights.safetensors").unlink()
    (copy / "weights.safetensors").symlink_to(outside)
    with pytest.raises(EngineError, match="symbolic link leading outside the engine"):
        bounded(load, copy)


def test_symlink_inside_the_directory_is_followed(bounded, copy):
    os.rename(copy / "weights.safetensors", copy / "w.bin")
    (copy / "weights.safetensors").symlink_to("w.bin")
    assert bounded(load, copy) == ("Graph", True)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_fifo_or_device_is_refused_without_hanging(bounded, copy, kind):
    """Old behaviour: hashing a FIFO without a writer, or /dev/zero, listed with size 0 (a
    FIFO and a character device stat as 0 bytes), never returned."""
    if kind == "fifo":
        (copy / "weights.safetensors").unlink()
        os.mkfifo(copy / "weights.safetensors")
        name, match = "weights.safetensors", "is a FIFO, not a regular file"
    else:
        name, match = "/dev/zero", "only files\\s+inside its own directory"
    edit_manifest(copy, lambda m: m["files"].__setitem__(name, {"bytes": 0, "sha256": "0" * 64}))
    with pytest.raises(EngineError, match=match):
        bounded(load, copy, seconds=20)


def test_rank_path_outside_the_directory_is_refused(bounded, tmp_path):
    """Old behaviour: ``parallel.ranks[].path`` = ``../other`` ran that other engine."""
    split = tmp_path / "split"
    write_parallel_engine([tiny_graph(0), tiny_graph(1)], split, {"source": "tiny"}, tp=2, pp=1)
    other = tmp_path / "other"
    write_engine(tiny_graph(7), other, {"source": "other"})

    def to_other(m):
        m["parallel"]["ranks"][1]["path"] = "../other"
        m["files"]["../other/engine.json"] = listing(other / "engine.json")
    edit_manifest(split, to_other)
    with pytest.raises(EngineError, match=r"'\.\./other'.*only files\s+inside"):
        bounded(load, split)
    # and through a symlinked rank directory
    shutil.rmtree(split)
    write_parallel_engine([tiny_graph(0), tiny_graph(1)], split, {"source": "tiny"}, tp=2, pp=1)
    shutil.rmtree(split / "rank1")
    (split / "rank1").symlink_to(other)
    with pytest.raises(EngineError, match="symbolic link leading outside"):
        bounded(load, split)


def test_unlisted_tokenizer_file_is_refused(bounded, copy):
    """Old behaviour: a modified tokenizer.json whose entry was removed loaded unchecked."""
    data = json.loads((copy / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 999, "content": "EVIL", "single_word": False,
                                 "lstrip": False, "rstrip": False, "normalized": False,
                                 "special": True})
    (copy / "tokenizer.json").write_text(json.dumps(data))
    edit_manifest(copy, lambda m: m["files"].pop("tokenizer.json"))
    with pytest.raises(EngineError, match="tokenizer.json: present but not listed"):
        bounded(load, copy)


def test_stray_tokenizer_side_files_are_never_read(bounded, copy, engine):
    """A file transformers would pick up from the directory (added_tokens.json) has no
    effect unless the manifest lists it: the loaded vocabulary is the compiled one."""
    (copy / "added_tokens.json").write_text(json.dumps({"EVIL": 12345}))

    def vocab(path):
        return len(load_engine(path).tokenizer)
    assert bounded(vocab, copy) == bounded(vocab, engine)
    # the old loader (transformers reading the whole directory) would have grown it
    from transformers import PreTrainedTokenizerFast
    assert len(PreTrainedTokenizerFast.from_pretrained(str(copy))) != bounded(vocab, engine)


@pytest.mark.parametrize("field,value,match", [
    ("max_model_len", "512", r"config.max_model_len must be an int"),
    ("eos_token_id", [1, "2"], r"config.eos_token_id must be a token id"),
    ("dtype", "f64", r"config.dtype must be one of"),
])
def test_config_fields_are_type_checked(bounded, copy, field, value, match):
    edit_manifest(copy, lambda m: m["config"].__setitem__(field, value))
    with pytest.raises(EngineError, match=match):
        bounded(load, copy)


def test_config_edit_breaks_the_manifest_checksum(bounded, copy):
    m = json.loads((copy / "engine.json").read_text())
    m["config"]["max_model_len"] = 4096
    (copy / "engine.json").write_text(json.dumps(m))
    with pytest.raises(EngineError, match="manifest checksum mismatch"):
        bounded(load, copy)


def test_parallel_section_is_type_checked(bounded, tmp_path):
    split = tmp_path / "split"
    write_parallel_engine([tiny_graph(0), tiny_graph(1)], split, {"source": "tiny"}, tp=2, pp=1)
    edit_manifest(split, lambda m: m["parallel"].__setitem__("tp", "2"))
    with pytest.raises(EngineError, match=r"parallel.tp must be an int"):
        bounded(load, split)


@pytest.mark.parametrize("body", [b"[" * 200_000 + b"]" * 200_000,
                                  b'{"format": "irlm-engine", "x": "' + b"a" * (9 << 20) + b'"}',
                                  b"\xff\xfe{}"])
def test_hostile_manifest_costs_bounded_time_and_memory(bounded, copy, body):
    (copy / "engine.json").write_bytes(body)
    with pytest.raises(EngineError, match="engine.json: (JSON nested deeper|.*bytes, more than|"
                                          "not UTF-8)"):
        bounded(load, copy, seconds=20, memory_mb=512)
