"""Host (Python) time per engine step, without a model: the runtime's own overhead.

On the GPU the decode step of a large batch is a CUDA graph replay of a few milliseconds;
everything the runtime does on the CPU around it (schedule, pack the batch, sample, update
sequences, retire) adds to every step unless it overlaps.  This benchmark runs
:class:`~irlm.runtime.llm_engine.LLMEngine` over a runner that computes nothing (it returns
precomputed logits of a small vocabulary, so sampling's device work is negligible) and
reports milliseconds per step of each part, for a steady decode batch of ``--batch``
sequences: the cost that a faster GPU step cannot hide.

    python benchmarks/host_overhead.py [--batch 512] [--steps 50] [--vocab 256] [--async-decode]

``--async-decode``: the engine's overlapped decode (on by default for GPU engines), whose host
work per step runs while the device computes: here nothing overlaps it, so the figure is what
the GPU step must exceed for that work to be hidden.
"""
from __future__ import annotations

import argparse
import collections
import time

import torch


class NullRunner:
    """A ModelRunner that returns fixed random logits: no model, no device work."""

    def __init__(self, vocab: int, rows: int, block_size: int = 16, num_blocks: int = 65536):
        self.vocab_size, self.block_size, self.num_blocks = vocab, block_size, num_blocks
        self.max_model_len = 4096
        g = torch.Generator().manual_seed(0)
        self._logits = torch.randn(rows, vocab, generator=g)

    def step(self, batch):
        return self._logits[:len(batch)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--async-decode", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    import irlm.runtime.llm_engine as E
    from irlm.runtime import SamplingParams
    from irlm.runtime.llm_engine import LLMEngine

    runner = NullRunner(args.vocab, args.batch)
    eng = LLMEngine(runner, None, max_num_tokens=args.batch * args.prompt,
                    max_batch_size=args.batch, max_waiting=args.batch + 1,
                    enable_prefix_caching=False, async_decode=args.async_decode)
    times = collections.defaultdict(float)

    def timed(name, fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                times[name] += time.perf_counter() - t
        return wrapper
    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    eng._sample = timed("sample + update sequences", eng._sample)
    pack = E.StepBatch.pack
    E.StepBatch.pack = timed("pack batch", pack)
    g = torch.Generator().manual_seed(1)
    params = SamplingParams(max_tokens=args.steps + 10, temperature=0.0, ignore_eos=True)
    for _ in range(args.batch):
        eng.add_request(torch.randint(0, args.vocab, (args.prompt,), generator=g).tolist(),
                        params)
    while eng.num_steps < 3:                      # the prefill and a few decode steps
        eng.step()
    times.clear()
    t = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    total = (time.perf_counter() - t) / args.steps * 1e3
    E.StepBatch.pack = pack
    mode = "async decode" if args.async_decode else "synchronous"
    print(f"batch {args.batch}, vocab {args.vocab}, {mode}: {total:.2f} ms host time per "
          f"decode step")
    for k, v in times.items():
        print(f"  {k}: {v / args.steps * 1e3:.2f} ms")
    print(f"  rest (step bookkeeping, commit): "
          f"{total - sum(times.values()) / args.steps * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
