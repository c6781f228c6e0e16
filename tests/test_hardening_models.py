"""Hostile model files (GGUF, config.json) are one ModelLoadError line, found before anything
is built, at bounded cost (issue 21, finding 4).  The GGUF files are written byte by byte here
from the format's specification (github.com/ggml-org/ggml docs/gguf.md), so the reader under
test is not its own oracle."""
from __future__ import annotations

import json
import struct

import pytest
import torch

from irlm.frontends.loaded_model import ModelLoadError

# imported here, once, so that each forked ``bounded`` child does not import them again
transformers = pytest.importorskip("transformers")
import irlm.frontends.gguf  # noqa: E402,F401
import irlm.frontends.hf  # noqa: E402,F401
import transformers.models.llama.modeling_llama  # noqa: E402,F401

U32, I32, F32, STRING, ARRAY = 4, 5, 6, 8, 9


def gstr(s: str) -> bytes:
    b = s.encode()
    return struct.pack("<Q", len(b)) + b


def kv(key: str, vtype: int, value) -> bytes:
    payload = {U32: lambda v: struct.pack("<I", v), I32: lambda v: struct.pack("<i", v),
               F32: lambda v: struct.pack("<f", v), STRING: gstr}[vtype](value)
    return gstr(key) + struct.pack("<I", vtype) + payload


