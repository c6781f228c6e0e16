"""Model loaders on small synthetic checkpoints (seeded random weights, written to tmp_path).

The oracle is transformers itself: the same checkpoint loaded by transformers must give the
same tensors as irlm's lazy store, under the module's own state_dict names.  GGUF files are
written the way llama.cpp's converter writes them (renamed, Wq/Wk rows permuted, quantized).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

from irlm.errors import IRLMError  # noqa: E402
from irlm.frontends.gguf import load_gguf, unpermute_rotary_rows  # noqa: E402
from irlm.frontends.hf import load_hf_directory, load_safetensors  # noqa: E402
from irlm.frontends.loaded_model import load_model  # noqa: E402
from irlm.frontends.model_file import load_model_file  # noqa: E402

Q = gguf.GGMLQuantizationType


def tiny_llama_config(**kw):
    base = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                max_position_embeddings=128, rms_norm_eps=1e-5, rope_theta=10000.0,
                tie_word_embeddings=False)
    base.update(kw)
    return transformers.LlamaConfig(**base)


def random_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():  # norms start at 1; randomize so mix-ups show
            p.normal_(0, 0.5)
    return model.eval()


def assert_store_matches(store, state_dict, names=None):
    for name in names or state_dict:
        got, want = store.get(name), state_dict[name]
        assert got.dtype == want.dtype, name
        assert torch.equal(got, want), f"{name} differs"


# ----- Hugging Face directories ---------------------------------------------------------------
def test_hf_directory_matches_transformers(tmp_path):
    model = random_model(tiny_llama_config())
    model.save_pretrained(tmp_path)
    loaded = load_hf_directory(tmp_path)
    assert loaded.format == "hf" and loaded.config.model_type == "llama"
    assert all(p.device.type == "meta" for p in loaded.module.parameters())
    sd = model.state_dict()
    assert set(loaded.weights.names()) == set(sd)
    assert_store_matches(loaded.weights, sd)


def test_directory_without_tokenizer_has_none(tmp_path):
    random_model(tiny_llama_config()).save_pretrained(tmp_path)
    loaded = load_hf_directory(tmp_path)
    assert loaded.tokenizer is None and loaded.chat_template is None


def test_tied_lm_head_reads_the_embedding(tmp_path):
    model = random_model(tiny_llama_config(tie_word_embeddings=True))
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()  # transformers does not store the tied copy
    loaded = load_hf_directory(tmp_path)
    assert torch.equal(loaded.weights.get("lm_head.weight"),
                       model.state_dict()["model.embed_tokens.weight"])


def test_sharded_checkpoint(tmp_path):
    model = random_model(tiny_llama_config())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    loaded = load_hf_directory(tmp_path)
    assert_store_matches(loaded.weights, model.state_dict())


def test_checkpoint_dtype_is_cast_lazily(tmp_path):
    model = random_model(tiny_llama_config()).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    loaded = load_hf_directory(tmp_path, dtype=torch.float32)
    w = loaded.weights.get("model.layers.0.mlp.up_proj.weight")
    assert w.dtype == torch.float32
    assert torch.equal(w, model.state_dict()["model.layers.0.mlp.up_proj.weight"].float())


def _bert(tmp_path, key_prefix="", legacy_norm_names=False):
    from safetensors.torch import save_file
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, vocab_size=100,
                                     architectures=["BertModel"])
    torch.manual_seed(1)
    model = transformers.BertModel(config, add_pooling_layer=True).eval()
    sd = {}
    for k, v in model.state_dict().items():
        if legacy_norm_names and "LayerNorm." in k:
            k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                          "LayerNorm.beta")
        sd[key_prefix + k] = v.contiguous()
    save_file(sd, str(tmp_path / "model.safetensors"))
    config.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("key_prefix,legacy", [("", False), ("bert.", False), ("", True)])
def test_bert_checkpoint_spellings(tmp_path, key_prefix, legacy):
    model = _bert(tmp_path, key_prefix, legacy)
    loaded = load_hf_directory(tmp_path)
    assert type(loaded.module).__name__ == "BertModel"
    sd = model.state_dict()
    assert_store_matches(loaded.weights, sd, [n for n in sd if n in loaded.weights])
    assert all(n in loaded.weights for n in sd)


def test_missing_tensor_names_the_tensor_and_file(tmp_path):
    from safetensors.torch import save_file
    model = random_model(tiny_llama_config())
    model.save_pretrained(tmp_path)
    sd = {k: v for k, v in model.state_dict().items()
          if k != "model.layers.1.self_attn.v_proj.weight"}
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(IRLMError, match=r"model\.safetensors.*model\.layers\.1\.self_attn\."
                                        r"v_proj\.weight"):
        load_hf_directory(tmp_path)


def test_shape_mismatch_names_tensor_file_and_shapes(tmp_path):
    model = random_model(tiny_llama_config())
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(IRLMError, match=r"model\.safetensors: tensor 'model\.layers\.0\.mlp\."
                                        r"\w+_proj\.weight' has shape \(\d+, \d+\)"):
        load_hf_directory(tmp_path)


def test_bare_safetensors_with_config(tmp_path):
    model = random_model(tiny_llama_config())
    model.save_pretrained(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").rename(tmp_path / "my-config.json")
    loaded = load_safetensors(tmp_path / "ckpt" / "model.safetensors", tmp_path / "my-config.json")
    assert loaded.format == "safetensors"
    assert_store_matches(loaded.weights, model.state_dict())
    with pytest.raises(IRLMError, match="needs a config"):
        load_model(tmp_path / "ckpt" / "model.safetensors")


def test_directory_errors(tmp_path):
    with pytest.raises(IRLMError, match=r"config\.json"):
        load_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 4}')
    with pytest.raises(IRLMError, match="model_type"):
        load_hf_directory(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-arch"}')
    with pytest.raises(IRLMError, match="no-such-arch"):
        load_hf_directory(tmp_path)
    tiny_llama_config().save_pretrained(tmp_path)
    with pytest.raises(IRLMError, match="has no model.safetensors"):
        load_hf_directory(tmp_path)


# ----- GGUF -----------------------------------------------------------------------------------
def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Wq / Wk rows (LlamaModel.permute)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def byte_vocab():
    """A small GPT-2-style vocabulary: 256 byte tokens, a few merges, two control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    byte_tokens = list(bytes_to_unicode().values())
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a"]
    tokens = ["<|endoftext|>", "<|im_start|>"] + byte_tokens + [m.replace(" ", "") for m in merges]
    types = [3, 3] + [1] * (len(tokens) - 2)
    return tokens, types, merges


