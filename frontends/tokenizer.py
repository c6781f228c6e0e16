"""Tokenizers for loaded models: from a Hugging Face directory, or rebuilt from GGUF metadata.

Every tokenizer is a ``transformers.PreTrainedTokenizerFast`` (a ``tokenizers.Tokenizer``
underneath, reachable as ``.backend_tokenizer``), so ``apply_chat_template`` works the same
whatever the source.

A GGUF file stores no ``tokenizer.json``, only llama.cpp's description of one: the vocabulary,
the merges, each token's type, and a *pre-tokenizer name* (``tokenizer.ggml.pre``) that stands
for the regular expressions llama.cpp splits text with before merging.  Byte-level BPE
vocabularies (GPT-2 style: SmolLM, Llama 3, Qwen 2) are rebuilt here directly from those
fields, with the pre-tokenizer each name means in llama.cpp (``PRE_TOKENIZERS``); anything else
(sentencepiece and unigram vocabularies, unknown pre-tokenizer names) goes through
transformers' own GGUF tokenizer converter, which reads the file again.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from .loaded_model import ModelLoadError

# llama.cpp's token types (llama_token_type in llama.cpp / gguf.TokenType)
_CONTROL, _USER_DEFINED = 3, 4


# ----- Hugging Face directories -------------------------------------------------------------
# Files any one of which makes a directory's tokenizer loadable by transformers.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt")


def has_hf_tokenizer(directory: Path) -> bool:
    """Whether a model directory ships a tokenizer (a checkpoint need not)."""
    return any((Path(directory) / f).is_file() for f in TOKENIZER_FILES)


def load_hf_tokenizer(directory: Path):
    """The tokenizer of a Hugging Face model directory (tokenizer.json + tokenizer_config.json),
    exactly as transformers loads it, offline."""
    from transformers import AutoTokenizer
    directory = Path(directory)
    if not has_hf_tokenizer(directory):
        raise ModelLoadError(f"{directory}: has no tokenizer (none of "
                             f"{', '.join(TOKENIZER_FILES)})")
    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types for broken tokenizer files
        raise ModelLoadError(f"{directory}: transformers cannot load its tokenizer: "
                             f"{type(e).__name__}: {e}") from None


def read_chat_template(directory: Path) -> Optional[str]:
    """The chat template of a model directory: ``chat_template.jinja`` or the
    ``chat_template`` key of ``tokenizer_config.json``; None if it has none."""
    directory = Path(directory)
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = directory / "tokenizer_config.json"
    if config.is_file():
        try:
            template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        except ValueError as e:
            raise ModelLoadError(f"{config}: not valid JSON: {e}") from None
        if isinstance(template, str):
            return template
    return None


# ----- GGUF metadata --------------------------------------------------------------------------
# The Llama 3 split, from llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 (also in Llama 3's tokenizer.json)
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen 2's split, from llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 (digits one by one)
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2_pre_tokenizer():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _smollm_pre_tokenizer():
    # llama.cpp: LLAMA_VOCAB_PRE_TYPE_SMOLLM = split digits one by one, then the GPT-2 regex;
    # SmolLM's own tokenizer.json spells the same thing as Digits + ByteLevel.
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                    _gpt2_pre_tokenizer()])


def _split_then_bytes(regex: str):
    def build():
        from tokenizers import Regex, pre_tokenizers
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    return build


# tokenizer.ggml.pre → (pre-tokenizer builder, ignore_merges).  ignore_merges: a word that is a
# whole vocabulary entry is taken as is (Llama 3 and llama.cpp's llama3 pre type do this).
PRE_TOKENIZERS = {
    "default": (_gpt2_pre_tokenizer, False),
    "gpt-2": (_gpt2_pre_tokenizer, False),
    "gpt2": (_gpt2_pre_tokenizer, False),
    "smollm": (_smollm_pre_tokenizer, False),
    "llama-bpe": (_split_then_bytes(_LLAMA3_SPLIT), True),
    "llama3": (_split_then_bytes(_LLAMA3_SPLIT), True),
    "qwen2": (_split_then_bytes(_QWEN2_SPLIT), False),
}


def gguf_tokenizer(metadata: dict, path: Path):
    """The tokenizer a GGUF file describes; ``metadata`` maps its keys to Python values."""
    model = metadata.get("tokenizer.ggml.model")
    if model is None:
        raise ModelLoadError(f"{path}: has no tokenizer (no tokenizer.ggml.model metadata)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if model == "gpt2" and pre in PRE_TOKENIZERS:
        return _byte_level_bpe(metadata, pre)
    return _transformers_gguf_tokenizer(path)


def _byte_level_bpe(metadata: dict, pre: str):
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
    build_pre, ignore_merges = PRE_TOKENIZERS[pre]
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges,
                     fuse_unk=False, byte_fallback=False, ignore_merges=ignore_merges)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = build_pre()
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|endoftext|>) must match whole in text, never be split.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == _CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == _USER_DEFINED])

    def token(key):
        i = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    single = ([f"{bos}:0"] if add_bos else []) + ["$A:0"] + ([f"{eos}:0"] if add_eos else [])
    specials = [(t, tokens.index(t)) for t in {bos, eos} if t is not None]
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=" ".join(single), special_tokens=specials)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"))


def _transformers_gguf_tokenizer(path: Path):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name,
                                             local_files_only=True)
    except Exception as e:  # transformers raises ValueError/KeyError/... for what it can't convert
        raise ModelLoadError(f"{path}: cannot build its tokenizer: {type(e).__name__}: "
                             f"{e}") from None