def gguf(kvs: list[bytes], tensors: dict[str, torch.Tensor], *, alignment: int = 32,
         counts: tuple[int, int] | None = None) -> bytes:
    """A GGUF v3 file: header, metadata, tensor infos (f32), aligned data."""
    infos, data = b"", b""
    for name, t in tensors.items():
        dims = list(reversed(t.shape))                   # GGUF lists the innermost first
        infos += gstr(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        infos += struct.pack("<IQ", 0, len(data))        # type 0 = F32, offset in the data
        data += t.numpy().astype("<f4").tobytes()
        data += b"\0" * (-len(data) % alignment)
    n_tensors, n_kv = counts or (len(tensors), len(kvs))
    head = b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + b"".join(kvs) + infos
    return head + b"\0" * (-len(head) % alignment) + data


def llama(path, *, layers_meta=1, layers_present=1, heads=2, alignment=None, extra=()):
    h, ff, vocab = 8, 16, 32
    kvs = [kv("general.architecture", STRING, "llama"), kv("llama.block_count", U32, layers_meta),
           kv("llama.embedding_length", U32, h), kv("llama.feed_forward_length", U32, ff),
           kv("llama.attention.head_count", U32, heads), kv("llama.context_length", U32, 64),
           *extra]
    if alignment is not None:
        kvs.append(kv("general.alignment", U32, alignment))
    t = {"token_embd.weight": torch.zeros(vocab, h), "output_norm.weight": torch.ones(h)}
    for i in range(layers_present):
        for n, shape in (("attn_q", (h, h)), ("attn_k", (h, h)), ("attn_v", (h, h)),
                         ("attn_output", (h, h)), ("ffn_gate", (ff, h)), ("ffn_up", (ff, h)),
                         ("ffn_down", (h, ff)), ("attn_norm", (h,)), ("ffn_norm", (h,))):
            t[f"blk.{i}.{n}.weight"] = torch.zeros(shape)
    path.write_bytes(gguf(kvs, t, alignment=alignment or 32))
    return path


def load(path):
    from irlm.frontends.gguf import load_gguf
    m = load_gguf(path)
    return m.config.num_hidden_layers


def test_well_formed_tiny_gguf_loads(bounded, tmp_path):
    assert bounded(load, llama(tmp_path / "ok.gguf")) == 1


@pytest.mark.parametrize("case,kwargs,match", [
    ("huge block count", dict(layers_meta=10 ** 7),
     r"num_hidden_layers must be an int in \[1, 4096\], got 10000000"),
    ("more layers than tensors", dict(layers_meta=8),
     r"num_hidden_layers is 8 but the checkpoint holds tensors for 1 layers"),
    ("zero heads", dict(heads=0), r"num_attention_heads must be an int in \[1, 4096\], got 0"),
    ("alignment 0", dict(alignment=0), r"general.alignment must be a power of two"),
])
def test_hostile_gguf_hyperparameters(bounded, tmp_path, case, kwargs, match):
    """Old behaviour: 10**7 layers grew past 4 GB while transformers built them; a head count
    or an alignment of 0 divided by zero (a traceback)."""
    with pytest.raises(ModelLoadError, match=match):
        bounded(load, llama(tmp_path / "bad.gguf", **kwargs), memory_mb=1024, seconds=60)


def test_gguf_header_counts_beyond_the_file(bounded, tmp_path):
    """A 200-byte file claiming 2**40 tensors is refused from its header."""
    path = tmp_path / "counts.gguf"
    path.write_bytes(gguf([kv("general.architecture", STRING, "llama")], {},
                          counts=(1 << 40, 1)).ljust(200, b"\0"))
    with pytest.raises(ModelLoadError, match=r"corrupt GGUF header \(it claims 1 metadata "
                                             r"entries and 1099511627776 tensors, more than its "
                                             r"200 bytes hold\)"):
        bounded(load, path, memory_mb=256)


def test_deeply_nested_gguf_arrays(bounded, tmp_path):
    """Old behaviour: 200,000 nested arrays recursed until RecursionError (a traceback)."""
    nested = struct.pack("<IQ", ARRAY, 1) * 200_000 + struct.pack("<IQ", U32, 0)
    deep = gstr("x.deep") + struct.pack("<I", ARRAY) + nested
    path = tmp_path / "deep.gguf"
    path.write_bytes(gguf([kv("general.architecture", STRING, "llama"), deep], {}))
    with pytest.raises(ModelLoadError, match="metadata arrays nested deeper than 8"):
        bounded(load, path, memory_mb=256)


# ----- config.json ------------------------------------------------------------------------------
def hf_dir(tmp_path, config: dict | bytes):
    from safetensors.torch import save_file
    d = tmp_path / "hf"
    d.mkdir()
    raw = config if isinstance(config, bytes) else json.dumps(config).encode()
    (d / "config.json").write_bytes(raw)
    save_file({"model.embed_tokens.weight": torch.zeros(32, 8),
               "model.layers.0.input_layernorm.weight": torch.ones(8)}, str(d / "model.safetensors"))
    return d


def load_hf(d):
    from irlm.frontends.hf import load_hf_directory
    load_hf_directory(d)


LLAMA = dict(model_type="llama", hidden_size=8, intermediate_size=16, num_hidden_layers=1,
             num_attention_heads=2, num_key_value_heads=2, vocab_size=32)


@pytest.mark.parametrize("change,match", [
    (dict(num_hidden_layers=10 ** 7), r"num_hidden_layers must be an int in \[1, 4096\]"),
    (dict(num_hidden_layers=3), r"num_hidden_layers is 3 but the checkpoint holds tensors for "
                                r"1 layers"),
    (dict(num_attention_heads="2"), r"num_attention_heads must be an int in \[1, 4096\], "
                                    r"got '2'"),
    (dict(num_attention_heads=0), r"num_attention_heads must be an int in \[1, 4096\], got 0"),
    (dict(num_key_value_heads=3), r"num_attention_heads 2 is not a multiple of "
                                  r"num_key_value_heads 3"),
])
def test_hostile_config_json(bounded, tmp_path, change, match):
    """Old behaviour: 10**7 layers built for minutes past 4 GB; "2" raised transformers'
    TypeError; 0 heads divided by zero."""
    with pytest.raises(ModelLoadError, match=match):
        bounded(load_hf, hf_dir(tmp_path, dict(LLAMA, **change)), memory_mb=1024, seconds=60)


def test_deeply_nested_config_json(bounded, tmp_path):
    """Old behaviour: json.loads recursed on 100,000 levels (RecursionError traceback)."""
    raw = b'{"model_type": "llama", "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ModelLoadError, match="JSON nested deeper than 64 levels"):
        bounded(load_hf, hf_dir(tmp_path, raw), memory_mb=256)


def kv_strings(key: str, values: list[str]) -> bytes:
    return gstr(key) + struct.pack("<IIQ", ARRAY, STRING, len(values)) + \
        b"".join(gstr(v) for v in values)


def test_corrupted_bpe_merge_fails_at_load_not_after_the_passes(tmp_path, capsys):
    """Old behaviour: the compile traced and ran every pass, then failed writing the engine
    (with tokenizers' own exception)."""
    from irlm.cli import main as irlm_main
    tok = [kv("tokenizer.ggml.model", STRING, "gpt2"), kv("tokenizer.ggml.pre", STRING, "smollm"),
           kv_strings("tokenizer.ggml.tokens", ["a", "b", "ab"]),
           kv_strings("tokenizer.ggml.merges", ["a b", "corrupted-merge-without-a-space"])]
    path = llama(tmp_path / "tok.gguf", extra=tok)
    out = tmp_path / "out"
    assert irlm_main(["compile", "--gguf", str(path), "-o", str(out), "--max-seq", "32"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}: cannot build its tokenizer" in err[0]
    assert not (out / "ir" / "00-frontend.irlm").exists()     # failed before the trace