def write_gguf(path, model, arch="llama", qtypes=None, permute=True, with_output=True,
               extra_tensors=(), extra_metadata=None):
    """Write ``model`` (a transformers causal LM) as llama.cpp's converter would."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    tokens, types, merges = byte_vocab()
    tokens = tokens + [f"<extra_{i}>" for i in range(cfg.vocab_size - len(tokens))]
    types = types + [4] * (cfg.vocab_size - len(types))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}{% endfor %}")
    if extra_metadata is not None:
        extra_metadata(w)
    names = gguf.get_tensor_name_map(
        {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[arch], cfg.num_hidden_layers)
    qtypes = qtypes or {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and not with_output:
            continue
        base, _, suffix = name.rpartition(".")
        gname = f"{names.get_name(base)}.{suffix}"
        data = t.float().numpy()
        if permute and ".attn_q." in gname:
            data = llama_cpp_permute(data, cfg.num_attention_heads)
        elif permute and ".attn_k." in gname:
            data = llama_cpp_permute(data, cfg.num_key_value_heads)
        qtype = next((q for pat, q in qtypes.items() if pat in gname), Q.F32)
        if data.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gname, np.ascontiguousarray(data, dtype=np.float32))
        elif qtype == Q.F16:
            w.add_tensor(gname, data.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    for gname, data in extra_tensors:
        w.add_tensor(gname, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


ALL_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
             "ffn_gate": Q.BF16, "ffn_up": Q.Q4_1, "ffn_down": Q.Q8_0, "token_embd": Q.Q8_0,
             "output.": Q.F16}


def hf_from_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def test_gguf_unquantized_round_trips_exactly(tmp_path):
    """F32 GGUF: irlm must recover the original transformers weights bit for bit, which checks
    the name mapping and the un-permutation of Wq/Wk."""
    model = random_model(tiny_llama_config())
    loaded = load_gguf(write_gguf(tmp_path / "m.gguf", model))
    assert loaded.config.num_key_value_heads == 2 and not loaded.config.tie_word_embeddings
    assert_store_matches(loaded.weights, model.state_dict())


def test_gguf_quantized_matches_transformers_loader(tmp_path):
    model = random_model(tiny_llama_config())
    path = write_gguf(tmp_path / "m.gguf", model, qtypes=ALL_TYPES)
    loaded = load_gguf(path)
    reference = hf_from_gguf(path).state_dict()
    assert set(loaded.weights.names()) == set(reference)
    assert_store_matches(loaded.weights, reference)
    # and dequantization is close to the original weights (Q4 error is ~ scale/16)
    orig = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    got = loaded.weights.get("model.layers.0.self_attn.q_proj.weight")
    assert (got - orig).abs().max() < 0.25 * orig.abs().max()


def test_gguf_tied_output_when_output_weight_absent(tmp_path):
    model = random_model(tiny_llama_config(tie_word_embeddings=True))
    loaded = load_gguf(write_gguf(tmp_path / "m.gguf", model, with_output=False))
    assert loaded.config.tie_word_embeddings
    assert torch.equal(loaded.weights.get("lm_head.weight"),
                       model.state_dict()["model.embed_tokens.weight"])


def test_gguf_qwen2_is_a_table_entry(tmp_path):
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=300, max_position_embeddings=128,
                                      tie_word_embeddings=False)
    model = random_model(config)
    path = write_gguf(tmp_path / "q.gguf", model, arch="qwen2", permute=False,
                      qtypes={"ffn": Q.Q8_0})
    loaded = load_gguf(path)
    assert loaded.config.model_type == "qwen2"
    assert_store_matches(loaded.weights, hf_from_gguf(path).state_dict())


def test_gguf_tokenizer_matches_transformers(tmp_path):
    model = random_model(tiny_llama_config())
    path = write_gguf(tmp_path / "m.gguf", model)
    loaded = load_gguf(path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the cat sat on the mat", "<|im_start|>in the hat", "  tab\tand ünïcode"]:
        assert loaded.tokenizer(text)["input_ids"] == reference(text)["input_ids"], text
    assert loaded.chat_template.startswith("{% for m in messages %}")


def assert_reader_agrees_with_gguf_package(path):
    """irlm's GGUF header reader and gguf.GGUFReader see the same metadata and tensors."""
    from irlm.frontends.gguf_file import GGUFFile
    ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
    expected = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert ours.metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert ours.metadata[key] == pytest.approx(value) if isinstance(value, float) \
            else ours.metadata[key] == value, key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        info = ours.tensors[t.name]
        assert info.ggml_type == t.tensor_type and info.nbytes == t.n_bytes, t.name
        assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name
        want = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        assert torch.equal(ours.dequantize(t.name), want.reshape(info.shape)), t.name


