"""Small, seeded stand-ins for tests, examples and docs: a byte-level BPE tokenizer trained
in-process and a tiny random-weight Llama (fp32, CPU), so nothing needs a model hub."""
from __future__ import annotations

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Paged attention reads keys and values "
    "through block tables, and the scheduler packs prompts and decodes into one batch.",
    "Café crème brûlée, naïve façade, jalapeño piñata: ünïcödé text in UTF-8. 日本語のテキスト。",
    "In the beginning was the word, and the word was with the compiler, and the compiler "
    "lowered the word into kernels.",
    "<|user|> hello there <|assistant|> general kenobi <|end|>",
]


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE ``PreTrainedTokenizerFast`` with ``<s>`` (id 0) and ``</s>`` (id 1).
    Byte-level, so characters outside the corpus split into several tokens: the case that
    incremental detokenization must get right."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_llama(vocab_size: int, *, seed: int = 0, layers: int = 2, hidden: int = 64,
               heads: int = 4, kv_heads: int = 2, max_len: int = 512,
               initializer_range: float = 0.2, eos_token_id: int = 1):
    """A seeded random-weight ``LlamaForCausalLM`` in fp32, in eval mode.  The large
    initializer makes logits peaky, so greedy choices are not decided by rounding noise."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=max_len,
                      initializer_range=initializer_range, bos_token_id=0,
                      eos_token_id=eos_token_id, pad_token_id=None, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    return model.eval()


class HistoryHashRunner:
    """A model-free :class:`~irlm.runtime.model_runner.ModelRunner` for fast property tests.

    Its "KV cache" is the token id written at each position through the block tables; a row's
    logits are a pseudo-random vector seeded by the whole history read back through the
    tables.  So, like a real model over a paged cache, a wrong table, a block freed too early
    or a wrong share changes the logits, yet a step costs microseconds."""

    def __init__(self, vocab_size: int = 64, *, block_size: int = 4, num_blocks: int = 64,
                 max_model_len: int = 256):
        import torch

        self.vocab_size, self.block_size = vocab_size, block_size
        self.num_blocks, self.max_model_len = num_blocks, max_model_len
        self.pool = torch.full((num_blocks, block_size), -1, dtype=torch.int64)

    def step(self, batch):
        import torch

        out, start = [], 0
        for n, c, table in zip(batch.q_lens.tolist(), batch.cached_lens.tolist(),
                               batch.block_tables.tolist()):
            for i, token in enumerate(batch.input_ids[start:start + n].tolist()):
                pos = c + i
                self.pool[table[pos // self.block_size], pos % self.block_size] = token
            history = tuple(int(self.pool[table[p // self.block_size], p % self.block_size])
                            for p in range(c + n))
            g = torch.Generator().manual_seed(hash(history) % 2**62)
            out.append(torch.randn(self.vocab_size, generator=g) * 3)
            start += n
        return torch.stack(out)
