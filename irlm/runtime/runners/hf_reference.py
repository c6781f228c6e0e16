"""Model runners over a Hugging Face causal LM, for tests and for checking engines.

:class:`ReferenceRunner` really uses the paged KV cache: every key and value it attends over
comes out of its pool through the step's block tables, and every new one goes back in through
them.  So a wrong block table, a block freed too early or a wrong prefix-sharing decision in
the runtime gives wrong logits, which is what makes it a test of the block manager and the
scheduler, not just of the model.

:class:`RecomputeRunner` keeps no keys or values at all: it recomputes the whole sequence every
step (the oracle that the KV path must match).  It still has to know each sequence's earlier
tokens, and the step interface only carries new ones, so it remembers the token id at each
cached position in a ``[num_blocks, block_size]`` pool, addressed through the block tables.
"""
from __future__ import annotations

import torch

from ...errors import IRLMError
from ..model_runner import StepBatch


class _HFRunner:
    """What both runners share: the model, the sizes, slicing a batch into rows."""

    def __init__(self, model, *, block_size: int = 16, num_blocks: int = 256,
                 max_model_len: int | None = None):
        cfg = model.config.get_text_config(decoder=True)
        self.model = model.eval()
        self.config = cfg
        self.device = next(model.parameters()).device
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.block_size, self.num_blocks = block_size, num_blocks
        self.max_model_len = max_model_len or int(cfg.max_position_embeddings)

    def _rows(self, batch: StepBatch):
        """(row, new token ids [n], cached_len, positions [n], block table) per row."""
        q_lens = batch.q_lens.tolist()
        cached = batch.cached_lens.tolist()
        start = 0
        for r, (n, c) in enumerate(zip(q_lens, cached)):
            ids = batch.input_ids[start:start + n].to(self.device)
            pos = batch.positions[start:start + n].to(self.device)
            if n < 1 or pos[0].item() != c:
                raise IRLMError(f"step row {r}: q_len {n} / positions do not start at "
                                f"cached_len {c}")
            yield r, ids, c, pos, batch.block_tables[r].to(self.device).long()
            start += n

    def _slots(self, table: torch.Tensor, start: int, stop: int):
        """(block, offset) of positions [start, stop) through a block table."""
        pos = torch.arange(start, stop, device=self.device)
        return table[pos // self.block_size], pos % self.block_size


class ReferenceRunner(_HFRunner):
    """Runs each row through the HF model with ``past_key_values`` gathered from a paged pool
    ``[layers, num_blocks, 2, block_size, kv_heads, head_dim]``, then scatters the row's new
    keys and values back into the pool."""

    def __init__(self, model, *, block_size: int = 16, num_blocks: int = 256,
                 max_model_len: int | None = None):
        super().__init__(model, block_size=block_size, num_blocks=num_blocks,
                         max_model_len=max_model_len)
        cfg = self.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        dtype = next(model.parameters()).dtype
        self.kv_pool = torch.zeros(cfg.num_hidden_layers, num_blocks, 2, block_size, kv_heads,
                                   head_dim, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def step(self, batch: StepBatch) -> torch.Tensor:
        from transformers import DynamicCache

        pool = self.kv_pool
        out = []
        for _r, ids, c, pos, table in self._rows(batch):
            cache = DynamicCache(config=self.config)
            if c:
                blocks, offsets = self._slots(table, 0, c)
                for layer in range(pool.shape[0]):
                    # pool[layer, blocks, kv, offsets]: [c, kv_heads, d] -> HF's [1, kv_heads, c, d]
                    k = pool[layer, blocks, 0, offsets].transpose(0, 1)[None]
                    v = pool[layer, blocks, 1, offsets].transpose(0, 1)[None]
                    cache.update(k, v, layer)
            logits = self.model(ids[None], position_ids=pos[None], past_key_values=cache,
                                use_cache=True, logits_to_keep=1).logits
            blocks, offsets = self._slots(table, c, c + ids.shape[0])
            for layer, cache_layer in enumerate(cache.layers):
                pool[layer, blocks, 0, offsets] = cache_layer.keys[0, :, c:].transpose(0, 1)
                pool[layer, blocks, 1, offsets] = cache_layer.values[0, :, c:].transpose(0, 1)
            out.append(logits[0, -1])
        return torch.stack(out).float()


class RecomputeRunner(_HFRunner):
    """Recomputes every row's whole history each step; no keys or values are kept."""

    def __init__(self, model, *, block_size: int = 16, num_blocks: int = 256,
                 max_model_len: int | None = None):
        super().__init__(model, block_size=block_size, num_blocks=num_blocks,
                         max_model_len=max_model_len)
        self.token_pool = torch.full((num_blocks, block_size), -1, dtype=torch.int64,
                                     device=self.device)

    @torch.inference_mode()
    def step(self, batch: StepBatch) -> torch.Tensor:
        out = []
        for _r, ids, c, _pos, table in self._rows(batch):
            n = ids.shape[0]
            self.token_pool[self._slots(table, c, c + n)] = ids
            history = self.token_pool[self._slots(table, 0, c + n)]
            out.append(self.model(history[None], logits_to_keep=1).logits[0, -1])
        return torch.stack(out).float()