def test_gguf_reader_agrees_with_gguf_package(tmp_path):
    model = random_model(tiny_llama_config())

    def every_value_type(w):
        w.add_uint8("test.u8", 7)
        w.add_int16("test.i16", -3)
        w.add_uint64("test.u64", 2**40)
        w.add_float64("test.f64", 0.125)
        w.add_bool("test.flag", True)
        w.add_array("test.floats", [0.5, 1.5])

    path = write_gguf(tmp_path / "m.gguf", model, qtypes=ALL_TYPES,
                      extra_metadata=every_value_type)
    assert_reader_agrees_with_gguf_package(path)


def test_gguf_reader_nested_arrays(tmp_path):
    # (GGUFReader.contents() flattens these to [1, 2, 3]; the structure is what was written)
    from irlm.frontends.gguf_file import GGUFFile
    w = gguf.GGUFWriter(str(tmp_path / "n.gguf"), "llama")
    w.add_array("test.nested", [[1, 2], [3]])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert GGUFFile(tmp_path / "n.gguf").metadata["test.nested"] == [[1, 2], [3]]


def test_gguf_truncated_file(tmp_path):
    model = random_model(tiny_llama_config())
    path = write_gguf(tmp_path / "m.gguf", model)
    data = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(IRLMError, match=r"cut\.gguf: tensor '.*' ends past the end of the file"):
        load_gguf(tmp_path / "cut.gguf")
    (tmp_path / "cut2.gguf").write_bytes(data[:200])
    with pytest.raises(IRLMError, match=r"cut2\.gguf: truncated or corrupt GGUF header"):
        load_gguf(tmp_path / "cut2.gguf")


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.arange(8 * 3 * 5, dtype=torch.float32).reshape(24, 5)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 3))
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rotary_rows(permuted, 3), w)
    b = torch.arange(24, dtype=torch.float32)
    assert torch.equal(unpermute_rotary_rows(torch.from_numpy(llama_cpp_permute(b.numpy(), 3)),
                                             3), b)


def test_gguf_errors(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n")
    with pytest.raises(IRLMError, match=r"notes\.txt: not a GGUF file"):
        load_gguf(text)
    with pytest.raises(IRLMError, match=r"missing\.gguf: no such"):
        load_gguf(tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bert.gguf"), "bert")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(IRLMError, match=r"architecture 'bert' is not supported \(supported: "
                                        r"llama"):
        load_gguf(tmp_path / "bert.gguf")


def test_gguf_rope_scaling(tmp_path):
    model = random_model(tiny_llama_config())

    def linear(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(4.0)

    loaded = load_gguf(write_gguf(tmp_path / "lin.gguf", model, extra_metadata=linear))
    assert loaded.config.rope_parameters["rope_type"] == "linear"
    assert loaded.config.rope_parameters["factor"] == 4.0

    def yarn(w):
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(4.0)

    with pytest.raises(IRLMError, match=r"RoPE scaling 'yarn' \(llama\.rope\.scaling\.type\) "
                                        r"is not supported"):
        load_gguf(write_gguf(tmp_path / "yarn.gguf", model, extra_metadata=yarn))


def test_gguf_refuses_to_drop_tensors(tmp_path):
    model = random_model(tiny_llama_config())
    path = write_gguf(tmp_path / "m.gguf", model,
                      extra_tensors=[("blk.0.mystery.weight", np.ones(4, np.float32))])
    with pytest.raises(IRLMError, match=r"'blk\.0\.mystery\.weight' has no place"):
        load_gguf(path)


# ----- model.py -------------------------------------------------------------------------------
MODEL_PY = """
import torch

class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x):
        return torch.relu(self.proj(x))

def build_model():
    torch.manual_seed(0)
    return Tiny()

def example_inputs():
    return (torch.randn(2, 4),)
"""


def test_model_file_loads(tmp_path):
    f = tmp_path / "model.py"
    f.write_text(MODEL_PY)
    loaded = load_model_file(f)
    assert loaded.format == "model.py" and loaded.weights is None
    (x,) = loaded.example_inputs()
    assert loaded.module(x).shape == (2, 3)
    assert load_model(f).format == "model.py"


@pytest.mark.parametrize("body,message", [
    ("x = 1\n", r"m\.py: defines no build_model\(\)"),
    ("def build_model():\n    return 3\n", r"m\.py: build_model\(\) returned int"),
    ("def build_model():\n    raise ValueError('bad size')\n",
     r"m\.py:2: build_model\(\) raised ValueError: bad size"),
    ("import torch\ndef build_model(:\n", r"m\.py:2: syntax error"),
    ("import no_such_module_xyz\n", r"m\.py:1: importing the model file raised "
                                    r"ModuleNotFoundError"),
])
def test_model_file_errors_name_the_file(tmp_path, body, message):
    f = tmp_path / "m.py"
    f.write_text(body)
    with pytest.raises(IRLMError, match=message):
        load_model_file(f)


def test_model_file_missing(tmp_path):
    with pytest.raises(IRLMError, match=r"nope\.py: no such model file"):
        load_model_file(tmp_path / "nope.py")
